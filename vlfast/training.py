"""What a training loop needs besides the model: a config from YAML with command-line overrides,
the warmup + cosine learning rate, checkpoints written atomically and loaded without running
code, metrics as JSON lines, the loss-curve PNG, a clear stop on a non-finite loss, and a
training step recorded as one CUDA graph.
"""
import dataclasses
import functools
import json
import math
import typing
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

import torch
import yaml

from vlfast.files import write_atomically
from vlfast.nn import matmul_weights


def load_config(config_class, path: Optional[str] = None, overrides: Iterable[str] = (), base: Optional[dict] = None):
    """A (nested) dataclass from a YAML file plus ``key.sub=value`` overrides (values parsed as
    YAML), over the class defaults or, when given, over ``base`` (e.g. a checkpoint's
    ``dataclasses.asdict`` config). Unknown keys and values of the wrong type raise ValueError
    naming the key."""
    values = {}
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config keys at the top level")
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r} is not key=value")
        *parents, leaf = key.split(".")
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {parent} is not a section")
        node[leaf] = yaml.safe_load(raw)
    defaults = config_class() if base is None else _build(config_class(), base, prefix="")
    return _build(defaults, values, prefix="")


def _build(base, values: dict, prefix: str):
    """``base`` (a dataclass instance: the defaults, nested ones included) with ``values`` applied."""
    config_class = type(base)
    field_types = typing.get_type_hints(config_class)
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]} (known under {prefix or 'the top level'}: {sorted(known)})")
    kwargs = {}
    for name, value in values.items():
        kind = field_types[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ValueError(f"config key {prefix}{name} is a section, got {value!r}")
            kwargs[name] = _build(getattr(base, name), value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(kind, value, f"{prefix}{name}")
    return dataclasses.replace(base, **kwargs)


def _coerce(kind, value, key: str):
    origin = typing.get_origin(kind)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        origin = typing.get_origin(kind)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key} must be a list, got {value!r}")
        item = typing.get_args(kind)[0]
        return origin(_coerce(item, v, key) for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"config key {key} must be {kind.__name__}, got {value!r}")
    return value


def learning_rate(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 to base_lr over warmup_steps, then cosine down to min_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def save_checkpoint(path, state: dict) -> Path:
    """torch.save, atomically (vlfast.files): a crash leaves the previous checkpoint whole."""
    return write_atomically(path, lambda file: torch.save(state, file), sync=True)


def load_checkpoint(path, map_location="cpu") -> dict:
    """weights_only: a checkpoint from a download link cannot run code when loaded."""
    return torch.load(path, map_location=map_location, weights_only=True)


class MetricsLog:
    """One JSON object per line. Lines are appended and flushed (rewriting the whole file per
    step would cost O(steps²)); a reader skips a last line cut short by a crash."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")

    def read(self) -> List[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash: everything before it is whole
        return records

    def keep(self, wanted: Callable[[dict], bool]) -> None:
        """Rewrite the file with only the ``wanted`` records (a line cut short goes too)."""
        kept = [record for record in self.read() if wanted(record)]
        write_atomically(self.path, lambda file: file.write("".join(json.dumps(r) + "\n" for r in kept)), mode="w")


def check_finite(step: int, losses: dict, last_checkpoint: Optional[Path]) -> None:
    """Stop with the step, every loss term (and the gradient norm, when given) and the last good
    checkpoint when one is NaN/inf."""
    values = {name: float(value.detach() if isinstance(value, torch.Tensor) else value) for name, value in losses.items()}
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        terms = ", ".join(f"{name}={value:.6g}" for name, value in values.items())
        what = "gradient norm" if set(bad) == {"grad_norm"} else "loss"
        raise FloatingPointError(f"step {step}: non-finite {what} {sorted(bad)} ({terms}); "
                                 f"last good checkpoint: {last_checkpoint or 'none yet'}")


def plot_losses(records: List[dict], path, keys: Optional[List[str]] = None) -> Path:
    """A PNG of each loss against the step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = keys or sorted({k for r in records for k in r if k.startswith("loss")})
    figure, axis = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        axis.plot([p[0] for p in points], [p[1] for p in points], label=key)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    try:
        return write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=100))
    finally:
        plt.close(figure)


class CudaGraphStep:
    """A training step on the GPU recorded once as a CUDA graph and then replayed with one launch
    per call, so the host's per-kernel cost (Python, dispatch, launch: about half of a ViT-B +
    BERT step on an H200, README) is paid once:

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
