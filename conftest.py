"""pytest's hooks and fixtures for tests/ and benchmarks/ (the helpers tests share: tests/helpers.py)."""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Triton kernels run on the CPU through the interpreter, which is chosen when they are
    # defined: before any test imports vlfast.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vlfast import _extension  # noqa: E402  (after TRITON_INTERPRET is set)


def pytest_addoption(parser):
    parser.addoption("--cuda-config", action="store_true",
                     help="benchmarks: the CPU rows run each benchmark's CUDA configuration (its dtypes, its "
                          "autocast) at CPU sizes, as the GPU suite's dry run does (benchmarks/timing.py)")


def pytest_configure(config):
    if config.getoption("cuda_config"):  # read by benchmarks/timing.py at import, and by its child processes
        os.environ["VLFAST_BENCH_CUDA_CONFIG"] = "1"
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    if _extension.BUILT and _extension.LOAD_ERROR is not None:  # skips would hide a broken build
        raise pytest.UsageError(f"vlfast._C is built but does not load: {_extension.LOAD_ERROR}. "
                                f"Rebuild it: {_extension.BUILD_COMMAND}")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def backend_chosen_by_the_test(monkeypatch):
    """A VLFAST_BACKEND or VLFAST_REFERENCE_OPS set in the shell would change what the tests test;
    each test that needs one sets it."""
    monkeypatch.delenv("VLFAST_BACKEND", raising=False)
    monkeypatch.delenv("VLFAST_REFERENCE_OPS", raising=False)


@pytest.fixture
def poisoned_memory():
    """Every uninitialised tensor torch allocates (torch.empty in Python, at::empty in the C++
    kernels) starts as NaN (integers: their maximum), so an output element a kernel never writes
    shows. torch fills them only in deterministic mode; warn_only keeps the ops it has no
    deterministic version of running."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = before[2]
