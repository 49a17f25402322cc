"""A benchmark file with one row that passes and one that fails, for the GPU suite's dry run: it
checks that the suite publishes what a file measured even when a later row of it fails, and
records the failure (gpu_suite.sh, "check: a failing benchmark row loses no results"). Not a
bench_*.py file, so a plain `pytest` does not collect it."""
import pytest


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("row", ["passes", "fails"])
def bench_suite_check(benchmark, row, device):
    def step():
        if row == "fails":
            raise RuntimeError("this row fails on purpose (gpu_suite.sh's dry-run check)")
        return sum(range(100))

    benchmark(step)
