"""Where a training step's time goes when the host, not the GPU, sets the pace.

    python benchmarks/profile_train_step.py                      # CUDA: ViT-B/16 + BERT-base, b64
    python benchmarks/profile_train_step.py --config tiny --steps 2
    python benchmarks/profile_train_step.py --config tiny --ablate 16

Prints what host work costs on this machine: one launch from Python (an in-place add on one
element; on CUDA also a one-element Triton kernel), the forward and backward of x·2 with torch's
backward and with a Python one (an autograd.Function: on CUDA the autograd engine runs it on its
device thread, which must take the GIL), and dropout_add_layer_norm's forward and backward on a
4×8 input, fused and reference. Then for each path (fused, reference, on CUDA also
fused_cuda_graph) the wall time of a step, the GPU's busy time in it (the sum of kernel times,
torch.profiler), the number of kernel launches, the operators with the most self CPU time and,
on CUDA, the kernels with the most GPU time and the places where the step makes the host wait
for the GPU. A step whose wall time is far over its GPU busy time is bound by launches and
Python, and only fewer launches or less host work make it faster. The step is
train_steps.py's, as bench_train_step.py times it (same model, batch and seeds).
--ablate N instead times, for each op, the fused step with that op alone on its reference
(VLFAST_REFERENCE_OPS) against the fused step: N rounds of one each, the median ratio. Above 1,
the fused op makes the step faster by that factor; below 1, slower.
"""
import argparse
import collections
import functools
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train.py, when run as a script
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from train_steps import BACKENDS, CONFIGS, build_step, implementations  # noqa: E402
from timing import device_events, device_seconds, in_turn  # noqa: E402
from vlfast._extension import KERNELS  # noqa: E402
from vlfast.ops import dropout_add_layer_norm  # noqa: E402

try:
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr):
        tl.store(x_ptr, tl.load(x_ptr) + 1)
except ImportError:
    triton = None


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(call, device, calls=2000, warmup=None):
    """Wall time per call, after ``warmup`` calls (a tenth of ``calls`` by default)."""
    for _ in range(calls // 10 if warmup is None else warmup):
        call()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize(device)
    return (time.perf_counter() - start) / calls


class Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def host_costs(device):
    def micro(what, call, calls=2000):
        print(f"{what}: {seconds_per_call(call, device, calls) * 1e6:.1f} µs")

    x = torch.zeros(1, device=device)
    micro(f"one x.add_(1) on a 1-element {device} tensor", lambda: x.add_(1))
    if device == "cuda" and triton is not None:
        micro("one Triton launch (a one-element add)", lambda: add_one[(1,)](x))
    leaf = torch.randn(8, device=device, requires_grad=True)
    micro("x·2, forward and backward, torch's backward", lambda: torch.autograd.grad((leaf * 2).sum(), leaf))
    micro("x·2, forward and backward, a Python backward", lambda: torch.autograd.grad(Double.apply(leaf).sum(), leaf))
    inputs = [torch.randn(shape, device=device, requires_grad=True) for shape in ((4, 8), (4, 8), (8,), (8,))]
    for backend in ("fused", "reference"):
        os.environ["VLFAST_BACKEND"] = backend
        micro(f"dropout_add_layer_norm 4×8, forward and backward, {backend}",
              lambda: torch.autograd.grad(dropout_add_layer_norm(*inputs, 0.1).sum(), inputs), calls=500)


def host_syncs(step) -> collections.Counter:
    """Where one step made the host wait for the GPU (.item(), boolean-mask indexing, a copy from
    pageable memory...): torch.cuda.set_sync_debug_mode warns at each such call."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                               if "synchronizing" in str(w.message))


def profile_step(config, device, implementation, steps):
    os.environ["VLFAST_BACKEND"] = BACKENDS[implementation]
    step, batch = build_step(config, device, implementation)
    wall = seconds_per_call(step, device, steps, warmup=2)  # warm-up: Triton compiles, allocator, cuBLAS handles
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    events = profiler.key_averages()
    launches = sum(e.count for e in device_events(events, "cuda")) / steps
    busy = device_seconds(events, "cuda") / steps
    print(f"\n## {config}, {implementation} ({device}): {wall * 1e3:.1f} ms per step ({batch / wall:.1f} samples/s)"
          + (f", GPU busy {busy * 1e3:.1f} ms ({busy / wall:.0%}), {launches:.0f} kernels per step"
             + (" (one graph launch)" if implementation.endswith("cuda_graph") else
                f" ({(wall - busy) / max(launches, 1) * 1e6:.1f} µs of wall time per launch beyond the GPU's)")
             if device == "cuda" else ""))
    print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    if device == "cuda":  # the kernels, by GPU time: their names say which precision the matmuls ran in
        print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=80))
        syncs = host_syncs(step)
        print(f"host syncs in one step: {sum(syncs.values())}"
              + "".join(f"\n  {count} at {where}" for where, count in syncs.most_common(10)))


def ablation(config, device, rounds):
    """One model, its step run with and without VLFAST_REFERENCE_OPS=op in turn (which goes first
    alternates), after two warm-up rounds; the per-round ratios' median for each op."""
    os.environ["VLFAST_BACKEND"] = "auto"
    step, _ = build_step(config, device)
    print(f"\n## {config} ({device}): the step with one op on its reference / the fused step, median of {rounds} rounds")
    def with_reference_ops(ops):
        os.environ["VLFAST_REFERENCE_OPS"] = ops
        step()

    for op in KERNELS:
        runs = {"reference": functools.partial(with_reference_ops, op), "fused": functools.partial(with_reference_ops, "")}
        ratios = []
        for round_ in range(rounds + 2):
            seconds = in_turn(runs, reverse=round_ % 2 == 1, device=device)
            if round_ >= 2:
                ratios.append(seconds["reference"] / seconds["fused"])
        print(f"{op}: {statistics.median(ratios):.3f}", flush=True)
    del os.environ["VLFAST_REFERENCE_OPS"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=CONFIGS, default=None,
                        help="default: vit_b16_bert_base_224_b64 on CUDA, tiny on the CPU")
    parser.add_argument("--ops", choices=[*BACKENDS, "all"], default="all",
                        help="all: fused, reference and, on CUDA, fused_cuda_graph and fused_compiled_cuda_graph "
                             "(on the CPU the compiled step is left to --ops fused_compiled: minutes to compile)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ablate", type=int, default=0, metavar="ROUNDS",
                        help="time each op on its reference inside the fused step instead (module docstring)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = args.config or ("vit_b16_bert_base_224_b64" if device == "cuda" else "tiny")
    if device == "cpu" and config != "tiny":
        parser.error(f"--config {config} is a GPU configuration (bf16 autocast); on the CPU use tiny")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          + (torch.cuda.get_device_name() if device == "cuda" else "CPU only")
          + "".join(f", {k}={v}" for k, v in os.environ.items() if k.startswith(("CUDA_LAUNCH", "TORCH_", "PYTORCH_"))))
    if args.ablate:
        return ablation(config, device, args.ablate)
    host_costs(device)
    if args.ops not in ("all", *implementations(device)):
        parser.error(f"--ops {args.ops} is not run on {device} (train_steps.implementations)")
    chosen = [i for i in implementations(device) if device == "cuda" or "compiled" not in i]
    for implementation in (chosen if args.ops == "all" else [args.ops]):
        profile_step(config, device, implementation, args.steps)


if __name__ == "__main__":
    main()
