"""Compiles vlfast's Triton kernels (itc_loss, attention and indexed_attention, dropout_add_layer_norm) for real GPUs (sm_80, sm_90) without one: Triton's ptxas
builds the cubins here, so a kernel that only the interpreter has run cannot fail to compile on
a lent card; and each kernel's shared memory must fit the architecture's limit per block (a
kernel over it compiles but fails to launch: itc_loss's fp32 kernels at D = 768 needed 393 KB on
sm_90). Every config the launchers pick is compiled: each dtype, and D across itc_loss's chunking
(one chunk up to 1 KiB per row, chunks beyond, up to D = 1024). Run by tests/test_contrastive.py
in a process without TRITON_INTERPRET.

    python tests/compile_kernels_for_gpu.py
"""
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vlfast.kernels import attention, dropout_add_layer_norm, itc_loss
from vlfast.ops.contrastive import ROW_CHUNK_BYTES, _launch_config as itc_config
from vlfast.ops.padded_attention import _launch_config as attention_config
from vlfast.ops.residual_layer_norm import _launch_config as layer_norm_config

POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64"}
SCALARS = {"B": "i32", "N": "i32", "D": "i32", "key_offset": "i32", "smoothing": "fp32", "H": "i32", "LQ": "i32",
           "LK": "i32", "DH": "i32", "ENTRIES": "i32", "scale": "fp32", "eps": "fp32", "threshold": "i32", "rows": "i32",
           "rows_per_program": "i32"}


# The most shared memory one block may use (opt-in), in bytes: A100 163 KB, H100/H200 227 KB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# itc_loss's D: the narrowest block, the widest single chunk (fp64 128, fp32 256, 16-bit 512), and
# chunks (any D beyond the widest chunk gives the same config as 1024)
ITC_DIMS = {dtype: (16, ROW_CHUNK_BYTES // torch.empty((), dtype=dtype).element_size(), 1024) for dtype in POINTER}


def itc_kernel(fn, dtype, arch, dim=256, **flags):
    config, accumulate = itc_config(torch.empty(1, dim, dtype=dtype))
    feature, acc = POINTER[dtype], POINTER[accumulate]
    pointers = {"Q": feature, "K": feature, "TAU": "*fp32", "QIDS": "*i64", "KIDS": "*i64", "SEED": "*i64",
                "ROW_LOSS": acc, "NEG": "*i64", "LSE": acc, "NPOS": "*i32", "GRAD": acc, "DQ": acc, "DK": acc,
                "DTAU_ROWS": acc}
    compile_for(fn, arch, pointers, {**config, **flags})


def attention_kernel(fn, dtype, dim, arch, **flags):
    q = torch.empty(1, 1, 1, dim, dtype=dtype)
    feature = POINTER[dtype]
    pointers = {"Q": feature, "K": feature, "V": feature, "MASK": "*i1", "OUT": feature, "LSE": "*fp32", "DO": feature,
                "DELTA": "*fp32", "DQ": feature, "DK": feature, "DV": feature, "INDEX": "*i64", "ORDER": "*i64",
                "OFFSETS": "*i64"}
    compile_for(fn, arch, pointers, {**attention_config(q, q), **flags})


def layer_norm_kernel(fn, x_dtype, residual_dtype, dim, p, arch):
    config = layer_norm_config(p, dim)
    pointers = {"X": POINTER[x_dtype], "DX": POINTER[x_dtype], "SEED": "*i64", "MEAN": "*fp32", "RSTD": "*fp32",
                "DW_PARTS": "*fp32", "DB_PARTS": "*fp32"}
    for name in ("RES", "W", "B", "OUT", "DY", "DRES"):
        pointers[name] = POINTER[residual_dtype]
    constexprs = {name: config[name] for name in ("HAS_DROPOUT", "BLOCK_D")}
    compile_for(fn, arch, pointers, constexprs, num_warps=config["num_warps"])


def compile_for(fn, arch, pointers, constexprs, **options):
    signature = {name: "constexpr" if name in constexprs else pointers.get(name) or SCALARS.get(name, "i32")
                 for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options or None)
    shared = kernel.metadata.shared
    if shared > SHARED_MEMORY_LIMIT[arch]:
        raise SystemExit(f"{fn.__name__} {constexprs}: {shared} bytes of shared memory per block, over sm_{arch}'s "
                         f"{SHARED_MEMORY_LIMIT[arch]}")


def main():
    for arch in (80, 90):
        for dtype in POINTER:
            for dim in ITC_DIMS[dtype]:
                itc_kernel(itc_loss.itc_loss_rows_forward, dtype, arch, dim, HAS_IDS=True, SAMPLE=True, SMOOTH=True)
                itc_kernel(itc_loss.itc_loss_rows_backward_query, dtype, arch, dim, HAS_IDS=True)
                itc_kernel(itc_loss.itc_loss_rows_backward_key, dtype, arch, dim, HAS_IDS=True)
            for fn in (attention.attention_forward, attention.attention_backward_kv, attention.attention_backward_q):
                if dtype != torch.float64:  # fp64 attention runs SDPA; HAS_INDEX: indexed_attention's
                    attention_kernel(fn, dtype, 64, arch, HAS_MASK=True, HAS_INDEX=False)
                    attention_kernel(fn, dtype, 64, arch, HAS_MASK=True, HAS_INDEX=True)
        itc_kernel(itc_loss.itc_loss_rows_forward, torch.bfloat16, arch, HAS_IDS=False, SAMPLE=False, SMOOTH=False)
        for dim in (16, 40, 128):
            attention_kernel(attention.attention_forward, torch.bfloat16, dim, arch, HAS_MASK=False, HAS_INDEX=False)
            attention_kernel(attention.attention_backward_kv, torch.bfloat16, dim, arch, HAS_MASK=False, HAS_INDEX=True)
        for x_dtype, residual_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                        (torch.float16, torch.float16)):
            for fn in (dropout_add_layer_norm.dropout_add_layer_norm_forward,
                       dropout_add_layer_norm.dropout_add_layer_norm_backward):
                layer_norm_kernel(fn, x_dtype, residual_dtype, 768, 0.1, arch)
        layer_norm_kernel(dropout_add_layer_norm.dropout_add_layer_norm_forward, torch.bfloat16, torch.bfloat16, 100, 0.0, arch)
        for fn in (dropout_add_layer_norm.dropout_add_layer_norm_forward,  # the widest row the launcher takes
                   dropout_add_layer_norm.dropout_add_layer_norm_backward):
            layer_norm_kernel(fn, torch.bfloat16, torch.float32, 16384, 0.1, arch)
        print(f"sm_{arch}: ok")


if __name__ == "__main__":
    sys.exit(main())
