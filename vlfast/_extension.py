"""Loads vlfast._C (the compiled kernels) and decides, per call, fused kernel or reference.

VLFAST_BACKEND=auto (default) runs the fused kernel where one is built for the device, except
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
# Public op -> the torch.ops.vlfast kernel behind it (attention: the CPU's; its CUDA kernels are
# Triton's attention_forward/backward, which auto leaves to SDPA, TORCH_BY_DEFAULT).
KERNELS = {"ema_update_": "ema_update_", "random_masking": "gather_rows", "unmask": "unmask_rows",
           "itc_loss": "itc_rows", "attention": "attention_cpu",
           "dropout_add_layer_norm": "dropout_add_layer_norm"}
# (op, device type) where auto runs the op's own torch path although a kernel is built: Triton
# runs on the CPU only in the interpreter, and on the GPU these two measured slower than torch at
# VLP shapes (their modules say by how much); VLFAST_BACKEND=fused runs the kernel there.
TORCH_BY_DEFAULT = frozenset({("itc_loss", "cpu"), ("attention", "cuda"),
                              ("dropout_add_layer_norm", "cuda")})

# Whether a compiled vlfast._C file is there at all: one that is there and fails to load is a
# broken build (tests/conftest.py stops the tests on it), not one that was never built.
BUILT = importlib.util.find_spec("vlfast._C") is not None
try:
    from vlfast import _C  # noqa: F401  (importing it registers torch.ops.vlfast.*)

    LOAD_ERROR = None
except (ImportError, OSError) as error:
    LOAD_ERROR = error
    warnings.warn(
        (f"vlfast._C could not be loaded ({error})" if BUILT else "vlfast._C could not be loaded: it is not built")
        + "; the ops whose kernels it holds run their torch paths (Triton kernels still run on a GPU). "
        f"Build the kernels with: {BUILD_COMMAND}",
        stacklevel=2,
    )


# Decided outside traced code: torch.compile traces the ops' Python, and a dispatcher query there
# breaks the graph. The kernels register at import (vlfast.ops calls find_kernels once all are
# registered), so each answer is looked up in a dict, which compile treats as a constant.
_KERNELS_FOUND = {}
# The environment as last read: eager calls read it again (two lookups) so a switch set at run time
# takes effect at the next call; traced calls use the last eager reading (guarded by compile, which
# retraces when it changes) instead of baking in whatever the environment said mid-trace.
_SETTINGS = {"read": None, "backend": "auto", "reference_ops": frozenset(), "interpreted": False}


def has_kernel(op: str, device_type: str) -> bool:
    """Whether torch.ops.vlfast.<op> (from vlfast._C or a Triton custom op) has a kernel for this device type."""
    found = _KERNELS_FOUND.get((op, device_type))
    if found is None:
        found = _KERNELS_FOUND[(op, device_type)] = hasattr(torch.ops.vlfast, op) and \
            torch._C._dispatch_has_kernel_for_dispatch_key(f"vlfast::{op}", device_type.upper())
    return found


def find_kernels(device_types=("cpu", "cuda")) -> None:
    """Look up every op's kernel once, eagerly (vlfast.ops does, after every op has registered)."""
    for kernel in KERNELS.values():
        for device_type in device_types:
            has_kernel(kernel, device_type)


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
    return _SETTINGS


def backend(op: Optional[str] = None) -> str:
    """VLFAST_BACKEND, or "reference" for an op that VLFAST_REFERENCE_OPS names."""
    current = settings()
    return "reference" if op in current["reference_ops"] else current["backend"]


def use_fused(op: str, device_type: str) -> bool:
    """For ops with C++/CUDA kernels in vlfast._C; op is a public op's name (KERNELS)."""
    backend_name = backend(op)
    if backend_name == "reference":
        return False
    if backend_name == "auto":
        return has_kernel(KERNELS[op], device_type)
    if not has_kernel(KERNELS[op], device_type):
        raise RuntimeError(
            f"VLFAST_BACKEND=fused but vlfast has no {device_type} kernel for {op}"
            + (f" (vlfast._C not loaded: {LOAD_ERROR})" if LOAD_ERROR else "")
            + f"; build it with: {BUILD_COMMAND}"
        )
    return True


def triton_path(op: str, device_type: str, has_triton_kernel: bool) -> str:
    """For ops whose fused kernels are Triton: "reference" (VLFAST_BACKEND=reference); "torch", the
    op's own torch path, where auto chooses it (TORCH_BY_DEFAULT); else "triton" on CUDA, and on
    the CPU only under TRITON_INTERPRET=1 with VLFAST_BACKEND=fused.
    ``has_triton_kernel``: Triton is installed and the kernels take this call."""
    backend_name = backend(op)
    if backend_name == "reference":
        return "reference"
    if backend_name == "auto" and (op, device_type) in TORCH_BY_DEFAULT:
        return "torch"
    interpreted = device_type == "cpu" and settings()["interpreted"]
    if has_triton_kernel and (device_type == "cuda" or (interpreted and backend_name == "fused")):
        return "triton"
    if backend_name == "fused" and device_type == "cuda":
        raise RuntimeError(f"VLFAST_BACKEND=fused but {op} has no Triton kernel for this call (Triton or "
                           f"vlfast._C missing, or inputs the kernels do not take: see vlfast.ops.{op}'s docstring)")
    return "torch"


def no_double_backward(op: str):
    """The autograd formula of a backward op: vlfast's kernels have no second derivative."""
    def backward(ctx, *grads):
        raise NotImplementedError(f"vlfast.ops.{op} has no second derivative (double backward)")

    return backward
