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


def test_readme_and_docs_tables_are_generated_from_the_committed_results():
    files = sorted(str(p) for p in RESULTS.glob("*.json"))
    root = RESULTS.parents[1]
    generate = lambda option: subprocess.run([sys.executable, "benchmarks/report.py", option, *files], cwd=root,
                                             capture_output=True, text=True, check=True).stdout.strip()
    block = lambda path, name: path.read_text().split(f"<!-- {name}: start -->\n")[1].split(f"\n<!-- {name}: end -->")[0]
    headline, shapes = generate("--headline"), generate("--by-shape")
    assert block(root / "README.md", "headline") == headline
    assert block(root / "docs" / "benchmarks.md", "by-shape") == shapes
    assert "| cpu: " in shapes and "(paired)" in shapes
    for page in ("ema_update_", "patch_gather", "itc_loss", "attention", "dropout_add_layer_norm"):
        assert f"(docs/ops/{page}.md)" in headline and (root / "docs" / "ops" / f"{page}.md").exists()
    assert "speed-up, NVIDIA H200" in headline and "CPU, 2 cores" in headline


def test_readme_option_rewrites_only_the_two_blocks(tmp_path):
    readme, docs = tmp_path / "README.md", tmp_path / "docs" / "benchmarks.md"
    readme.write_text("intro\n<!-- headline: start -->\nold table\n<!-- headline: end -->\nrest\n")
    docs.parent.mkdir()
    docs.write_text("top\n<!-- by-shape: start -->\nold rows\n<!-- by-shape: end -->\nend\n")
    (tmp_path / "Card-2026-01-01-op.json").write_text(json.dumps({"benchmarks": [
        bench("bench_ema", 1e-3, {"implementation": "vlfast"}, {}), bench("bench_ema", 2e-3, {"implementation": "albef_loop"}, {})]}))
    subprocess.run([sys.executable, str(RESULTS.parent / "report.py"), "--readme", str(readme),
                    str(tmp_path / "Card-2026-01-01-op.json")], check=True)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- headline: start -->\n| op |") and text.endswith("\n<!-- headline: end -->\nrest\n")
    assert "| 2.00× |" in text and "old table" not in text
    text = docs.read_text()
    assert text.startswith("top\n<!-- by-shape: start -->\n| device |") and text.endswith("\n<!-- by-shape: end -->\nend\n")
    assert "| 2.00× |" in text and "old rows" not in text


def bench(name, median, params, extra, device="cuda", file="bench_x.py"):
    return {"fullname": f"benchmarks/{file}::{name}", "name": f"{name}[...]", "stats": {"median": median},
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


def test_tables_show_the_newest_run_of_each_file_forward_backward_and_the_paired_step(tmp_path):
    write = lambda name, benchmarks: (tmp_path / name).write_text(json.dumps({"benchmarks": benchmarks}))
    op = lambda implementation, median, passes, device="cuda", shape="a": bench(
        "bench_ema", median, {"implementation": implementation, "passes": passes, "shape": shape}, {}, device=device)
    write("Card-2026-01-01-op.json", [op("vlfast", 1e-3, "forward_backward"), op("albef_loop", 9e-3, "forward_backward")])
    write("Card-2026-02-02-op.json", [op("vlfast", 1e-3, "forward_backward"), op("albef_loop", 3e-3, "forward_backward"),
                                      op("vlfast", 1e-3, "forward"), op("albef_loop", 5e-3, "forward"),
                                      op("vlfast", 1e-3, "forward_backward", shape="b"),
                                      op("albef_loop", 6e-3, "forward_backward", shape="b")])
    write("Cpu-2026-02-02-op.json", [op("vlfast", 2e-3, "forward_backward", "cpu"), op("albef_loop", 3e-3, "forward_backward", "cpu")])
    step = lambda name, median, implementation, extra: bench(name, median, {"implementation": implementation}, extra,
                                                             file="bench_step.py")
    write("Card-2026-01-01-step.json", [step("bench_train_step", 0.1, "fused", {}),
                                        step("bench_train_step", 0.2, "reference", {}),
                                        step("bench_train_step_paired", 0.3, "fused", {"reference/fused": 1.5}),
                                        step("bench_train_step_paired", 0.3, "fused_compiled", {"reference/fused_compiled": 1.7})])
    files = sorted(map(str, tmp_path.glob("*.json")))
    generate = lambda option: subprocess.run([sys.executable, str(RESULTS.parent / "report.py"), option, *files],
                                             capture_output=True, text=True, check=True).stdout
    table = generate("--by-shape")
    rows = [line for line in table.splitlines() if line.startswith("| Card")]
    assert len(rows) == 4, table  # the op's newest forward + backward rows, the step's two paired rows
    op_row = [row for row in rows if "shape=a" in row][0]
    assert "3.00×" in op_row and "Card-2026-02-02" in op_row and "albef_loop 3.000 ms" in op_row
    assert any("bench_train_step_paired" in row and "1.50× (paired)" in row for row in rows)
    # one line per op: the range over its shapes per device, the default path only, the files it comes from
    table = generate("--headline")
    assert table.splitlines()[0] == "| op | replaces | speed-up, Card | speed-up, CPU | results |", table
    ema, step_line = [line for line in table.splitlines()[2:]]
    assert "| 3.00–6.00× | 1.50× |" in ema and "`Card-2026-02-02-op.json`, `Cpu-2026-02-02-op.json`" in ema
    assert "| 1.50× | – |" in step_line and "1.70" not in step_line


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


def test_a_step_on_a_listed_card_gets_its_mfu_against_the_datasheet_peak(tmp_path):
    sys.path.insert(0, str(RESULTS.parent))
    import report

    assert report.datasheet_peak("NVIDIA H200") == 989 and report.datasheet_peak("NVIDIA-H100-80GB-HBM3") == 989
    assert report.datasheet_peak("NVIDIA H100 PCIe") == 756 and report.datasheet_peak("NVIDIA A100-SXM4-80GB") == 312
    assert report.datasheet_peak("NVIDIA H200 NVL") == 835 and report.datasheet_peak("NVIDIA L40") == 181
    assert report.datasheet_peak("NVIDIA L4") == 121 and report.datasheet_peak("Card") is None
    step = bench("bench_step", 0.1, {}, {"samples/s": 640.0, "TFLOP/s": 42.0})
    step["extra_info"]["card"] = "NVIDIA H200"
    (tmp_path / "NVIDIA-H200-2026-01-01-step.json").write_text(json.dumps({"benchmarks": [
        step, bench("bench_matmul_rate", 1e-3, {}, {"TFLOP/s": 600.0})]}))
    table = subprocess.run([sys.executable, str(RESULTS.parent / "report.py"), str(tmp_path / "NVIDIA-H200-2026-01-01-step.json")],
                           capture_output=True, text=True, check=True).stdout
    assert "MFU 7.0% of the measured matmul rate, 4.2% of the 989 TFLOP/s datasheet peak" in table, table


def test_committed_results_hold_no_raw_rounds_and_slimming_keeps_the_summary(tmp_path):
    # every round's timing made the results folder 6 MB; report.py reads the summary only
    for path in RESULTS.glob("*.json"):
        assert all("data" not in bench["stats"] for bench in json.loads(path.read_text())["benchmarks"]), path.name
    assert sum(p.stat().st_size for p in RESULTS.iterdir()) < 1_000_000
    raw = tmp_path / "Card-2026-01-01-op.json"
    stats = {"median": 1e-3, "iqr": 1e-4, "q1": 9e-4, "q3": 1.1e-3, "rounds": 3, "data": [9e-4, 1e-3, 1.1e-3]}
    raw.write_text(json.dumps({"machine_info": {"cpu": {}}, "commit_info": {"id": "abc"},
                               "benchmarks": [{"name": "bench_op", "stats": stats, "extra_info": {"GB/s": 1.0}}]}))
    result = subprocess.run([sys.executable, str(RESULTS.parent / "slim_results.py"), str(raw)],
                            capture_output=True, text=True, check=True)
    assert "slimmed" in result.stdout
    slim = json.loads(raw.read_text())
    assert slim["benchmarks"][0]["stats"] == {k: v for k, v in stats.items() if k != "data"}
    assert slim["commit_info"] == {"id": "abc"} and slim["benchmarks"][0]["extra_info"] == {"GB/s": 1.0}
