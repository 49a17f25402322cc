"""What one call of each op costs the host, forward and backward, against the code it replaces.

    pytest benchmarks/bench_host_cost.py --benchmark-enable --benchmark-json=host_cost.json

A user who swaps one op into eager code pays its Python, argument checks, dispatch and autograd
on every call. With tiny inputs (a few dozen values) the kernels' work is nothing, so the time
per call is that host cost: on the CPU all of it; on CUDA the synchronised wall time, whose GPU
part is a few microseconds. The references are the code each op replaces (MAE's masking and
unshuffle, ALBEF's contrastive loss with its per-row sampling and its momentum loop, Hugging
Face's dropout-add-LayerNorm, attention written out), the same functions the per-op benchmarks
time at model sizes.
"""
import pytest
import torch
import torch.nn.functional as F

from timing import DEVICES, timed
from vlfast.ops import (attention, attention_reference, dropout_add_layer_norm, dropout_add_layer_norm_reference,
                        ema_update_, ema_update_reference, itc_loss, itc_loss_reference, random_masking,
                        random_masking_reference, unmask, unmask_reference)


def leaf(*shape, device):
    return torch.randn(*shape, device=device, requires_grad=True)


def masking_call(device, implementation):
    masking = {"vlfast": random_masking, "mae": random_masking_reference}[implementation]
    tokens, pos_embed = leaf(2, 8, 4, device=device), leaf(1, 8, 4, device=device)
    return lambda: torch.autograd.grad(masking(tokens, 0.5, pos_embed=pos_embed).visible.sum(), (tokens, pos_embed))


def unmask_call(device, implementation):
    restore = {"vlfast": unmask, "mae": unmask_reference}[implementation]
    visible, mask_token, pos_embed = leaf(2, 4, 4, device=device), leaf(1, 1, 4, device=device), leaf(1, 8, 4, device=device)
    ids_restore = torch.argsort(torch.rand(2, 8, device=device), dim=1)
    inputs = (visible, mask_token, pos_embed)
    return lambda: torch.autograd.grad(restore(visible, ids_restore, mask_token, pos_embed=pos_embed).sum(), inputs)


def dropout_add_layer_norm_call(device, implementation):
    function = {"vlfast": dropout_add_layer_norm, "hugging_face": dropout_add_layer_norm_reference}[implementation]
    inputs = (leaf(4, 8, device=device), leaf(4, 8, device=device), leaf(8, device=device), leaf(8, device=device))
    return lambda: torch.autograd.grad(function(*inputs, 0.1).sum(), inputs)


def itc_loss_call(device, implementation):
    loss = {"vlfast": itc_loss, "albef_loop": itc_loss_reference}[implementation]
    image = F.normalize(torch.randn(4, 8, device=device), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(4, 8, device=device), dim=-1).requires_grad_()
    temperature = torch.tensor(0.07, device=device, requires_grad=True)
    inputs = (image, text, temperature)
    return lambda: torch.autograd.grad(loss(image, text, temperature, smoothing=1e-4).loss, inputs)


def attention_call(device, implementation):
    function = {"vlfast": attention, "reference": attention_reference}[implementation]
    inputs = tuple(leaf(2, 2, 5, 16, device=device) for _ in range(3))
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2], device=device)
    return lambda: torch.autograd.grad(function(*inputs, key_padding_mask=mask).sum(), inputs)


def ema_update_call(device, implementation):
    update = {"vlfast": ema_update_, "albef_loop": ema_update_reference}[implementation]
    target = [torch.randn(4, device=device) for _ in range(20)]
    source = [torch.randn(4, device=device) for _ in range(20)]
    return lambda: update(target, source, 0.995)


CALLS = {"random_masking": (masking_call, "mae"), "unmask": (unmask_call, "mae"),
         "dropout_add_layer_norm": (dropout_add_layer_norm_call, "hugging_face"),
         "itc_loss": (itc_loss_call, "albef_loop"), "attention": (attention_call, "reference"),
         "ema_update_": (ema_update_call, "albef_loop")}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op, implementation", [(op, implementation) for op, (_, reference) in CALLS.items()
                                                for implementation in ("vlfast", reference)])
def bench_host_cost(benchmark, op, implementation, device):
    torch.manual_seed(0)
    call = CALLS[op][0](device, implementation)
    timed(benchmark, device, call, warmup=20, busy=False)
    if benchmark.stats:
        benchmark.extra_info["host_us_per_call"] = round(benchmark.stats.stats.median * 1e6, 1)
