"""The public fused ops. Each module holds the op, its argument checks and its plain-torch reference."""
from vlfast._extension import has_kernel
from vlfast.ops.ema import ema_decay, ema_update_, ema_update_reference

OPS = ("ema_update_",)
DEVICE_TYPES = ("cpu", "cuda")


def available() -> dict:
    """{op: {device type: "fused" | "reference"}}: what VLFAST_BACKEND=auto runs on this build.

    "fused" for cuda means the kernel is compiled in; it still needs a GPU to run.
    """
    return {
        op: {device: "fused" if has_kernel(op, device) else "reference" for device in DEVICE_TYPES}
        for op in OPS
    }


__all__ = ["available", "ema_decay", "ema_update_", "ema_update_reference"]
