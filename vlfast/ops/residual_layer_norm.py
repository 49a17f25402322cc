"""vlfast.ops.dropout_add_layer_norm: LayerNorm(dropout(x) + residual) in one pass, the output
sublayer of every post-norm BERT layer (Hugging Face's BertSelfOutput and BertOutput, in ALBEF,
BLIP and X-VLM's text and fusion encoders).

Torch runs it as dropout (a Bernoulli draw into a mask, a division, a product), an add and a
LayerNorm, and stores the mask and the sum for the backward. Here one kernel reads x and the
residual once and writes the output and two statistics per row. The mask is never stored: it
comes from Philox4x32-10, keyed by a seed drawn from torch's default generator and counted by
element index, so the backward regenerates it. On the CPU the kernel is C++
(csrc/cpu/dropout_add_layer_norm.cpp), on the GPU Triton (vlfast.kernels.dropout_add_layer_norm,
registered below as the schema's CUDA kernel); both draw the same mask from the same seed.
On the GPU the Triton kernel runs only when VLFAST_BACKEND=fused: by default (auto) the GPU runs
Hugging Face's code, which measured faster on an H200 at BERT's shapes: there the op's bytes
take microseconds at the card's copy bandwidth, and the host's launches and the then Python
autograd cost more than the kernel saved (docs/ops/dropout_add_layer_norm.md has the numbers).
The autograd is C++ since (csrc/autograd.cpp, on every device), not yet measured on a card.
That mask is another draw than torch's dropout (same distribution, tested): with p = 0 or
training=False the op equals the reference up to rounding, with dropout in distribution.
"""
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from vlfast import _extension
from vlfast._extension import backend, implementation, kernel_refuses

try:
    import triton

    from vlfast.kernels import dropout_add_layer_norm as kernels
except ImportError:  # a torch build without Triton: the reference on the GPU
    triton = None

MAX_TRITON_WIDTH = 16384  # one row per program in registers; wider rows run the reference on the GPU


def dropout_add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, p: float, *,
                           eps: float = 1e-12, training: bool = True) -> Tensor:
    """``F.layer_norm(F.dropout(x, p, training) + residual, (D,), weight, bias, eps)``.

    Args:
        x: (..., D), e.g. the output of BertSelfOutput's dense layer; any float dtype.
        residual: x's shape, any float dtype.
        weight, bias: (D,), the LayerNorm's affine parameters.
        p: the dropout probability, in [0, 1].
        eps: LayerNorm's epsilon (BERT's 1e-12 by default).
        training: as F.dropout's; False (or p = 0) skips the dropout and draws no random number.

    Returns x's shape in the promoted dtype of x and residual (fp32 under autocast, whose residual
    stream is LayerNorm's fp32 output); math in fp32, fp64 if an input is fp64. Differentiable in
    x, residual, weight and bias. The mask draws one seed from the default generator of x's
    device per call, so torch.manual_seed makes it reproducible, as for nn.Dropout. On the GPU
    the reference runs unless VLFAST_BACKEND=fused, which runs the Triton kernel and raises a
    RuntimeError for what it does not take: fp64, rows wider than MAX_TRITON_WIDTH (16384), or
    a build without vlfast._C.
    """
    _check(x, residual, weight, bias, p, eps)
    p = float(p) if training else 0.0
    fused = implementation("dropout_add_layer_norm", x.device.type) == "kernel"
    if fused and x.device.type == "cuda" and not _triton_takes(x, residual):  # Triton's kernel does not take it
        if backend("dropout_add_layer_norm") == "fused":
            raise kernel_refuses("dropout_add_layer_norm", f"fp64 or D > {MAX_TRITON_WIDTH}")
        fused = False
    if not fused:
        return dropout_add_layer_norm_reference(x, residual, weight, bias, p, eps=eps, training=training)
    dtype = torch.promote_types(x.dtype, residual.dtype)
    out, _, _ = torch.ops.vlfast.dropout_add_layer_norm(
        x.contiguous(), residual.to(dtype).contiguous(), weight.to(dtype).contiguous(), bias.to(dtype).contiguous(),
        p, float(eps), _draw_seed(p, x.device))
    return out


def dropout_add_layer_norm_reference(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, p: float, *,
                                     eps: float = 1e-12, training: bool = True) -> Tensor:
    """Hugging Face's BertSelfOutput / BertOutput after the dense layer: LayerNorm(dropout(x) + residual)."""
    dtype = torch.promote_types(x.dtype, residual.dtype)
    h = F.dropout(x, p, training) + residual
    return F.layer_norm(h, (h.shape[-1],), weight.to(dtype), bias.to(dtype), eps)


def dropout_threshold(p: float) -> int:
    """Element e is kept iff (its Philox word >> 1) >= floor(p·2³¹), as the C++ kernel computes it."""
    return int(p * 2 ** 31)


def _draw_seed(p: float, device: torch.device) -> Tensor:
    """The Philox key: one draw from the device's default generator (no host sync on the GPU);
    none when nothing is dropped, so eval mode leaves the RNG as it was."""
    if dropout_threshold(p) == 0:
        # under torch.compile a constant in the graph (dynamo cannot trace the mode query); a fake
        # tensor (FakeTensorMode without compile) must not be kept
        if torch.compiler.is_compiling() or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE):
            return torch.zeros(1, dtype=torch.int64, device=device)
        if device not in _NO_SEED:  # made once: the target network's calls would each make one (48 per ViT-B step)
            with torch.inference_mode(False):  # a normal tensor even when first made under inference_mode
                _NO_SEED[device] = torch.zeros(1, dtype=torch.int64, device=device)
        return _NO_SEED[device]
    return torch.randint(2 ** 62, (1,), device=device)


_NO_SEED = {}  # device -> the seed tensor of calls that drop nothing (never written)


def _check(x, residual, weight, bias, p, eps) -> None:
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x on {x.device}")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be (..., D) with D >= 1, got shape {tuple(x.shape)}")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    dim = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (dim,):
            raise ValueError(f"{name} must be ({dim},), got {tuple(t.shape)}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a float in [0, 1], got {p!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite positive float, got {eps!r}")


def _accumulate_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# The Triton launchers: the CUDA kernels of the torch.ops.vlfast schemas (csrc/vlfast.cpp); the
# tests also run them on CPU tensors under TRITON_INTERPRET=1 against the C++ kernels.

def _triton_takes(x: Tensor, residual: Tensor) -> bool:
    return x.shape[-1] <= MAX_TRITON_WIDTH and torch.float64 not in (x.dtype, residual.dtype)


def _check_triton_inputs(x: Tensor, residual: Tensor, weight: Tensor, seed: Tensor) -> None:
    """What the C++ kernels check, for direct calls of torch.ops.vlfast.* on the GPU."""
    if not _triton_takes(x, residual):
        raise ValueError(f"the Triton kernel takes D <= {MAX_TRITON_WIDTH} and no fp64, got D={x.shape[-1]}, "
                         f"{x.dtype} and {residual.dtype}: call vlfast.ops.dropout_add_layer_norm")
    if x.ndim == 0 or x.shape[-1] == 0 or residual.shape != x.shape or weight.shape != x.shape[-1:]:
        raise ValueError(f"x and residual must be (..., D), D >= 1, and weight (D,), got {tuple(x.shape)}, "
                         f"{tuple(residual.shape)}, {tuple(weight.shape)}")
    if not (x.is_contiguous() and residual.is_contiguous() and weight.is_contiguous()):
        raise ValueError("x, residual and weight must be contiguous")
    if residual.dtype != weight.dtype:
        raise TypeError(f"weight must have residual's dtype {residual.dtype}, got {weight.dtype}")
    if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != x.device:
        raise ValueError(f"seed must be one int64 on {x.device}, got {seed.dtype} {tuple(seed.shape)} on {seed.device}")


def _launch_config(p: float, dim: int):
    block = max(16, triton.next_power_of_2(dim))
    threshold = dropout_threshold(p)
    return dict(threshold=min(threshold, 2 ** 31 - 1), scale=1.0 / (1.0 - p) if p < 1 else 0.0,
                HAS_DROPOUT=threshold > 0, BLOCK_D=block, num_warps=min(max(block // 256, 1), 8))


def triton_forward(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, p: float, eps: float, seed: Tensor):
    _check_triton_inputs(x, residual, weight, seed)
    if bias.shape != weight.shape or bias.dtype != weight.dtype or not bias.is_contiguous():
        raise ValueError("bias must be a contiguous tensor of weight's shape and dtype")
    dim = x.shape[-1]
    rows = x.numel() // dim
    out = torch.empty_like(residual)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if rows:
        kernels.dropout_add_layer_norm_forward[(rows,)](x, residual, weight, bias, seed, out, mean, rstd, dim,
                                                        eps=eps, **_launch_config(p, dim))
    return out, mean, rstd


def triton_backward(grad: Tensor, x: Tensor, residual: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                    p: float, seed: Tensor):
    _check_triton_inputs(x, residual, weight, seed)
    dim = x.shape[-1]
    rows = x.numel() // dim
    programs = 8 if os.environ.get("TRITON_INTERPRET") == "1" or x.device.type != "cuda" else \
        4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    rows_per_program = max(1, triton.cdiv(rows, programs))
    programs = max(1, triton.cdiv(rows, rows_per_program))
    grad_x, grad_residual = torch.empty_like(x), torch.empty_like(residual)
    parts = torch.empty(2, programs, dim, dtype=mean.dtype, device=x.device)
    kernels.dropout_add_layer_norm_backward[(programs,)](
        grad.contiguous(), x, residual, weight, seed, mean, rstd, grad_x, grad_residual, parts[0], parts[1], rows, dim,
        rows_per_program, **_launch_config(p, dim))
    grad_weight, grad_bias = parts.sum(1).to(weight.dtype)
    return grad_x, grad_residual, grad_weight, grad_bias


if _extension.LOAD_ERROR is None:

    @torch.library.register_fake("vlfast::dropout_add_layer_norm")
    def _forward_fake(x, residual, weight, bias, p, eps, seed):
        stats = x.new_empty(math.prod(x.shape[:-1]), dtype=_accumulate_dtype(x, residual))
        return torch.empty_like(residual), stats, torch.empty_like(stats)

    @torch.library.register_fake("vlfast::dropout_add_layer_norm_backward")
    def _backward_fake(grad, x, residual, weight, mean, rstd, p, seed):
        return torch.empty_like(x), torch.empty_like(residual), torch.empty_like(weight), torch.empty_like(weight)

    # Autograd: C++ (csrc/autograd.cpp), which also raises if a second derivative is taken.
    if triton is not None:
        torch.library.register_kernel("vlfast::dropout_add_layer_norm", "cuda", triton_forward)
        torch.library.register_kernel("vlfast::dropout_add_layer_norm_backward", "cuda", triton_backward)
