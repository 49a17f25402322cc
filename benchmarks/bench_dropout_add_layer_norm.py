"""dropout_add_layer_norm against Hugging Face's BertSelfOutput / BertOutput after the dense layer
(F.dropout, add, LayerNorm), p = 0.1, forward and forward + backward.

    pytest benchmarks/bench_dropout_add_layer_norm.py --benchmark-enable --benchmark-json=dropout_add_ln.json

Shapes (rows = batch · text length, D): train.py's default model on the ITM batch (96 · 30,
128) and BERT-base on a batch of 64 captions of 40 tokens (2560, 768). fp32 on the CPU; on CUDA
autocast's layout, a bf16 dense output onto the fp32 residual stream. extra_info["GB/s"] counts
the bytes the op must move at least: forward reads x and the residual and writes the output,
backward reads the output gradient, x and the residual and writes both input gradients.
"""
import itertools

import pytest
import torch

from timing import CUDA, DEVICES, PASSES, feature_dtype, timed
from vlfast.ops import dropout_add_layer_norm, dropout_add_layer_norm_reference

SHAPES = {"tiny_itm": (96 * 30, 128), "bert_base_b64": (64 * 40, 768)}
IMPLEMENTATIONS = {"vlfast": dropout_add_layer_norm, "hugging_face": dropout_add_layer_norm_reference}
if CUDA:  # auto runs Hugging Face's code on the GPU (measured faster there); this row times the kernel
    IMPLEMENTATIONS["triton"] = dropout_add_layer_norm
P = 0.1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def bench_dropout_add_layer_norm(benchmark, monkeypatch, implementation, shape, passes, device):
    if implementation == "triton":
        if device == "cpu":
            pytest.skip("the Triton row is the GPU's; on the CPU vlfast runs the C++ kernel")
        monkeypatch.setenv("VLFAST_BACKEND", "fused")
    rows, dim = SHAPES[shape]
    x_dtype = feature_dtype(device)
    op = IMPLEMENTATIONS[implementation]
    weight = torch.ones(dim, device=device, requires_grad=True)
    bias = torch.zeros(dim, device=device, requires_grad=True)
    # Several input sets in turn, 64 MiB in all, so the small shape is not timed from cache.
    copies = max(1, min(8, (64 << 20) // (3 * rows * dim * 4)))
    sets = itertools.cycle([(torch.randn(rows, dim, device=device, dtype=x_dtype, requires_grad=True),
                             torch.randn(rows, dim, device=device, requires_grad=True),
                             torch.randn(rows, dim, device=device)) for _ in range(copies)])

    def step():
        x, residual, grad = next(sets)
        out = op(x, residual, weight, bias, P)
        if passes == "forward_backward":
            torch.autograd.grad(out, (x, residual, weight, bias), grad)

    x_bytes, residual_bytes = rows * dim * (2 if x_dtype == torch.bfloat16 else 4), rows * dim * 4
    moved = (x_bytes + 2 * residual_bytes) + (passes == "forward_backward") * (2 * residual_bytes + x_bytes + x_bytes + residual_bytes)
    timed(benchmark, device, step, bytes_moved=moved, warmup=copies, graph_replay=True)
