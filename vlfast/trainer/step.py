"""One training step: the forward of every objective, backward and clipping (the part
torch.compile takes as one graph), then AdamW and the target network's EMA; and the step
recorded once as a CUDA graph and replayed.
"""
import contextlib
from typing import Callable, Optional, Sequence

import torch

from vlfast._extension import backend as ops_backend
from vlfast._extension import settings as ops_settings
from vlfast.models import Mamo
from vlfast.trainer.config import TrainConfig
from vlfast.trainer.optimizer import clip_grad_norm


def forward_backward(runner, model: Mamo, batch, grad_clip: float, image_ids=None):
    """The forward of every objective (bf16 autocast on a GPU), backward and gradient clipping:
    the part of the step that torch.compile traces as one graph (``compile=true``). Returns
    (losses, gradient norm), detached."""
    images, input_ids, attention_mask = batch
    # bf16 autocast on a GPU; on the CPU whatever the caller set (step_cost.py counts under CPU autocast)
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if images.is_cuda else contextlib.nullcontext()
    with precision:
        losses = runner(images, input_ids, attention_mask, image_ids=image_ids)
    losses["loss"].backward()
    norm = clip_grad_norm(model.parameters(), grad_clip)
    return {name: value.detach() for name, value in losses.items()}, norm


def check_whole_step_options(config: TrainConfig, device: torch.device, world: int) -> None:
    """compile=true and cuda_graph=true take the step of one process as a whole: DDP's hooks are not
    traced, and the image ids' check and ALBEF's sampling (itc_loss's reference: --ops reference or
    VLFAST_REFERENCE_OPS) read values on the host mid-step. A CUDA graph also needs a GPU."""
    itc = ops_backend("itc_loss")
    refused = world > 1 or config.image_id_positives or itc == "reference"
    this_run = (f"this run: {device.type}, {world} processes, image_id_positives={config.image_id_positives}, "
                f"itc_loss {itc}")
    for option, wanted, gpu in (("compile=true compiles", config.compile, False),
                                ("cuda_graph=true records", config.cuda_graph, True)):
        if wanted and (refused or (gpu and device.type != "cuda")):
            raise ValueError(f"{option} the step of one process{' on a GPU' if gpu else ''}, without "
                             f"image_id_positives and itc_loss's reference (--ops reference or "
                             f"VLFAST_REFERENCE_OPS; both read values on the host mid-step; DDP's hooks are "
                             f"not traced); {this_run}")


def compile_forward_backward(backend: str = "inductor"):
    """forward_backward compiled as one graph (an error, not a silent split, if it cannot be): dynamo
    traces the backward call too (trace_autograd_ops), so inductor fuses forward and backward.
    The optimizer and the EMA stay eager: each is already one multi-tensor kernel per dtype
    (fused AdamW is not traceable), and a CUDA graph records them with the rest.

    It compiles once. Each call first reads vlfast's settings eagerly (three environment lookups),
    so every op's implementation is decided before tracing and the traced code only reads that
    decision: decided inside the trace, it recompiled the step at the next eager reading, once
    or twice, and under CudaGraphStep the second compile fell inside the graph's capture
    (tests/test_compile.py counts the compiles). ``dynamic=False``: a step has one shape (train.py
    pads texts and keeps batches full), and a second model compiled in the same process (a
    benchmark's second config) would otherwise make dynamo trace sizes as symbols, which the
    caption masking's draws do not take. ``backend``: torch.compile's (the tests count compiles
    with "eager")."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):  # older torch: the backward splits the graph
        return torch.compile(forward_backward, backend=backend, dynamic=False)
    compiled = torch.compile(forward_backward, backend=backend, fullgraph=True, dynamic=False)

    def run(*args, **kwargs):
        ops_settings()
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(*args, **kwargs)
    return run


def train_step(runner, model: Mamo, optimizer, batch, grad_clip: float, image_ids=None,
               forward_backward=forward_backward) -> dict:
    """One step: ``forward_backward`` (the objectives, backward, clipping; or its compiled form),
    AdamW, EMA of the target network. ``runner`` is the model or its DDP wrapper; ``batch``
    (images, input_ids, attention_mask). Returns the losses and the gradient norm, detached, on
    the device.

    The host never waits for the GPU here, so it can queue the next step, and the step can be
    recorded as a CUDA graph. The random draws (masks, negatives, dropout) come from torch's
    default generator, whose state checkpoints save and graphs and torch.compile advance. A
    non-finite loss or gradient norm is caught on the device: fused AdamW skips the update
    where ``found_inf`` is 1 (as under torch.amp.GradScaler: weights, moments and step count
    stay as they were), and the target then averages toward unchanged weights. Returns the losses
    and the gradient norm (before clipping); the caller reads them when it likes and stops on a
    non-finite one, so a skipped step never goes unseen and no weight ever holds it."""
    optimizer.zero_grad(set_to_none=True)
    losses, norm = forward_backward(runner, model, batch, grad_clip, image_ids)
    optimizer.found_inf = (~torch.isfinite(losses["loss"].float() + norm)).float()
    optimizer.step()
    model.update_target()
    return {**losses, "grad_norm": norm}


class CudaGraphStep:
    """A training step on the GPU recorded once as a CUDA graph and then replayed with one launch
    per call, so the host's per-kernel cost (Python, dispatch, launch: about half of a ViT-B +
    BERT step on an H200, docs/benchmarks.md) is paid once:

        graphed = CudaGraphStep(lambda *batch: train_step(model, model, optimizer, batch, 5.0))
        for images, input_ids, attention_mask in batches:
            losses = graphed(images, input_ids, attention_mask)

    Each call copies its tensors (on the GPU) into the ones the step reads (every call needs the
    first call's shapes and dtypes: pad texts to one length, keep batches full) and returns what
    ``step`` returned, a dict of tensors (e.g. the losses) detached, which the next call
    overwrites. The first ``warmup`` calls run ``step`` eagerly on a side stream (lazy setup:
    cuBLAS, Triton compiles, optimizer state); the next one records it and replays it. Every call
    is a real step.

    ``step`` must never make the host wait for the GPU (no ``.item()``, no boolean-mask indexing:
    vlfast's ops and Mamo's forward qualify, ALBEF's per-row multinomial does not); its optimizer
    must keep its step count on the GPU (``AdamW(..., capturable=True)``), a learning rate that
    changes must be a GPU tensor updated in place (``group["lr"].fill_(lr)``), and every
    ``torch.Generator`` it draws from besides the default one goes in ``generators`` (each replay
    draws new numbers). Host-side state that ``step`` changes changes in the eager and recording
    calls only, so numbers read from it stay at their recorded values; MomentumModel keeps its
    update count in a tensor for that reason (its warmup decay advances at each replay).
    The object holds ``step`` and the input tensors, whose memory the graph reads and writes, for
    as long as it lives.
    """

    def __init__(self, step: Callable[..., Optional[dict]], generators: Sequence[torch.Generator] = (),
                 warmup: int = 2):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (CUDA graphs record only after an eager step), got {warmup}")
        self.step, self.generators, self.warmup = step, tuple(generators), warmup
        self.calls, self.inputs, self.outputs, self.side, self.graph = 0, None, None, None, None

    def __call__(self, *inputs: torch.Tensor) -> Optional[dict]:
        self._copy_in(inputs)
        if self.calls < self.warmup:
            self.side = self.side or torch.cuda.Stream()  # one stream: its cached blocks serve the next call
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self.outputs = self._run()
            torch.cuda.current_stream().wait_stream(self.side)
        else:
            if self.graph is None:
                graph = torch.cuda.CUDAGraph()
                for generator in self.generators:
                    graph.register_generator_state(generator)
                # thread_local: CUDA calls of other threads, such as a DataLoader's pin-memory thread,
                # stay allowed while this thread records.
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.outputs = self._run()
                self.graph = graph
            self.graph.replay()
        self.calls += 1
        return self.outputs

    def _run(self) -> Optional[dict]:
        # Detached: an output's autograd history would keep this step's graph alive into the next.
        outputs = self.step(*self.inputs)
        return None if outputs is None else {name: value.detach() for name, value in outputs.items()}

    def _copy_in(self, inputs) -> None:
        if self.inputs is None:
            self.inputs = [x.clone() for x in inputs]
            return
        if len(inputs) != len(self.inputs):
            raise ValueError(f"the step was recorded with {len(self.inputs)} input tensors, got {len(inputs)}")
        for index, (mine, new) in enumerate(zip(self.inputs, inputs)):  # all checked before any is overwritten
            if new.shape != mine.shape or new.dtype != mine.dtype:
                raise ValueError(f"input {index} is {new.dtype} {tuple(new.shape)}, but the recorded step takes "
                                 f"{mine.dtype} {tuple(mine.shape)}: every call needs the first call's shapes and dtypes")
        for mine, new in zip(self.inputs, inputs):
            mine.copy_(new, non_blocking=True)
