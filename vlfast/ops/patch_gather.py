"""Random masking of image patches (gather of the visible ones) and its inverse, one pass each.

MAE's `random_masking` adds the position embedding, then gathers with an index repeated to
(B, L, D), then builds the mask with a second gather; its decoder concatenates mask tokens and
gathers again, then adds position embeddings. Here each direction is one kernel that reads each
needed row once and writes each output row once, with the position embedding added on the way:

    torch.ops.vlfast.random_masking(src, pos, index)[b, l] = src[b, index[b, l]] + pos[b or 0, index[b, l]]
    torch.ops.vlfast.unmask(rows, ids_restore, fill, pos)[b, n] = (rows[b, j] if j < L else fill) + pos[b or 0, n],
        j = ids_restore[b, n]

(random_masking's kernel is only the gather: the op draws the permutation in torch.) Each is the
other's backward: the gradient of a gather is an unmask with zero fill and that of an unmask is a
gather, so two kernels per device serve all four directions. Kernels: csrc/cpu/patch_gather.cpp,
csrc/cuda/patch_gather.cpp (+ patch_gather_kernel.cu); autograd: csrc/autograd.cpp.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from vlfast import _extension
from vlfast._extension import implementation


class Masking(NamedTuple):
    visible: Tensor  # (B, L, D): (tokens + pos_embed) at the kept positions, in ids_keep order
    mask: Tensor  # (B, N) float32: 1 masked, 0 kept
    ids_restore: Tensor  # (B, N) int64: argsort of the shuffle; < L at kept positions
    ids_keep: Tensor  # (B, L) int64: the kept positions


def random_masking(tokens: Tensor, mask_ratio: float, *, pos_embed: Optional[Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> Masking:
    """Keep a uniformly random subset of L = int(N·(1 − mask_ratio)) patches per sample (MAE).

    Args:
        tokens: (B, N, D) patch tokens without [CLS], any float dtype.
        mask_ratio: in [0, 1); 0 keeps every patch (in a random order).
        pos_embed: (1, N, D) or (B, N, D), added to the kept tokens; the result takes the
            promoted dtype of tokens and pos_embed, as ``tokens + pos_embed`` would.
        generator: draws the per-sample noise (``torch.rand``) on the tokens' device, so a seeded
            generator gives the same masks as MAE's code with the same generator.

    Returns ``Masking(visible, mask, ids_restore, ids_keep)``. Differentiable in tokens and pos_embed.
    """
    batch, patches, dim = _check_tokens(tokens, "tokens")
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a float, got {type(mask_ratio).__name__}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    _check_pos_embed(pos_embed, tokens, batch, patches, dim)
    if generator is not None and generator.device.type != tokens.device.type:
        raise ValueError(f"generator is on {generator.device}, tokens on {tokens.device}")
    if implementation("random_masking", tokens.device.type) != "kernel":
        return random_masking_reference(tokens, mask_ratio, pos_embed=pos_embed, generator=generator)

    # Written for the host's cost per call as much as the kernels' (a user pays it at every call):
    # method calls rather than indexing syntax, no conversion that would do nothing.
    keep = int(patches * (1 - mask_ratio))
    noise = torch.rand(batch, patches, device=tokens.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = _inverse_permutation(ids_shuffle)
    ids_keep = ids_shuffle.narrow(1, 0, keep).contiguous()
    visible = torch.ops.vlfast.random_masking(tokens.contiguous(), _promoted(pos_embed, tokens), ids_keep)
    mask = ids_restore.ge(keep).to(torch.float32)
    return Masking(visible, mask, ids_restore, ids_keep)


def unmask(visible: Tensor, ids_restore: Tensor, mask_token: Tensor, *, pos_embed: Optional[Tensor] = None) -> Tensor:
    """All N positions back: visible rows where ids_restore < L, ``mask_token`` elsewhere, + pos_embed.

    Args:
        visible: (B, L, D), e.g. the image encoder's output on ``random_masking``'s visible tokens.
        ids_restore: (B, N) int64 from ``random_masking`` (a permutation of 0..N-1 per sample).
        mask_token: (1, 1, D) or (D,), the learned mask token.
        pos_embed: (1, N, D) or (B, N, D), added at every position, or None.

    Returns (B, N, D) in the promoted dtype of visible, mask_token and pos_embed (as MAE's
    concatenation and add). Differentiable in visible, mask_token and pos_embed. An id outside
    [0, N) raises IndexError on the CPU; on the GPU its row becomes NaN (checking would sync).
    """
    batch, kept, dim = _check_tokens(visible, "visible")
    if not isinstance(ids_restore, Tensor) or ids_restore.dtype != torch.int64:
        raise TypeError(f"ids_restore must be an int64 tensor, got {getattr(ids_restore, 'dtype', type(ids_restore).__name__)}")
    if ids_restore.ndim != 2 or ids_restore.shape[0] != batch or ids_restore.shape[1] < kept:
        raise ValueError(f"ids_restore must be (B={batch}, N >= L={kept}), got {tuple(ids_restore.shape)}")
    if ids_restore.device != visible.device:
        raise ValueError(f"ids_restore is on {ids_restore.device}, visible on {visible.device}")
    if not isinstance(mask_token, Tensor) or mask_token.numel() != dim or mask_token.shape[-1:] != (dim,):
        raise ValueError(f"mask_token must be (1, 1, {dim}) or ({dim},), got {getattr(mask_token, 'shape', mask_token)}")
    if not mask_token.is_floating_point():
        raise TypeError(f"mask_token must be a float tensor, got {mask_token.dtype}")
    if mask_token.device != visible.device:
        raise ValueError(f"mask_token is on {mask_token.device}, visible on {visible.device}")
    patches = ids_restore.shape[1]
    _check_pos_embed(pos_embed, visible, batch, patches, dim)
    if implementation("unmask", visible.device.type) != "kernel":
        return unmask_reference(visible, ids_restore, mask_token, pos_embed=pos_embed)

    dtype = torch.promote_types(visible.dtype, mask_token.dtype)
    if pos_embed is not None:
        dtype = torch.promote_types(dtype, pos_embed.dtype)
    return torch.ops.vlfast.unmask(visible.contiguous(), ids_restore.contiguous(),
                                   mask_token.reshape(dim).to(dtype).contiguous(), _promoted(pos_embed, visible, dtype))


def random_masking_reference(tokens: Tensor, mask_ratio: float, *, pos_embed: Optional[Tensor] = None,
                             generator: Optional[torch.Generator] = None) -> Masking:
    """MAE's `random_masking` (models_mae.py), with the position embedding added first as MAE does."""
    if pos_embed is not None:
        tokens = tokens + pos_embed
    N, L, D = tokens.shape  # MAE's names: batch, length, dim
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(N, L, device=tokens.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(tokens, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=tokens.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return Masking(x_masked, mask, ids_restore, ids_keep)


def unmask_reference(visible: Tensor, ids_restore: Tensor, mask_token: Tensor, *,
                     pos_embed: Optional[Tensor] = None) -> Tensor:
    """MAE's decoder unshuffle (forward_decoder without the [CLS] token), then the position embedding."""
    x = visible
    mask_tokens = mask_token.reshape(1, 1, -1).repeat(x.shape[0], ids_restore.shape[1] - x.shape[1], 1)
    x = torch.cat([x, mask_tokens], dim=1)
    x = torch.gather(x, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    if pos_embed is not None:
        x = x + pos_embed
    return x


def _check_tokens(tokens, name: str):
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tokens).__name__}")
    if tokens.ndim != 3:
        raise ValueError(f"{name} must be (B, N, D), got shape {tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {tokens.dtype}")
    return tokens.shape


def _check_pos_embed(pos_embed, like: Tensor, batch: int, patches: int, dim: int) -> None:
    if pos_embed is None:
        return
    if not isinstance(pos_embed, Tensor) or not pos_embed.is_floating_point():
        raise TypeError(f"pos_embed must be a float tensor, got {getattr(pos_embed, 'dtype', type(pos_embed).__name__)}")
    if pos_embed.ndim != 3 or pos_embed.shape[0] not in (1, batch) or pos_embed.shape[1:] != (patches, dim):
        raise ValueError(f"pos_embed must be (1, {patches}, {dim}) or ({batch}, {patches}, {dim}), got {tuple(pos_embed.shape)}")
    if pos_embed.device != like.device:
        raise ValueError(f"pos_embed is on {pos_embed.device}, the tokens on {like.device}")


def _promoted(pos_embed: Optional[Tensor], like: Tensor, dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    """pos_embed in the output dtype (the promotion of its own and the rows'), contiguous."""
    if pos_embed is None:
        return None
    dtype = dtype or torch.promote_types(like.dtype, pos_embed.dtype)
    return (pos_embed if pos_embed.dtype == dtype else pos_embed.to(dtype)).contiguous()


def _inverse_permutation(permutation: Tensor) -> Tensor:
    """(B, N): the argsort of a permutation of 0..N-1 per row, as one scatter (every place is written)."""
    positions = torch.arange(permutation.shape[1], device=permutation.device).expand_as(permutation)
    return torch.empty_like(permutation).scatter_(1, permutation, positions)


if _extension.LOAD_ERROR is None:

    @torch.library.register_fake("vlfast::random_masking")
    def _random_masking_fake(src, pos_embed, index):
        dtype = src.dtype if pos_embed is None else pos_embed.dtype
        return src.new_empty((src.shape[0], index.shape[1], src.shape[2]), dtype=dtype)

    @torch.library.register_fake("vlfast::unmask")
    def _unmask_fake(rows, ids_restore, fill, pos_embed):
        dtype = fill.dtype if fill is not None else pos_embed.dtype if pos_embed is not None else rows.dtype
        return rows.new_empty((rows.shape[0], ids_restore.shape[1], rows.shape[2]), dtype=dtype)

    # Autograd: in C++ (csrc/autograd.cpp), each kernel the other's backward.
