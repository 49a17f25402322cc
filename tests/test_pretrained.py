"""vlfast.models.pretrained on small files written here: Hugging Face BERT folders in the hub's
legacy layout (LayerNorm gamma/beta), timm and DeiT ViT files in their usual wrappers."""
import json
import re

import pytest
import torch

from vlfast.models import BertForMaskedLM, TextConfig, VisionConfig, VisionTransformer, resample_pos_embed
from vlfast.models.pretrained import load_text_weights, load_vision_weights

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402 (installed with transformers)


def randomized(model):
    """Every parameter random: LayerNorms start at 1/0, which a skipped load would leave equal."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    return model.eval()


def hf_bert(kind="BertForMaskedLM", **config):
    torch.manual_seed(0)
    return randomized(getattr(transformers, kind)(transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40, attn_implementation="eager", **config)))


def legacy(state: dict) -> dict:
    """The names of the hub's bert-base-uncased files."""
    return {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v.clone()
            for k, v in state.items()}


def write_folder(model, folder, form="safetensors", edit=legacy):
    """A saved HF folder, its weights passed through ``edit``: model.safetensors, pytorch_model.bin
    (the whole state dict, tied names included, as transformers 4 wrote it) or sharded safetensors."""
    model.save_pretrained(folder, max_shard_size="20KB" if form == "sharded" else "5GB")
    if form == "bin":
        (folder / "model.safetensors").unlink()
        torch.save(edit(model.state_dict()), folder / "pytorch_model.bin")
    elif form == "safetensors":
        save_file(edit(load_file(folder / "model.safetensors")), folder / "model.safetensors", metadata={"format": "pt"})
    else:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        for shard in set(index["weight_map"].values()):
            save_file(edit(load_file(folder / shard)), folder / shard, metadata={"format": "pt"})
        index["weight_map"] = {name: shard for old, shard in index["weight_map"].items()
                               for name in edit({old: torch.zeros(0)})}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def ours_for(folder, **overrides):
    return BertForMaskedLM(TextConfig.from_hf(folder, **{"fusion_layer": 1, "encoder_width": 48, **overrides})).eval()


@pytest.mark.parametrize("form", ["safetensors", "bin", "sharded"])
@pytest.mark.parametrize("kind", ["BertModel", "BertForMaskedLM", "BertForPreTraining"])
def test_hf_bert_folder_with_legacy_names_loads_completely(tmp_path, kind, form):
    source = hf_bert(kind)
    write_folder(source, tmp_path, form)
    assert not any(k.endswith("LayerNorm.weight") for k in
                   (load_file(tmp_path / "model.safetensors") if form == "safetensors" else
                    torch.load(tmp_path / "pytorch_model.bin") if form == "bin" else {}))
    ours = ours_for(tmp_path)
    summary = load_text_weights(ours, tmp_path)

    has_head = kind != "BertModel"
    assert f"{12 if has_head else 10} LayerNorm gamma/beta renamed" in summary
    assert "kept as initialised: 10 fusion cross-attention weights" in summary  # layer 1's
    assert ("MLM head weights" in summary) != has_head
    want = {("" if has_head else "bert.") + k: v for k, v in source.state_dict().items()}
    layer_norms = [k for k in ours.state_dict() if "LayerNorm" in k and "crossattention" not in k and k in want]
    assert len(layer_norms) == (12 if has_head else 10)
    for key in layer_norms:
        assert not torch.all(want[key] == float(key.endswith("weight")))
        torch.testing.assert_close(ours.state_dict()[key], want[key], rtol=0, atol=0, msg=key)

    bert = source if kind == "BertModel" else source.bert
    input_ids = torch.randint(0, 97, (3, 11))
    attention_mask = (torch.arange(11)[None, :] < torch.tensor([[11], [6], [3]])).long()
    with torch.no_grad():
        reference = bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        text = ours.bert(input_ids, attention_mask, mode="text")  # layers [0, fusion_layer = 1)
        torch.testing.assert_close(text, reference.hidden_states[1], rtol=1e-5, atol=1e-5)
        if has_head:
            torch.testing.assert_close(ours.cls.predictions(text), source.cls.predictions(text), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.cls.predictions.decoder.weight, bert.embeddings.word_embeddings.weight)
    skipped = summary.partition("skipped: ")[2]
    assert ("bert.pooler.dense.weight" in skipped) == (kind != "BertForMaskedLM")
    assert ("cls.seq_relationship.weight" in skipped) == (kind == "BertForPreTraining")


def test_transformers_reads_the_legacy_folder_as_vlfast_does(tmp_path):
    source = hf_bert()
    write_folder(source, tmp_path)
    reference = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    ours = ours_for(tmp_path, fusion_layer=2)
    load_text_weights(ours, tmp_path)
    input_ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids), reference(input_ids=input_ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(input_ids), source(input_ids=input_ids).logits, rtol=1e-5, atol=1e-5)


def test_missing_weight_fails_naming_it(tmp_path):
    write_folder(hf_bert(), tmp_path, edit=lambda s: {k: v for k, v in legacy(s).items()
                                                      if k != "bert.encoder.layer.0.output.dense.weight"})
    with pytest.raises(ValueError, match="missing from the checkpoint: bert.encoder.layer.0.output.dense.weight$"):
        load_text_weights(ours_for(tmp_path), tmp_path)


def test_partial_mlm_head_fails(tmp_path):
    write_folder(hf_bert(), tmp_path, edit=lambda s: {k: v for k, v in legacy(s).items() if "transform.dense" not in k})
    with pytest.raises(ValueError, match="missing from the checkpoint: cls.predictions.transform.dense.weight, "
                                         "cls.predictions.transform.dense.bias"):
        load_text_weights(ours_for(tmp_path), tmp_path)


def test_shape_mismatch_fails_naming_key_and_shapes(tmp_path):
    write_folder(hf_bert(), tmp_path)
    with pytest.raises(ValueError, match=re.escape("bert.embeddings.word_embeddings.weight (97, 32) in the "
                                                   "checkpoint, (100, 32) in the model")):
        load_text_weights(ours_for(tmp_path, vocab_size=100), tmp_path)


def test_a_name_the_mapping_misses_fails(tmp_path):
    def renamed(state):
        state = legacy(state)
        state["bert.encoder.layer.0.output.LayerNorm.scale"] = state.pop("bert.encoder.layer.0.output.LayerNorm.gamma")
        return state
    write_folder(hf_bert(), tmp_path, edit=renamed)
    with pytest.raises(ValueError) as error:
        load_text_weights(ours_for(tmp_path), tmp_path)
    assert "missing from the checkpoint: bert.encoder.layer.0.output.LayerNorm.weight" in str(error.value)
    assert "matching no weight of the model: bert.encoder.layer.0.output.LayerNorm.scale" in str(error.value)


def test_extra_layers_fail(tmp_path):
    write_folder(hf_bert(), tmp_path)
    with pytest.raises(ValueError, match=r"matching no weight of the model: bert\.encoder\.layer\.1\."):
        load_text_weights(ours_for(tmp_path, depth=1, fusion_layer=1), tmp_path)


def test_weights_without_a_place_are_listed_once(tmp_path):
    def with_extras(state):
        return {**legacy(state), "bert.embeddings.position_ids": torch.arange(40)[None],
                "bert.pooler.dense.weight": torch.randn(32, 32), "bert.pooler.dense.bias": torch.randn(32),
                "cls.seq_relationship.weight": torch.randn(2, 32), "cls.seq_relationship.bias": torch.randn(2)}
    write_folder(hf_bert(), tmp_path, "bin", edit=with_extras)
    ours = ours_for(tmp_path)
    summary = load_text_weights(ours, tmp_path)
    assert summary.count("\n") == 0 and "pytorch_model.bin" in summary
    assert summary.endswith("skipped: bert.embeddings.position_ids, bert.pooler.dense.bias, bert.pooler.dense.weight, "
                            "cls.seq_relationship.bias, cls.seq_relationship.weight")


def test_untied_decoder_fails(tmp_path):
    source = hf_bert(tie_word_embeddings=False)
    assert not torch.equal(source.cls.predictions.decoder.weight, source.bert.embeddings.word_embeddings.weight)
    write_folder(source, tmp_path)
    with pytest.raises(ValueError, match="bert.embeddings.word_embeddings.weight and cls.predictions.decoder.weight "
                                         "are one tied weight in vlfast but differ"):
        load_text_weights(ours_for(tmp_path), tmp_path)


def test_folder_without_weights_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors, pytorch_model.bin"):
        load_text_weights(ours_for(write_folder(hf_bert(), tmp_path / "bert")), tmp_path)


def timm_vit(num_classes=5, distilled=False):
    torch.manual_seed(0)
    kind = timm.models.deit.VisionTransformerDistilled if distilled else timm.models.vision_transformer.VisionTransformer
    return randomized(kind(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=num_classes))


def vit(num_classes=0, image_size=32, width=48):
    return VisionTransformer(VisionConfig(image_size=image_size, patch_size=8, width=width, depth=2, heads=3,
                                          num_classes=num_classes)).eval()


def save_vit(state, path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


LAYOUTS = {"raw": lambda s: s, "model": lambda s: {"model": s, "epoch": 300},
           "state_dict": lambda s: {"state_dict": s, "state_dict_ema": {k: v + 1 for k, v in s.items()}, "epoch": 3},
           "ddp": lambda s: {f"module.{k}": v for k, v in s.items()},
           "ddp_model": lambda s: {"model": {f"module.{k}": v for k, v in s.items()}}}


@pytest.mark.parametrize("layout, suffix", [*((layout, ".pt") for layout in LAYOUTS),
                                            ("raw", ".safetensors"), ("ddp", ".safetensors")])  # flat files only
def test_timm_vit_file_loads_without_its_classifier(tmp_path, layout, suffix):
    reference = timm_vit()
    ours = vit()
    summary = load_vision_weights(ours, save_vit(LAYOUTS[layout](reference.state_dict()), tmp_path / f"vit{suffix}"))
    assert summary.endswith("no place in the model, skipped: head.bias, head.weight")
    assert (f"under '{layout}'" in summary) == (layout in ("model", "state_dict"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(images), reference.forward_features(images),
                                   rtol=1e-5, atol=1e-5)


def test_ema_weights_load_when_alone(tmp_path):
    reference = timm_vit()
    ema = {k: v * 2 for k, v in reference.state_dict().items()}
    ours = vit()
    assert "under 'state_dict_ema'" in load_vision_weights(ours, save_vit({"state_dict_ema": ema}, tmp_path / "v.pt"))
    torch.testing.assert_close(ours.blocks[1].mlp.fc2.weight.detach(), ema["blocks.1.mlp.fc2.weight"])


def test_classifier_loads_into_a_model_with_one(tmp_path):
    reference = timm_vit(num_classes=5)
    ours = vit(num_classes=5)
    summary = load_vision_weights(ours, save_vit(reference.state_dict(), tmp_path / "vit.pt"))
    assert "skipped" not in summary
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images), rtol=1e-5, atol=1e-5)


def test_missing_block_weight_fails(tmp_path):
    state = timm_vit().state_dict()
    del state["blocks.1.mlp.fc2.weight"]
    with pytest.raises(ValueError, match="missing from the checkpoint: blocks.1.mlp.fc2.weight$"):
        load_vision_weights(vit(), save_vit(state, tmp_path / "vit.pt"))


def test_vision_shape_mismatch_and_unknown_weight_fail(tmp_path):
    path = save_vit(timm_vit().state_dict(), tmp_path / "vit.pt")
    with pytest.raises(ValueError, match=re.escape("patch_embed.proj.weight (48, 3, 8, 8) in the checkpoint, "
                                                   "(60, 3, 8, 8) in the model")):
        load_vision_weights(vit(width=60), path)
    state = timm_vit().state_dict()
    state["norm_pre.weight"] = torch.ones(48)  # a CLIP-style ViT's: its features would differ without it
    with pytest.raises(ValueError, match="matching no weight of the model: norm_pre.weight$"):
        load_vision_weights(vit(), save_vit(state, tmp_path / "clip.pt"))


def test_position_embeddings_of_another_grid_are_resampled(tmp_path):
    reference = timm_vit()
    ours = vit(image_size=48)
    summary = load_vision_weights(ours, save_vit(reference.state_dict(), tmp_path / "vit.pt"))
    assert "pos_embed resampled from 16 to 36 patches" in summary
    torch.testing.assert_close(ours.pos_embed.detach(), resample_pos_embed(reference.pos_embed.detach(), 6))


def test_distilled_deit_loads_without_its_distillation_token(tmp_path):
    reference = timm_vit(distilled=True)
    assert reference.pos_embed.shape == (1, 2 + 16, 48)
    ours = vit()
    summary = load_vision_weights(ours, save_vit({"model": reference.state_dict()}, tmp_path / "deit.pth"))
    assert "distillation token's position embedding dropped" in summary
    assert summary.endswith("skipped: dist_token, head.bias, head.weight, head_dist.bias, head_dist.weight")
    pos = reference.pos_embed.detach()
    torch.testing.assert_close(ours.pos_embed.detach(), torch.cat([pos[:, :1], pos[:, 2:]], dim=1))
    for key, value in ours.state_dict().items():
        if key != "pos_embed":
            torch.testing.assert_close(value, reference.state_dict()[key], rtol=0, atol=0, msg=key)
