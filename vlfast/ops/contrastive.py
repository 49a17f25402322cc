"""Image-text contrastive (InfoNCE) loss fused with hard-negative sampling for ITM.

ALBEF, BLIP and X-VLM compute the B×N similarity matrix, its log-softmax for the loss, its
softmax again for the ITM negatives, zero the positives and draw one negative per row with a
Python loop of `torch.multinomial` (2·B launches and host syncs per step). On the GPU this op
is tiled Triton kernels (vlfast.kernels.itc_loss) that never store the matrix, behind
torch.ops.vlfast.itc_loss_rows (one direction's per-row losses and negatives; autograd in
csrc/autograd.cpp); on the CPU the same loss vectorised in torch (the matrix is stored;
negatives by one inverse-CDF draw per row).
"""
import math
import os
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from vlfast import _extension
from vlfast._extension import implementation

try:
    import triton

    from vlfast.kernels import itc_loss as itc_kernels
except ImportError:  # a torch build without Triton: the vectorised torch path everywhere
    triton = None


class ContrastiveOutput(NamedTuple):
    loss: Tensor  # (loss_i2t + loss_t2i) / 2
    loss_i2t: Tensor
    loss_t2i: Tensor
    neg_text_idx: Optional[Tensor]  # (B,) int64 into the (gathered) texts, one hard negative per image
    neg_image_idx: Optional[Tensor]  # (B,) int64 into the (gathered) images, one per text


def itc_loss(image_feat: Tensor, text_feat: Tensor, temperature: Union[Tensor, float], *,
             image_ids: Optional[Tensor] = None, sample_negatives: bool = True, smoothing: float = 0.0,
             all_gather: bool = False, generator: Optional[torch.Generator] = None) -> ContrastiveOutput:
    """InfoNCE in both directions plus one ITM hard negative per image and per text.

    Args:
        image_feat, text_feat: (B, D) projected and L2-normalised features (as ALBEF), any float dtype.
        temperature: τ, a 0-d tensor (learnable; gets a gradient) or a float; sim = image·text / τ.
        image_ids: (B,) int ids; pairs sharing an id are all positives, the target mass split
            evenly over them (ALBEF retrieval fine-tuning). None: the matching index is the positive.
        sample_negatives: draw neg_text_idx / neg_image_idx; else they are None.
        smoothing: negatives are drawn ∝ softmax(sim)_j + smoothing, zero at positives:
            ALBEF 0, BLIP 1e-4, X-VLM 1e-5.
        all_gather: keys (and ids) come from every rank of torch.distributed, with gradients;
            each rank keeps its local queries; negatives index the gathered batch. Under DDP the
            averaged parameter gradients equal one process's on the whole batch.
        generator: seeds the draw (reproducible); on the features' device.

    Returns ``ContrastiveOutput(loss, loss_i2t, loss_t2i, neg_text_idx, neg_image_idx)``: the
    losses as 0-d fp32 (fp64 for fp64 inputs) tensors, the indices without gradient.
    On the GPU the draw is a Gumbel-max over a counter-based RNG: the same distribution as
    ALBEF's `torch.multinomial` (tested), other draws. With ``image_ids`` the check that every
    row has a negative costs one host sync.
    """
    temperature = _check_inputs(image_feat, text_feat, temperature, image_ids, smoothing, generator)
    path = implementation("itc_loss", image_feat.device.type)
    if path == "reference":
        return itc_loss_reference(image_feat, text_feat, temperature, image_ids=image_ids,
                                  sample_negatives=sample_negatives, smoothing=smoothing,
                                  all_gather=all_gather, generator=generator)
    keys = _gather_batch(image_feat, text_feat, image_ids, all_gather)
    return _loss_on_keys(image_feat, text_feat, temperature, image_ids, keys, path, sample_negatives, smoothing,
                         generator)


class Keys(NamedTuple):
    """The keys both directions score against: this rank's batch, or every rank's (gathered)."""
    image: Tensor  # (N, D)
    text: Tensor  # (N, D)
    ids: Optional[Tensor]  # (N,) image ids, when given
    offset: int  # where this rank's rows start among the N


def _loss_on_keys(image_feat, text_feat, temperature, image_ids, keys: Keys, path: str, sample_negatives: bool,
                  smoothing: float, generator) -> ContrastiveOutput:
    """itc_loss once the keys are gathered, on the kernel (path "kernel" or "interpreted") or the
    vectorised torch path ("torch"); benchmarks call it with keys made as if by 8 ranks."""
    image_all, text_all, ids_all, offset = keys
    if sample_negatives:
        _check_every_row_has_a_negative(ids_all, text_all.shape[0])
    if path in ("kernel", "interpreted"):  # the kernel (interpreted: Triton's on CPU tensors, in its interpreter)
        seeds = torch.randint(0, 2**31 - 1, (2,), device=image_feat.device, generator=generator)
        if not isinstance(temperature, Tensor):  # a fill on the device, not a copy from the host
            temperature = torch.full((), temperature, device=image_feat.device)
        # The kernels read every tensor as contiguous rows (ids too: a strided id column miscounted
        # the positives)
        image_ids = None if image_ids is None else image_ids.contiguous()
        ids_all = None if ids_all is None else ids_all.contiguous()
        rows_i2t, neg_text = torch.ops.vlfast.itc_loss_rows(image_feat.contiguous(), text_all.contiguous(), temperature,
                                                            image_ids, ids_all, offset, seeds[:1], smoothing,
                                                            sample_negatives)[:2]
        rows_t2i, neg_image = torch.ops.vlfast.itc_loss_rows(text_feat.contiguous(), image_all.contiguous(),
                                                             temperature, image_ids, ids_all, offset, seeds[1:],
                                                             smoothing, sample_negatives)[:2]
    else:
        positives = _positives(image_ids, ids_all, offset, image_feat.shape[0], text_all.shape[0], image_feat.device)
        dtype = torch.promote_types(image_feat.dtype, torch.float32)
        sim_i2t = image_feat.to(dtype) @ text_all.to(dtype).t() / temperature
        in_batch = image_all is image_feat and text_all is text_feat
        # In-batch keys: the t2i matrix is the transpose, one product instead of two.
        sim_t2i = sim_i2t.t() if in_batch else text_feat.to(dtype) @ image_all.to(dtype).t() / temperature
        rows_i2t, neg_text = _rows_torch(sim_i2t, positives, smoothing, sample_negatives, generator)
        rows_t2i, neg_image = _rows_torch(sim_t2i, positives, smoothing, sample_negatives, generator)
    loss_i2t, loss_t2i = rows_i2t.mean(), rows_t2i.mean()
    neg_text, neg_image = (neg_text, neg_image) if sample_negatives else (None, None)
    return ContrastiveOutput((loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i, neg_text, neg_image)


def itc_loss_reference(image_feat: Tensor, text_feat: Tensor, temperature: Union[Tensor, float], *,
                       image_ids: Optional[Tensor] = None, sample_negatives: bool = True, smoothing: float = 0.0,
                       all_gather: bool = False, generator: Optional[torch.Generator] = None,
                       per_row_sampling: bool = True) -> ContrastiveOutput:
    """The ALBEF / BLIP code path in plain torch (models/model_pretrain.py, model_retrieval.py).

    ``per_row_sampling=False`` draws all rows with one ``torch.multinomial`` call instead of
    ALBEF's loop (the "vectorised torch" baseline of the benchmarks).
    """
    keys = _gather_batch(image_feat, text_feat, image_ids, all_gather)
    return _reference_loss(image_feat, text_feat, temperature, image_ids, keys, sample_negatives, smoothing,
                           generator, per_row_sampling)


def _reference_loss(image_feat, text_feat, temperature, image_ids, keys: Keys, sample_negatives: bool,
                    smoothing: float, generator, per_row_sampling: bool) -> ContrastiveOutput:
    image_all, text_all, ids_all, offset = keys
    sim_i2t = image_feat @ text_all.t() / temperature
    sim_t2i = text_feat @ image_all.t() / temperature
    pos_idx = _positives(image_ids, ids_all, offset, image_feat.shape[0], text_all.shape[0], image_feat.device)
    sim_targets = pos_idx.to(sim_i2t.dtype) / pos_idx.sum(1, keepdim=True)
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_targets, dim=1).mean()
    neg_text_idx = neg_image_idx = None
    if sample_negatives:
        with torch.no_grad():
            weights_i2t = F.softmax(sim_i2t.float(), dim=1) + smoothing
            weights_i2t.masked_fill_(pos_idx, 0)
            weights_t2i = F.softmax(sim_t2i.float(), dim=1) + smoothing
            weights_t2i.masked_fill_(pos_idx, 0)
            if per_row_sampling:
                neg_text_idx = torch.tensor([torch.multinomial(w, 1, generator=generator).item() for w in weights_i2t])
                neg_image_idx = torch.tensor([torch.multinomial(w, 1, generator=generator).item() for w in weights_t2i])
            else:
                neg_text_idx = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
                neg_image_idx = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
            neg_text_idx, neg_image_idx = neg_text_idx.to(image_feat.device), neg_image_idx.to(image_feat.device)
    return ContrastiveOutput((loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i, neg_text_idx, neg_image_idx)


def _rows_torch(sim: Tensor, positives: Tensor, smoothing: float, sample: bool, generator) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-row losses and negatives from the stored (B, N) similarities: the kernels' loss, vectorised."""
    log_p = F.log_softmax(sim, dim=1)
    rows = -torch.where(positives, log_p, 0.0).sum(1) / positives.sum(1)
    negatives = None
    if sample:
        with torch.no_grad():
            # Inverse-CDF draw, one uniform per row, on the weights divided by the row's largest
            # (cumulated in float64): no underflow where ALBEF's multinomial fails because the
            # positive took all the mass, and one random number per row instead of one per entry.
            log_w = (torch.log(log_p.exp() + smoothing) if smoothing else log_p).masked_fill(positives, float("-inf"))
            cdf = (log_w - log_w.amax(1, keepdim=True)).exp_().cumsum(1, dtype=torch.float64)
            total = cdf[:, -1:]
            below_total = torch.nextafter(total, torch.zeros_like(total))  # so the pick lands on a weight > 0
            u = torch.minimum(torch.rand(total.shape, device=sim.device, generator=generator, dtype=torch.float64) * total, below_total)
            # A row of NaN scores (diverged weights) finds no place in its CDF: it still gets an
            # index in range, so the step ends and the trainer stops on its NaN loss.
            negatives = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    return rows, negatives


def _positives(image_ids, ids_all, offset: int, batch: int, keys: int, device) -> Tensor:
    """(B, N) bool: row b's positives among the (gathered) keys."""
    if image_ids is None:
        return torch.arange(keys, device=device)[None, :] == torch.arange(offset, offset + batch, device=device)[:, None]
    return image_ids.view(-1, 1) == ids_all.view(1, -1)


def _check_every_row_has_a_negative(ids_all: Optional[Tensor], keys: int) -> None:
    if keys < 2 or (ids_all is not None and bool((ids_all == ids_all[0]).all())):
        raise ValueError("every key is a positive of some row (one key, or all image_ids equal): "
                         "no hard negative to sample; pass sample_negatives=False")


def all_gather_rows(x: Tensor) -> Tensor:
    """Every rank's ``x`` of torch.distributed, concatenated in rank order along dim 0 (no gradient)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _AllGather(torch.autograd.Function):
    """all_gather with gradients: each rank gets the gradient of every rank's loss w.r.t. its own
    slice (all_reduce SUM, then its slice, as BLIP's GatherLayer). With DDP averaging that is the
    gradient of the mean loss, the one-process result (open_clip #616 is the pitfall)."""

    @staticmethod
    def forward(ctx, x):
        return all_gather_rows(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()  # all_reduce drops the gradient of a non-contiguous view (pytorch #120386)
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


def _gather_batch(image_feat, text_feat, image_ids, all_gather: bool) -> Keys:
    if not all_gather:
        return Keys(image_feat, text_feat, image_ids, 0)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("all_gather=True needs torch.distributed initialised (torchrun / init_process_group)")
    ids_all = None if image_ids is None else all_gather_rows(image_ids)
    offset = dist.get_rank() * image_feat.shape[0]
    return Keys(_AllGather.apply(image_feat), _AllGather.apply(text_feat), ids_all, offset)


def _check_inputs(image_feat, text_feat, temperature, image_ids, smoothing, generator):
    for name, x in (("image_feat", image_feat), ("text_feat", text_feat)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{name} must be (B, D) with B, D >= 1, got shape {tuple(x.shape)}")
    if text_feat.shape != image_feat.shape:
        raise ValueError(f"text_feat has shape {tuple(text_feat.shape)} but image_feat has {tuple(image_feat.shape)}")
    if text_feat.dtype != image_feat.dtype:
        raise TypeError(f"text_feat is {text_feat.dtype} but image_feat is {image_feat.dtype}")
    if text_feat.device != image_feat.device:
        raise ValueError(f"text_feat is on {text_feat.device} but image_feat on {image_feat.device}")
    if isinstance(temperature, Tensor):
        if temperature.ndim != 0 or not temperature.is_floating_point():
            raise ValueError(f"temperature must be a float or a 0-d float tensor, got {temperature.dtype} of shape {tuple(temperature.shape)}")
        if temperature.device != image_feat.device:
            raise ValueError(f"temperature is on {temperature.device} but the features on {image_feat.device}")
        # Checked on the CPU by a kernel, not a host read (.item() would break a compiled graph and,
        # on a GPU, make the host wait); on a GPU not at all (a failed device-side assert ends the process).
        if temperature.device.type == "cpu":
            torch._assert_async(temperature > 0, "temperature must be > 0")
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        if not temperature > 0 or math.isinf(temperature):
            raise ValueError(f"temperature must be a finite float > 0, got {temperature}")
        temperature = float(temperature)
    else:
        raise TypeError(f"temperature must be a float or a 0-d tensor, got {type(temperature).__name__}")
    if image_ids is not None:
        if not isinstance(image_ids, Tensor) or image_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"image_ids must be an int64 or int32 tensor, got {getattr(image_ids, 'dtype', type(image_ids).__name__)}")
        if image_ids.shape != image_feat.shape[:1]:
            raise ValueError(f"image_ids must have shape ({image_feat.shape[0]},), got {tuple(image_ids.shape)}")
        if image_ids.device != image_feat.device:
            raise ValueError(f"image_ids is on {image_ids.device} but the features on {image_feat.device}")
    if not (isinstance(smoothing, (int, float)) and smoothing >= 0 and math.isfinite(smoothing)):
        raise ValueError(f"smoothing must be a finite float >= 0, got {smoothing}")
    if generator is not None and generator.device.type != image_feat.device.type:
        raise ValueError(f"generator is on {generator.device} but the features on {image_feat.device}")
    return temperature


# The kernels of torch.ops.vlfast.itc_loss_rows (schema: csrc/vlfast.cpp; autograd:
# csrc/autograd.cpp): Triton's launchers, registered for CUDA and, for the interpreter, the CPU.

# The widest D chunk a program holds, in bytes per row: 1 KiB (fp32 D 256, bf16 512, fp64 128)
# keeps every kernel's shared memory under 110 KB at 32-row tiles (tests/compile_kernels_for_gpu.py
# checks every config against sm_80's and sm_90's limits). Wider features are summed in chunks.
ROW_CHUNK_BYTES = 1024


def _launch_config(query: Tensor):
    dim = query.shape[1]
    block_d = max(16, min(triton.next_power_of_2(dim), ROW_CHUNK_BYTES // query.element_size()))
    narrow = block_d <= 128 and block_d * query.element_size() <= 512  # 64-row tiles fit shared memory
    block = 16 if os.environ.get("TRITON_INTERPRET") == "1" else (64 if narrow else 32)
    accumulate = torch.float64 if query.dtype == torch.float64 else torch.float32
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, SPLIT_D=dim > block_d,
                PRECISION="ieee" if query.dtype in (torch.float32, torch.float64) else "tf32",
                ACC=itc_kernels.tl.float64 if accumulate == torch.float64 else itc_kernels.tl.float32), accumulate


def triton_forward(query: Tensor, key: Tensor, temperature: Tensor, query_ids: Optional[Tensor],
                   key_ids: Optional[Tensor], key_offset: int, seed: Tensor, smoothing: float,
                   sample: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per query row: (loss = lse − mean positive score, sampled negative, lse, #positives)."""
    batch, dim = query.shape
    keys = key.shape[0]
    config, accumulate = _launch_config(query)
    row_loss = torch.empty(batch, dtype=accumulate, device=query.device)
    lse = torch.empty_like(row_loss)
    npos = torch.empty(batch, dtype=torch.int32, device=query.device)
    negative = torch.full((batch,), -1, dtype=torch.int64, device=query.device)
    grid = (triton.cdiv(batch, config["BLOCK_M"]),)
    itc_kernels.itc_loss_rows_forward[grid](
        query, key, temperature, query_ids, key_ids, seed, row_loss, negative, lse, npos,
        batch, keys, dim, key_offset, smoothing,
        HAS_IDS=query_ids is not None, SAMPLE=sample, SMOOTH=sample and smoothing > 0, **config)
    return row_loss, negative, lse, npos


def triton_backward(grad: Tensor, query: Tensor, key: Tensor, temperature: Tensor, query_ids: Optional[Tensor],
                    key_ids: Optional[Tensor], key_offset: int, lse: Tensor,
                    npos: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    batch, dim = query.shape
    keys = key.shape[0]
    config, accumulate = _launch_config(query)
    grad = grad.contiguous()
    dq = torch.empty(batch, dim, dtype=accumulate, device=query.device)
    dk = torch.empty(keys, dim, dtype=accumulate, device=query.device)
    dtau_rows = torch.empty(batch, dtype=accumulate, device=query.device)
    common = (query, key, temperature, query_ids, key_ids, lse, npos, grad)
    chunks = triton.cdiv(dim, config["BLOCK_D"])  # one program per D chunk of dq / dk
    itc_kernels.itc_loss_rows_backward_query[(triton.cdiv(batch, config["BLOCK_M"]), chunks)](
        *common, dq, dtau_rows, batch, keys, dim, key_offset, HAS_IDS=query_ids is not None, **config)
    itc_kernels.itc_loss_rows_backward_key[(triton.cdiv(keys, config["BLOCK_N"]), chunks)](
        *common, dk, batch, keys, dim, key_offset, HAS_IDS=query_ids is not None, **config)
    return dq.to(query.dtype), dk.to(key.dtype), dtau_rows.sum().to(temperature.dtype)


if _extension.LOAD_ERROR is None:

    @torch.library.register_fake("vlfast::itc_loss_rows")
    def _itc_loss_rows_fake(query, key, temperature, query_ids, key_ids, key_offset, seed, smoothing, sample):
        accumulate = torch.float64 if query.dtype == torch.float64 else torch.float32
        batch = query.shape[0]
        return (query.new_empty(batch, dtype=accumulate), query.new_empty(batch, dtype=torch.int64),
                query.new_empty(batch, dtype=accumulate), query.new_empty(batch, dtype=torch.int32))

    @torch.library.register_fake("vlfast::itc_loss_rows_backward")
    def _itc_loss_rows_backward_fake(grad, query, key, temperature, query_ids, key_ids, key_offset, lse, npos):
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(temperature)

    if triton is not None:
        torch.library.register_kernel("vlfast::itc_loss_rows", ("cpu", "cuda"), triton_forward)
        torch.library.register_kernel("vlfast::itc_loss_rows_backward", ("cpu", "cuda"), triton_backward)
