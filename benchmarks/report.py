"""Markdown tables from pytest-benchmark JSON files, GPU rows and CPU rows apart: each row with
its device, the command that reruns it, the median, what extra_info measured, and the speed-up
over the reference implementation of the same shape. A GPU row with GB/s or TFLOP/s also gets its
roofline fraction: over the copy bandwidth or bf16 matmul rate that bench_ceilings.py measured in
the same run (files named <card>-<date>-<bench>.json share the run <card>-<date>), its rate taken
over the GPU's busy time where that was measured (timing.busy_seconds), else over the median,
which also holds the host's overhead. A training step's TFLOP/s over the matmul rate is its MFU,
over the wall-clock median.

    python benchmarks/report.py benchmarks/results/*.json > benchmarks/results/README.md
    python benchmarks/report.py --headline benchmarks/results/*.json   # README's table of ops
    python benchmarks/report.py --by-shape benchmarks/results/*.json   # docs/benchmarks.md's table
    python benchmarks/report.py --readme README.md benchmarks/results/*.json  # both, written in place

--by-shape prints a row per op and shape: each op's default path against the code it replaces,
forward + backward, from the newest run of each benchmark file on each device, the training step
by its paired ratio. --headline sums those rows up for a newcomer: one line per op (OPS), what it
replaces, and per device the range of its speed-ups over the shapes, with the result files.
--readme writes the headline between README's markers and, where the README's folder has
docs/benchmarks.md, the by-shape table between that file's markers; both tables are generated, so
a test can hold them equal to the committed results.
"""
import argparse
import json
import sys
from pathlib import Path

REFERENCES = ("albef_loop", "mae", "eager", "reference", "hugging_face")  # implementations the ops replace: the ratio's denominators
DEFAULT_PATHS = ("vlfast", "fused")  # what vlfast runs by default: the rows of the headline and by-shape tables
UNPAIRED_STEPS = ("bench_train_step",)  # its paired rows give the step's ratio
SHOWN_EXTRA = ("reference/fused", "reference/fused_cuda_graph", "reference/fused_compiled",
               "reference/fused_compiled_cuda_graph", "samples/s", "GB/s", "TFLOP/s", "MFU", "host_us_per_call", "GPU_busy_ms", "graph_replay_ms",
               "graph_replay", "peak_memory_MiB", "reference/vlfast", "pairs", "albef_pairs", "vlfast pairs/s",
               "albef_loop pairs/s", "pairs/s", "total_s", "embedding_s", "itc_s", "rerank_s",
               "albef_rerank_s (scaled)", "rerank speed-up over ALBEF")


def rows(path):
    data = json.loads(Path(path).read_text())
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "")
    cores = data.get("machine_info", {}).get("cpu", {}).get("count")
    for bench in data["benchmarks"]:
        params = dict(bench.get("params") or {})
        extra = bench.get("extra_info", {})
        device = params.pop("device", "")
        yield {"file": Path(path).name, "bench_file": bench["fullname"].split("::")[0],
               "function": bench["name"].split("[")[0], "params": params, "median": bench["stats"]["median"],
               "extra": extra, "device": extra.get("card") if device == "cuda" else f"cpu: {cpu}",
               "gpu": device == "cuda", "cores": cores}


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


def default_path_rows(all_rows):
    """Each op's default path against the code it replaces, forward + backward, from the newest run
    of each benchmark file on each device, and the training step's paired rows: (row, path, vlfast,
    reference, speed-up) with the path's name ('vlfast', 'fused', 'fused_compiled', ...)."""
    newest = {}  # (device, benchmark file) -> the date of its newest run
    for row in all_rows:
        key = (row["device"], row["bench_file"])
        newest[key] = max(newest.get(key, ""), run_of(row)[-10:])
    for gpu in (True, False):
        for row in all_rows:
            if (row["gpu"] != gpu or run_of(row)[-10:] != newest[(row["device"], row["bench_file"])]
                    or row["params"].get("passes", "forward_backward") != "forward_backward"):
                continue
            implementation = row["params"].get("implementation")
            paired = [(k, v) for k, v in row["extra"].items() if k.startswith("reference/")]
            if paired:  # both paths in each round (the training step, the re-ranking): the ratio to quote
                (name, ratio), = paired
                path = name.split("/")[1]
                step = " step" if "train_step" in row["function"] else ""
                yield row, path, f"{path}{step}", f"reference{step}", ratio
            elif implementation in DEFAULT_PATHS and row["function"] not in UNPAIRED_STEPS:
                other = reference_row(row, all_rows)
                if other is not None:
                    yield (row, implementation, f"{row['median'] * 1e3:.3f} ms",
                           f"{other['params']['implementation']} {other['median'] * 1e3:.3f} ms",
                           other["median"] / row["median"])


def by_shape(all_rows) -> str:
    """docs/benchmarks.md's table (module docstring): a row per op and shape of default_path_rows."""
    lines = ["| device | benchmark | parameters | vlfast | reference | speed-up | run | rerun with |",
             "|---|---|---|---|---|---|---|---|"]
    for row, _, vlfast, reference, ratio in default_path_rows(all_rows):
        paired = "reference/" in "".join(row["extra"])
        speedup = f"{ratio:.2f}× (paired)" if paired else f"{ratio:.2f}×"
        params = {k: v for k, v in row["params"].items() if k not in ("implementation", "passes")}
        lines.append(f"| {row['device']} | {row['function']} | {', '.join(f'{k}={v}' for k, v in params.items())} "
                     f"| {vlfast} | {reference} | {speedup} | {run_of(row)} | `pytest {row['bench_file']} --benchmark-enable` |")
    return "\n".join(lines)


# The README's table of ops, in this order: benchmark function -> the op (a link to its page), what it replaces.
OPS = {
    "bench_ema": ("[`ema_update_`](docs/ops/ema_update_.md)", "ALBEF's momentum-update loop"),
    "bench_random_masking": ("[`random_masking`](docs/ops/patch_gather.md)", "MAE's `random_masking`"),
    "bench_unmask": ("[`unmask`](docs/ops/patch_gather.md)", "MAE's unshuffle with mask tokens"),
    "bench_itc_loss": ("[`itc_loss`](docs/ops/itc_loss.md)", "ALBEF's ITC loss and per-row `torch.multinomial` negatives"),
    "bench_momentum_itc_loss": ("[`momentum_itc_loss`](docs/ops/momentum_itc_loss.md)",
                                "ALBEF's queue-based ITC with momentum distillation, and `_dequeue_and_enqueue`"),
    "bench_attention": ("[`attention`](docs/ops/attention.md)", "eager attention (ALBEF's xbert)"),
    "bench_dropout_add_layer_norm": ("[`dropout_add_layer_norm`](docs/ops/dropout_add_layer_norm.md)",
                                     "Hugging Face's dropout, add and LayerNorm"),
    "bench_rerank": ("retrieval's re-ranking, with [`indexed_attention`](docs/ops/indexed_attention.md)",
                     "ALBEF's per-query re-ranking loop (image tokens repeated per pair)"),
    "bench_train_step_paired": ("train.py's whole step", "the same step on every op's reference"),
}


def speedup_range(ratios) -> str:
    """'2.85–5.15×', or one value where the two ends print alike: two decimals below 10, one below 100."""
    text = lambda x: f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"
    low, high = text(min(ratios)), text(max(ratios))
    return f"{low}×" if low == high else f"{low}–{high}×"


def device_label(row) -> str:
    """'NVIDIA H200', 'AMD EPYC CPU, 2 cores'."""
    if row["gpu"]:
        return row["device"]
    brand = row["device"].removeprefix("cpu: ").strip()
    return f"{brand} CPU".strip() + (f", {row['cores']} cores" if row["cores"] else "")


def headline(all_rows) -> str:
    """README's table (module docstring): one line per op of OPS, the range of its default path's
    speed-ups over the shapes on each device, and the files they come from."""
    selected = [(row, ratio) for row, path, _, _, ratio in default_path_rows(all_rows)
                if row["function"] in OPS and path in DEFAULT_PATHS]
    devices = list(dict.fromkeys(device_label(row) for row, _ in selected))  # GPUs first
    lines = ["| op | replaces | " + " | ".join(f"speed-up, {device}" for device in devices) + " | results |",
             "|---|---|" + "---|" * len(devices) + "---|"]
    for function, (op, replaces) in OPS.items():
        mine = [(row, ratio) for row, ratio in selected if row["function"] == function]
        if not mine:
            continue
        cells = [speedup_range([ratio for row, ratio in mine if device_label(row) == device]) if
                 any(device_label(row) == device for row, _ in mine) else "–" for device in devices]
        files = ", ".join(f"`{name}`" for name in dict.fromkeys(row["file"] for row, _ in mine))
        lines.append(f"| {op} | {replaces} | {' | '.join(cells)} | {files} |")
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


BLOCKS = {"headline": headline, "by-shape": by_shape}  # a table's markers name its function


def write_block(path: Path, name: str, table: str) -> None:
    """Replace what stands between the file's <!-- name: start --> and <!-- name: end --> lines
    (nothing, the first time) with the table."""
    start, end = f"<!-- {name}: start -->\n", f"<!-- {name}: end -->"
    text = path.read_text()
    if start not in text or end not in text.split(start, 1)[1]:
        sys.exit(f"{path} has no {start.strip()} ... {end} block")
    before, rest = text.split(start, 1)
    path.write_text(before + start + table + "\n" + end + rest.split(end, 1)[1])


def main(paths, printed=None, readme=None):
    all_rows = [row for path in sorted(paths) for row in rows(path)]
    if readme:
        write_block(Path(readme), "headline", headline(all_rows))
        docs = Path(readme).parent / "docs" / "benchmarks.md"
        if docs.exists():
            write_block(docs, "by-shape", by_shape(all_rows))
        return
    if printed:
        print(BLOCKS[printed](all_rows))
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
    parser.add_argument("--headline", dest="printed", action="store_const", const="headline",
                        help="print README's table of ops only")
    parser.add_argument("--by-shape", dest="printed", action="store_const", const="by-shape",
                        help="print docs/benchmarks.md's table of ops and shapes only")
    parser.add_argument("--readme", help="write both tables in place: into this file and its docs/benchmarks.md")
    parser.add_argument("files", nargs="+", metavar="RESULTS.json")
    args = parser.parse_args()
    main(args.files, args.printed, args.readme)
