"""vlfast.ops.attention against SDPA (same mask) and eager attention (ALBEF's xbert), forward and
forward + backward, at the shapes of a ViT-B/16 + BERT-base VLP model.

    pytest benchmarks/bench_attention.py --benchmark-enable --benchmark-json=attention.json

CUDA: bf16, B = 64, H = 12, Dh = 64; "triton" times the Triton kernels, which vlfast runs only
under VLFAST_BACKEND=fused since they measured slower than SDPA on an H200 (docs/ops/attention.md). CPU: fp32,
B = 4 (vlfast runs its C++ kernel there up to 768² scores per head, SDPA beyond; "cpu_kernel"
times the kernel beyond).
extra_info["TFLOP/s"] counts the forward's 4·B·H·Lq·Lk·Dh, 3.5 times that with the backward
(backward = 2.5 × forward).
"""
import pytest
import torch
import torch.nn.functional as F

from timing import CUDA, DEVICES, PASSES, feature_dtype, timed
from vlfast._extension import has_kernel
from vlfast.ops import attention, attention_reference
from vlfast.ops.padded_attention import CPU_KERNEL_MAX_SCORES

SHAPES = {  # name: (Lq, Lk, padded)
    "vit_self_197": (197, 197, False),
    "text_self_40_padded": (40, 40, True),
    "cross_40x197": (40, 197, False),
    "cross_40x577": (40, 577, False),
    "self_1024": (1024, 1024, False),  # past VLP lengths: where the CPU's auto leaves its kernel for SDPA
}
IMPLEMENTATIONS = {
    "vlfast": lambda q, k, v, mask: attention(q, k, v, key_padding_mask=mask),
    "sdpa": lambda q, k, v, mask: F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if mask is None else mask[:, None, None, :]),
    "eager": lambda q, k, v, mask: attention_reference(q, k, v, key_padding_mask=mask),
}
# torch.ops.vlfast.attention: on CUDA the Triton kernels, on the CPU the C++ kernel
if CUDA and has_kernel("attention", "cuda"):
    IMPLEMENTATIONS["triton"] = lambda q, k, v, mask: torch.ops.vlfast.attention(q, k, v, mask, q.shape[-1] ** -0.5)[0]
if has_kernel("attention", "cpu"):  # the CPU kernel where auto runs SDPA instead (long sequences)
    IMPLEMENTATIONS["cpu_kernel"] = lambda q, k, v, mask: torch.ops.vlfast.attention(
        q, k, v, mask, q.shape[-1] ** -0.5)[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def bench_attention(benchmark, implementation, shape, passes, device):
    if implementation == "triton" and device == "cpu":
        pytest.skip("the Triton row is the GPU's (on the CPU Triton runs only in its interpreter)")
    queries, keys, padded = SHAPES[shape]
    if implementation == "cpu_kernel" and (device == "cuda" or queries * keys <= CPU_KERNEL_MAX_SCORES):
        pytest.skip("the CPU kernel's own row is for CPU shapes where auto runs SDPA (elsewhere vlfast's row is it)")
    batch, heads, dim = (64, 12, 64) if device == "cuda" else (4, 12, 64)
    dtype = feature_dtype(device)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=generator).to(device, dtype).requires_grad_()
               for length in (queries, keys, keys))
    mask = None
    if padded:  # caption lengths 8..Lk, as a padded text batch
        lengths = torch.randint(8, keys + 1, (batch,), generator=generator)
        mask = (torch.arange(keys)[None, :] < lengths[:, None]).to(device)
    grad = torch.randn(batch, heads, queries, dim, generator=generator).to(device, dtype)
    run = IMPLEMENTATIONS[implementation]

    def step():
        out = run(q, k, v, mask)
        if passes == "forward_backward":
            torch.autograd.grad(out, (q, k, v), grad)

    timed(benchmark, device, step, graph_replay=True)
    if benchmark.stats:
        flops = (1 if passes == "forward" else 3.5) * 4 * batch * heads * queries * keys * dim
        benchmark.extra_info["TFLOP/s"] = round(flops / benchmark.stats.stats.median / 1e12, 2)
