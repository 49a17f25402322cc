"""Triton kernels, one module per op; the public ops in vlfast.ops wrap them."""
