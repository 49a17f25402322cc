"""Markdown tables from pytest-benchmark JSON files, GPU rows and CPU rows apart: each row with
its device, the command that reruns it, the median, what extra_info measured, and the speed-up
over the reference implementation of the same shape. A GPU row with GB/s or TFLOP/s also gets its
roofline fraction: over the copy bandwidth or bf16 matmul rate that bench_ceilings.py measured in
the same run (files named <card>-<date>-<bench>.json share the run <card>-<date>), its rate taken
over the GPU's busy time where that was measured (timing.busy_seconds), else over the median,
which also holds the host's overhead. A training step's TFLOP/s over the matmul rate is its MFU,
over the wall-clock median.

    python benchmarks/report.py benchmarks/results/*.json > benchmarks/results/README.md
    python benchmarks/report.py --headline benchmarks/results/*.json   # README's Benchmarks table
    python benchmarks/report.py --readme README.md benchmarks/results/*.json  # ...written into README.md

--headline prints one table: each op's default path against the code it replaces, forward +
backward, from the newest run of each benchmark file on each device, the training step by its
paired ratio.
"""
import argparse
import json
import sys
from pathlib import Path

REFERENCES = ("albef_loop", "mae", "eager", "reference", "hugging_face")  # implementations the ops replace: the ratio's denominators
DEFAULT_PATHS = ("vlfast", "fused")  # what vlfast runs by default: the headline's rows
UNPAIRED_STEPS = ("bench_train_step",)  # its paired rows give the step's ratio
SHOWN_EXTRA = ("reference/fused", "reference/fused_cuda_graph", "reference/fused_compiled",
               "reference/fused_compiled_cuda_graph", "samples/s", "GB/s", "TFLOP/s", "MFU", "host_us_per_call", "GPU_busy_ms", "graph_replay_ms",
               "graph_replay", "peak_memory_MiB")


def rows(path):
    data = json.loads(Path(path).read_text())
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "")
    for bench in data["benchmarks"]:
        params = dict(bench.get("params") or {})
        extra = bench.get("extra_info", {})
        device = params.pop("device", "")
        yield {"file": Path(path).name, "bench_file": bench["fullname"].split("::")[0],
               "function": bench["name"].split("[")[0], "params": params, "median": bench["stats"]["median"],
               "extra": extra, "device": extra.get("card") if device == "cuda" else f"cpu: {cpu}",
               "gpu": device == "cuda"}


CEILINGS = {"GB/s": "bench_copy_bandwidth", "TFLOP/s": "bench_matmul_rate"}
# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, without sparsity), by the
# start of torch.cuda.get_device_name() after "NVIDIA "; the first match wins (PCIe before H100).
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200 NVL", 835), ("H200", 989),
                         ("H800", 989), ("GH200", 989), ("B200", 2250), ("A100", 312), ("A800", 312), ("L40S", 362),
                         ("L40", 181), ("L4", 121))


def datasheet_peak(card: str):
    """The card's dense bf16 peak in TFLOP/s from DATASHEET_BF16_TFLOPS, or None when not listed."""
    name = (card or "").replace("-", " ").removeprefix("NVIDIA ")
    return next((peak for prefix, peak in DATASHEET_BF16_TFLOPS if name.startswith(prefix)), None)


def run_of(row):
    return row["file"].rsplit("-", 1)[0]


def roofline(row, all_rows):
    """The row's GB/s or TFLOP/s over its run's measured ceiling, as 'roofline 77%'; a training
    step's (a row with samples/s) as 'MFU 7.0%', over its wall-clock median: model-FLOP
    utilisation counts the time a user waits, the host's overhead included. '' where none applies."""
    if not row["gpu"] or row["function"] in CEILINGS.values() or "MFU" in row["extra"]:  # older runs stored MFU
        return ""
    for unit, ceiling_function in CEILINGS.items():
        ceilings = [other["extra"][unit] for other in all_rows
                    if other["function"] == ceiling_function and other["gpu"] and run_of(other) == run_of(row)]
        if unit in row["extra"] and ceilings:
            if "samples/s" in row["extra"]:
                peak = datasheet_peak(row["extra"].get("card"))
                of_peak = f", {row['extra'][unit] / peak:.1%} of the {peak} TFLOP/s datasheet peak" if peak else ""
                return f"MFU {row['extra'][unit] / ceilings[0]:.1%} of the measured matmul rate{of_peak}"
            busy = row["extra"].get("GPU_busy_ms", 0) / 1e3
            rate = row["extra"][unit] * (row["median"] / busy if busy else 1)
            return f"roofline {rate / ceilings[0]:.0%}"
    return ""


def reference_row(row, all_rows):
    """The row of the same file, function and shape whose implementation is a reference, or None."""
    if "implementation" not in row["params"]:
        return None
    same_shape = {k: v for k, v in row["params"].items() if k != "implementation"}
    for other in all_rows:
        if (other["file"] == row["file"] and other["function"] == row["function"] and other["gpu"] == row["gpu"]
                and other["params"].get("implementation") in REFERENCES
                and {k: v for k, v in other["params"].items() if k != "implementation"} == same_shape):
            return other
    return None


def headline(all_rows) -> str:
    """README's table (module docstring): a row per op and shape of vlfast's default path, from
    the newest run of each benchmark file on each device."""
    newest = {}  # (device, benchmark file) -> the date of its newest run
    for row in all_rows:
        key = (row["device"], row["bench_file"])
        newest[key] = max(newest.get(key, ""), run_of(row)[-10:])
    lines = ["| device | benchmark | parameters | vlfast | reference | speed-up | run | rerun with |",
             "|---|---|---|---|---|---|---|---|"]
    for gpu in (True, False):
        for row in all_rows:
            if (row["gpu"] != gpu or run_of(row)[-10:] != newest[(row["device"], row["bench_file"])]
                    or row["params"].get("passes", "forward_backward") != "forward_backward"):
                continue
            params = {k: v for k, v in row["params"].items() if k not in ("implementation", "passes")}
            implementation = row["params"].get("implementation")
            paired = [(k, v) for k, v in row["extra"].items() if k.startswith("reference/")]
            if paired:  # the training step: both paths in each round, the ratio to quote
                (name, ratio), = paired
                vlfast, reference, speedup = f"{name.split('/')[1]} step", "reference step", f"{ratio:.2f}× (paired)"
            elif implementation in DEFAULT_PATHS and row["function"] not in UNPAIRED_STEPS:
                other = reference_row(row, all_rows)
                if other is None:
                    continue
                vlfast = f"{row['median'] * 1e3:.3f} ms"
                reference = f"{other['params']['implementation']} {other['median'] * 1e3:.3f} ms"
                speedup = f"{other['median'] / row['median']:.2f}×"
            else:
                continue
            lines.append(f"| {row['device']} | {row['function']} | {', '.join(f'{k}={v}' for k, v in params.items())} "
                         f"| {vlfast} | {reference} | {speedup} | {run_of(row)} | `pytest {row['bench_file']} --benchmark-enable` |")
    return "\n".join(lines)


def table(selected, all_rows):
    lines = ["| device | benchmark | parameters | median | measured | vs reference | rerun with |",
             "|---|---|---|---|---|---|---|"]
    for row in selected:
        reference = reference_row(row, all_rows)
        speedup = f"{reference['median'] / row['median']:.2f}×" if reference else ""
        measured = ", ".join([f"{k} {row['extra'][k]}" for k in SHOWN_EXTRA if k in row["extra"]]
                             + [fraction for fraction in [roofline(row, all_rows)] if fraction])
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        command = f"`pytest {row['bench_file']} --benchmark-enable`"
        lines.append(f"| {row['device']} | {row['function']} | {params} | {row['median'] * 1e3:.3f} ms | {measured} "
                     f"| {speedup} | {command} |")
    return "\n".join(lines)


HEADLINE_START, HEADLINE_END = "<!-- headline: start -->\n", "\n<!-- headline: end -->"


def write_headline(readme: Path, table: str) -> None:
    """Replace the table between README's headline markers."""
    text = readme.read_text()
    if HEADLINE_START not in text or HEADLINE_END not in text:
        sys.exit(f"{readme} has no {HEADLINE_START.strip()} ... {HEADLINE_END.strip()} block")
    before, rest = text.split(HEADLINE_START, 1)
    readme.write_text(before + HEADLINE_START + table + HEADLINE_END + rest.split(HEADLINE_END, 1)[1])


def main(paths, headline_only=False, readme=None):
    all_rows = [row for path in sorted(paths) for row in rows(path)]
    if readme:
        write_headline(Path(readme), headline(all_rows))
        return
    if headline_only:
        print(headline(all_rows))
        return
    print("# Benchmark results\n")
    print(f"Generated by `python benchmarks/report.py` from {', '.join(sorted(Path(p).name for p in paths))}.\n")
    for title, gpu in (("GPU", True), ("CPU", False)):
        selected = [row for row in all_rows if row["gpu"] == gpu]
        print(f"## {title}\n")
        print(table(selected, all_rows) if selected else "No results yet.")
        print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--headline", action="store_true", help="print the headline table only")
    parser.add_argument("--readme", help="write the headline table into this file, between its markers")
    parser.add_argument("files", nargs="+", metavar="RESULTS.json")
    args = parser.parse_args()
    main(args.files, args.headline, args.readme)
