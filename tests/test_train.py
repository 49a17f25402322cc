import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.images=24", "data.image_size=32", "data.captions_per_image=1", "optim.batch_size=4",
        "optim.max_steps=6", "optim.warmup_steps=2", "optim.log_every=1", "optim.checkpoint_every=100",
        "model.vision.image_size=32", "model.vision.width=32", "model.vision.heads=2", "model.vision.depth=1",
        "model.text.width=32", "model.text.heads=2", "model.text.depth=2", "model.text.fusion_layer=1",
        "model.text.intermediate=64", "model.text.encoder_width=32", "model.embed_dim=16"]


def run(*args, processes=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    return subprocess.run([sys.executable, *launcher, "train.py", *args], cwd=ROOT, capture_output=True, text=True)


def losses(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines}


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run("--out", str(straight), *TINY).returncode == 0
    first = run("--out", str(split), "--stop-after", "3", *TINY)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "next: python train.py --resume" in first.stdout
    second = run("--out", str(split), "--resume", str(split / "last.pt"), *TINY)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "next: python retrieve.py --checkpoint" in second.stdout
    want, got = losses(straight), losses(split)
    assert sorted(got) == list(range(6))
    for step in range(6):
        assert got[step] == want[step], step
    assert (split / "loss.png").exists()


def test_bad_config_stops_before_training(tmp_path):
    result = run("--out", str(tmp_path), "optim.batch_sise=4")
    assert result.returncode == 2 and "unknown config key optim.batch_sise" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    # ITC only and no dropout: deterministic. 2 gloo processes × 2 rows (keys gathered across
    # them) against 1 process × 4 rows: the same losses and, after 3 steps, the same weights.
    common = [*TINY, "optim.max_steps=3", "model.objectives=[itc]", "model.text.dropout=0.0"]
    single = run("--out", str(tmp_path / "one"), *common, "optim.batch_size=4")
    assert single.returncode == 0, single.stderr[-2000:]
    double = run("--out", str(tmp_path / "two"), *common, "optim.batch_size=2", processes=2)
    assert double.returncode == 0, double.stderr[-3000:]
    want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step in range(3):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
    import torch
    weights_one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    weights_two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"]
    for name, value in weights_one.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            # atol 1e-5: the attention key bias has no gradient in exact arithmetic (softmax is
            # shift-invariant), and Adam scales the rounding noise it gets up to ~5e-6 steps.
            torch.testing.assert_close(weights_two[name], value, rtol=1e-4, atol=1e-5, msg=name)
