"""Compiles vlfast's Triton kernels for real GPUs (sm_80, sm_90) without one: Triton's ptxas
builds the cubins here, so a kernel that only the interpreter has run cannot fail to compile on
a lent card. Run by tests/test_contrastive.py in a process without TRITON_INTERPRET.

    python tests/compile_kernels_for_gpu.py
"""
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vlfast.kernels import itc
from vlfast.ops.contrastive import _launch_config

POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64"}
SCALARS = {"B": "i32", "N": "i32", "D": "i32", "key_offset": "i32", "smoothing": "fp32"}


def compile_for(fn, dtype, arch, **flags):
    config, accumulate = _launch_config(torch.empty(1, 256, dtype=dtype))
    constexprs = {**config, **flags}
    feature, acc = POINTER[dtype], POINTER[accumulate]
    pointers = {"Q": feature, "K": feature, "TAU": "*fp32", "QIDS": "*i64", "KIDS": "*i64", "SEED": "*i64",
                "ROW_LOSS": acc, "NEG": "*i64", "LSE": acc, "NPOS": "*i32", "GRAD": acc, "DQ": acc, "DK": acc,
                "DTAU_ROWS": acc}
    signature = {name: "constexpr" if name in constexprs else pointers.get(name) or SCALARS[name]
                 for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()})
    triton.compile(source, target=GPUTarget("cuda", arch, 32))


def main():
    for arch in (80, 90):
        for dtype in POINTER:
            compile_for(itc.itc_rows_forward, dtype, arch, HAS_IDS=True, SAMPLE=True, SMOOTH=True)
            compile_for(itc.itc_rows_backward_query, dtype, arch, HAS_IDS=True)
            compile_for(itc.itc_rows_backward_key, dtype, arch, HAS_IDS=True)
        compile_for(itc.itc_rows_forward, torch.bfloat16, arch, HAS_IDS=False, SAMPLE=False, SMOOTH=False)
        print(f"sm_{arch}: ok")


if __name__ == "__main__":
    sys.exit(main())
