"""The training step gets no more expensive, in the units a GPU pays (benchmarks/step_cost.py):
launching ops, casts, host syncs and non-matmul bytes of one tiny step on the auto path, against
the counts recorded in benchmarks/step_cost_record.json. After a change that lowers them, record
the new counts: python benchmarks/step_cost.py --write."""
import json
import sys
from pathlib import Path

from helpers import needs_extension

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import step_cost  # noqa: E402


@needs_extension  # without vlfast._C the ops run their references, which cost more
def test_the_step_costs_no_more_than_recorded():
    recorded = json.loads(step_cost.RESULTS.read_text())["tiny/fused"]
    now = step_cost.count("tiny", "fused", flops=False)
    risen = {key: (recorded[key], now[key]) for key in ("ops", "casts", "host_syncs", "bytes_non_matmul")
             if now[key] > recorded[key]}
    assert not risen, f"(recorded, now): {risen}; most frequent ops now: {now['top_ops']}"
    assert now["ops"] > 100 and now["casts"] > 0  # it counted a step


@needs_extension
def test_zeroing_the_matrix_products_changes_no_count():
    # --zero-matmuls is how the large configs are counted: it must see the step the real arithmetic runs.
    real = step_cost.count("tiny", "fused", batch=4)
    zeroed = step_cost.count("tiny", "fused", batch=4, zero_matmuls=True)
    for key in ("ops", "casts", "host_syncs", "bytes_non_matmul", "gflops", "top_ops"):
        assert zeroed[key] == real[key], key
    assert real["gflops"] > 0
