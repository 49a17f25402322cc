"""What one training step costs in the units a GPU pays for, counted on the CPU: no GPU needed.

    python benchmarks/step_cost.py                 # train.py's default model (tiny), batch 32
    python benchmarks/step_cost.py --explain       # also torch.compile's graphs and breaks (minutes)
    python benchmarks/step_cost.py --write         # and record them in benchmarks/step_cost_record.json
    python benchmarks/step_cost.py --config vit_b16_bert_base_224_b64 --batch 2 --zero-matmuls --write
                                                   # ViT-B/16 + BERT-base (ITC needs 2), in half a minute

The step is benchmarks/train_steps.py's (forward of all five objectives, backward, clipping, fused AdamW,
EMA of the target network) under bf16 autocast, as a GPU runs it; it is counted after one warm-up
step, for each path (auto and the reference). Every aten op the dispatcher runs is seen by a
TorchDispatchMode, which counts:
- ops: the ops that launch a kernel on a GPU: all but views, metadata and bare allocations (a
  vlfast kernel counts once, whatever it does inside; a foreach op once on CUDA's fast route, once
  per tensor where CUDA would take its slow route). On a GPU each costs a launch from Python,
  10-30 µs of host time, which is what set the pace of the step on the H200;
- casts: copies that change the dtype (autocast's weight and activation casts among them; a
  multi-tensor copy, as MasterWeightAdamW's, counts once: it is one launch);
- host syncs: the ops that make the host wait for a GPU (a scalar read, nonzero, boolean-mask
  indexing), which also stop a CUDA graph from being recorded;
- bytes: what the ops other than matrix products and attention read and write (the sum of their
  tensor inputs' and outputs' sizes): the memory traffic that kernel fusion removes;
- FLOPs: torch's FlopCounterMode (the useful work, the same on both paths).
--explain adds torch._dynamo.explain over the part of the step that `train.py compile=true`
compiles (forward, backward, clipping): the graphs it makes and why it breaks; the optimizer and
the EMA run eagerly beside it. Launches and casts do not depend on the batch, so ViT-B/16 +
BERT-base is counted at a small --batch (bytes and FLOPs do: they are recorded with the batch).
--zero-matmuls skips the arithmetic of torch's matrix products, convolutions and attention (their
outputs are zeros of the right shape and strides, made on the meta device): the same ops run in
the same order, so every count is the same (tests/test_step_cost.py checks it on the small model),
and a ViT-B step is counted in half a minute on a CPU whose bf16 matrix products take an hour.

The routing is this machine's: on the CPU auto runs the C++ kernels, where a GPU runs Triton
kernels or torch's SDPA (vlfast.ops.available()); the counts of torch's own ops are the GPU's.
tests/test_step_cost.py fails when an eager count rises above the recorded one.
"""
import argparse
import collections
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # vlfast from a checkout, when run as a script
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "step_cost_record.json"  # beside the script: the record the test holds the step to, not a timing run
ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh"}
SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "equal",
         "is_nonzero"}
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "convolution", "convolution_backward", "_scaled_dot_product_flash_attention",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention", "attention",
           "attention_backward", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_flash_attention_for_cpu_backward", "itc_loss_rows", "momentum_itc_loss_rows"}


def _is_view(func) -> bool:
    """An op whose outputs alias its inputs without writing them: no kernel runs."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _nbytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(values) if isinstance(t, torch.Tensor))


class StepCounter(TorchDispatchMode):
    """Counts what the ops dispatched under it would cost a GPU (the module docstring)."""

    def __init__(self):
        super().__init__()
        self.ops, self.casts, self.syncs, self.bytes = collections.Counter(), 0, collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if func.namespace == "prim" or name in ALLOCATIONS or _is_view(func):
            return out
        if name in SYNCS or (name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                      for i in args[1] if i is not None)):
            self.syncs[f"{func.namespace}.{name}"] += 1
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        if not writes and not any(isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves(out)):
            return out  # a value for the host (a scalar read, a dtype), not a kernel; in-place ops
            # that return nothing (_fused_adamw_, _foreach_mul_, vlfast.ema_update_) do launch one
        self.ops[f"{func.namespace}.{name}"] += _foreach_launches(name, args) if name.startswith("_foreach_") else 1
        if name in ("_to_copy", "copy_", "_foreach_copy_") and _dtype_changes(func, args, out):
            self.casts += 1
        if name not in MATMULS:
            self.bytes += _nbytes((args, kwargs)) + _nbytes(out)
        return out


class ZeroMatmuls(TorchDispatchMode):
    """torch's matrix products, convolutions and attention return zeros of the shape, dtype and
    strides their meta kernels give, without computing (--zero-matmuls)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "aten" or func.__name__.split(".")[0] not in MATMULS:
            return func(*args, **kwargs)
        device = next(t.device for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor))
        meta = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        out = func(*meta[0], **meta[1])
        return torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda t: torch.zeros_like(t, device=device) if t.device.type == "meta" else t, out)


def _foreach_launches(name: str, args) -> int:
    """The kernels a CUDA foreach op launches: one multi-tensor kernel on its fast route, one per
    tensor on its slow one (ATen's can_use_fast_route): the fast route needs every tensor of the
    lists in one dtype (_foreach_copy_ may change it between its two lists), on one device and
    dense, and a 0-d tensor scalar (clipping's scale) in the tensors' dtype too. On the CPU every
    foreach op loops over its tensors; this counts what a GPU would launch."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a)]
    if not lists:
        return 1
    first = lists[0][0]
    scalars = [a for a in args if isinstance(a, torch.Tensor) and a.ndim == 0]
    each_list = lists[:1] + [lst for lst in lists[1:] if not name.startswith("_foreach_copy_")]
    fast = (all(t.dtype == first.dtype for lst in each_list for t in lst)
            and all(t.dtype == lists[-1][0].dtype for t in lists[-1])
            and all(t.device == first.device and _dense(t) for lst in lists for t in lst)
            and all(s.dtype == first.dtype for s in scalars))
    return 1 if fast else len(lists[0])


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _dtype_changes(func, args, out) -> bool:
    if func.__name__.startswith("_foreach_copy_"):  # one multi-tensor launch: counted as one cast
        return any(d.dtype != s.dtype for d, s in zip(args[0], args[1]))
    source = args[1] if func.__name__.startswith("copy_") else args[0]
    return isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor) and source.dtype != out.dtype


def autocast_step(step):
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return step()
    return run


def count(config: str = "tiny", implementation: str = "fused", explain: bool = False, flops: bool = True,
          batch: int = None, zero_matmuls: bool = False) -> dict:
    """The counts of one step (after one warm-up step) of a named train_steps config."""
    import train_steps
    from pytest import MonkeyPatch

    with MonkeyPatch.context() as patch:
        patch.setenv("VLFAST_BACKEND", train_steps.BACKENDS[implementation])
        step, batch = train_steps.build_step(config, "cpu", implementation, batch, autocast=True)
        forward_backward_args = step.forward_backward_args
        step = autocast_step(step)
        arithmetic = ZeroMatmuls() if zero_matmuls else contextlib.nullcontext()
        with arithmetic:
            step()  # warm-up: the optimizer's state is made in the first step
        # One counted step: the FLOP counter inside the op counter sees the same ops (a ViT-B step
        # under bf16 autocast takes an hour on a CPU without bf16 matmul instructions).
        with arithmetic, StepCounter() as counter, \
                (FlopCounterMode(display=False) if flops else contextlib.nullcontext()) as counted:
            step()
        result = {"config": config, "batch": batch, "path": implementation, "ops": sum(counter.ops.values()),
                  "casts": counter.casts, "host_syncs": sum(counter.syncs.values()), "bytes_non_matmul": counter.bytes,
                  "sync_ops": dict(counter.syncs), "top_ops": dict(counter.ops.most_common(12))}
        if flops:
            result["gflops"] = round(counted.get_total_flops() / 1e9, 3)
        if explain:
            import torch._dynamo

            from vlfast.trainer import forward_backward

            torch._dynamo.reset()
            with torch._dynamo.config.patch(trace_autograd_ops=True), torch.autocast("cpu", dtype=torch.bfloat16):
                explanation = torch._dynamo.explain(forward_backward)(*forward_backward_args)
            result.update(graphs=explanation.graph_count, graph_breaks=explanation.graph_break_count,
                          break_reasons=sorted({str(r.reason).splitlines()[0][:120] for r in explanation.break_reasons}))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="a train_steps config that fits a CPU (tiny)")
    parser.add_argument("--batch", type=int, help="samples per step instead of the config's (launches and casts "
                                                   "do not depend on it)")
    parser.add_argument("--explain", action="store_true", help="also count torch.compile's graphs and breaks")
    parser.add_argument("--zero-matmuls", action="store_true", help="skip the matrix products' arithmetic "
                                                                        "(same counts; for large configs)")
    parser.add_argument("--write", action="store_true", help=f"record the counts in {RESULTS}")
    args = parser.parse_args()
    results = [count(args.config, path, args.explain, batch=args.batch, zero_matmuls=args.zero_matmuls) for path in ("fused", "reference")]
    for result in results:
        print(json.dumps({k: v for k, v in result.items() if k != "top_ops"}))
        print("  most frequent:", ", ".join(f"{name} {n}" for name, n in result["top_ops"].items()))
    if args.write:
        recorded = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        batch = "" if args.batch is None else f"/batch{args.batch}"
        recorded.update({f"{r['config']}{batch}/{r['path']}": r for r in results})
        RESULTS.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
