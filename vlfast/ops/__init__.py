"""The public fused ops. Each module holds its ops, their argument checks and plain-torch
references, their fake implementations and, for Triton, the launchers registered as their CUDA
kernels; docs/design.md ("Where each op lives") maps each op to its schema, kernels and tests.
Modules are named for what they hold, never for one of their functions, so that no
vlfast.ops.<module> is shadowed by the function imported here."""
from vlfast._extension import DEVICE_TYPES, KERNELS, find_kernels, implementation
from vlfast.ops.contrastive import ContrastiveOutput, itc_loss, itc_loss_reference
from vlfast.ops.ema import ema_decay, ema_update_, ema_update_reference
from vlfast.ops.indexed_attention import indexed_attention, indexed_attention_reference
from vlfast.ops.momentum_contrastive import momentum_itc_loss, momentum_itc_loss_reference
from vlfast.ops.padded_attention import attention, attention_reference
from vlfast.ops.patch_gather import Masking, random_masking, random_masking_reference, unmask, unmask_reference
from vlfast.ops.residual_layer_norm import dropout_add_layer_norm, dropout_add_layer_norm_reference

find_kernels()  # every op has registered its kernels by now (vlfast._extension says why once)

_RUNS = {"kernel": "fused", "interpreted": "fused", "torch": "torch", "reference": "reference"}


def available() -> dict:
    """{op: {device type: "fused" | "torch" | "reference" | "missing"}}: what this build runs under
    the environment's VLFAST_BACKEND and VLFAST_REFERENCE_OPS (auto and none by default), as
    vlfast._extension.implementation decides it for every call. "fused": the kernel (for cuda:
    registered; it still needs a GPU to run). "torch": the op's own torch path (vectorised torch,
    SDPA, Hugging Face's code) by choice or where no kernel is built. "reference": no kernel is
    built for that device, or the environment asks for the reference. "missing": VLFAST_BACKEND=fused
    and no kernel, where a call raises.
    """
    def runs(op, device):
        try:
            return _RUNS[implementation(op, device)]
        except RuntimeError:
            return "missing"

    return {op: {device: runs(op, device) for device in DEVICE_TYPES} for op in KERNELS}


__all__ = ["ContrastiveOutput", "Masking", "attention", "attention_reference", "available", "dropout_add_layer_norm",
           "dropout_add_layer_norm_reference", "ema_decay", "ema_update_", "ema_update_reference", "indexed_attention",
           "indexed_attention_reference", "itc_loss", "itc_loss_reference", "momentum_itc_loss",
           "momentum_itc_loss_reference", "random_masking", "random_masking_reference", "unmask", "unmask_reference"]
