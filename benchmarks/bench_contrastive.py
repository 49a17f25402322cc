"""itc_loss (InfoNCE both ways + ITM hard negatives) against (a) ALBEF's code path and (b) the
same with one vectorised torch.multinomial, forward + backward.

    pytest benchmarks/bench_contrastive.py --benchmark-enable --benchmark-json=contrastive.json

D = 256 (ALBEF's embed dim), N = B keys (in-batch); fp32 on the CPU (B = 64, 256), bf16 on CUDA
(B = 64, 256, 1024). bench_matmul_ceiling times one image @ text.T of the same shape: the
fused op does 2 such products forward and 8 backward (recomputed tiles), the reference 2 and 4.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import CUDA, DEVICES
from timing import timed
from vlfast.ops import itc_loss, itc_loss_reference

DIM = 256
BATCHES = [64, 256] + ([1024] if CUDA else [])
IMPLEMENTATIONS = {
    "vlfast": itc_loss,
    "albef_loop": itc_loss_reference,
    "vectorised_multinomial": lambda *args, **kwargs: itc_loss_reference(*args, **kwargs, per_row_sampling=False),
}


def features(batch, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    image = F.normalize(torch.randn(batch, DIM, device=device), dim=1).to(dtype).requires_grad_()
    text = F.normalize(torch.randn(batch, DIM, device=device), dim=1).to(dtype).requires_grad_()
    return image, text


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def bench_itc_loss(benchmark, implementation, batch, device):
    image, text = features(batch, device)
    temperature = torch.tensor(0.07, device=device, requires_grad=True)
    loss_fn = IMPLEMENTATIONS[implementation]
    generator = torch.Generator(device).manual_seed(0)

    def step():
        out = loss_fn(image, text, temperature, smoothing=1e-4, generator=generator)
        torch.autograd.grad(out.loss, (image, text, temperature))

    timed(benchmark, device, step)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCHES)
def bench_matmul_ceiling(benchmark, batch, device):
    image, text = (x.detach() for x in features(batch, device))
    timed(benchmark, device, lambda: image @ text.t())
    if benchmark.stats:
        benchmark.extra_info["TFLOP/s"] = round(2 * batch * batch * DIM / benchmark.stats.stats.median / 1e12, 2)
