"""itc_loss (InfoNCE both ways + ITM hard negatives) against (a) ALBEF's code path and (b) the
same with one vectorised torch.multinomial, forward and forward + backward.

    pytest benchmarks/bench_contrastive.py --benchmark-enable --benchmark-json=contrastive.json

D = 256 (ALBEF's embed dim); fp32 on the CPU (B = 64, 256), bf16 on CUDA (B = 64, 256, 1024).
Keys: the local batch (N = B), or gathered as if from 8 ranks (N = 8·B): the loss after the
all_gather, which is what a rank computes (the communication itself is not timed).
bench_matmul_ceiling times one (B, D) @ (D, N) product of the same shape: the fused op does 2
such products forward and 8 backward (tiles recomputed), the reference 2 and 4.
"""
import pytest
import torch
import torch.nn.functional as F

from timing import CUDA, DEVICES, PASSES, feature_dtype, timed
from vlfast._extension import implementation
from vlfast.ops import contrastive

DIM = 256
BATCHES = [64, 256] + ([1024] if CUDA else [])
KEYS = {"in_batch": 1, "gathered_8x": 8}
IMPLEMENTATIONS = {
    "vlfast": lambda image, text, tau, keys, generator: contrastive._loss_on_keys(
        image, text, tau, None, keys, implementation("itc_loss", image.device.type), True, 1e-4, generator),
    "albef_loop": lambda image, text, tau, keys, generator: contrastive._reference_loss(
        image, text, tau, None, keys, True, 1e-4, generator, per_row_sampling=True),
    "vectorised_multinomial": lambda image, text, tau, keys, generator: contrastive._reference_loss(
        image, text, tau, None, keys, True, 1e-4, generator, per_row_sampling=False),
}


def features(rows, device, requires_grad=True):
    dtype = feature_dtype(device)
    return [F.normalize(torch.randn(rows, DIM, device=device), dim=1).to(dtype).requires_grad_(requires_grad)
            for _ in range(2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("keys", KEYS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def bench_itc_loss(benchmark, implementation, batch, keys, passes, device):
    image, text = features(batch, device)
    others = features((KEYS[keys] - 1) * batch, device, requires_grad=False)  # the other ranks' rows
    temperature = torch.tensor(0.07, device=device, requires_grad=True)
    loss_fn = IMPLEMENTATIONS[implementation]
    torch.manual_seed(0)  # the default generator: a CUDA graph of the step can record its draws

    def step():
        if keys == "in_batch":
            gathered = contrastive.Keys(image, text, None, 0)
        else:
            gathered = contrastive.Keys(torch.cat([image, others[0]]), torch.cat([text, others[1]]), None, 0)
        out = loss_fn(image, text, temperature, gathered, None)
        if passes == "forward_backward":
            torch.autograd.grad(out.loss, (image, text, temperature))

    timed(benchmark, device, step, graph_replay=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keys", KEYS)
@pytest.mark.parametrize("batch", BATCHES)
def bench_matmul_ceiling(benchmark, batch, keys, device):
    image, _ = (x.detach() for x in features(batch, device))
    text = features(KEYS[keys] * batch, device, requires_grad=False)[1]
    timed(benchmark, device, lambda: image @ text.t())
    if benchmark.stats:
        benchmark.extra_info["TFLOP/s"] = round(2 * batch * KEYS[keys] * batch * DIM / benchmark.stats.stats.median / 1e12, 2)
