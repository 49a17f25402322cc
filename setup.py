"""Builds vlfast._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

    python setup.py build_ext --inplace

VLFAST_BUILD_CUDA=auto (default) builds the CUDA sources when torch is a CUDA build and nvcc is
found (CUDA_HOME or PATH), =1 requires them (fails loudly), =0 skips them (quick CPU-only
iteration). TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0"; MAX_JOBS bounds the parallel compiles.
VLFAST_CPU_BASELINE=1 builds the C++ CPU kernels for the baseline x86-64 only, without the AVX2
versions picked at load time (to test the code a CPU without AVX2 runs).
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension


def build_cuda() -> bool:
    switch = os.environ.get("VLFAST_BUILD_CUDA", "auto")
    if switch not in ("auto", "0", "1"):
        raise SystemExit(f"VLFAST_BUILD_CUDA must be auto, 0 or 1, got {switch!r}")
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if cpp_extension.CUDA_HOME is None:
        missing.append("nvcc not found (set CUDA_HOME)")
    if switch == "1" and missing:
        raise SystemExit("VLFAST_BUILD_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
    if switch == "auto" and missing:
        print("vlfast: building without CUDA kernels: " + "; ".join(missing))
    return switch == "1" or (switch == "auto" and not missing)


def extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # at::parallel_for is an OpenMP pragma in ATen's headers: without -fopenmp it runs serially.
    # -fno-trapping-math lets GCC turn a float compare in a loop (a clamp, a select) into vector
    # blends; the kernels never read floating-point exception flags.
    compile_args = {"cxx": ["-O3", "-fopenmp", "-fno-trapping-math"]}
    if os.environ.get("VLFAST_CPU_BASELINE") == "1":  # csrc/cpu/vectorize.h: no AVX2 clones
        compile_args["cxx"].append("-DVLFAST_BASELINE_ONLY")
    link_args = ["-fopenmp"]
    if not build_cuda():
        return cpp_extension.CppExtension("vlfast._C", sources, extra_compile_args=compile_args,
                                          extra_link_args=link_args)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    compile_args["nvcc"] = ["-O3"]
    return cpp_extension.CUDAExtension("vlfast._C", sources, extra_compile_args=compile_args,
                                       extra_link_args=link_args)


setup(
    name="vlfast",
    version="0.1.0",
    description="Fused GPU kernels for vision-language pretraining",
    packages=find_packages(include=["vlfast", "vlfast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.10",
)
