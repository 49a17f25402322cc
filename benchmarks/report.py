"""Markdown table from pytest-benchmark JSON files: one row per benchmark, with its device, the
median, what extra_info measured, and the speed-up over the reference row of the same shape.

    python benchmarks/report.py benchmarks/results/*.json > table.md
"""
import json
import sys
from pathlib import Path

REFERENCES = ("albef_loop", "mae", "eager")  # implementations the ops replace: the ratio's denominators


def rows(path):
    data = json.loads(Path(path).read_text())
    machine = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "")
    for bench in data["benchmarks"]:
        params = dict(bench.get("params") or {})
        yield {"file": Path(path).name, "function": bench["name"].split("[")[0], "params": params,
               "median": bench["stats"]["median"], "extra": bench.get("extra_info", {}), "machine": machine}


def reference_median(row, all_rows):
    if "implementation" not in row["params"]:
        return None
    for other in all_rows:
        if (other["function"] == row["function"] and other["file"] == row["file"]
                and other["params"].get("implementation") in REFERENCES
                and {k: v for k, v in other["params"].items() if k != "implementation"}
                == {k: v for k, v in row["params"].items() if k != "implementation"}):
            return other["median"]
    return None


def main(paths):
    all_rows = [row for path in paths for row in rows(path)]
    print("| file | benchmark | device | parameters | median | measured | vs reference |")
    print("|---|---|---|---|---|---|---|")
    for row in sorted(all_rows, key=lambda r: (r["params"].get("device") != "cuda", r["file"], r["function"])):
        params = {k: v for k, v in row["params"].items() if k != "device"}
        reference = reference_median(row, all_rows)
        speedup = f"{reference / row['median']:.2f}×" if reference else ""
        measured = ", ".join(f"{k} {v}" for k, v in row["extra"].items())
        device = row["params"].get("device", "")
        if device == "cpu" and row["machine"]:
            device = f"cpu ({row['machine']})"
        print(f"| {row['file']} | {row['function']} | {device} | "
              f"{', '.join(f'{k}={v}' for k, v in params.items())} | {row['median'] * 1e3:.3f} ms | {measured} | {speedup} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/report.py RESULTS.json [...]")
    main(sys.argv[1:])
