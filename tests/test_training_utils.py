import contextlib
import gc
import math
import types
import weakref
from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest
import torch

from vlfast.files import write_atomically
from vlfast.trainer import (CudaGraphStep, MetricsLog, check_finite, learning_rate, load_checkpoint, load_config,
                            plot_losses, save_checkpoint)


@dataclass
class Optim:
    lr: float = 1e-4
    warmup_steps: int = 10


@dataclass
class Config:
    name: str = "synthetic"
    batch_size: int = 32
    objectives: Tuple[str, ...] = ("itc", "itm")
    resume: Optional[str] = None
    optim: Optim = field(default_factory=lambda: Optim(warmup_steps=99))  # a default unlike Optim's own


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 8\noptim:\n  lr: 3\nobjectives: [itc]\n")
    config = load_config(Config, path, ["optim.warmup_steps=5", "resume=runs/x.pt", "name=coco"])
    assert config == Config(name="coco", batch_size=8, objectives=("itc",), resume="runs/x.pt",
                            optim=Optim(lr=3.0, warmup_steps=5))
    assert load_config(Config) == Config()
    # A section given in part keeps the parent's defaults for the rest, not the section class's.
    assert load_config(Config, None, ["optim.lr=0.5"]).optim == Optim(lr=0.5, warmup_steps=99)
    # YAML 1.1 reads 1e-4 as a string; a float key still takes it. A checkpoint's dict as the base.
    assert load_config(Config, None, ["optim.lr=1e-4"]).optim.lr == 1e-4
    assert load_config(Config, None, ["name=x"], base={"batch_size": 4, "objectives": ["itm"]}) == \
        Config(name="x", batch_size=4, objectives=("itm",))
    # One string for a list of strings (data.shards=pattern): a list of one
    assert load_config(Config, None, ["objectives=itc"]).objectives == ("itc",)


@pytest.mark.parametrize("overrides, message", [
    (["batch_sise=8"], "unknown config key batch_sise"),
    (["optim.momentum=0.9"], "unknown config key optim.momentum"),
    (["batch_size=eight"], "config key batch_size must be int, got 'eight'"),
    (["batch_size=true"], "config key batch_size must be int, got True"),
    (["optim.lr=fast"], "config key optim.lr must be float, got 'fast'"),
    (["optim=3"], "config key optim is a section"),
    (["objectives=3"], "config key objectives must be a list"),
    (["batch_size"], "override 'batch_size' is not key=value"),
])
def test_bad_config_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(Config, None, overrides)


def test_learning_rate_schedule():
    kwargs = dict(base_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert learning_rate(0, **kwargs) == pytest.approx(0.1)
    assert learning_rate(9, **kwargs) == pytest.approx(1.0)
    assert learning_rate(60, **kwargs) == pytest.approx(0.55)
    assert learning_rate(110, **kwargs) == pytest.approx(0.1) == learning_rate(500, **kwargs)
    lrs = [learning_rate(s, **kwargs) for s in range(10, 111)]
    assert lrs == sorted(lrs, reverse=True)


def test_checkpoints_are_atomic_and_load_without_code(tmp_path, monkeypatch):
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.ones(3)})

    def crash(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the previous checkpoint is whole
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # and the failed write left nothing behind
    assert path.stat().st_mode & 0o777 == 0o644

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(tmp_path / "evil.pt")


def test_two_writers_of_one_path_never_share_a_temporary_file(tmp_path):
    """Two processes saving one checkpoint (two `retrieve.py search` runs on one folder) each write
    their own temporary file: the last rename wins, and neither fails or leaves a mixed file."""
    import threading

    path, inside, errors = tmp_path / "cache.pt", threading.Barrier(2), []

    def slow_save(value):
        def write(file):
            torch.save({"value": value}, file)
            inside.wait(timeout=30)  # both writers hold their temporary files at once
        try:
            write_atomically(path, write)
        except Exception as error:  # a thread's exception does not reach the test by itself
            errors.append(error)

    writers = [threading.Thread(target=slow_save, args=(value,)) for value in (1, 2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert not errors, errors
    assert load_checkpoint(path)["value"] in (1, 2) and [p.name for p in tmp_path.iterdir()] == ["cache.pt"]


def test_metrics_log_survives_a_cut_line_and_plots(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(5):
        log.write({"step": step, "loss": 1 / (step + 1), "loss_itc": 0.5})
    with open(log.path, "a") as file:
        file.write('{"step": 5, "lo')  # a crash mid-line
    records = log.read()
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    png = plot_losses(records, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_finite_loss_stops_with_the_step_and_checkpoint(tmp_path):
    check_finite(3, {"loss": 1.0, "loss_itc": torch.tensor(0.5)}, None)
    with pytest.raises(FloatingPointError, match=r"step 7: non-finite loss \['loss_mim'\] .*loss_mim=nan.*last good checkpoint: .*last.pt"):
        check_finite(7, {"loss": 1.0, "loss_mim": math.nan}, tmp_path / "last.pt")
    with pytest.raises(FloatingPointError, match=r"step 2: non-finite gradient norm \['grad_norm'\] \(loss=1, grad_norm=inf\)"):
        check_finite(2, {"loss": 1.0, "grad_norm": math.inf}, None)  # the update was skipped; the run stops


@pytest.fixture
def cuda_calls(monkeypatch):
    """CUDA's stream and graph calls stubbed, recorded in order: CudaGraphStep's own logic on a CPU
    (the CUDA tests in test_mamo.py record and replay a real step)."""
    calls = []

    class Graph:
        def register_generator_state(self, generator):
            calls.append("register")

        def replay(self):
            calls.append("replay")

    @contextlib.contextmanager
    def recording(graph, capture_error_mode):
        calls.append(f"record ({capture_error_mode})")
        yield

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", recording)
    return calls


def test_a_graphed_step_runs_eagerly_then_records_once_then_replays(cuda_calls):
    seen = []

    def step(x, y):
        seen.append((x.tolist(), y.tolist()))
        cuda_calls.append("step")
        loss = (x.sum() * y.sum()).requires_grad_()
        return {"loss": loss * 2}

    graphed = CudaGraphStep(step, [torch.Generator()], warmup=2)
    for value in range(5):
        out = graphed(torch.full((2,), float(value)), torch.ones(3))
    assert cuda_calls == ["step", "step", "register", "record (thread_local)", "step", "replay", "replay", "replay"]
    assert [x for x, _ in seen] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]  # each call's batch reached the step
    assert not out["loss"].requires_grad  # detached: no autograd history kept into the next call
    assert graphed.inputs[0].tolist() == [4.0, 4.0]  # the last batch was copied in for the replay
    with pytest.raises(ValueError, match=r"input 1 is torch.float32 \(4,\), but the recorded step takes torch.float32 \(3,\)"):
        graphed(torch.zeros(2), torch.ones(4))
    with pytest.raises(ValueError, match="recorded with 2 input tensors, got 1"):
        graphed(torch.zeros(2))
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        CudaGraphStep(step, warmup=0)


def test_a_graphed_step_keeps_the_tensors_its_graph_uses_alive(cuda_calls):
    def record():
        weights = torch.zeros(3)  # only the step refers to it, as the model and optimizer in bench_train_step

        def step(x):
            weights.add_(x)
            cuda_calls.append("step")

        graphed = CudaGraphStep(step, warmup=1)
        graphed(torch.ones(3))
        graphed(torch.ones(3))
        return graphed, weakref.ref(weights)

    graphed, weights = record()
    gc.collect()
    assert weights() is not None and cuda_calls == ["step", "record (thread_local)", "step", "replay"]
    del graphed
    gc.collect()
    assert weights() is None
