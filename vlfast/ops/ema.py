"""EMA update of a momentum (target) network in one multi-tensor pass.

    target <- decay * target + (1 - decay) * source

Replaces ALBEF's `_momentum_update` loop (three tensor ops and two temporaries per parameter)
and timm's ModelEmaV3 `_foreach_lerp_` (same dtype only) with one kernel launch that reads each
weight once and accepts mixed dtypes, e.g. an fp32 EMA of a bf16 model. With ``copies`` the same
pass also writes a bf16 (or fp16) copy of each updated fp32 target: the weights a mixed-precision
forward of the target network reads, which autocast would otherwise re-cast at every use (it
caches casts only of weights that require grad).
"""
import math
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from vlfast import _extension
from vlfast._extension import implementation

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
Tensors = Union[nn.Module, Sequence[Tensor]]


def ema_update_(target: Tensors, source: Tensors, decay: Union[float, Tensor], copies: Tensors = None) -> None:
    """In place, without autograd: ``t <- decay * t + (1 - decay) * s`` for every pair, and
    ``c <- t`` rounded to nearest for every copy.

    Args:
        target: the EMA (momentum) model or its tensors; updated in place.
        source: the online model or its tensors, in the same order and shapes as ``target``.
            Two ``nn.Module``s pair parameters and buffers by name: floating-point ones are
            averaged, the others (e.g. BatchNorm's step counter) copied. Two sequences of tensors
            pair by position and must all be floating point.
        decay: in [0, 1]; a Python float or a 0-d floating tensor on the CPU or on the targets'
            device. A tensor on the GPU is read by the kernel (no host sync), so its value is not
            range-checked.
        copies: optional, like ``target``: a module with the target's parameter and buffer names,
            or a sequence with one entry per target tensor (``None`` where there is none). A
            bfloat16 or float16 tensor of a float32 target's shape receives the updated target
            rounded to its dtype, in the same pass; an entry that is the target tensor itself (a
            module sharing it) is skipped.

    Dtypes: any pair of float32 / float16 / bfloat16 / float64; the update is computed in
    float32 (float64 when either side is float64) and rounded once into the target.
    Targets must be contiguous (they are written in one flat pass; parameters always are); a
    non-contiguous source is read through a contiguous copy.
    """
    non_float = []
    if isinstance(target, nn.Module) or isinstance(source, nn.Module):
        target_module = target
        target, source, names, non_float = _module_tensors(target, source)  # checks both are modules
        if copies is not None:
            copies = _module_copies(target_module, copies)
    else:
        target, source, names = list(target), list(source), None
    if len(target) != len(source):
        raise ValueError(f"target has {len(target)} tensors but source has {len(source)}")
    _check_tensors(target[:1], source[:1], names)
    decay = _check_decay(decay, target[0].device) if target else decay
    groups = [(target, source, [], names)]  # one kernel call per group: the pairs with copies, those without
    if copies is not None:
        copies = list(copies)
        if len(copies) != len(target):
            raise ValueError(f"copies has {len(copies)} entries but target has {len(target)}")
        has_copy = [c is not None and c is not t for t, c in zip(target, copies)]
        names = names or [f"target[{i}]" for i in range(len(target))]  # positions in the caller's lists
        groups = [([x for x, keep in zip(target, has_copy) if keep == copied],
                   [x for x, keep in zip(source, has_copy) if keep == copied],
                   [x for x, keep in zip(copies, has_copy) if keep] if copied else [],
                   [x for x, keep in zip(names, has_copy) if keep == copied] if names else None)
                  for copied in (False, True)]
    with torch.no_grad():
        for t, s in non_float:
            t.copy_(s)
        for target, source, copies, names in groups:
            if target:
                _update(target, source, decay, copies, names)


def _update(target: list, source: list, decay, copies: list, names) -> None:
    """One kernel launch (per device dtype group) over the pairs of one group, all with copies or none."""
    if implementation("ema_update_", target[0].device.type) == "kernel":
        if not isinstance(decay, Tensor):
            decay = torch.tensor(decay, dtype=torch.float64)
        # The kernel checks every pair itself (in Python that costs more than the update of a
        # small model); on its error the Python check finds the culprit and names it.
        try:
            torch.ops.vlfast.ema_update_(target, source, decay, copies)
        except (RuntimeError, TypeError, ValueError):
            _check_tensors(target, source, names, copies)
            raise
    else:
        _check_tensors(target, source, names, copies)
        ema_update_reference(target, source, decay, copies)


def ema_update_reference(target: Sequence[Tensor], source: Sequence[Tensor], decay,
                         copies: Sequence[Tensor] = ()) -> None:
    """ALBEF's momentum update, `param_m * m + param * (1. - m)`, written into the target; then
    each copy (if any) takes the target's new value, as a cast would."""
    with torch.no_grad():
        for t, s in zip(target, source):
            t.copy_(t * decay + s * (1.0 - decay))
        for t, c in zip(target, copies):
            c.copy_(t)


def ema_decay(step: Union[int, Tensor], decay: float = 0.995, *, warmup_gamma: float = 1.0,
              warmup_power: float = None) -> Union[float, Tensor]:
    """The decay to use for EMA update number ``step`` (0 for the first update). ``step`` may be a
    0-d integer tensor (an update count kept on the GPU): the decay is then a 0-d float64 tensor on
    its device, computed there without a host read, which ema_update_ takes as it is.

    ``warmup_power=None``: the constant ``decay`` (ALBEF, BLIP, MAMO: 0.995).
    Otherwise timm ModelEmaV3's warmup, ``min(decay, 1 - (1 + step / warmup_gamma) ** -warmup_power)``:
    0 at step 0 (the target starts as a copy of the source), rising to ``decay``. timm suggests
    power 2/3 for runs of about a million steps and 3/4 for shorter ones.
    """
    if not isinstance(step, Tensor) and step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if warmup_power is None:
        return decay
    if not warmup_gamma > 0 or not warmup_power > 0:
        raise ValueError(f"warmup_gamma and warmup_power must be > 0, got {warmup_gamma} and {warmup_power}")
    if isinstance(step, Tensor):
        return (1.0 - (1.0 + step.to(torch.float64) / warmup_gamma) ** -warmup_power).clamp_(max=decay)
    return min(decay, 1.0 - (1.0 + step / warmup_gamma) ** -warmup_power)


def _module_tensors(target, source):
    """Parameters and buffers of two modules paired by name: (float targets, float sources, their
    names, [(target, source)] of the non-float ones, which are copied rather than averaged)."""
    for name, module in (("target", target), ("source", source)):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{name} must be an nn.Module like the other argument, got {type(module).__name__}")
    pairs = []
    for kind, target_named, source_named in (
        ("parameter", target.named_parameters(), source.named_parameters()),
        ("buffer", target.named_buffers(), source.named_buffers()),
    ):
        target_named, source_named = dict(target_named), dict(source_named)
        if target_named.keys() != source_named.keys():
            only_target = sorted(target_named.keys() - source_named.keys())
            only_source = sorted(source_named.keys() - target_named.keys())
            raise ValueError(
                f"target and source modules have different {kind}s: only in target {only_target}, "
                f"only in source {only_source}"
            )
        pairs += [(f"target {kind} {name!r}", t, source_named[name]) for name, t in target_named.items()]
    averaged = [(name, t, s) for name, t, s in pairs if t.is_floating_point()]
    copies = []
    for name, t, s in pairs:
        if not t.is_floating_point():
            if t.shape != s.shape or t.device != s.device:
                raise ValueError(f"{name} is {tuple(t.shape)} on {t.device} but its source is {tuple(s.shape)} on {s.device}")
            copies.append((t, s))
    names = [name for name, _, _ in averaged]
    return [t for _, t, _ in averaged], [s for _, _, s in averaged], names, copies


def _module_copies(target: nn.Module, copies) -> list:
    """The copy of each floating-point tensor of ``target`` (the order _module_tensors gives), or None."""
    if not isinstance(copies, nn.Module):
        raise TypeError(f"copies must be an nn.Module like target, got {type(copies).__name__}")
    named = {**dict(copies.named_parameters()), **dict(copies.named_buffers())}
    tensors = [*target.named_parameters(), *target.named_buffers()]
    missing = sorted(name for name, _ in tensors if name not in named)
    if missing:
        raise ValueError(f"copies has no tensor named {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return [named[name] for name, t in tensors if t.is_floating_point()]


def _check_tensors(target: list, source: list, names, copies: list = ()) -> None:
    device = None
    for i, (t, s) in enumerate(zip(target, source)):
        name = names[i] if names else f"target[{i}]"
        source_name = f"the source of {name}" if names else f"source[{i}]"
        for label, x in ((name, t), (source_name, s)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{label} must be a tensor, got {type(x).__name__}")
            device = device or x.device
            if x.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{label} has dtype {x.dtype}; ema_update_ averages {', '.join(map(str, FLOAT_DTYPES))}")
            if x.device != device:
                raise ValueError(f"{label} is on {x.device} but the first target is on {device}")
        if t.shape != s.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {source_name} has shape {tuple(s.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} is not contiguous; ema_update_ writes targets in place in one flat pass")
    for i, (t, c) in enumerate(zip(target, copies)):
        name = f"the copy of {names[i]}" if names else f"copies[{i}]"
        if not isinstance(c, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(c).__name__}")
        if t.dtype != torch.float32 or c.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"{name} is {c.dtype} of a {t.dtype} target; copies are bfloat16 or float16 copies "
                            "of float32 targets")
        if c.shape != t.shape or not c.is_contiguous() or c.device != t.device:
            raise ValueError(f"{name} must be contiguous, of shape {tuple(t.shape)} and on {t.device}; got "
                             f"{tuple(c.shape)} on {c.device}")


def _check_decay(decay, device: torch.device):
    if isinstance(decay, Tensor):
        if decay.ndim != 0:
            raise ValueError(f"decay must be a float or a 0-d tensor, got a tensor of shape {tuple(decay.shape)}")
        if not decay.is_floating_point():
            raise TypeError(f"decay must be a floating-point tensor, got {decay.dtype}")
        if decay.device.type == "cpu":
            _check_decay_value(decay.item())
        elif decay.device != device:
            raise ValueError(f"decay is on {decay.device}; it must be on the CPU or on the targets' device {device}")
        return decay
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"decay must be a float or a 0-d tensor, got {type(decay).__name__}")
    _check_decay_value(decay)
    return float(decay)


def _check_decay_value(value: float) -> None:
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {value}")


if _extension.LOAD_ERROR is None:

    @torch.library.register_fake("vlfast::ema_update_")
    def _ema_update_fake(target, source, decay, copies) -> None:
        # Also the Meta kernel: a list mixing meta and real tensors dispatches here, so the
        # kernels' device check is repeated.
        devices = {x.device for x in (*target, *source, *copies)}
        if len(devices) > 1:
            raise ValueError(f"ema_update_: target and source tensors are on several devices: {devices}")
