"""The timing loop every benchmark shares: warm up, synchronise inside the timed call on CUDA,
and record the card and peak memory (CUDA) and effective bandwidth (when the bytes moved are given)."""
import torch


def timed(benchmark, device: str, step, bytes_moved: int = 0, warmup: int = 1) -> None:
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
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
