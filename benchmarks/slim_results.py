"""Drop every round's raw timing from pytest-benchmark JSON files, in place.

    python benchmarks/slim_results.py benchmarks/results/*.json

pytest-benchmark stores each round's time under stats["data"]: thousands of numbers per
benchmark, most of a results file's size. What a reader and report.py use stays: the parameters,
the summary statistics (median, IQR, quartiles, rounds, ...), extra_info, the machine and the
commit. gpu_suite.sh slims each file as it is written; a file already slim is left as it is.
"""
import json
import sys
from pathlib import Path


def slim(path) -> bool:
    """Remove the raw rounds from ``path``; True if the file changed."""
    path = Path(path)
    data = json.loads(path.read_text())
    dropped = [bench["stats"].pop("data") for bench in data.get("benchmarks", []) if "data" in bench.get("stats", {})]
    if dropped:
        path.write_text(json.dumps(data, indent=1) + "\n")
    return bool(dropped)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for name in sys.argv[1:]:
        print(f"{name}: {'slimmed' if slim(name) else 'already slim'}")
