"""Loads vlfast._C (the op schemas and the compiled kernels) and decides which implementation of
each op runs: `implementation(op, device_type)`, the one place the choice is made.

VLFAST_BACKEND=auto (default) runs the op's kernel where one is registered for the device, except
where an op runs its own torch path by choice (TORCH_BY_DEFAULT: measured faster, or Triton on
the CPU), =fused requires the kernel (an error names what is missing), =reference forces the
plain-torch reference. VLFAST_REFERENCE_OPS (comma-separated op names) forces the reference for
those ops alone, to find what one op gives or costs inside a model.
"""
import importlib.util
import os
import warnings
from typing import Optional

import torch

BUILD_COMMAND = "python setup.py build_ext --inplace"
DEVICE_TYPES = ("cpu", "cuda")
# Public op (vlfast.ops.X) -> the torch.ops.vlfast schema of its kernel (csrc/vlfast.cpp). Where
# each op's files are: docs/design.md, "Where each op lives".
KERNELS = {"ema_update_": "ema_update_", "random_masking": "random_masking", "unmask": "unmask",
           "itc_loss": "itc_loss_rows", "momentum_itc_loss": "momentum_itc_loss_rows", "attention": "attention",
           "indexed_attention": "indexed_attention", "dropout_add_layer_norm": "dropout_add_layer_norm"}
# (op, device type) where auto runs the op's own torch path although a kernel is registered: Triton
# runs on the CPU only in the interpreter, and on the GPU these two measured slower than torch at
# VLP shapes (their modules say by how much); VLFAST_BACKEND=fused runs the kernel there.
TORCH_BY_DEFAULT = frozenset({("itc_loss", "cpu"), ("attention", "cuda"),
                              ("dropout_add_layer_norm", "cuda")})
# What an op runs where no kernel does: its own torch path where it has one (itc_loss: the same
# loss vectorised in torch; attention: SDPA; indexed_attention: a gathered copy into attention),
# else its reference.
NO_KERNEL = {"itc_loss": "torch", "attention": "torch", "indexed_attention": "torch"}
# Ops whose Triton kernels the tests run on CPU tensors under TRITON_INTERPRET=1 with
# VLFAST_BACKEND=fused (how they are tested without a GPU): itc_loss's Triton kernel is its
# schema's CPU kernel too; attention's and indexed_attention's CPU kernels are others (C++, torch's
# flash kernel), so those ops call their Triton launchers.
INTERPRETED = frozenset({"itc_loss", "attention", "indexed_attention"})

# Whether a compiled vlfast._C file is there at all: one that is there and fails to load is a
# broken build (tests/conftest.py stops the tests on it), not one that was never built.
BUILT = importlib.util.find_spec("vlfast._C") is not None
try:
    from vlfast import _C  # noqa: F401  (importing it defines torch.ops.vlfast.* and registers the C++ kernels)

    LOAD_ERROR = None
except (ImportError, OSError) as error:
    LOAD_ERROR = error
    warnings.warn(
        (f"vlfast._C could not be loaded ({error})" if BUILT else "vlfast._C could not be loaded: it is not built")
        + "; every op runs its torch path (the op schemas are in vlfast._C: without them the Triton kernels do "
        f"not register either). Build the kernels with: {BUILD_COMMAND}",
        stacklevel=2,
    )


# Decided outside traced code: torch.compile traces the ops' Python, and a dispatcher query or an
# environment read there breaks the graph. The kernels register at import (vlfast.ops calls
# find_kernels once all are registered), so each answer is looked up in a dict, which compile
# treats as a constant.
_KERNELS_FOUND = {}
# The environment as last read, and the choice for every (op, device type) made under it: eager
# calls read it again (three lookups), and a reading that differs from the last decides every
# choice at once, eagerly, so a switch set at run time takes effect at the next call. Traced calls
# use the last eager reading and never write: compile guards on what it reads here, and a dict
# that traced code filled (or a new one made by a later eager reading) failed those guards and
# recompiled the whole step (compile_forward_backward reads the settings before each call).
_SETTINGS = {"read": None, "backend": "auto", "reference_ops": frozenset(), "interpreted": False, "decided": {}}


def has_kernel(schema: str, device_type: str) -> bool:
    """Whether torch.ops.vlfast.<schema> has a kernel for this device type (C++ from vlfast._C, or
    Triton registered by the op's module)."""
    found = _KERNELS_FOUND.get((schema, device_type))
    if found is None:
        found = _KERNELS_FOUND[(schema, device_type)] = hasattr(torch.ops.vlfast, schema) and \
            torch._C._dispatch_has_kernel_for_dispatch_key(f"vlfast::{schema}", device_type.upper())
    return found


def find_kernels(device_types=DEVICE_TYPES) -> None:
    """Look up every op's kernel once, eagerly, and decide every op's implementation under the
    environment's settings (vlfast.ops does, after every op has registered)."""
    for schema in KERNELS.values():
        for device_type in device_types:
            has_kernel(schema, device_type)
    _SETTINGS["read"] = None  # decide again, now that every kernel is known
    settings()


def settings() -> dict:
    """VLFAST_BACKEND, VLFAST_REFERENCE_OPS and TRITON_INTERPRET, parsed and checked."""
    if torch.compiler.is_compiling():
        return _SETTINGS
    read = (os.environ.get("VLFAST_BACKEND", "auto"), os.environ.get("VLFAST_REFERENCE_OPS", ""),
            os.environ.get("TRITON_INTERPRET") == "1")
    if read != _SETTINGS["read"]:
        value, listed, interpreted = read
        if value not in ("auto", "fused", "reference"):
            raise ValueError(f"VLFAST_BACKEND must be auto, fused or reference, got {value!r}")
        listed = frozenset(name.strip() for name in listed.split(",")) - {""}
        if listed - KERNELS.keys():
            raise ValueError(f"VLFAST_REFERENCE_OPS names no op {sorted(listed - KERNELS.keys())}; the ops: {', '.join(KERNELS)}")
        _SETTINGS.update(read=read, backend=value, reference_ops=listed, interpreted=interpreted)
        _SETTINGS["decided"] = {(op, device_type): _decide(op, device_type, _SETTINGS)
                                for op in KERNELS for device_type in DEVICE_TYPES}
    return _SETTINGS


def backend(op: Optional[str] = None) -> str:
    """VLFAST_BACKEND, or "reference" for an op that VLFAST_REFERENCE_OPS names."""
    current = settings()
    return "reference" if op in current["reference_ops"] else current["backend"]


def implementation(op: str, device_type: str) -> str:
    """What vlfast.ops.<op> runs on this device type under the environment's settings:

    - "kernel": its kernel, torch.ops.vlfast.<KERNELS[op]> (C++, CUDA or Triton: docs/design.md);
    - "interpreted": its Triton kernels on CPU tensors through Triton's interpreter
      (TRITON_INTERPRET=1 with VLFAST_BACKEND=fused, INTERPRETED: how the tests run them without a GPU);
    - "torch": its own torch path (TORCH_BY_DEFAULT, or NO_KERNEL where no kernel is registered);
    - "reference": its plain-torch reference.

    Raises RuntimeError under VLFAST_BACKEND=fused where the device has no kernel. Every (op,
    device type) is decided at once when the settings are read (settings()); an op still leaves its
    kernel for inputs the kernel does not take (its docstring says which).
    """
    current = settings()
    choice = current["decided"].get((op, device_type))
    if choice is None:  # a device type beyond DEVICE_TYPES: decided here, not stored (traced code must not write)
        choice = _decide(op, device_type, current)
    if isinstance(choice, RuntimeError):
        raise RuntimeError(*choice.args)
    return choice


def _decide(op: str, device_type: str, current: dict):
    """implementation()'s answer, or the error it raises."""
    backend_name = "reference" if op in current["reference_ops"] else current["backend"]
    if backend_name == "reference":
        return "reference"
    if backend_name == "auto" and (op, device_type) in TORCH_BY_DEFAULT:
        return "torch"
    # Triton's kernels register for CUDA (itc_loss's for the CPU too) once vlfast._C has defined the schemas
    if (device_type == "cpu" and op in INTERPRETED and backend_name == "fused" and current["interpreted"]
            and has_kernel(KERNELS[op], "cuda")):
        return "interpreted"
    if op == "itc_loss" and device_type == "cpu":
        return "torch"  # its only kernel is Triton's, which runs on a CPU in the interpreter alone
    if has_kernel(KERNELS[op], device_type):
        return "kernel"
    if backend_name == "fused":
        return RuntimeError(f"VLFAST_BACKEND=fused but vlfast has no {device_type} kernel for {op}"
                            + (f" (vlfast._C not loaded: {LOAD_ERROR})" if LOAD_ERROR else "")
                            + f"; build it with: {BUILD_COMMAND}")
    return NO_KERNEL.get(op, "reference")


def kernel_refuses(op: str, why: str) -> RuntimeError:
    """The error of an op whose kernel does not take this call under VLFAST_BACKEND=fused."""
    return RuntimeError(f"VLFAST_BACKEND=fused but {op} has no Triton kernel for this call ({why}; "
                        f"vlfast.ops.{op}'s docstring says what its kernel takes)")
