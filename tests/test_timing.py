"""benchmarks/timing.py's busy time counts the ops' own time, not the user annotations around them."""
import sys
from pathlib import Path

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
