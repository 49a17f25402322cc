"""vlfast.ops.attention: fused attention with a key-padding mask, for self-attention and
cross-attention (Lq ≠ Lk).

A BERT key-padding mask pushes `scaled_dot_product_attention` off its flash kernel, and eager
attention (ALBEF's xbert) materialises B·H·Lq·Lk scores several times. On the CPU a C++ kernel
(csrc/cpu/attention.cpp) takes each (batch, head) whole: at VLP lengths its Lq×Lk scores fit in
cache, the softmax needs no online rescaling, and the backward reuses the forward's
probabilities (kept as eager attention keeps them: B·H·Lq·Lk floats, where SDPA keeps O(Lq)).
On CUDA a call runs flash-attention-style Triton kernels (vlfast.kernels.attention) when
VLFAST_BACKEND=fused; by default (auto) every CUDA call runs SDPA (with the mask, its
memory-efficient kernel), which measured faster on an H200 at VLP lengths, where host overhead,
not GPU work, sets both times (docs/ops/attention.md has the numbers).
Both kernels are torch.ops.vlfast.attention (schema: csrc/vlfast.cpp), whose second output, aux,
is what each kernel's backward takes: the CPU's probabilities, the GPU's row log-sum-exp; its
autograd is C++ (csrc/autograd.cpp).
"""
import math
import numbers
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vlfast import _extension
from vlfast._extension import backend, implementation, kernel_refuses

try:
    import triton

    from vlfast.kernels import attention as attention_kernels
except ImportError:  # a torch build without Triton: no Triton path (the CPU kernel is C++)
    triton = None

HEAD_DIMS = range(16, 129, 8)
# Scores per (batch, head) up to which auto runs the CPU kernel. It keeps all Lq×Lk probabilities
# of a head; past about this many SDPA's tiled kernel was faster, and it keeps O(Lq) memory
# (forward + backward at 1024 × 1024 tokens: benchmarks/bench_attention.py's self_1024 rows).
CPU_KERNEL_MAX_SCORES = 768 * 768


def attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
              scale: Optional[float] = None) -> Tensor:
    """softmax(q·kᵀ·scale, masked) · v, as ``F.scaled_dot_product_attention(q, k, v,
    attn_mask=key_padding_mask[:, None, None, :])``.

    Args:
        q: (B, H, Lq, Dh); k, v: (B, H, Lk, Dh); one float dtype (on the GPU bf16/fp16 on its
            tensor cores, fp32, and fp64 through SDPA; on the CPU fp32 math for fp16/bf16, fp64 in
            fp64). Dh in 16..128, a multiple of 8. Any strides.
        key_padding_mask: (B, Lk), bool or 0/1; True/1 marks a real token that may be attended
            (the Hugging Face attention_mask convention). None attends to every key.
        scale: a finite number; defaults to Dh ** -0.5.

    A batch whose mask is all False (no key to attend to), where SDPA gives NaN, gets output 0
    and zero gradients. Returns (B, H, Lq, Dh) in q's dtype. On the CPU, auto runs the C++ kernel
    up to Lq·Lk = CPU_KERNEL_MAX_SCORES (768²) and SDPA beyond; VLFAST_BACKEND=fused runs the
    kernel at any length.
    """
    mask = _check(q, k, v, key_padding_mask)
    scale = check_scale(scale, q)
    path = implementation("attention", q.device.type)
    if path == "reference":
        return attention_reference(q, k, v, key_padding_mask=mask, scale=scale)
    # No fp64 in Triton: its fp64 dot does not compile at these tile sizes (tests/compile_kernels_for_gpu.py).
    if path == "interpreted":
        if q.dtype != torch.float64 and not torch.compiler.is_compiling():
            return _InterpretedTriton.apply(q, k, v, mask, scale)
        path = "kernel"  # the CPU's C++ kernel (dynamo cannot trace Triton's interpreter)
    if path == "kernel" and q.device.type == "cpu":  # the C++ kernel up to CPU_KERNEL_MAX_SCORES, unless fused
        if q.shape[2] * k.shape[2] <= CPU_KERNEL_MAX_SCORES or backend("attention") == "fused":
            return torch.ops.vlfast.attention(q, k, v, mask, scale)[0]
    elif path == "kernel":  # Triton's (by default auto leaves the GPU to SDPA: module docstring)
        if q.dtype != torch.float64:
            return torch.ops.vlfast.attention(q, k, v, mask, scale)[0]
        if backend("attention") == "fused":
            raise kernel_refuses("attention", "fp64")
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    attend_all, has_key = _without_empty_rows(mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend_all[:, None, None, :], scale=scale)
    if q.device.type == "cpu" and bool(has_key.all()):  # free to ask on the CPU; a host sync on the GPU
        return out
    return torch.where(has_key[:, None, None, None], out, 0.0)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                        scale: Optional[float] = None) -> Tensor:
    """Eager attention as ALBEF's xbert computes it (scores, masked softmax, product), with the
    masked keys at −inf instead of −10000 so that it equals SDPA."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, Lq, Lk)
    if key_padding_mask is None:
        return scores.softmax(dim=-1) @ v
    attend_all, has_key = _without_empty_rows(key_padding_mask.bool())
    probs = scores.masked_fill(~attend_all[:, None, None, :], float("-inf")).softmax(dim=-1)
    return torch.where(has_key[:, None, None, None], probs @ v, 0.0)


def _without_empty_rows(mask: Tensor) -> Tuple[Tensor, Tensor]:
    """(the mask with all-False rows set to all-True, which rows had a key): a softmax over no key
    is NaN; over all keys, then zeroed, it gives the defined 0 output and 0 gradients."""
    has_key = mask.any(dim=1)
    return mask | ~has_key[:, None], has_key


def _check(q, k, v, key_padding_mask) -> Optional[Tensor]:
    check_tensors(q, k, v, {name: "(B, H, L, Dh)" for name in "qkv"})
    batch, heads, _, dim = q.shape
    if k.shape[:2] != (batch, heads) or k.shape[3] != dim:
        raise ValueError(f"k must be (B={batch}, H={heads}, Lk, Dh={dim}), got {tuple(k.shape)}")
    check_lengths(q, k, v)
    return check_mask(key_padding_mask, (batch, k.shape[2]), f"(B={batch}, Lk={k.shape[2]})", q.device)


def check_scale(scale, q: Tensor) -> float:
    """The softmax's scale: a finite number, or Dh ** -0.5 for None."""
    if scale is not None and not (isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def check_tensors(q: Tensor, k: Tensor, v: Tensor, shapes: dict) -> None:
    """q, k and v are 4-d float tensors of q's dtype and device (``shapes``: each one's dims, as
    the error names them). The argument checks attention and indexed_attention share."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must be {shapes[name]}, got shape {tuple(x.shape)}")
        if not x.is_floating_point() or x.dtype != q.dtype:
            raise TypeError(f"{name} must be a float tensor of q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q on {q.device}")


def check_lengths(q: Tensor, k: Tensor, v: Tensor) -> None:
    """v has k's shape, the head dim is one the kernels take, and Lq, Lk >= 1."""
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[3]} is not supported: 16..128, a multiple of 8")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"Lq and Lk must be >= 1, got {q.shape[2]} and {k.shape[2]}")


def check_mask(key_padding_mask, shape: tuple, described: str, device) -> Optional[Tensor]:
    """The key-padding mask as a contiguous bool tensor of ``shape`` (``described`` in the error), or None."""
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.shape != shape:
        raise ValueError(f"key_padding_mask must be {described}, got "
                         f"{tuple(getattr(key_padding_mask, 'shape', ())) or type(key_padding_mask).__name__}")
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q on {device}")
    if key_padding_mask.is_floating_point() or key_padding_mask.is_complex():
        raise TypeError(f"key_padding_mask must be bool or 0/1 integers, got {key_padding_mask.dtype}")
    return key_padding_mask.bool().contiguous()


# The Triton kernels: the CUDA kernels of torch.ops.vlfast.attention and attention_backward
# (the CPU's are C++, csrc/cpu/attention.cpp), registered below.

def _launch_config(q: Tensor, k: Tensor):
    dim = q.shape[-1]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    block_m = 16 if interpreted else 64
    block_n = 16 if interpreted else (64 if dim <= 64 else 32)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(dim)),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _strides(*tensors):
    return [stride for x in tensors for stride in x.stride()[:3]]


def _unit_last_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], scale: float,
                   index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(output (B, H, Lq, Dh), aux: the row log-sum-exp (B, H, Lq) fp32, +inf for rows with no key).
    ``index`` (B,) int64: k, v and the mask are (I, ...) cache entries, query batch b reading entry
    index[b] (vlfast.ops.indexed_attention)."""
    q, k, v = (_unit_last_stride(x) for x in (q, k, v))
    batch, heads, queries, dim = q.shape
    keys = k.shape[2]
    out = torch.empty(batch, heads, queries, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, queries, dtype=torch.float32, device=q.device)
    config = _launch_config(q, k)
    grid = (triton.cdiv(queries, config["BLOCK_M"]), batch * heads)
    attention_kernels.attention_forward[grid](
        q, k, v, key_padding_mask, index, out, lse, *_strides(q, k, v), heads, queries, keys, dim, k.shape[0], scale,
        HAS_MASK=key_padding_mask is not None, HAS_INDEX=index is not None, **config)
    return out, lse


def triton_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                    out: Tensor, lse: Tensor, scale: float, index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); with ``index``, dk and dv are the cache entries', summed over the batches that read each."""
    q, k, v = (_unit_last_stride(x) for x in (q, k, v))
    grad_out = grad_out.contiguous()
    batch, heads, queries, dim = q.shape
    entries, _, keys, _ = k.shape
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # rowsum(dO ∘ O), (B, H, Lq)
    dq = torch.empty(batch, heads, queries, dim, dtype=q.dtype, device=q.device)
    if index is None:
        dk = torch.empty(entries, heads, keys, dim, dtype=k.dtype, device=q.device)
        dv = torch.empty_like(dk)
    else:  # in the cache's layout (its heads are views of (I, L, W) projections): their backward copies nothing
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    order = offsets = None
    if index is not None:  # the batches by entry, and where each entry's run starts: no host sync
        ordered, order = torch.sort(index, stable=True)
        offsets = torch.searchsorted(ordered, torch.arange(entries + 1, device=q.device))  # #batches below each entry
    config = _launch_config(q, k)
    has = dict(HAS_MASK=key_padding_mask is not None, HAS_INDEX=index is not None)
    attention_kernels.attention_backward_kv[(triton.cdiv(keys, config["BLOCK_N"]), entries * heads)](
        q, k, v, key_padding_mask, order, offsets, grad_out, lse, delta, dk, dv, *_strides(q, k, v, dk, dv), heads,
        queries, keys, dim, scale, **has, **config)
    attention_kernels.attention_backward_q[(triton.cdiv(queries, config["BLOCK_M"]), batch * heads)](
        q, k, v, key_padding_mask, index, grad_out, lse, delta, dq, *_strides(q, k, v), heads, queries, keys, dim,
        entries, scale, **has, **config)
    return dq, dk, dv


class _InterpretedTriton(torch.autograd.Function):
    """The Triton kernels on CPU tensors, through Triton's interpreter (implementation() gives
    "interpreted": TRITON_INTERPRET=1 and VLFAST_BACKEND=fused), which is how the tests run them
    without a GPU. The schemas' CPU kernels are others (C++; indexed_attention's torch), so this
    path calls the launchers itself; the GPU runs them through torch.ops.vlfast.attention and
    indexed_attention (``index``: the latter's)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, scale, index=None):
        out, lse = triton_forward(q, k, v, key_padding_mask, scale, index)
        ctx.save_for_backward(q, k, v, key_padding_mask, out, lse, index)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, key_padding_mask, out, lse, index = ctx.saved_tensors
        return (*triton_backward(grad_out, q, k, v, key_padding_mask, out, lse, ctx.scale, index), None, None, None)


def _padded_keys(keys: int) -> int:
    return -(-keys // 8) * 8  # the CPU kernel's probabilities pad their rows to 8 keys


def _heads_layout(t: Tensor) -> Tensor:
    """A (B, H, L, Dh) tensor laid out as (B, L, H, Dh), as the CPU kernel returns its outputs."""
    return t.new_empty(t.shape[0], t.shape[2], t.shape[1], t.shape[3]).transpose(1, 2)


if _extension.LOAD_ERROR is None:

    @torch.library.register_fake("vlfast::attention")
    def _attention_fake(q, k, v, key_padding_mask, scale):
        batch, heads, queries, _ = q.shape
        if q.device.type == "cpu":  # the C++ kernel: aux = probabilities in the math dtype
            math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            return _heads_layout(q), q.new_empty(batch, heads, queries, _padded_keys(k.shape[2]), dtype=math_dtype)
        # Triton's: aux = row log-sum-exp
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("vlfast::attention_backward")
    def _attention_backward_fake(grad_out, q, k, v, key_padding_mask, out, aux, scale):
        if q.device.type == "cpu":
            return _heads_layout(q), _heads_layout(k), _heads_layout(v)
        return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))

    # Autograd: C++ (csrc/autograd.cpp), which also raises if a second derivative is taken.
    if triton is not None:
        torch.library.register_kernel("vlfast::attention", "cuda", triton_forward)
        torch.library.register_kernel("vlfast::attention_backward", "cuda", triton_backward)
