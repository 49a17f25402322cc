"""Triton kernels, one module per op, named for it; the public ops in vlfast.ops launch them as their schemas' CUDA kernels."""
