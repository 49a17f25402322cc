"""nn.Module conveniences for swapping vlfast into an existing VLP model (docs/porting.md).

MomentumModel owns a momentum (EMA, target) copy of a module; FeatureQueue holds the queues of
momentum features that ALBEF's and BLIP's contrastive loss scores against; Attention is the core
of a BERT / xbert attention layer that accepts the attention_mask in the forms those codebases pass.
"""
import copy
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vlfast.ops import attention, ema_decay, ema_update_
from vlfast.ops.contrastive import all_gather_rows


MATMUL_MODULES = (nn.Linear, nn.modules.conv._ConvNd)  # the modules whose weights autocast casts


def matmul_weights(module: nn.Module) -> set:
    """ids of the parameters of ``module`` held only by Linear and convolution modules: the weights
    a mixed-precision run keeps in bf16 (a weight tied to an embedding, as BERT's decoder, is not)."""
    only = {}
    for m in module.modules():
        for weight in m.parameters(recurse=False):
            only[id(weight)] = only.get(id(weight), True) and isinstance(m, MATMUL_MODULES)
    return {key for key, value in only.items() if value}


class MomentumModel(nn.Module):
    """The EMA copy of ``online``: a frozen deep copy at creation (ALBEF's ``copy_params``),
    ``update(online)`` after each optimizer step (ALBEF's ``_momentum_update``, in one
    multi-tensor pass), calls run the copy. Its state_dict holds the copy and the update count.

    ``decay`` constant (ALBEF, BLIP: 0.995), or with ``warmup_power`` timm ModelEmaV3's warmup
    (see vlfast.ops.ema_decay).

    ``compute_dtype`` (e.g. torch.bfloat16, for a forward under autocast to it): the matrix
    products' weights (every nn.Linear and convolution) also exist in that dtype, written by each
    update in the same pass that updates their float32 values, and calls run on them. Autocast
    caches its casts only for weights that require grad, so without this it re-casts every frozen
    weight at every use. The float32 values stay the EMA (an update of 0.005 of a difference is
    below bf16's spacing near 1) and the state_dict; the other tensors (norms, embeddings) are
    shared, as autocast runs their ops in float32.
    """

    def __init__(self, online: nn.Module, decay: float = 0.995, *, warmup_power: Optional[float] = None,
                 warmup_gamma: float = 1.0, compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        ema_decay(0, decay, warmup_gamma=warmup_gamma, warmup_power=warmup_power)  # validates the schedule
        self.model = copy.deepcopy(online).requires_grad_(False)
        self.decay, self.warmup_power, self.warmup_gamma = decay, warmup_power, warmup_gamma
        # The update count lives beside the weights (it moves with .to()): the warmup's decay is
        # computed from it on the device, so no update reads it on the host and a CUDA graph's
        # replays advance it. Saved as extra state, so older checkpoints (an int) still load.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64), persistent=False)
        # Loading weights into the copy (here or through a parent) rewrites the compute copy too.
        self.model.register_load_state_dict_post_hook(self._loaded)
        self.set_compute_dtype(compute_dtype)

    def set_compute_dtype(self, dtype: Optional[torch.dtype]) -> None:
        """Run calls on ``dtype`` copies of the matrix products' weights (None: on the weights themselves)."""
        if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be torch.bfloat16, torch.float16 or None, got {dtype}")
        self.compute_dtype = dtype
        # Kept out of the module tree: not in the state_dict, not seen by DDP or .to() (_apply rebuilds it).
        self.__dict__["_compute"] = None if dtype is None else self._compute_copy(dtype)

    @property
    def compute_model(self) -> nn.Module:
        """The module calls run: ``model``, or its copy with ``compute_dtype`` weights."""
        return self.model if self._compute is None else self._compute

    def _compute_copy(self, dtype: torch.dtype) -> nn.Module:
        """self.model sharing every tensor, except float32 Linear/conv weights and biases, held in ``dtype``."""
        shared = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}
        shared[id(self)] = self  # the load hook's bound method refers to self: not a copy of it
        compute = copy.deepcopy(self.model, memo=shared)
        compute._load_state_dict_post_hooks.clear()
        only_matmuls = matmul_weights(compute)
        for module in compute.modules():
            if isinstance(module, MATMUL_MODULES):
                for name, weight in list(module.named_parameters(recurse=False)):
                    if weight.dtype == torch.float32 and id(weight) in only_matmuls:
                        setattr(module, name, nn.Parameter(weight.detach().to(dtype), requires_grad=False))
        return compute

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "_compute", None) is not None:
            self._compute.train(mode)  # the copy the calls run is not a submodule
        return self

    def _loaded(self, module, incompatible_keys) -> None:
        if self.compute_dtype is not None:
            self.set_compute_dtype(self.compute_dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if getattr(self, "compute_dtype", None) is not None:
            self.set_compute_dtype(self.compute_dtype)  # the weights moved or changed dtype: copy them again
        return self

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        decay = self.decay if self.warmup_power is None else \
            ema_decay(self.step, self.decay, warmup_gamma=self.warmup_gamma, warmup_power=self.warmup_power)
        ema_update_(self.model, online, decay, copies=self._compute)
        self.step.add_(1)

    def forward(self, *args, **kwargs):
        return self.compute_model(*args, **kwargs)

    def get_extra_state(self):
        return {"step": int(self.step)}  # read on the host when saving only

    def set_extra_state(self, state) -> None:
        self.step.fill_(int(state["step"]))


class FeatureQueue(nn.Module):
    """ALBEF's and BLIP's queues of momentum features (``image_queue``, ``text_queue`` and, for
    retrieval fine-tuning, ``idx_queue``), as (Q, D) rows of a ring buffer that
    vlfast.ops.momentum_itc_loss scores against.

    ``enqueue(image_feat_m, text_feat_m, image_ids)`` after the loss (ALBEF's
    ``_dequeue_and_enqueue``) writes the batch over the oldest rows (ids -100 where a queue with
    ids is given none). Under torch.distributed it
    first gathers every rank's batch in rank order, so every rank holds the same queue. The write
    position lives on the device: no host sync (ALBEF reads it with ``int(queue_ptr)``), and a CUDA
    graph's replays advance it. Any Q and any batch: writes wrap around (ALBEF asserts Q % batch
    == 0); a batch larger than Q leaves its last Q rows.

    ``fill="random"`` starts as ALBEF's: random unit rows, ids -100 (no image's). ``fill="empty"``
    starts empty: ``keys()`` returns the rows written so far (a count kept on the host, so their
    number changes until the queue is full: not for a recorded CUDA graph before then). The queue
    and the write position are in the state_dict.
    """

    def __init__(self, size: int, dim: int, *, ids: bool = False, fill: str = "random",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (size, dim)) or size < 0 or dim < 1:
            raise ValueError(f"size must be an int >= 0 and dim an int >= 1, got {size!r} and {dim!r}")
        if fill not in ("random", "empty"):
            raise ValueError(f"fill must be 'random' or 'empty', got {fill!r}")
        self.size, self.fill = size, fill
        image, text = torch.randn(2, size, dim).to(dtype) if fill == "random" else torch.zeros(2, size, dim, dtype=dtype)
        self.register_buffer("image", nn.functional.normalize(image, dim=-1) if fill == "random" else image)
        self.register_buffer("text", nn.functional.normalize(text, dim=-1) if fill == "random" else text)
        self.register_buffer("ids", torch.full((size,), -100, dtype=torch.int64) if ids else None)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        self.filled = size if fill == "random" else 0

    def keys(self):
        """(image, text, ids or None): the rows to score against, (Q', D) with Q' = Q once full."""
        if self.filled == self.size:
            return self.image, self.text, self.ids
        return self.image[:self.filled], self.text[:self.filled], None if self.ids is None else self.ids[:self.filled]

    @torch.no_grad()
    def enqueue(self, image_feat_m: Tensor, text_feat_m: Tensor, image_ids: Optional[Tensor] = None) -> None:
        if image_feat_m.ndim != 2 or image_feat_m.shape != text_feat_m.shape or image_feat_m.shape[1] != self.image.shape[1]:
            raise ValueError(f"image_feat_m and text_feat_m must both be (B, {self.image.shape[1]}), got "
                             f"{tuple(image_feat_m.shape)} and {tuple(text_feat_m.shape)}")
        if image_ids is not None and self.ids is None:
            raise ValueError("image_ids given, but this queue holds no ids (FeatureQueue(..., ids=True) does)")
        if image_ids is not None and image_ids.shape != image_feat_m.shape[:1]:
            raise ValueError(f"image_ids must have shape ({image_feat_m.shape[0]},), got {tuple(image_ids.shape)}")
        if image_ids is None and self.ids is not None:  # pretraining: entries of no image, as ALBEF's start
            image_ids = torch.full(image_feat_m.shape[:1], -100, dtype=torch.int64, device=image_feat_m.device)
        rows = [image_feat_m.detach(), text_feat_m.detach()] + ([image_ids] if self.ids is not None else [])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            rows = [all_gather_rows(x) for x in rows]
        written = rows[0].shape[0]
        if self.size == 0 or written == 0:
            return
        kept = min(written, self.size)  # a batch larger than the queue: its last rows
        index = (self.ptr + (written - kept) + torch.arange(kept, device=self.ptr.device)) % self.size
        for buffer, new in zip((self.image, self.text, self.ids), rows):
            buffer.index_copy_(0, index, new[written - kept:].to(buffer.dtype))
        self.ptr.copy_((self.ptr + written) % self.size)
        self.filled = min(self.size, self.filled + written)

    def get_extra_state(self):
        return {"filled": self.filled}

    def set_extra_state(self, state) -> None:
        self.filled = int(state["filled"])


def key_padding_mask(attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The (B, Lk) bool mask vlfast.ops.attention takes (True = may be attended), from
    - None;
    - the Hugging Face ``attention_mask``: (B, Lk) bool or 0/1, 1 = real token;
    - the extended additive form of BERT's ``get_extended_attention_mask`` and ALBEF's xbert:
      (B, 1, 1, Lk), 0 where attended and a large negative (−10000, finfo.min or −inf) elsewhere.
    """
    if attention_mask is None:
        return None
    if attention_mask.ndim == 2:
        return attention_mask != 0
    if attention_mask.ndim == 4 and attention_mask.shape[1:3] == (1, 1):
        return attention_mask[:, 0, 0, :] == 0
    raise ValueError(f"attention_mask must be (B, Lk) or the extended (B, 1, 1, Lk); got {tuple(attention_mask.shape)} "
                     "(per-query masks such as causal ones are not supported)")


class Attention(nn.Module):
    """softmax(q·kᵀ/√Dh + mask)·v for (B, H, L, Dh) q, k, v: the lines between the projections
    and the output dense of HF's BertSelfAttention / xbert, for self- and cross-attention.

    No dropout on the attention probabilities (a fused kernel never forms them): models that
    train with ``attention_probs_dropout_prob > 0`` change there, docs/porting.md says how.
    """

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        return attention(q, k, v, key_padding_mask=key_padding_mask(attention_mask))
