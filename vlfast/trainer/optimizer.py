"""The optimizer side of a step: AdamW (torch's fused kernel) with weight decay on matrices only,
bf16 weights with fp32 masters (MasterWeightAdamW), gradient clipping with fp32 norms, and the
learning-rate schedule.
"""
import collections
import functools
import math
from typing import List

import torch

from vlfast._extension import backend as ops_backend
from vlfast.models import Mamo
from vlfast.nn import matmul_weights


def learning_rate(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 to base_lr over warmup_steps, then cosine down to min_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, cuda_graph: bool = False,
                   bf16_weights: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, LayerNorms, tokens and position
    embeddings). torch's fused kernel: the default (foreach) one makes a dozen passes over the
    weights, each launched from the host, in a step the host paces (docs/benchmarks.md has the
    profile). ``cuda_graph``: capturable, for a recorded step (vlfast.trainer.CudaGraphStep).
    ``bf16_weights``: the model's matrix weights become bf16, their fp32 masters live in the
    optimizer (MasterWeightAdamW, below)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "token" in name or "pos_embed" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if bf16_weights:
        return MasterWeightAdamW(model, groups, torch.bfloat16, lr=lr, fused=True, capturable=cuda_graph)
    return torch.optim.AdamW(groups, lr=lr, fused=True, capturable=cuda_graph)


def bf16_weights(model: Mamo, autocast: bool, enabled: bool = True) -> bool:
    """Whether the step keeps its matrix weights in bf16: under bf16 autocast (a GPU's step), on
    vlfast's path (the reference casts at every use, as ALBEF's code does), unless not ``enabled``.
    If so, the target network gets bf16 copies of its weights, written by each EMA update beside
    their fp32 values (vlfast.nn.MomentumModel's compute_dtype); make_optimizer(bf16_weights=True)
    does the same for the online model. Autocast caches casts only of weights that require grad,
    so it re-cast every frozen target weight at every use; the online model's it casts once per
    step, and casts each one's gradient back in the backward: 1707 casts per ViT-B/16 + BERT-base
    step (benchmarks/step_cost_record.json)."""
    if not (autocast and enabled and ops_backend() != "reference"):
        return False
    model.target.set_compute_dtype(torch.bfloat16)
    return True


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm), with each gradient's norm computed into fp32 by the
    multi-tensor norm itself: torch's takes bf16 gradients' norms in bf16 and stacks them with one
    cast each (312 casts per ViT-B/16 + BERT-base step with bf16 weights). The same numbers for
    fp32 gradients; the norm before clipping is returned. The norms are summed in the parameters'
    order whatever their dtypes, so bf16 and fp32 weights with the same gradients clip alike."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    groups = collections.defaultdict(list)  # (device, dtype) -> positions in grads
    for i, grad in enumerate(grads):
        groups[(grad.device, grad.dtype)].append(i)
    norms = [None] * len(grads)
    for positions in groups.values():
        for i, norm in zip(positions, torch._foreach_norm([grads[i] for i in positions], 2.0, dtype=torch.float32)):
            norms[i] = norm
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for (_, dtype), positions in groups.items():
        # The scale in the gradients' dtype: CUDA's foreach kernel takes a 0-d tensor of another
        # dtype on its slow path, one mul_ per tensor (about 300 launches per ViT-B step with bf16
        # weights); that path rounds the scale to the gradients' dtype anyway, so the numbers match.
        torch._foreach_mul_([grads[i] for i in positions], scale.to(dtype))
    return total


class MasterWeightAdamW(torch.optim.AdamW):
    """Mixed precision with float32 master weights, the scheme of apex's FusedAdam
    (``master_weights``) and Megatron's optimizer: ``model``'s float32 nn.Linear and convolution
    weights and biases that require grad are turned into ``dtype`` parameters, so a forward under
    autocast to ``dtype`` reads them without a cast and the backward writes their gradients without
    one. This optimizer keeps their float32 masters (and moments) and, at each ``step``: copies the
    ``dtype`` gradients into the masters' float32 gradients (one multi-tensor copy), runs fused
    AdamW on the masters and the model's other (float32) parameters, and writes the masters back
    into the ``dtype`` parameters (one multi-tensor copy). The forward and its gradients are
    those of autocast, which casts the same float32 weights to ``dtype`` at every step; the update
    is computed in float32 from the same gradients (a gradient clipped before ``step`` is scaled in
    ``dtype``, one rounding more than autocast's fp32 gradient). Make it after moving the model to
    its device: the masters are made where the weights are.

    ``param_groups`` are AdamW's, over ``model``'s parameters (taken before the conversion);
    ``adamw`` its keyword arguments (``found_inf`` set on the optimizer skips a step, as for fused
    AdamW). ``model.state_dict()`` gives the float32 masters under the parameters' names, and
    ``model.load_state_dict`` sets them from what it loads, so checkpoints hold float32 weights
    either way. A parameter shared with another kind of module (BERT's decoder tied to its
    word embeddings) stays float32.
    """

    def __init__(self, model: torch.nn.Module, param_groups: List[dict], dtype: torch.dtype = torch.bfloat16,
                 **adamw):
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        only_matmuls = matmul_weights(model)
        names = {id(p): name for name, p in model.named_parameters()}
        self.low, self.masters, self.master_names = [], [], []  # the dtype parameters, their masters, names
        masters = {}
        for p in model.parameters():
            if id(p) in only_matmuls and p.requires_grad and p.dtype == torch.float32:
                master = p.detach().clone()
                master.grad = torch.zeros_like(master)  # allocated once: a CUDA graph reads it at each replay
                masters[id(p)] = master
                self.low.append(p)
                self.masters.append(master)
                self.master_names.append(names[id(p)])
                p.data = p.data.to(dtype)
        groups = [{**group, "params": [masters.get(id(p), p) for p in group["params"]]} for group in param_groups]
        super().__init__(groups, **adamw)
        # The hooks hold the names and masters, not the optimizer: a copy of the model (deepcopy,
        # pickle) copies them with it and keeps saving and loading fp32 values. partial: torch marks
        # the hooks it is given, which a bound method cannot take.
        masters_by_name = dict(zip(self.master_names, self.masters))
        model.register_state_dict_post_hook(functools.partial(_masters_into_state_dict, masters_by_name))
        model.register_load_state_dict_pre_hook(functools.partial(_masters_from_state_dict, masters_by_name))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        buffers = [m.grad for m in self.masters]
        with_grad = [(p.grad, m) for p, m in zip(self.low, self.masters) if p.grad is not None]
        if with_grad:
            torch._foreach_copy_([m.grad for _, m in with_grad], [g for g, _ in with_grad])
        for p, m in zip(self.low, self.masters):
            if p.grad is None:
                m.grad = None  # no gradient this step (an objective left out): AdamW leaves it alone
        super().step()
        for m, buffer in zip(self.masters, buffers):
            m.grad = buffer
        torch._foreach_copy_(self.low, self.masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        masters = {id(m) for m in self.masters}  # their gradient buffers stay: each step overwrites them
        for p in [*self.low, *(p for group in self.param_groups for p in group["params"] if id(p) not in masters)]:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()


def _masters_into_state_dict(masters: dict, module, state_dict, prefix, local_metadata) -> None:
    for name, master in masters.items():
        if prefix + name in state_dict:
            state_dict[prefix + name] = master.detach()


def _masters_from_state_dict(masters: dict, module, state_dict, prefix, local_metadata, strict, missing, unexpected,
                             errors) -> None:
    with torch.no_grad():
        for name, master in masters.items():
            if prefix + name in state_dict:
                master.copy_(state_dict[prefix + name])
