import json
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, TINY
from vlfast.trainer import TrainConfig, load_config, make_dataset


def run(*args, processes=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    return subprocess.run([sys.executable, *launcher, "train.py", *args], cwd=ROOT, capture_output=True, text=True)


def failure(result) -> str:
    """What a failed run printed: each rank's last lines (torchrun prefixes them [rankN]:; any rank
    may be the first to fail), then the end of stderr."""
    ranks = {}
    for line in result.stderr.splitlines():
        if line.startswith("[rank"):
            ranks.setdefault(line.split("]")[0], []).append(line)
    return "\n".join(line for lines in ranks.values() for line in lines[-25:]) + "\n...\n" + result.stderr[-2000:]


def losses_in_order(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return {line["step"]: line for line in losses_in_order(out)}


def comparable_weights(checkpoint):
    """A checkpoint's floating-point weights less the attention key biases: their gradient is 0
    in exact arithmetic (softmax is shift-invariant), so AdamW turns whatever rounding noise they
    get into full-size steps, which differ between two runs that round differently."""
    weights = {}
    for name, value in torch.load(checkpoint, weights_only=True)["model"].items():
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()) or name.endswith("key.bias"):
            continue
        if name.endswith("qkv.bias"):
            width = value.shape[0] // 3
            value = torch.cat([value[:width], value[2 * width:]])
        weights[name] = value
    return weights


def assert_same_weights(got_checkpoint, want_checkpoint):
    """Tight enough to see a learning rate frozen at a recorded step (1e-4 per step in TINY)."""
    got, want = comparable_weights(got_checkpoint), comparable_weights(want_checkpoint)
    assert got.keys() == want.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run("--out", str(straight), *TINY, "data.num_workers=0").returncode == 0  # loader workers change nothing
    first = run("--out", str(split), "--stop-after", "3", *TINY)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "next: python train.py --resume" in first.stdout
    with open(split / "metrics.jsonl", "a") as file:  # as if it had crashed after its checkpoint, mid-line
        file.write(json.dumps({"step": 3, "loss": 99.0}) + '\n{"step": 4, "lo')
    second = run("--out", str(split), "--resume", str(split / "last.pt"))  # the checkpoint's config: TINY
    assert second.returncode == 0, second.stderr[-2000:]
    assert "next: python retrieve.py --checkpoint" in second.stdout
    lines = losses_in_order(split)
    assert [line["step"] for line in lines] == list(range(6))  # each step once: the crashed run's lines are gone
    want = losses(straight)
    for line in lines:
        assert line == want[line["step"]], line["step"]
    again = run("--out", str(straight), *TINY)  # a new run in a used folder starts a new log
    assert again.returncode == 0 and [line["step"] for line in losses_in_order(straight)] == list(range(6))
    assert (split / "loss.png").exists()


def test_queue_itc_run_resumes_with_its_queue(tmp_path):
    """ALBEF's ITC in train.py (model.itc_queue, itc_alpha): the queue and its write position are in
    the checkpoint, so a stopped and resumed run equals an uninterrupted one."""
    queue = ["model.itc_queue=5", "model.itc_alpha=0.4", "model.itc_alpha_warmup=3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run("--out", str(straight), *TINY, *queue).returncode == 0
    first = run("--out", str(split), "--stop-after", "3", *TINY, *queue)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run("--out", str(split), "--resume", str(split / "last.pt"))
    assert second.returncode == 0, second.stderr[-2000:]
    want = losses(straight)
    for line in losses_in_order(split):
        assert line == want[line["step"]], line["step"]
    got, expected = (torch.load(out / "last.pt", weights_only=True)["model"] for out in (split, straight))
    assert int(got["itc_queue.ptr"]) == 6 * 4 % 5 and torch.equal(got["itc_queue.ids"], expected["itc_queue.ids"])
    torch.testing.assert_close(got["itc_queue.image"], expected["itc_queue.image"], rtol=1e-4, atol=1e-6)


def test_a_stopped_and_resumed_torchrun_run_equals_an_uninterrupted_one(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*TINY, "optim.batch_size=2", "optim.max_steps=4"]
    result = run("--out", str(straight), *common, processes=2)
    assert result.returncode == 0, failure(result)
    result = run("--out", str(split), "--stop-after", "2", *common, processes=2)
    assert result.returncode == 0, failure(result)
    result = run("--out", str(split), "--resume", str(split / "last.pt"), *common, processes=2)
    assert result.returncode == 0, failure(result)
    want, got = losses(straight), losses(split)
    assert sorted(got) == list(range(4))
    for step in range(4):
        assert got[step] == want[step], step
    single = run("--out", str(tmp_path / "one"), "--resume", str(split / "last.pt"), *common)  # other world size
    assert single.returncode == 0 and "written by 2 processes, this run has 1" in single.stdout, single.stderr[-3000:]


def test_a_non_finite_loss_stops_the_run_with_its_step(tmp_path):
    result = run("--out", str(tmp_path), *TINY, "optim.lr=1e30")  # step 0's update blows the weights up
    assert result.returncode != 0
    assert "FloatingPointError: step 1: non-finite loss" in result.stderr, result.stderr[-2000:]
    assert "last good checkpoint: none yet" in result.stderr
    assert [line["step"] for line in losses(tmp_path).values()] == [0]  # nothing logged from the bad step


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal; test_cuda_graph_* run it on a GPU")
def test_cuda_graph_needs_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("VLFAST_REFERENCE_OPS", "itc_loss")  # the run's environment: named in the refusal
    result = run("--out", str(tmp_path), *TINY, "cuda_graph=true")
    assert result.returncode != 0
    assert "cuda_graph=true records the step of one process on a GPU" in result.stderr, result.stderr[-2000:]
    assert "this run: cpu, 1 processes, image_id_positives=False, itc_loss reference" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="reads the backend from the CPU's refusal of cuda_graph")
@pytest.mark.parametrize("ops, environment, runs", [(None, "reference", "reference"), ("auto", "reference", "auto"),
                                                    (None, None, "auto")])
def test_ops_defaults_to_the_environments_backend(tmp_path, monkeypatch, ops, environment, runs):
    if environment:  # else none: conftest clears the shell's
        monkeypatch.setenv("VLFAST_BACKEND", environment)
    result = run("--out", str(tmp_path), *(["--ops", ops] if ops else []), *TINY, "cuda_graph=true")
    assert f"itc_loss {runs}" in result.stderr, result.stderr[-2000:]


def test_a_cuda_graph_checkpoint_resumes_without_one(tmp_path):
    # Its optimizer was saved capturable with a tensor learning rate (what cuda_graph=true sets):
    # made so here by hand, as a CPU cannot record a graph.
    assert run("--out", str(tmp_path), "--stop-after", "2", *TINY).returncode == 0
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["capturable"], group["lr"] = True, torch.tensor(group["lr"])
    torch.save(state, tmp_path / "graphed.pt")
    result = run("--out", str(tmp_path), "--resume", str(tmp_path / "graphed.pt"), *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(losses(tmp_path)) == list(range(6))


@pytest.mark.cuda
def test_cuda_graph_run_resumes_exactly_and_follows_the_eager_run(tmp_path):
    graph, split, eager = tmp_path / "graph", tmp_path / "split", tmp_path / "eager"
    common = [*TINY, "data.max_text_length=10"]  # every synthetic caption is longer: both runs see 10 tokens
    for out, extra in ((graph, []), (split, ["--stop-after", "3"]), (eager, [])):
        result = run("--out", str(out), *extra, *common, *([] if out == eager else ["cuda_graph=true"]))
        assert result.returncode == 0, result.stderr[-3000:]
    result = run("--out", str(split), "--resume", str(split / "last.pt"), *common, "cuda_graph=true")
    assert result.returncode == 0, result.stderr[-3000:]
    want, got, reference = losses(graph), losses(split), losses(eager)
    assert sorted(got) == list(range(6))
    for step in range(6):
        assert got[step] == want[step], step  # replays after a resume draw and update as the first run did
        for name, value in reference[step].items():  # the eager run: same draws, same updates
            assert want[step][name] == pytest.approx(value, rel=1e-3, abs=1e-4), (step, name)
    # The eager run's AdamW reads a float learning rate, the graphed run's a GPU tensor: the
    # same step up to rounding, which the key biases would amplify.
    assert_same_weights(graph / "last.pt", eager / "last.pt")


@pytest.mark.parametrize("override, message", [
    ("optim.batch_sise=4", "unknown config key optim.batch_sise"),
    ("optim.log_every=0", "optim.log_every must be at least 1, got 0"),
    ("optim.checkpoint_every=0", "optim.checkpoint_every must be at least 1, got 0"),
    ("optim.max_steps=0", "optim.max_steps must be at least 1, got 0"),
    ("optim.eval_every=-1", "optim.eval_every must be at least 0, got -1"),
    ("optim.lr=.nan", "optim.lr must be a finite number >= 0, got nan"),
    ("optim.min_lr=-1e-5", "optim.min_lr must be a finite number >= 0, got -1e-05"),
])
def test_bad_config_stops_before_training(tmp_path, override, message):
    result = run("--out", str(tmp_path), override)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_names_a_missing_checkpoint(tmp_path):
    result = run("--out", str(tmp_path), "--resume", str(tmp_path / "last.pt"))
    assert result.returncode == 2 and "--resume " + str(tmp_path / "last.pt") + ": no such file" in result.stderr


def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    # ITC only and no dropout: deterministic. 2 gloo processes × 2 rows (keys gathered across
    # them) against 1 process × 4 rows: the same losses and, after 3 steps, the same weights.
    common = [*TINY, "optim.max_steps=3", "model.objectives=[itc]", "model.text.dropout=0.0"]
    single = run("--out", str(tmp_path / "one"), *common, "optim.batch_size=4")
    assert single.returncode == 0, single.stderr[-2000:]
    double = run("--out", str(tmp_path / "two"), *common, "optim.batch_size=2", processes=2)
    assert double.returncode == 0, failure(double)
    want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step in range(3):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
    assert_same_weights(tmp_path / "two" / "last.pt", tmp_path / "one" / "last.pt")


def test_karpathy_data_and_pretrained_timm_and_hf_weights(tmp_path):
    from PIL import Image

    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    from vlfast.data import write_vocab

    (tmp_path / "images").mkdir()
    entries = []
    for i, colour in enumerate(["red", "green", "blue", "yellow", "purple", "white", "red", "blue"]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / "images" / f"{i}.jpg")
        entries.append({"image": f"{i}.jpg", "caption": f"a small {colour} square", "image_id": i // 2})
    # Four entries without an image file: served by the next entry, counted by the loader workers.
    entries += [{"image": f"missing{i}.jpg", "caption": "gone", "image_id": 9} for i in range(4)]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1,
                                                           num_heads=2, num_classes=5)
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    bert_dir = write_vocab(tmp_path / "bert")
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=len((bert_dir / "vocab.txt").read_text().split()), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=40))
    with torch.no_grad():  # LayerNorms away from 1/0, saved under the hub's legacy gamma/beta names
        for name, parameter in bert.named_parameters():
            if "LayerNorm" in name:
                parameter.add_(torch.randn_like(parameter))
    bert.save_pretrained(bert_dir)
    from safetensors.torch import load_file, save_file

    save_file({k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in load_file(bert_dir / "model.safetensors").items()}, bert_dir / "model.safetensors")

    result = run("--out", str(tmp_path / "run"), "data.dataset=karpathy", f"data.train_file={tmp_path / 'train.json'}",
                 f"data.image_root={tmp_path / 'images'}", f"init.vision={tmp_path / 'vit.pt'}", f"init.text={bert_dir}",
                 "model.vision.image_size=32", "model.vision.width=32", "model.vision.heads=2", "model.vision.depth=1",
                 "model.text.fusion_layer=1", "model.embed_dim=16", "optim.batch_size=4", "optim.max_steps=2",
                 "optim.warmup_steps=1", "optim.lr=0.0", "optim.min_lr=0.0", "data.num_workers=2")
    assert result.returncode == 0, failure(result)
    vision_line = next(line for line in result.stdout.splitlines() if line.startswith("vision weights from"))
    assert vision_line.endswith("loaded; no place in the model, skipped: head.bias, head.weight"), vision_line
    assert "unreadable images skipped" in result.stdout
    assert losses(tmp_path / "run")[1]["skipped_images"] > 0
    text_line = next(line for line in result.stdout.splitlines() if line.startswith("text weights from"))
    assert "12 LayerNorm gamma/beta renamed" in text_line and "kept as initialised: 10 fusion cross-attention" in text_line
    assert "skipped" not in text_line, text_line
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    torch.testing.assert_close(state["visual_encoder.blocks.0.attn.qkv.weight"], vit.blocks[0].attn.qkv.weight.detach())
    torch.testing.assert_close(state["text_encoder.bert.embeddings.word_embeddings.weight"],
                               bert.bert.embeddings.word_embeddings.weight.detach())
    torch.testing.assert_close(state["target.model.bert.encoder.layer.0.attention.self.query.weight"],
                               bert.bert.encoder.layer[0].attention.self.query.weight.detach())
    torch.testing.assert_close(state["text_encoder.bert.encoder.layer.1.output.LayerNorm.weight"],
                               bert.bert.encoder.layer[1].output.LayerNorm.weight.detach())


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(config):
    loaded = load_config(TrainConfig, config)
    assert loaded.data.dataset in ("synthetic", "karpathy", "pretrain", "shards")


def test_pretrain_corpus_trains_and_evaluates_on_karpathy_files(tmp_path):
    config = load_config(TrainConfig, ROOT / "configs" / "4m.yaml")
    with pytest.raises(ValueError, match="needs data.pretrain_files"):
        make_dataset(config, "train")
    with pytest.raises(ValueError, match="data.dataset=pretrain needs data.test_file and data.image_root"):
        make_dataset(config, "test")
    (tmp_path / "a.json").write_text(json.dumps([{"image": "x.jpg", "caption": ["one", "two"]}]))
    (tmp_path / "b.json").write_text(json.dumps([{"image": "y.jpg", "caption": "three"}]))
    (tmp_path / "test.json").write_text(json.dumps([{"image": "x.jpg", "caption": ["one"]}]))
    config = load_config(TrainConfig, ROOT / "configs" / "4m.yaml",
                               [f"data.pretrain_files=[{tmp_path / 'a.json'}, {tmp_path / 'b.json'}]",
                                f"data.test_file={tmp_path / 'test.json'}", f"data.image_root={tmp_path}"])
    assert len(make_dataset(config, "train")) == 2 and make_dataset(config, "test").split == "test"
