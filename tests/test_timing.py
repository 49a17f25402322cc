"""benchmarks/timing.py's busy time counts the ops' own time, not the user annotations around them."""
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from timing import device_events  # noqa: E402


def test_user_annotations_are_not_device_events():
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        with record_function("optimizer_step_span"):  # what Optimizer.step wraps its work in
            torch.ones(1000).add_(1)
    events = profiler.key_averages()
    names = {e.key for e in device_events(events, "cpu")}
    assert "aten::add_" in names
    assert "optimizer_step_span" not in names and "optimizer_step_span" in {e.key for e in events}


def test_graph_replay_times_the_replays_or_says_why_a_step_cannot_be_recorded(monkeypatch):
    """The CUDA calls stubbed: the step runs once, at the recording; the timing counts replays only;
    a step that fails to record (a host read, on a GPU) gives the reason instead of a time."""
    import contextlib

    import timing

    replays = []

    class Graph:
        def capture_begin(self, **kwargs):
            pass

        def capture_end(self):
            pass

        def replay(self):
            replays.append(1)

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    steps = []
    seconds, why = timing.graph_replay_seconds(lambda: steps.append(1), calls=5)
    assert why is None and seconds > 0 and len(steps) == 1 and len(replays) == 6  # one upload, five timed

    def host_read():
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    seconds, why = timing.graph_replay_seconds(host_read, calls=5)
    assert seconds is None and why == "RuntimeError: operation not permitted when stream is capturing"


@pytest.mark.cuda
def test_graph_replay_records_an_op_on_the_gpu():
    import timing

    from vlfast.ops import random_masking

    tokens = torch.randn(4, 16, 8, device="cuda", requires_grad=True)
    step = lambda: random_masking(tokens, 0.5).visible.sum().backward()  # noqa: E731
    step()
    seconds, why = timing.graph_replay_seconds(step, calls=3)
    assert why is None and seconds > 0
