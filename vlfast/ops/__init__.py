"""The public fused ops. Each module holds the op, its argument checks and its plain-torch reference."""
from vlfast._extension import KERNELS, TORCH_BY_DEFAULT, backend, find_kernels, has_kernel
from vlfast.ops.attention import attention, attention_reference
from vlfast.ops.contrastive import ContrastiveOutput, itc_loss, itc_loss_reference
from vlfast.ops.dropout_add_layer_norm import dropout_add_layer_norm, dropout_add_layer_norm_reference
from vlfast.ops.ema import ema_decay, ema_update_, ema_update_reference
from vlfast.ops.patch_gather import Masking, random_masking, random_masking_reference, unmask, unmask_reference

DEVICE_TYPES = ("cpu", "cuda")
find_kernels(DEVICE_TYPES)  # every op has registered its kernels by now (vlfast._extension says why once)


def available() -> dict:
    """{op: {device type: "fused" | "torch" | "reference"}}: what this build runs under the
    environment's VLFAST_BACKEND and VLFAST_REFERENCE_OPS (auto and none by default). "fused": the
    kernel (for cuda: compiled in; it still needs a GPU to run). "torch": the op's own torch path
    (vectorised torch, SDPA, Hugging Face's code) by choice, with or without a kernel:
    TORCH_BY_DEFAULT, the table the ops consult. "reference": no kernel is built for that device,
    or the environment asks for the reference.
    """
    def runs(op, kernel, device):
        if backend(op) == "reference":  # VLFAST_REFERENCE_OPS names it
            return "reference"
        if (op, device) in TORCH_BY_DEFAULT:
            return "torch"
        return "fused" if has_kernel(kernel, device) else "reference"

    return {op: {device: runs(op, kernel, device) for device in DEVICE_TYPES} for op, kernel in KERNELS.items()}


__all__ = ["ContrastiveOutput", "Masking", "attention", "attention_reference", "available", "dropout_add_layer_norm", "dropout_add_layer_norm_reference", "itc_loss", "itc_loss_reference", "ema_decay", "ema_update_", "ema_update_reference", "random_masking",
           "random_masking_reference", "unmask", "unmask_reference"]
