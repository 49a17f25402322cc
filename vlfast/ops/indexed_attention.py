"""vlfast.ops.indexed_attention: attention whose keys and values are read through an index into
a cache, for cross-attention to the same images from many texts.

Retrieval re-ranks each image with its top-k texts (and each text with its top-k images) through
the fusion encoder, and ALBEF's code repeats the image's tokens once per pair
(``image_feats[i].repeat(k, 1, 1)``): every pair recomputes the key and value projections of all
1 + N image tokens in every cross-attention layer, although they depend on the image alone (87%
of a pair's time at 384 px on a CPU). With a cache of each image's keys and values, computed once,
pair p attends to entry index[p]. On CUDA the Triton kernels of vlfast.ops.attention read the K/V
tiles of entry index[p] where they lie, as paged attention reads its block table, and the backward
sums each entry's dk and dv over the pairs that read it (vlfast.kernels.attention, HAS_INDEX). On
the CPU each entry's pairs go through torch's flash kernel together, their queries stacked against
the entry's keys: no gathered copy there either.
Schema: torch.ops.vlfast.indexed_attention (csrc/vlfast.cpp), autograd in C++ (csrc/autograd.cpp);
aux is the row log-sum-exp on both devices.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from vlfast import _extension
from vlfast._extension import implementation
from vlfast.ops.padded_attention import (_InterpretedTriton, attention, attention_reference, check_lengths, check_mask,
                                         check_scale, check_tensors, triton, triton_backward, triton_forward)


def indexed_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                      scale: Optional[float] = None) -> Tensor:
    """For each query batch p, attention to cache entry index[p]: ``attention(q, k[index], v[index],
    key_padding_mask=key_padding_mask[index])`` without forming k[index] and v[index].

    Args:
        q: (P, H, Lq, Dh) queries, e.g. the texts of P pairs; any strides.
        k, v: (I, H, Lk, Dh) the cache, e.g. I images' keys and values; q's dtype and device.
        index: (P,) int64 or int32, the cache entry of each query batch, in [0, I); entries may
            repeat or go unused.
        key_padding_mask: (I, Lk) of each entry, bool or 0/1 (True/1: a real token), or None.
        scale: a finite number; defaults to Dh ** -0.5.

    Returns (P, H, Lq, Dh) in q's dtype, differentiable in q, k and v (an entry's gradient is the
    sum over the query batches that read it). As vlfast.ops.attention: Dh in 16..128, a multiple of
    8; an entry with no key to attend gives 0. An index out of range raises IndexError on the CPU;
    on the GPU the Triton kernels give its rows NaN and its queries no gradient (checking would
    make the host wait; the GPU's gathered path, fp64, stops at a device-side assert).
    """
    mask, index = _check(q, k, v, index, key_padding_mask)
    scale = check_scale(scale, q)
    path = implementation("indexed_attention", q.device.type)
    if path == "reference":
        return indexed_attention_reference(q, k, v, index, key_padding_mask=mask, scale=scale)
    if path == "interpreted" and q.dtype != torch.float64 and not torch.compiler.is_compiling():
        return _InterpretedTriton.apply(q, k, v, mask, scale, index)
    if path in ("kernel", "interpreted") and (q.device.type == "cpu" or q.dtype != torch.float64):
        return torch.ops.vlfast.indexed_attention(q, k, v, index, mask, scale)[0]
    # No kernel here (or fp64 on a GPU, which Triton's attention takes no more than vlfast.ops.attention does)
    gathered = None if mask is None else mask.index_select(0, index)
    return attention(q, k.index_select(0, index), v.index_select(0, index), key_padding_mask=gathered, scale=scale)


def indexed_attention_reference(q: Tensor, k: Tensor, v: Tensor, index: Tensor, *,
                                key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """The gathered copy, then eager attention (vlfast.ops.attention_reference): what ALBEF's
    ``image_feats[i].repeat(k, 1, 1)`` gives its cross-attention, one entry per pair."""
    mask = None if key_padding_mask is None else key_padding_mask.index_select(0, index)
    return attention_reference(q, k.index_select(0, index), v.index_select(0, index), key_padding_mask=mask,
                               scale=scale)


def _check(q, k, v, index, key_padding_mask) -> Tuple[Optional[Tensor], Tensor]:
    check_tensors(q, k, v, {"q": "4-d (P, H, L, Dh)", "k": "4-d (I, H, L, Dh)", "v": "4-d (I, H, L, Dh)"})
    pairs, heads, _, dim = q.shape
    entries, _, keys, _ = k.shape
    if k.shape[1] != heads or k.shape[3] != dim or entries == 0:
        raise ValueError(f"k must be (I >= 1, H={heads}, Lk, Dh={dim}), got {tuple(k.shape)}")
    check_lengths(q, k, v)
    if not isinstance(index, Tensor) or index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"index must be an int64 or int32 tensor, got "
                        f"{getattr(index, 'dtype', None) or type(index).__name__}")
    if index.shape != (pairs,):
        raise ValueError(f"index must have shape (P={pairs},), one cache entry per query batch, got {tuple(index.shape)}")
    if index.device != q.device:
        raise ValueError(f"index is on {index.device} but q on {q.device}")
    # On the CPU the index is host memory, read where it lies (numpy: no op a GPU would launch or
    # wait for); on the GPU a read would make the host wait (its rows become NaN instead)
    if index.device.type == "cpu" and pairs and not torch.compiler.is_compiling() \
            and not torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE):  # no values to read there
        values = index.numpy()
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= entries:
            raise IndexError(f"index holds {low if low < 0 else high}, outside the cache's entries [0, {entries})")
    mask = check_mask(key_padding_mask, (entries, keys), f"(I={entries}, Lk={keys}), one row per cache entry", q.device)
    return mask, index.to(torch.int64).contiguous()


# The CPU kernels: each entry's query batches stacked as one long query against the entry's keys,
# through torch's flash kernel (which reads its inputs as contiguous rows), one call per entry read.

def _groups(index: Tensor, entries: int):
    """(order, [(entry, start, end)]): the query batches sorted by entry, and each read entry's run."""
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=entries).tolist()
    runs, start = [], 0
    for entry, count in enumerate(counts):
        if count:
            runs.append((entry, start, start + count))
        start += count
    return order, runs


def _stacked(x: Tensor, rows: Tensor) -> Tensor:
    """(n, H, L, ...) rows of x as one (1, H, n·L, ...) batch."""
    part = x.index_select(0, rows).transpose(0, 1)
    return part.reshape(1, part.shape[0], -1, *part.shape[3:])


def _unstacked(x: Tensor, n: int) -> Tensor:
    """The inverse of _stacked: (1, H, n·L, ...) -> (n, H, L, ...)."""
    return x.reshape(x.shape[1], n, -1, *x.shape[3:]).transpose(0, 1)


def _additive_mask(key_padding_mask: Optional[Tensor], entry: int, dtype) -> Optional[Tensor]:
    if key_padding_mask is None:
        return None
    row = torch.zeros(key_padding_mask.shape[1], dtype=dtype).masked_fill_(~key_padding_mask[entry], float("-inf"))
    return row[None, None, None, :]


def cpu_forward(q: Tensor, k: Tensor, v: Tensor, index: Tensor, key_padding_mask: Optional[Tensor],
                scale: float) -> Tuple[Tensor, Tensor]:
    """(out (P, H, Lq, Dh), lse (P, H, Lq) in the math dtype: fp64 for fp64, else fp32; +inf for rows with no key)."""
    pairs, heads, queries, dim = q.shape
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape, dtype=q.dtype)
    lse = torch.full((pairs, heads, queries), float("inf"), dtype=math_dtype)
    has_key = None if key_padding_mask is None else key_padding_mask.any(1).tolist()
    order, runs = _groups(index, k.shape[0])
    for entry, start, end in runs:
        if has_key is not None and not has_key[entry]:
            continue  # no key to attend: output 0, log-sum-exp +inf (as the GPU kernels)
        rows = order[start:end]
        part_out, part_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _stacked(q, rows).contiguous(), k[entry:entry + 1].contiguous(), v[entry:entry + 1].contiguous(),
            attn_mask=_additive_mask(key_padding_mask, entry, q.dtype), scale=scale)
        out.index_copy_(0, rows, _unstacked(part_out, end - start))
        lse.index_copy_(0, rows, _unstacked(part_lse, end - start).to(math_dtype))
    return out, lse


def cpu_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, index: Tensor, key_padding_mask: Optional[Tensor],
                 out: Tensor, lse: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv): each entry's dk and dv from one flash backward over all its query batches."""
    # dk, dv in k's and v's layouts (the cache's heads are views of (I, L, W) projections, whose
    # backward then copies nothing); every entry is written, the unread ones with zeros
    dq, dk, dv = torch.zeros(q.shape, dtype=q.dtype), torch.zeros_like(k), torch.zeros_like(v)
    has_key = None if key_padding_mask is None else key_padding_mask.any(1).tolist()
    order, runs = _groups(index, k.shape[0])
    for entry, start, end in runs:
        if has_key is not None and not has_key[entry]:
            continue
        rows = order[start:end]
        part_q, part_k, part_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _stacked(grad_out, rows).contiguous(), _stacked(q, rows).contiguous(), k[entry:entry + 1].contiguous(),
            v[entry:entry + 1].contiguous(), _stacked(out, rows).contiguous(),
            _stacked(lse.unsqueeze(-1), rows).squeeze(-1).contiguous(), 0.0, False,
            attn_mask=_additive_mask(key_padding_mask, entry, q.dtype), scale=scale)
        dq.index_copy_(0, rows, _unstacked(part_q, end - start))
        dk[entry], dv[entry] = part_k[0], part_v[0]
    return dq, dk, dv


# Once vlfast._C defines the schema (a build older than this op runs the gathered path: no kernel)
if _extension.LOAD_ERROR is None and hasattr(torch.ops.vlfast, "indexed_attention"):

    @torch.library.register_fake("vlfast::indexed_attention")
    def _indexed_attention_fake(q, k, v, index, key_padding_mask, scale):
        math_dtype = torch.float64 if q.device.type == "cpu" and q.dtype == torch.float64 else torch.float32
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        return out, q.new_empty(q.shape[:3], dtype=math_dtype)

    @torch.library.register_fake("vlfast::indexed_attention_backward")
    def _indexed_attention_backward_fake(grad_out, q, k, v, index, key_padding_mask, out, lse, scale):
        # dk, dv in k's and v's layouts; the Triton launcher first makes a k, v whose last stride is
        # not 1 contiguous, and so are theirs then
        like = lambda x: torch.empty_like(x) if x.device.type == "cpu" or x.stride(-1) == 1 else \
            torch.empty_like(x, memory_format=torch.contiguous_format)  # noqa: E731
        return torch.empty_like(q, memory_format=torch.contiguous_format), like(k), like(v)

    # Autograd: C++ (csrc/autograd.cpp), which also raises if a second derivative is taken.
    torch.library.register_kernel("vlfast::indexed_attention", "cpu", cpu_forward)
    torch.library.register_kernel("vlfast::indexed_attention_backward", "cpu", cpu_backward)
    if triton is not None:
        torch.library.register_kernel(
            "vlfast::indexed_attention", "cuda",
            lambda q, k, v, index, key_padding_mask, scale: triton_forward(q, k, v, key_padding_mask, scale, index))
        torch.library.register_kernel(
            "vlfast::indexed_attention_backward", "cuda",
            lambda grad_out, q, k, v, index, key_padding_mask, out, lse, scale: triton_backward(
                grad_out, q, k, v, key_padding_mask, out, lse, scale, index))
