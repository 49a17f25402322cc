"""Weight compatibility with timm and Hugging Face, on small configs with weights made here."""
import json

import pytest
import torch

from vlfast.models import BertForMaskedLM, BertModel, TextConfig, VisionConfig, VisionTransformer, resample_pos_embed

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

SMALL_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


def small_timm_vit(num_classes=0, img_size=32):
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(**{**SMALL_VIT, "img_size": img_size}, num_classes=num_classes).eval()


def vit_config(num_classes=0, image_size=32):
    return VisionConfig(image_size=image_size, patch_size=8, width=48, depth=2, heads=3, num_classes=num_classes)


@pytest.mark.parametrize("num_classes", [0, 10])
def test_timm_state_dict_loads_strictly_and_features_match(num_classes):
    reference = small_timm_vit(num_classes)
    ours = VisionTransformer(vit_config(num_classes)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(images), reference.forward_features(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(images), reference(images), rtol=1e-5, atol=1e-5)
    assert ours.state_dict().keys() == reference.state_dict().keys()


def test_position_embeddings_are_resampled_for_another_resolution():
    reference = small_timm_vit(img_size=32)  # 4×4 patches
    ours = VisionTransformer(vit_config(image_size=48)).eval()  # 6×6 patches
    ours.load_state_dict(reference.state_dict(), strict=True)
    want = resample_pos_embed(reference.pos_embed.detach(), 6)
    torch.testing.assert_close(ours.pos_embed.detach(), want)
    assert ours.pos_embed.shape == (1, 37, 48)
    torch.testing.assert_close(ours.pos_embed[:, 0], reference.pos_embed[:, 0])  # [CLS] kept
    # timm's resampler agrees when it interpolates as ALBEF does (bicubic without antialiasing).
    timm_resampled = timm.layers.resample_abs_pos_embed(reference.pos_embed.detach(), (6, 6), num_prefix_tokens=1,
                                                        antialias=False)
    torch.testing.assert_close(want, timm_resampled, rtol=1e-5, atol=1e-5)


def test_masked_forward_encodes_the_visible_patches():
    ours = VisionTransformer(vit_config()).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, masking = ours.forward_masked(images, 0.75, generator=torch.Generator().manual_seed(0))
        assert tokens.shape == (2, 1 + 4, 48) and masking.ids_keep.shape == (2, 4)
        # The same as running the blocks on [CLS] + the kept patches with their position embeddings.
        patches = ours.patch_embed(images) + ours.pos_embed[:, 1:]
        kept = torch.gather(patches, 1, masking.ids_keep[..., None].expand(-1, -1, 48))
        cls = (ours.cls_token + ours.pos_embed[:, :1]).expand(2, -1, -1)
        torch.testing.assert_close(tokens, ours._encode(torch.cat([cls, kept], dim=1)))
        torch.testing.assert_close(ours.forward_masked(images, 0.0, generator=torch.Generator().manual_seed(0))[0][:, 0],
                                   ours.forward_features(images)[:, 0], rtol=1e-5, atol=1e-5)


def hf_config(layers):
    return transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=40, attn_implementation="eager")


def test_hf_masked_lm_state_dict_loads_and_text_mode_matches():
    torch.manual_seed(1)
    reference = transformers.BertForMaskedLM(hf_config(layers=2)).eval()
    ours = BertForMaskedLM(TextConfig.from_hf(reference.config, depth=4, fusion_layer=2, encoder_width=48)).eval()
    result = ours.load_state_dict(reference.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".crossattention." in k or ".layer.2." in k or ".layer.3." in k
                                       for k in result.missing_keys)
    input_ids = torch.randint(0, 97, (3, 11))
    attention_mask = (torch.arange(11)[None, :] < torch.tensor([[11], [6], [3]])).long()
    with torch.no_grad():
        want = reference.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        torch.testing.assert_close(ours.bert(input_ids, attention_mask, mode="text"), want, rtol=1e-5, atol=1e-5)
        want_logits = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        torch.testing.assert_close(ours(input_ids, attention_mask, mode="text"), want_logits, rtol=1e-5, atol=1e-5)


def test_full_depth_text_encoder_matches_hf_bert_model():
    torch.manual_seed(2)
    reference = transformers.BertModel(hf_config(layers=3), add_pooling_layer=False).eval()
    ours = BertModel(TextConfig.from_hf(reference.config, fusion_layer=3)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    input_ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids), reference(input_ids=input_ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_fusion_mode_cross_attends_to_image_tokens():
    torch.manual_seed(3)
    model = BertModel(TextConfig(vocab_size=50, width=64, depth=3, heads=4, intermediate=128, max_positions=20,
                                 fusion_layer=1, encoder_width=48)).eval()
    input_ids = torch.randint(0, 50, (2, 7))
    image = torch.randn(2, 5, 48)
    with torch.no_grad():
        text = model(input_ids, mode="text")
        fused = model(mode="fusion", states=text, context=image)
        other = model(mode="fusion", states=text, context=torch.randn(2, 5, 48))
    assert fused.shape == (2, 7, 64) and not torch.allclose(fused, other)
    assert sum(1 for layer in model.encoder.layer if layer.crossattention is not None) == 2
    with pytest.raises(ValueError, match="mode='fusion' needs states"):
        model(mode="fusion", states=text)
    with pytest.raises(ValueError, match="mode must be 'text' or 'fusion'"):
        model(input_ids, mode="multimodal")


def test_config_from_a_local_hf_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config(layers=2).to_dict()))
    config = TextConfig.from_hf(tmp_path, fusion_layer=1)
    assert (config.width, config.depth, config.heads, config.vocab_size, config.fusion_layer) == (64, 2, 4, 97, 1)
    with pytest.raises(ValueError, match="only hidden_act='gelu'"):
        TextConfig.from_hf({**hf_config(2).to_dict(), "hidden_act": "relu"})
