import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_results_table_is_generated_from_the_committed_results():
    # README's performance table must be what report.py makes of the results files, no hand edits.
    files = sorted(str(p) for p in RESULTS.glob("*.json"))
    generated = subprocess.run([sys.executable, "benchmarks/report.py", *files], cwd=RESULTS.parents[1],
                               capture_output=True, text=True, check=True).stdout
    assert (RESULTS / "README.md").read_text() == generated
    assert "| cpu: " in generated and "× |" in generated


def bench(name, median, params, extra, device="cuda"):
    return {"fullname": f"benchmarks/bench_x.py::{name}", "name": f"{name}[...]", "stats": {"median": median},
            "params": {**params, "device": device}, "extra_info": {**extra, "card": "Card"}}


def test_gpu_rows_get_the_roofline_of_their_own_run(tmp_path):
    write = lambda name, benchmarks: (tmp_path / name).write_text(json.dumps({"benchmarks": benchmarks}))
    write("Card-2026-01-01-ceilings.json", [bench("bench_copy_bandwidth", 1e-3, {}, {"GB/s": 4000.0}),
                                            bench("bench_matmul_rate", 1e-3, {}, {"TFLOP/s": 600.0})])
    write("Card-2026-01-01-op.json", [bench("bench_op", 1e-3, {"implementation": "vlfast"}, {"GB/s": 1000.0}),
                                      bench("bench_attn", 1e-3, {}, {"TFLOP/s": 150.0}),
                                      bench("bench_op", 1e-3, {"implementation": "vlfast"}, {"GB/s": 10.0}, device="cpu")])
    write("Card-2026-01-01-busy.json", [bench("bench_busy", 1e-3, {}, {"GB/s": 400.0, "GPU_busy_ms": 0.2})])
    write("Card-2026-01-01-step.json", [bench("bench_step", 0.1, {}, {"samples/s": 640.0, "TFLOP/s": 42.0,
                                                                       "GPU_busy_ms": 50.0})])
    write("Card-2026-02-02-op.json", [bench("bench_op", 1e-3, {"implementation": "vlfast"}, {"GB/s": 2000.0})])
    table = subprocess.run([sys.executable, str(RESULTS.parent / "report.py"), *sorted(map(str, tmp_path.glob("*.json")))],
                           capture_output=True, text=True, check=True).stdout
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert any("GB/s 1000.0" in row and "roofline 25%" in row for row in rows)
    assert any("TFLOP/s 150.0" in row and "roofline 25%" in row for row in rows)
    assert any("GB/s 400.0" in row and "roofline 50%" in row for row in rows)  # its bytes over 0.2 ms of GPU time
    assert any("TFLOP/s 42.0" in row and "MFU 7.0%" in row and "roofline" not in row for row in rows)  # wall clock
    assert not any("GB/s 2000.0" in row and "roofline" in row for row in rows)  # another run: no ceiling measured
    assert not any("GB/s 10.0" in row and "roofline" in row for row in rows)  # CPU rows have none
    assert not any("bench_copy_bandwidth" in row and "roofline" in row for row in rows)


def test_busy_seconds_counts_the_device_time_of_each_call(monkeypatch):
    sys.path.insert(0, str(RESULTS.parent))
    import timing

    a = torch.randn(64, 64)
    assert timing.busy_seconds(lambda: a @ a, "cpu", calls=2) > 0  # the real profiler, on the CPU

    class Profile:  # torch.profiler's events as the GPU gives them: kernels and host-side ops mixed
        def __init__(self, activities):
            assert activities == [ProfilerActivity.CUDA]
        __enter__ = lambda self: self
        __exit__ = lambda self, *exc: None
        key_averages = lambda self: [SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=300.0),
                                     SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=100.0),
                                     SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=9e6)]

    monkeypatch.setattr(timing, "profile", Profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []
    assert timing.busy_seconds(lambda: calls.append(1), "cuda", calls=4) == pytest.approx(400e-6 / 4)
    assert len(calls) == 4
