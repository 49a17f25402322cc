"""Image-text contrastive loss against momentum keys and a feature queue, with momentum
distillation (ALBEF's and BLIP's pretraining and retrieval ITC), and the ITM hard negatives.

ALBEF concatenates the momentum model's features of the batch with a queue of Q earlier ones,
forms four B × (B + Q) similarity matrices (online and momentum queries, both directions), the
soft targets alpha·softmax(sim_m) + (1 − alpha)·positives, the log-softmax of the online
similarities and their products, and backpropagates through all of it. Per query row q (its
momentum twin q_m, the keys K, none of which get gradients) the loss needs much less:

    L = lse(s) − q·(alpha·softmax(m)·K + (1 − alpha)·k⁺)/τ,    s = q·Kᵀ/τ,  m = q_m·Kᵀ/τ,
    dL/dq = (softmax(s)·K − alpha·softmax(m)·K − (1 − alpha)·k⁺)/τ,   dL/dτ = −q·(dL/dq)/τ,

with k⁺ the mean of the row's positive keys. softmax(s)·K with lse(s) is attention with the
keys as the values: a flash-attention pass over the key tiles gives both without forming the
B × (B + Q) matrix. So the op makes two passes per direction (online and momentum queries; one
when alpha = 0), and the gradients are ready when the forward ends: the backward only scales
them. The queue is read where it lies (the batch's keys and the queue are scored apart and
merged by their log-sum-exp), so the op allocates O(B·D) (O((B + Q)·D) with image ids).
"""
import functools
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from vlfast._extension import implementation
from vlfast.ops.contrastive import (ContrastiveOutput, _check_every_row_has_a_negative, _check_inputs as _check_features,
                                    _positives, _rows_torch, all_gather_rows)

# Key tiles of the torch path (devices without the CPU's flash kernel): a (B, KEY_TILE) block of
# scores at a time.
KEY_TILE = 8192


def momentum_itc_loss(image_feat: Tensor, text_feat: Tensor, image_feat_m: Tensor, text_feat_m: Tensor,
                      temperature: Union[Tensor, float], *, alpha: float = 0.4, image_queue: Optional[Tensor] = None,
                      text_queue: Optional[Tensor] = None, image_ids: Optional[Tensor] = None,
                      id_queue: Optional[Tensor] = None, sample_negatives: bool = True, smoothing: float = 0.0,
                      all_gather: bool = False, generator: Optional[torch.Generator] = None) -> ContrastiveOutput:
    """ALBEF's ITC with momentum distillation and a queue, plus one ITM hard negative per image and per text.

    Args:
        image_feat, text_feat: (B, D) online features, projected and L2-normalised; they get the gradients.
        image_feat_m, text_feat_m: (B, D) the momentum model's features of the same batch (no gradient).
        temperature: τ, a 0-d tensor (learnable; gets a gradient) or a float. The momentum
            similarities use the same τ without a gradient through them, as ALBEF's.
        alpha: weight of the momentum softmax in the targets (ALBEF 0.4, ramped up over the
            first epoch), a number or a 0-d tensor (a schedule on the device); 0: the positives
            alone, and the momentum queries are not used.
        image_queue, text_queue: (Q, D) momentum features of earlier batches (vlfast.nn.FeatureQueue
            holds them; ALBEF's buffers are their transposes), Q >= 0, or None for no queue.
        image_ids: (B,) int ids: every key with the same id is a positive, the target mass split
            evenly (ALBEF retrieval fine-tuning); id_queue: (Q,) the queue entries' ids, then
            required with a queue. None: each row's own momentum feature is its positive.
        sample_negatives, smoothing, generator: as vlfast.ops.itc_loss; the negatives are drawn
            from the online queries against the batch's momentum keys (the in-batch part, as ALBEF).
        all_gather: the batch's momentum keys (and ids) come from every rank of torch.distributed,
            each rank keeping its own queries; the negatives index the gathered batch.

    Returns ``ContrastiveOutput(loss, loss_i2t, loss_t2i, neg_text_idx, neg_image_idx)``: the
    losses 0-d fp32 (fp64 for fp64 features), the indices int64 without gradient. No host sync
    except the check, with ``image_ids``, that some key is a negative.
    """
    temperature = _check_inputs(image_feat, text_feat, image_feat_m, text_feat_m, temperature, alpha, image_queue,
                                text_queue, image_ids, id_queue, smoothing, generator)
    if implementation("momentum_itc_loss", image_feat.device.type) == "reference":
        return momentum_itc_loss_reference(image_feat, text_feat, image_feat_m, text_feat_m, temperature, alpha=alpha,
                                           image_queue=image_queue, text_queue=text_queue, image_ids=image_ids,
                                           id_queue=id_queue, sample_negatives=sample_negatives, smoothing=smoothing,
                                           all_gather=all_gather, generator=generator)
    accumulate = torch.float64 if image_feat.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        batch_image_m, batch_text_m, batch_ids, offset = _gather_momentum(image_feat_m, text_feat_m, image_ids,
                                                                          all_gather)
        text_keys = _keys(batch_text_m, text_queue, accumulate)
        image_keys = _keys(batch_image_m, image_queue, accumulate)
        ids_all = None if image_ids is None else \
            torch.cat([batch_ids] + ([id_queue.to(batch_ids.dtype)] if id_queue is not None else []))
        text_positive = _positive_mean(text_keys, image_ids, ids_all, offset, image_feat.shape[0])
        image_positive = _positive_mean(image_keys, image_ids, ids_all, offset, image_feat.shape[0])
        # Scalars as 0-d tensors made on the device (a fill, not a copy from the host)
        tau = temperature if isinstance(temperature, Tensor) else \
            torch.full((), temperature, dtype=accumulate, device=image_feat.device)
        distill = alpha if isinstance(alpha, Tensor) else \
            (torch.full((), alpha, dtype=accumulate, device=image_feat.device) if alpha else None)
    rows = torch.ops.vlfast.momentum_itc_loss_rows
    loss_i2t = rows(image_feat, image_feat_m, list(text_keys), text_positive, tau, distill)[0].mean()
    loss_t2i = rows(text_feat, text_feat_m, list(image_keys), image_positive, tau, distill)[0].mean()
    neg_text = neg_image = None
    if sample_negatives:
        neg_text, neg_image = _in_batch_negatives(image_feat, text_feat, batch_image_m, batch_text_m, temperature,
                                                  image_ids, batch_ids, offset, smoothing, generator, accumulate)
    return ContrastiveOutput((loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i, neg_text, neg_image)


def momentum_itc_loss_reference(image_feat: Tensor, text_feat: Tensor, image_feat_m: Tensor, text_feat_m: Tensor,
                                temperature: Union[Tensor, float], *, alpha: float = 0.4,
                                image_queue: Optional[Tensor] = None, text_queue: Optional[Tensor] = None,
                                image_ids: Optional[Tensor] = None, id_queue: Optional[Tensor] = None,
                                sample_negatives: bool = True, smoothing: float = 0.0, all_gather: bool = False,
                                generator: Optional[torch.Generator] = None) -> ContrastiveOutput:
    """ALBEF's code path in plain torch (models/model_pretrain.py; model_retrieval.py with ids):
    the queue concatenated, the four similarity matrices, both soft-target softmaxes, the
    log-softmax products, and a torch.multinomial per row for the negatives.

    Features and queues of different dtypes (a bf16 batch against an fp32 queue) are computed in
    their promoted dtype, as the op takes them: ALBEF's matrix products mix them only under
    autocast, which casts both sides; outside it torch refuses the product."""
    features = [image_feat, text_feat, image_feat_m, text_feat_m] + [q for q in (image_queue, text_queue) if q is not None]
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in features))
    if any(x.dtype != dtype for x in features):
        image_feat, text_feat, image_feat_m, text_feat_m = (x.to(dtype) for x in features[:4])
        image_queue, text_queue = (None if q is None else q.to(dtype) for q in (image_queue, text_queue))
    batch = image_feat.shape[0]
    with torch.no_grad():
        image_m, text_m, ids_m, offset = _gather_momentum(image_feat_m, text_feat_m, image_ids, all_gather)
        image_feat_all = torch.cat([image_m] + ([image_queue] if image_queue is not None else []))
        text_feat_all = torch.cat([text_m] + ([text_queue] if text_queue is not None else []))
        sim_i2t_m = image_feat_m @ text_feat_all.t() / temperature
        sim_t2i_m = text_feat_m @ image_feat_all.t() / temperature
        if image_ids is None:
            sim_targets = torch.zeros_like(sim_i2t_m)
            sim_targets[torch.arange(batch), offset + torch.arange(batch)] = 1
        else:
            idx_all = torch.cat([ids_m] + ([id_queue.to(ids_m.dtype)] if id_queue is not None else []))
            pos_idx = torch.eq(image_ids.view(-1, 1), idx_all.view(1, -1)).to(sim_i2t_m.dtype)
            sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all.t() / temperature
    sim_t2i = text_feat @ image_feat_all.t() / temperature
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    neg_text_idx = neg_image_idx = None
    if sample_negatives:
        keys = text_m.shape[0]
        with torch.no_grad():
            if image_ids is None:
                mask = torch.zeros(batch, keys, dtype=torch.bool, device=image_feat.device)
                mask[torch.arange(batch), offset + torch.arange(batch)] = True
            else:
                mask = torch.eq(image_ids.view(-1, 1), ids_m.view(1, -1))
            weights_i2t = F.softmax(sim_i2t[:, :keys].float(), dim=1) + smoothing
            weights_i2t.masked_fill_(mask, 0)
            weights_t2i = F.softmax(sim_t2i[:, :keys].float(), dim=1) + smoothing
            weights_t2i.masked_fill_(mask, 0)
            neg_text_idx = torch.tensor([torch.multinomial(w, 1, generator=generator).item() for w in weights_i2t])
            neg_image_idx = torch.tensor([torch.multinomial(w, 1, generator=generator).item() for w in weights_t2i])
            neg_text_idx, neg_image_idx = neg_text_idx.to(image_feat.device), neg_image_idx.to(image_feat.device)
    return ContrastiveOutput((loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i, neg_text_idx, neg_image_idx)


def _rows(query: Tensor, query_m: Tensor, keys: List[Tensor], positive: Tensor, temperature: Tensor,
          alpha: Optional[Tensor], scores_of_part) -> Tuple[Tensor, Tensor, Tensor]:
    """momentum_itc_loss_rows' kernel: one direction's (row losses, dL/dq per row, dL/dτ per row)
    in positive's dtype (the accumulation dtype), the formulas of the module's docstring;
    ``scores_of_part``: the device's softmax-weighted sum over one part of the keys. Autocast is
    off inside: the loss is a difference of two large terms, which bf16 products would spoil (a
    trainer's forward calls the op under autocast)."""
    with torch.autocast(query.device.type, enabled=False):
        accumulate = positive.dtype
        tau = temperature.to(accumulate)
        query, keys = query.to(accumulate), [part.to(accumulate) for part in keys]
        scaled = query / tau
        out, lse = softmax_weighted_keys(scaled, keys, scores_of_part)
        target = positive
        if alpha is not None:
            alpha = alpha.to(accumulate)
            out_m, _ = softmax_weighted_keys(query_m.to(accumulate) / tau, keys, scores_of_part)
            target = (1 - alpha) * positive + alpha * out_m
        rows = lse - (scaled * target).sum(1)
        grad = (out - target) / tau
        return rows, grad, -(query * grad).sum(1) / tau


def softmax_weighted_keys(query: Tensor, keys: Sequence[Tensor], scores_of_part) -> Tuple[Tensor, Tensor]:
    """(softmax(query·Kᵀ)·K, logsumexp(query·Kᵀ)) for (B, D) queries and the keys K given in parts
    ((N_i, D) each, of the query's dtype, N = ΣN_i >= 1), without the (B, N) scores and without
    joining the parts: attention with the keys as values, each part's result (``scores_of_part``)
    merged by its log-sum-exp."""
    out = lse = None
    for part in keys:
        if part.shape[0] == 0:
            continue
        part_out, part_lse = scores_of_part(query, part)
        out, lse = (part_out, part_lse) if out is None else _merge(out, lse, part_out, part_lse)
    return out, lse


def _softmax_weighted_keys_flash(query: Tensor, keys: Tensor) -> Tuple[Tensor, Tensor]:
    """The CPU's: torch's flash-attention kernel, keys as values, in one call. Called directly, the
    kernel reads its inputs as if their rows were contiguous (SDPA's front end makes them so): a
    transposed query gave scores of 1e37 (tests/test_strided_inputs.py)."""
    query, keys = query.contiguous(), keys.contiguous()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query[None, None], keys[None, None],
                                                                          keys[None, None], scale=1.0)
    return out[0, 0], lse[0, 0]


def _softmax_weighted_keys_tiled(query: Tensor, keys: Tensor) -> Tuple[Tensor, Tensor]:
    """Elsewhere (CUDA): torch over tiles of KEY_TILE keys, a (B, KEY_TILE) block of scores at a time."""
    out = lse = None
    for start in range(0, keys.shape[0], KEY_TILE):
        tile = keys[start:start + KEY_TILE]
        scores = query @ tile.t()
        tile_out, tile_lse = torch.softmax(scores, 1) @ tile, scores.logsumexp(1)
        out, lse = (tile_out, tile_lse) if out is None else _merge(out, lse, tile_out, tile_lse)
    return out, lse


def _merge(out: Tensor, lse: Tensor, other_out: Tensor, other_lse: Tensor) -> Tuple[Tensor, Tensor]:
    """Two softmax-weighted sums over disjoint keys as one over their union."""
    merged = torch.logaddexp(lse, other_lse)
    return out * (lse - merged).exp()[:, None] + other_out * (other_lse - merged).exp()[:, None], merged


def _keys(batch_m: Tensor, queue: Optional[Tensor], dtype: torch.dtype) -> Tuple[Tensor, ...]:
    """The keys as parts: the batch's momentum features, then the queue (not copied: cast only
    where its dtype is not ``dtype``)."""
    if queue is None or queue.shape[0] == 0:
        return (batch_m.to(dtype).contiguous(),)
    return batch_m.to(dtype).contiguous(), queue.to(dtype).contiguous()


def _positive_mean(keys: Sequence[Tensor], image_ids: Optional[Tensor], ids_all: Optional[Tensor], offset: int,
                   batch: int) -> Tensor:
    """(B, D): each row's mean positive key. Without ids its own momentum feature; with ids the
    mean of every key with its id, by sums per id (keys sorted by id, each id's first place the
    group's index): O(N·D), no (B, N) mask, no host sync. A row's own feature carries its id, so
    every row has a positive."""
    if image_ids is None:
        return keys[0][offset:offset + batch]
    keys = torch.cat(keys) if len(keys) > 1 else keys[0]  # O((B + Q)·D), as the sums per id
    ordered = ids_all.sort().values
    group = torch.searchsorted(ordered, ids_all)  # first place of each key's id
    sums = torch.zeros_like(keys).index_add_(0, group, keys)
    counts = torch.zeros(keys.shape[0], dtype=keys.dtype, device=keys.device).index_add_(
        0, group, torch.ones_like(group, dtype=keys.dtype))
    rows = torch.searchsorted(ordered, image_ids.to(ordered.dtype).contiguous())
    return sums[rows] / counts[rows, None]


def _in_batch_negatives(image_feat, text_feat, batch_image_m, batch_text_m, temperature, image_ids, batch_ids,
                        offset, smoothing, generator, accumulate) -> Tuple[Tensor, Tensor]:
    """One negative per image among the batch's texts and per text among its images, drawn ∝
    softmax(online query · momentum keysᵀ / τ) + smoothing, zero at the positives (ALBEF's
    weights over sim[:, :bs])."""
    keys = batch_text_m.shape[0]
    _check_every_row_has_a_negative(batch_ids, keys)
    with torch.no_grad(), torch.autocast(image_feat.device.type, enabled=False):  # the scores in fp32 at least
        positives = _positives(image_ids, batch_ids, offset, image_feat.shape[0], keys, image_feat.device)
        sim_i2t = image_feat.to(accumulate) @ batch_text_m.to(accumulate).t() / temperature
        sim_t2i = text_feat.to(accumulate) @ batch_image_m.to(accumulate).t() / temperature
        return (_rows_torch(sim_i2t, positives, smoothing, True, generator)[1],
                _rows_torch(sim_t2i, positives, smoothing, True, generator)[1])


def _gather_momentum(image_feat_m, text_feat_m, image_ids, all_gather: bool):
    """(image, text, ids, offset): the batch's momentum features (every rank's with all_gather;
    they need no gradient) and where this rank's rows start among them."""
    image_m, text_m = image_feat_m.detach(), text_feat_m.detach()
    if not all_gather:
        return image_m, text_m, image_ids, 0
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("all_gather=True needs torch.distributed initialised (torchrun / init_process_group)")
    ids = None if image_ids is None else all_gather_rows(image_ids)
    return all_gather_rows(image_m), all_gather_rows(text_m), ids, dist.get_rank() * image_feat_m.shape[0]


def _check_inputs(image_feat, text_feat, image_feat_m, text_feat_m, temperature, alpha, image_queue, text_queue,
                  image_ids, id_queue, smoothing, generator):
    """itc_loss's checks (online features, temperature, image_ids, smoothing, generator), then
    what this op adds; returns the temperature as itc_loss's do."""
    temperature = _check_features(image_feat, text_feat, temperature, image_ids, smoothing, generator)
    for name, x in (("image_feat_m", image_feat_m), ("text_feat_m", text_feat_m)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.shape != image_feat.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but image_feat has {tuple(image_feat.shape)}")
        if x.device != image_feat.device:
            raise ValueError(f"{name} is on {x.device} but image_feat on {image_feat.device}")
    if (image_queue is None) != (text_queue is None):
        raise ValueError("image_queue and text_queue come together: pass both or neither")
    for name, queue in (("image_queue", image_queue), ("text_queue", text_queue)):
        if queue is None:
            continue
        if not isinstance(queue, Tensor) or not queue.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {getattr(queue, 'dtype', type(queue).__name__)}")
        if queue.ndim != 2 or queue.shape[1] != image_feat.shape[1]:
            raise ValueError(f"{name} must be (Q, D) with D = {image_feat.shape[1]}, got shape {tuple(queue.shape)} "
                             f"(ALBEF's buffers are (D, Q): pass their transpose)")
        if queue.shape[0] != image_queue.shape[0]:
            raise ValueError(f"text_queue has {text_queue.shape[0]} rows but image_queue {image_queue.shape[0]}")
        if queue.device != image_feat.device:
            raise ValueError(f"{name} is on {queue.device} but the features on {image_feat.device}")
    if isinstance(alpha, Tensor):  # a schedule computed on the device
        if alpha.ndim != 0 or not alpha.is_floating_point() or alpha.device != image_feat.device:
            raise ValueError(f"alpha must be a number in [0, 1] or a 0-d float tensor on the features' device, got "
                             f"{alpha.dtype} of shape {tuple(alpha.shape)} on {alpha.device}")
        if alpha.device.type == "cpu":  # a kernel, not a host read
            torch._assert_async((alpha >= 0) & (alpha <= 1), "alpha must be in [0, 1]")
    elif not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 <= alpha <= 1):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    queued = 0 if image_queue is None else image_queue.shape[0]
    if image_ids is not None and queued and id_queue is None:
        raise ValueError("with image_ids and a queue, id_queue must give the queue entries' ids")
    if id_queue is not None:
        if image_ids is None:
            raise ValueError("id_queue is given without image_ids")
        if not isinstance(id_queue, Tensor) or id_queue.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"id_queue must be an int64 or int32 tensor, got "
                            f"{getattr(id_queue, 'dtype', type(id_queue).__name__)}")
        if id_queue.shape != (queued,):
            raise ValueError(f"id_queue must have shape ({queued},) (one id per queue row), got {tuple(id_queue.shape)}")
        if id_queue.device != image_feat.device:
            raise ValueError(f"id_queue is on {id_queue.device} but the features on {image_feat.device}")
    return temperature

# The kernels of the schema (csrc/vlfast.cpp; autograd in csrc/autograd.cpp), once vlfast._C defines it.
if hasattr(torch.ops.vlfast, "momentum_itc_loss_rows"):
    @torch.library.register_fake("vlfast::momentum_itc_loss_rows")
    def _(query, query_m, keys, positive, temperature, alpha):
        rows = query.shape[0]
        return positive.new_empty(rows), positive.new_empty(positive.shape), positive.new_empty(rows)

    torch.library.register_kernel("vlfast::momentum_itc_loss_rows", "cpu",
                                  lambda *args: _rows(*args, _softmax_weighted_keys_flash))
    torch.library.register_kernel("vlfast::momentum_itc_loss_rows", "cuda",
                                  lambda *args: _rows(*args, _softmax_weighted_keys_tiled))
