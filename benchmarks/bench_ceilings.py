"""The two ceilings every GPU row is held against, measured in the same run rather than taken
from a datasheet: device-memory bandwidth (one large copy, bytes read plus bytes written) and
the matrix-multiply rate (an 8192³ bf16 product on random data: zeros run faster). report.py
divides each row's GB/s or TFLOP/s by them: the fraction of the roofline the row reaches.

    pytest benchmarks/bench_ceilings.py --benchmark-enable --benchmark-json=ceilings.json

On the CPU the same code runs at small sizes in fp32 (a smoke test, not a ceiling worth quoting).
"""
import pytest
import torch

from timing import DEVICES, feature_dtype, timed

COPY_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}  # fp32: 1 GiB per buffer on CUDA, far over L2
MATMUL_SIDE = {"cpu": 512, "cuda": 8192}


@pytest.mark.parametrize("device", DEVICES)
def bench_copy_bandwidth(benchmark, device):
    numel = COPY_ELEMENTS[device]
    destination = torch.empty(numel, device=device)
    origin = torch.empty(numel, device=device).uniform_(-1, 1)
    # About 0.3 s of warm-up on CUDA: an idle card ramps its clocks up first, and a ceiling is measured hot.
    timed(benchmark, device, lambda: destination.copy_(origin), bytes_moved=8 * numel,
          warmup=500 if device == "cuda" else 1)


@pytest.mark.parametrize("device", DEVICES)
def bench_matmul_rate(benchmark, device):
    side = MATMUL_SIDE[device]
    dtype = feature_dtype(device)
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    timed(benchmark, device, lambda: a @ b, warmup=300 if device == "cuda" else 3)  # about 0.5 s on CUDA
    if benchmark.stats:
        benchmark.extra_info["TFLOP/s"] = round(2 * side ** 3 / benchmark.stats.stats.median / 1e12, 1)
