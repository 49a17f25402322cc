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


def test_clipping_launches_one_kernel_per_gradient_dtype():
    """CUDA's foreach mul_ takes a 0-d scale of another dtype than the tensors on its slow path, one
    launch per tensor; the counter models that rule, and clipping gives each dtype's gradients a
    scale of their own dtype (before: 305 launches of mul_ per ViT-B/16 + BERT-base step)."""
    import torch

    from vlfast.trainer.optimizer import clip_grad_norm

    bf16 = [torch.randn(3, 4).to(torch.bfloat16) for _ in range(5)]
    fp32 = [torch.randn(7) for _ in range(3)]
    assert step_cost._foreach_launches("_foreach_mul_", (bf16, torch.tensor(0.5))) == 5  # the slow route
    assert step_cost._foreach_launches("_foreach_mul_", (bf16, torch.tensor(0.5, dtype=torch.bfloat16))) == 1
    assert step_cost._foreach_launches("_foreach_copy_", (fp32[:2], bf16[:2])) == 1  # copy may change dtype
    assert step_cost._foreach_launches("_foreach_add_", (fp32[:2], bf16[:2])) == 2
    parameters = [torch.nn.Parameter(g.clone()) for g in bf16 + fp32]
    for p in parameters:
        p.grad = p.detach().clone() * 100
    with step_cost.StepCounter() as counter:
        clip_grad_norm(parameters, 1.0)
    assert counter.ops["aten._foreach_mul_"] == 2, counter.ops
