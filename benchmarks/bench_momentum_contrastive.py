"""momentum_itc_loss (ALBEF's queue-based ITC with momentum distillation, the ITM negatives and the
queue's enqueue) against ALBEF's code path: the queue concatenated, the four similarity matrices,
both soft-target softmaxes, the log-softmax products, a torch.multinomial per row and
_dequeue_and_enqueue with its host read of the pointer. Forward + backward, as a training step
runs it; time and peak memory (the CPU's too).

    pytest benchmarks/bench_momentum_contrastive.py --benchmark-enable --benchmark-json=momentum_contrastive.json

D = 256 (ALBEF's embed dim), alpha 0.4, B = 64 and 256 per device, Q = 57600 (BLIP) and 65536
(ALBEF); fp32 on the CPU, bf16 on CUDA: features and queue in one dtype, as a queue written
with the features holds them (a bf16 batch against an fp32 queue failed every ALBEF row on CUDA).
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from timing import DEVICES, feature_dtype, host_peak_bytes, timed
from vlfast.nn import FeatureQueue
from vlfast.ops import momentum_itc_loss, momentum_itc_loss_reference

DIM = 256
BATCHES = [64, 256]
QUEUES = [57600, 65536]


class AlbefQueue:
    """ALBEF's buffers and _dequeue_and_enqueue (one process: its all_gather returns the batch)."""

    def __init__(self, size, device, dtype):
        self.image_queue = F.normalize(torch.randn(DIM, size, device=device), dim=0).to(dtype)
        self.text_queue = F.normalize(torch.randn(DIM, size, device=device), dim=0).to(dtype)
        self.queue_ptr = torch.zeros(1, dtype=torch.long, device=device)
        self.queue_size = size

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat, text_feat):
        batch_size = image_feat.shape[0]
        ptr = int(self.queue_ptr)
        if self.queue_size % batch_size == 0:
            self.image_queue[:, ptr:ptr + batch_size] = image_feat.T
            self.text_queue[:, ptr:ptr + batch_size] = text_feat.T
        self.queue_ptr[0] = (ptr + batch_size) % self.queue_size


def albef(image, text, image_m, text_m, temperature, queue):
    out = momentum_itc_loss_reference(image, text, image_m, text_m, temperature, alpha=0.4,
                                      image_queue=queue.image_queue.t(), text_queue=queue.text_queue.t())
    queue.dequeue_and_enqueue(image_m, text_m)
    return out


def vlfast(image, text, image_m, text_m, temperature, queue):
    image_queue, text_queue, _ = queue.keys()
    out = momentum_itc_loss(image, text, image_m, text_m, temperature, alpha=0.4, image_queue=image_queue,
                            text_queue=text_queue)
    queue.enqueue(image_m, text_m)
    return out


IMPLEMENTATIONS = {"vlfast": vlfast, "albef_loop": albef}


def make_step(implementation: str, batch: int, queue: int, device: str):
    """One call of ``implementation`` at these sizes: loss, gradients, negatives and enqueue."""
    dtype = feature_dtype(device)
    torch.manual_seed(0)
    image, text, image_m, text_m = (F.normalize(torch.randn(batch, DIM, device=device), dim=1).to(dtype)
                                    for _ in range(4))
    image.requires_grad_()
    text.requires_grad_()
    temperature = torch.tensor(0.07, device=device, requires_grad=True)
    queues = FeatureQueue(queue, DIM, dtype=dtype).to(device) if implementation == "vlfast" else \
        AlbefQueue(queue, device, dtype)
    loss_fn = IMPLEMENTATIONS[implementation]

    def step():
        out = loss_fn(image, text, image_m, text_m, temperature, queues)
        torch.autograd.grad(out.loss, (image, text, temperature))

    return step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("queue", QUEUES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def bench_momentum_itc_loss(benchmark, implementation, batch, queue, device):
    timed(benchmark, device, make_step(implementation, batch, queue, device))
    if device == "cpu" and not benchmark.disabled and sys.platform == "linux":  # the CPU's peak, in a child process
        peak = host_peak_bytes("bench_momentum_contrastive", "make_step", implementation=implementation, batch=batch,
                               queue=queue, device=device)
        benchmark.extra_info["peak_memory_MiB"] = round(peak / 2**20, 1)
