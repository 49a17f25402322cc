import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Triton kernels run on the CPU through the interpreter, which is chosen when they are
    # defined: before any test imports vlfast.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def chi_square_quantile(dof: int, z: float = 4.753) -> float:
    """Upper quantile of chi-square(dof) at the normal z (4.753: 1 - 1e-6), Wilson-Hilferty."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def poison_allocator(shape, dtype, device):
    """Fill and free a block of the output's size, so a kernel that skips elements shows NaN."""
    torch.full(shape, float("nan"), dtype=dtype, device=device)
