"""The timing loop every benchmark shares: warm up, synchronise inside the timed call on CUDA,
and record the card, peak memory and GPU busy time (CUDA) and effective bandwidth (when the
bytes moved are given); and the alternating pairs that compare two steps on a machine whose
speed drifts; the devices they run on."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]  # conftest.py skips "cuda" without a GPU
# `pytest --cuda-config` (conftest.py; carried to child processes by this variable): the CPU rows
# run each benchmark's CUDA configuration (its dtypes, its autocast) at the CPU's sizes. The GPU
# suite's dry run uses it, so that a configuration only a card runs fails in CI, not on the card.
CUDA_CONFIG_ON_CPU = os.environ.get("VLFAST_BENCH_CUDA_CONFIG") == "1"


def cuda_config(device: str) -> bool:
    """Whether rows on ``device`` take the CUDA configuration: on CUDA, and on the CPU under --cuda-config."""
    return device == "cuda" or CUDA_CONFIG_ON_CPU


def feature_dtype(device: str) -> torch.dtype:
    """The benchmarks' activations: bf16 in the CUDA configuration (a GPU step's autocast), fp32 on the CPU."""
    return torch.bfloat16 if cuda_config(device) else torch.float32
PASSES = ("forward", "forward_backward")  # an op's forward as training runs it (autograd records), or with its backward
BUSY = {"cuda": (ProfilerActivity.CUDA, DeviceType.CUDA, "self_device_time_total"),
        "cpu": (ProfilerActivity.CPU, DeviceType.CPU, "self_cpu_time_total")}


def device_events(events, device: str) -> list:
    """The events of torch.profiler's key_averages() that ran on the device: kernels on CUDA.
    Not user annotations (record_function spans, such as the optimizer's step): on CUDA the
    profiler also lays each one over the GPU's timeline, and counting it would count its kernels
    twice (the H200 profiles of 2026-11-27 counted the optimizer's 10.45 ms span as busy time)."""
    return [e for e in events if e.device_type == BUSY[device][1] and not getattr(e, "is_user_annotation", False)]


def device_seconds(events, device: str) -> float:
    """The time those events kept the device busy (on the CPU: the self time of torch's ops)."""
    return sum(getattr(e, BUSY[device][2]) for e in device_events(events, device)) / 1e6


def busy_seconds(step, device: str, calls: int) -> float:
    """Per call, the time the device spends in kernels (torch.profiler's device events; on the CPU
    the self time of torch's ops). A synchronised wall-clock time also holds the host's launch
    and Python overhead: where that dominates (small ops on a GPU), this is what the op costs a
    GPU that the host keeps busy."""
    with profile(activities=[BUSY[device][0]]) as profiler:
        for _ in range(calls):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    return device_seconds(profiler.key_averages(), device) / calls


def graph_replay_seconds(step, calls: int):
    """Per call, the wall time of ``step`` recorded once as a CUDA graph and replayed: the op's GPU
    cost without the host's (Python, checks, dispatch, launches). Returns (seconds, None), or
    (None, why) for a step that cannot be recorded (one that makes the host wait, as ALBEF's
    per-row sampling does)."""
    # Recorded by hand on a side stream: when a step fails to record, capture_end raises, and
    # torch.cuda.graph's context would then leave this thread on its capture stream.
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                step()
            finally:
                graph.capture_end()
    except Exception as error:  # noqa: BLE001  (any failure to record is the answer, not a crash)
        torch.cuda.synchronize()
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()  # the first replay uploads the graph
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls, None


def host_peak_bytes(module: str, make_step: str, **params) -> int:
    """The most memory a CPU step held at once beyond what was resident before it, measured in a
    child process (``module.make_step(**params)`` builds the step there): Linux's peak resident
    set size (VmHWM, reset through /proc/self/clear_refs) minus the resident size before, after one
    warm-up call. The child tells glibc's malloc to map every block over 128 KiB on its own (it
    otherwise raises that threshold as blocks are freed and keeps freed ones resident), so the
    count follows the tensors, to within small blocks; a child, because that setting slows large
    allocations for the rest of a process and would change the timings."""
    paths = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
    code = "\n".join([
        "import ctypes, re, sys",
        f"sys.path[:0] = {paths!r}",
        "ctypes.CDLL('libc.so.6').mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, not adjusted",
        f"import {module}",
        f"step = {module}.{make_step}(**{params!r})",
        "step()",
        "status = lambda key: int(re.search(key + r':\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024",
        "open('/proc/self/clear_refs', 'w').write('5')",
        "before = status('VmRSS')",
        "step()",
        "print(status('VmHWM') - before)",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"measuring {module}.{make_step}({params}) failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.split()[-1])


def timed(benchmark, device: str, step, bytes_moved: int = 0, warmup: int = 1, busy: bool = True,
          peak_from_warmup: bool = True, graph_replay: bool = False) -> None:
    """busy=False for a step that is not one thing (bench_train_step_paired's two steps).
    graph_replay: on CUDA also the step's time replayed from a CUDA graph (graph_replay_seconds),
    which the per-op benchmarks record so each op's GPU cost shows apart from its host cost.
    peak_from_warmup=False: the peak memory counts from the caller's last reset instead (a CUDA
    graph's activations are allocated once, at capture, before the warm-up)."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        if peak_from_warmup:
            torch.cuda.reset_peak_memory_stats()

    def run():
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
    if benchmark.stats and bytes_moved:
        benchmark.extra_info["GB/s"] = round(bytes_moved / benchmark.stats.stats.median / 1e9, 1)
    if device == "cuda":
        benchmark.extra_info["peak_memory_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20)
        benchmark.extra_info["card"] = torch.cuda.get_device_name()
        if benchmark.stats and busy:  # about a fifth of a second of calls, at least one
            calls = max(1, min(50, int(0.2 / benchmark.stats.stats.median)))
            benchmark.extra_info["GPU_busy_ms"] = round(busy_seconds(step, device, calls) * 1e3, 4)
            if graph_replay:
                seconds, why = graph_replay_seconds(step, calls)
                benchmark.extra_info["graph_replay_ms" if why is None else "graph_replay"] = \
                    round(seconds * 1e3, 4) if why is None else f"not recordable: {why}"


def in_turn(runs: dict, reverse: bool, device: str) -> dict:
    """Each of ``runs`` (name: call) once, in turn, in reverse order when ``reverse`` (alternate it
    between rounds, so that neither always runs on the other's warm caches) -> name: wall seconds."""
    seconds = {}
    for name in (list(runs)[::-1] if reverse else list(runs)):
        start = time.perf_counter()
        runs[name]()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - start
    return seconds
