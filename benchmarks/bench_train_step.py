"""One full MAMO training step as train.py runs it (forward of all five objectives, backward,
gradient clipping, AdamW, EMA of the target network) with vlfast's ops as auto runs them (the
fused kernels, except where auto picks a torch path: vlfast.ops.available()) against every op's
plain-torch reference (VLFAST_BACKEND, what `train.py --ops` sets): same model, same random batch.
fused_compiled: the same step with torch.compile over forward, backward and clipping (`train.py
compile=true`). On CUDA also fused_cuda_graph and fused_compiled_cuda_graph: the step recorded
once as a CUDA graph and replayed (vlfast.trainer.CudaGraphStep, as `train.py cuda_graph=true`
runs it), which the fused step allows because it never waits for the GPU; the reference cannot
be recorded (ALBEF's negative sampling reads each draw on the host).

    pytest benchmarks/bench_train_step.py --benchmark-enable --benchmark-json=train_step.json

Configs: tiny (train.py's default model, batch 32, 64 px: CPU and CUDA) and ViT-B/16 + BERT-base
(fusion from layer 6, 30 text tokens, bf16 autocast: CUDA only) at 224 px batch 64 and 256 px
batch 32. extra_info: samples/s; on CUDA also peak memory (from the model's creation on, a
graph's capture included) and the model's TFLOP/s (FLOPs of one step counted by torch's
FlopCounterMode, over the step's wall-clock median), which report.py turns into MFU against the
bf16 matmul rate bench_ceilings.py measures in the same run.
bench_train_step_paired runs a reference step and a fused (or fused_cuda_graph) one in each round
(the first of the two alternating) and reports the median of the per-round ratios,
reference/fused: on a shared machine whose speed drifts between the single-path runs, that ratio
is the one to quote (its peak memory on CUDA holds both models).
"""
import functools
import statistics

import pytest
import torch

from timing import in_turn, timed
from train_steps import BACKENDS, CONFIGS, build_step, implementations

CASES = [("tiny", "cpu")] + [pytest.param(config, "cuda", marks=pytest.mark.cuda) for config in CONFIGS]


def skip_unless_runnable(benchmark, implementation: str, config: str, device: str) -> None:
    if implementation not in implementations(device):
        pytest.skip(f"{implementation} is not timed on {device} (implementations())")
    if "compiled" in implementation and "256" in config:
        pytest.skip("compiled at 224 px only: a compile per shape would not fit a lease")
    if benchmark.disabled and "compiled" in implementation:
        pytest.skip("a smoke run does not compile (minutes on a CPU): tests/test_compile.py checks the compiled step")


@functools.lru_cache(maxsize=None)
def step_flops(config_name: str, device: str) -> int:
    """FLOPs of one step, counted on the reference path: the counter cannot see inside vlfast's
    kernels, and the math (so the useful work) is the same on both paths."""
    from torch.utils.flop_counter import FlopCounterMode

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLFAST_BACKEND", "reference")
        step, _ = build_step(config_name, device)
        with FlopCounterMode(display=False) as counter:
            step()
    return counter.get_total_flops()


@pytest.mark.parametrize("implementation", list(BACKENDS))
@pytest.mark.parametrize("config, device", CASES)
def bench_train_step(benchmark, monkeypatch, implementation, config, device):
    skip_unless_runnable(benchmark, implementation, config, device)
    monkeypatch.setenv("VLFAST_BACKEND", BACKENDS[implementation])
    if device == "cuda":  # the peak from the model's creation on: a graph's activations are allocated at capture
        torch.cuda.reset_peak_memory_stats()
    step, batch = build_step(config, device, implementation)
    timed(benchmark, device, step, warmup=2, peak_from_warmup=False)
    if not benchmark.stats:  # --benchmark-disable: ran once as a smoke test
        return
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["samples/s"] = round(batch / seconds, 1)
    if device == "cuda":
        benchmark.extra_info["TFLOP/s"] = round(step_flops(config, device) / seconds / 1e12, 1)


def run_with_backend(monkeypatch, name, step):
    monkeypatch.setenv("VLFAST_BACKEND", BACKENDS[name])
    step()


@pytest.mark.parametrize("implementation", [name for name in BACKENDS if name != "reference"])
@pytest.mark.parametrize("config, device", CASES)
def bench_train_step_paired(benchmark, monkeypatch, implementation, config, device):
    skip_unless_runnable(benchmark, implementation, config, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = {}
    for name in (implementation, "reference"):
        monkeypatch.setenv("VLFAST_BACKEND", BACKENDS[name])  # the ops read it at each call
        step, _ = build_step(config, device, name)
        runs[name] = functools.partial(run_with_backend, monkeypatch, name, step)
    ratios = []

    def pair():
        seconds = in_turn(runs, reverse=len(ratios) % 2 == 1, device=device)
        ratios.append(seconds["reference"] / seconds[implementation])

    warmup = 2
    timed(benchmark, device, pair, warmup=warmup, busy=False, peak_from_warmup=False)
    if benchmark.stats:
        benchmark.extra_info[f"reference/{implementation}"] = round(statistics.median(ratios[warmup:]), 3)
