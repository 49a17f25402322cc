"""train.py on webdataset shards (data.dataset=shards) written from the synthetic set: 20 steps
that see every sample; a run killed with SIGKILL mid-epoch and resumed equals an uninterrupted
one; under torchrun --max-restarts=1 a rank killed makes torchrun restart the group, which resumes
from its last checkpoint by itself and ends as an uninterrupted run."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import ROOT, TINY
from vlfast.data.shards import stable_id, write_shards
from vlfast.data.synthetic import SyntheticImageText
from vlfast.trainer import TrainConfig, load_config

PER_SHARD = 6


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory):
    """TINY's 24 synthetic training pairs as PNG files and an ALBEF-format JSON, converted to 4
    shards of 6 (python -m vlfast.data.shards write); returns (the shard pattern, each key's caption)."""
    folder = tmp_path_factory.mktemp("shards")
    data = SyntheticImageText("train", images=24, image_size=32, captions_per_image=1)
    (folder / "images").mkdir()
    entries = []
    for index in range(len(data)):
        pixels = ((data[index]["image"].permute(1, 2, 0) * 40 + 110).clamp(0, 255)).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / "images" / f"{index}.png")
        entries.append({"image": f"{index}.png", "caption": data[index]["caption"]})
    (folder / "train.json").write_text(json.dumps(entries))
    result = subprocess.run([sys.executable, "-m", "vlfast.data.shards", "write", "--json", str(folder / "train.json"),
                             "--image-root", str(folder / "images"), "--out", str(folder / "out"), "--samples",
                             str(PER_SHARD)], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote 24 samples in 4 shards" in result.stdout and "0 unreadable images skipped" in result.stdout
    return str(folder / "out" / "{000000..000003}.tar"), {f"{i:09d}": entry["caption"] for i, entry in enumerate(entries)}


def shard_settings(pattern):
    return [*TINY, "data.dataset=shards", f"data.shards={pattern}", "data.shuffle_buffer=3"]


def test_twenty_steps_from_shards_see_every_sample(synthetic_shards, tmp_path, monkeypatch):
    from vlfast.trainer import loop, train

    pattern, captions = synthetic_shards
    config = load_config(TrainConfig, None, [*shard_settings(pattern), "optim.max_steps=20", "data.num_workers=0"])
    seen = []
    make_loader = loop.make_loader

    def recording_loader(*args, **kwargs):
        for batch in make_loader(*args, **kwargs):
            seen.extend(batch[3].tolist())
            yield batch

    monkeypatch.setattr(loop, "make_loader", recording_loader)
    train(config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 19 and all(math.isfinite(record["loss"]) for record in records)
    ids = {stable_id(key) for key in captions}
    assert set(seen[:24]) == ids  # the first epoch's 6 steps of 4: every sample once
    assert len(seen) >= 80 and set(seen) == ids


def run(*args, processes=1, **popen):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "--max-restarts=1"] \
        if processes > 1 else []
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # bit-identical runs (docs/training.md, "Seeds and threads")
    return subprocess.Popen([sys.executable, *launcher, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment, **popen)


def finish(process, timeout=600):
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def records(out: Path) -> dict:
    return {record["step"]: record for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def kill_after_checkpoint(process, out: Path, victim=lambda pid: pid, timeout=300):
    """SIGKILL ``victim(process.pid)`` once the run's first checkpoint is on disk (mid-epoch)."""
    deadline = time.time() + timeout
    while not (out / "last.pt").exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint"
        time.sleep(0.05)
    os.kill(victim(process.pid), signal.SIGKILL)


def test_a_run_killed_mid_epoch_resumes_as_if_never_stopped(synthetic_shards, tmp_path):
    pattern, _ = synthetic_shards
    settings = [*shard_settings(pattern), "optim.max_steps=16", "optim.checkpoint_every=5", "data.num_workers=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    finish(run("--out", str(straight), *settings))
    process = run("--out", str(killed), *settings)
    kill_after_checkpoint(process, killed)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    stopped_at = torch.load(killed / "last.pt", weights_only=False)["step"]
    assert 0 < stopped_at < 16 and stopped_at % 6, "mid-epoch: 6 steps of 4 samples per epoch"
    finish(run("--out", str(killed), "--resume", str(killed / "last.pt")))
    want, got = records(straight), records(killed)
    assert sorted(got) == list(range(16))
    for step in range(16):
        assert got[step] == want[step], step


def _torchrun_rank(agent: int) -> int:
    """A rank process of the torchrun agent ``agent`` (a child of it running train.py)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == agent and b"train.py" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except (OSError, IndexError, ValueError):
                continue
    raise AssertionError(f"no rank process under torchrun {agent}")


def test_torchrun_restarts_a_killed_rank_and_the_run_resumes_by_itself(synthetic_shards, tmp_path):
    pattern, _ = synthetic_shards
    settings = [*shard_settings(pattern), "optim.batch_size=2", "optim.max_steps=10", "optim.checkpoint_every=4",
                "data.num_workers=2"]  # 2 ranks x 2 workers = 4 streams, one shard each per epoch (6 steps)
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    finish(run("--out", str(straight), *settings, processes=2))
    process = run("--out", str(restarted), *settings, processes=2)
    kill_after_checkpoint(process, restarted, victim=_torchrun_rank)
    stdout = finish(process)
    assert "torchrun restart 1: resuming from" in stdout
    want, got = records(straight), records(restarted)
    assert sorted(got) == list(range(10))
    for step in range(10):
        assert got[step] == want[step], step


def test_bad_samples_are_logged_with_shard_and_key_and_summed_up(synthetic_shards, tmp_path):
    import io
    import tarfile

    pattern, _ = synthetic_shards
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in (("broken.jpg", b"not a jpeg"), ("broken.txt", b"a caption"), ("mute.png", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shards = f"data.shards=['{pattern}', '{bad}']"  # two sources
    out = tmp_path / "run"
    process = run("--out", str(out), *shard_settings(pattern)[:-2], "data.dataset=shards", shards,
                  "data.shuffle_buffer=3", "optim.max_steps=8", "data.num_workers=0")
    stdout = finish(process)
    logged = [record for record in records(out).values() if "skips" in record]
    skips = [skip for record in logged for skip in record["skips"]]
    assert {(skip["shard"], skip["key"]) for skip in skips} == {(str(bad), "broken"), (str(bad), "mute")}
    assert {skip["reason"].split(" (")[0] for skip in skips} == {"unreadable image", "no caption"}
    assert logged[-1]["skipped_samples"] == len(skips)
    assert f"{len(skips)} samples skipped for bad data" in stdout and "metrics.jsonl" in stdout


def test_a_restart_resumes_only_from_a_checkpoint_of_its_own_torchrun(tmp_path, monkeypatch):
    """A last.pt left in --out by an earlier run is not picked up by a restart of a new run (which
    crashed before its first checkpoint); this run's own is, also over an explicit --resume."""
    from vlfast.trainer.loop import written_by_this_torchrun

    torch.save({"torchrun_id": "an-earlier-run", "step": 3}, tmp_path / "last.pt")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "this-run")
    assert not written_by_this_torchrun(tmp_path / "last.pt")
    torch.save({"torchrun_id": "this-run", "step": 5}, tmp_path / "last.pt")
    assert written_by_this_torchrun(tmp_path / "last.pt")
    assert not written_by_this_torchrun(tmp_path / "missing.pt")
