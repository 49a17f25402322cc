"""random_masking / unmask against MAE's code (models_mae.py), forward and forward + backward.

    pytest benchmarks/bench_patch_gather.py --benchmark-enable --benchmark-json=patch_gather.json

ViT-B/16 at 224 px: N = 196 patches, D = 768, mask ratio 0.75 (L = 49), B = 64 and 256, fp32 on
the CPU and bf16 on CUDA, a shared (1, N, D) position embedding that receives gradients.
extra_info["GB/s"] counts the bytes the op must move at least: masking's forward reads and
writes the kept rows (2·B·L·D), its backward reads them and writes the (B, N, D) token gradient,
then reads that once more for the position-embedding gradient; unmask's forward reads the kept
rows and writes (B, N, D), its backward reads the (B, N, D) gradient three times (visible rows,
mask token, position embedding) and writes the kept rows' gradient.
"""
import pytest
import torch

from timing import DEVICES, PASSES, feature_dtype, timed
from vlfast.ops import random_masking, random_masking_reference, unmask, unmask_reference

PATCHES, DIM, MASK_RATIO = 196, 768, 0.75
KEPT = int(PATCHES * (1 - MASK_RATIO))
BATCHES = [64, 256]


def inputs(batch, device):
    dtype = feature_dtype(device)
    tokens = torch.randn(batch, PATCHES, DIM, device=device, dtype=dtype, requires_grad=True)
    pos_embed = torch.randn(1, PATCHES, DIM, device=device, dtype=dtype, requires_grad=True)
    return tokens, pos_embed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("implementation", ["vlfast", "mae"])
def bench_random_masking(benchmark, implementation, batch, passes, device):
    masking = {"vlfast": random_masking, "mae": random_masking_reference}[implementation]
    tokens, pos_embed = inputs(batch, device)
    grad = torch.randn(batch, KEPT, DIM, device=device, dtype=tokens.dtype)
    torch.manual_seed(0)  # the default generator: a CUDA graph of the step can record its draws

    def step():
        visible = masking(tokens, MASK_RATIO, pos_embed=pos_embed).visible
        if passes == "forward_backward":
            torch.autograd.grad(visible, (tokens, pos_embed), grad)

    rows = batch * DIM * tokens.element_size()
    timed(benchmark, device, step, bytes_moved=rows * (2 * KEPT + (passes == "forward_backward") * (KEPT + 2 * PATCHES)),
          graph_replay=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("implementation", ["vlfast", "mae"])
def bench_unmask(benchmark, implementation, batch, passes, device):
    restore = {"vlfast": unmask, "mae": unmask_reference}[implementation]
    tokens, pos_embed = inputs(batch, device)
    visible = tokens[:, :KEPT].detach().clone().requires_grad_()
    mask_token = torch.zeros(1, 1, DIM, device=device, dtype=tokens.dtype, requires_grad=True)
    ids_restore = torch.argsort(torch.rand(batch, PATCHES, device=device), dim=1)
    grad = torch.randn_like(tokens)

    def step():
        out = restore(visible, ids_restore, mask_token, pos_embed=pos_embed)
        if passes == "forward_backward":
            torch.autograd.grad(out, (visible, mask_token, pos_embed), grad)

    rows = batch * DIM * tokens.element_size()
    timed(benchmark, device, step, bytes_moved=rows * (KEPT + PATCHES + (passes == "forward_backward") * (3 * PATCHES + KEPT)),
          graph_replay=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inverse", ["argsort", "scatter"])
def bench_mask_selection(benchmark, inverse, device):
    """The per-sample selection alone (B = 256): MAE inverts the shuffle with a second argsort,
    random_masking with one scatter. Both give the same ids_restore."""
    generator = torch.Generator(device).manual_seed(0)

    def step():
        ids_shuffle = torch.argsort(torch.rand(256, PATCHES, device=device, generator=generator), dim=1)
        if inverse == "argsort":
            torch.argsort(ids_shuffle, dim=1)
        else:
            positions = torch.arange(PATCHES, device=device).expand_as(ids_shuffle)
            torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, positions)

    timed(benchmark, device, step)
