"""Builds vlfast._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

    python setup.py build_ext --inplace              # in a checkout
    pip install --no-build-isolation .               # as a package another project depends on

VLFAST_BUILD_CUDA=auto (default) builds the CUDA sources when torch is a CUDA build and a complete
CUDA toolkit is found that compiles a test kernel (cuda_toolkit below); otherwise it builds the CPU kernels and says why in one
line. =1 requires the CUDA kernels (fails naming what is missing), =0 skips them (quick CPU-only
iteration). TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0"; MAX_JOBS bounds the parallel compiles.
VLFAST_CPU_BASELINE=1 builds the C++ CPU kernels for the baseline x86-64 only, without the AVX2
versions picked at load time (to test the code a CPU without AVX2 runs).
"""
import glob
import logging
import os
import re
import shutil
import subprocess
import tempfile

from setuptools import find_packages, setup

try:
    import torch
except ImportError:  # pip's default isolated build environment has no torch
    raise SystemExit("vlfast builds against the torch it will run with: install torch first, then "
                     "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace` in a checkout)")

# torch guesses a toolkit when cpp_extension is imported (and warns that it sees no GPU, which a
# build machine need not have): the toolkit is found below and handed to it instead.
_torch_log = logging.getLogger("torch.utils.cpp_extension")
_level = _torch_log.level
_torch_log.setLevel(logging.ERROR)
from torch.utils import cpp_extension  # noqa: E402

_torch_log.setLevel(_level)  # its other warnings (compiler versions, ABI) stay

STANDARD_TOOLKITS = ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True), "/opt/cuda"]


def nvcc_targets(path: str) -> list:
    """The real nvcc behind ``path``, links followed; a small wrapper script (``exec
    /somewhere/bin/nvcc "$@"``) leads to the nvcc paths it names first, then to itself."""
    path = os.path.realpath(path)
    try:
        with open(path, "rb") as file:
            head = file.read(4096)
    except OSError:  # executable but not readable: it can only be what it is
        return [path]
    named = re.findall(r"(/[^\s'\"]*/bin/nvcc)\b", head.decode(errors="replace")) if head.startswith(b"#!") else []
    return [os.path.realpath(p) for p in named] + [path]


def toolkit_candidates() -> list:
    """(where it came from, directory) in the order they are tried. A CUDA_HOME or CUDA_PATH the
    user set is the only candidate: a build never silently takes another toolkit than the one named."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            # absolute: torch writes it into build.ninja, which runs in the build folder
            return [(variable, os.path.abspath(os.path.expanduser(os.environ[variable])))]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [(f"nvcc on PATH ({nvcc} -> {target})", os.path.dirname(os.path.dirname(target)))
                       for target in nvcc_targets(nvcc)]
    candidates += [("standard location", directory) for directory in STANDARD_TOOLKITS]
    # /usr/local/cuda is often a link to /usr/local/cuda-X.Y, which nvcc also leads to: each once
    first = {}
    for where, home in candidates:
        first.setdefault(os.path.realpath(home), (where, home))
    return list(first.values())


def toolkit_problem(home: str) -> str:
    """Why the toolkit in ``home`` cannot build the CUDA kernels, or "" when it can."""
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        return f"no executable {nvcc}"
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return f"no {os.path.join(home, 'include', 'cuda_runtime.h')}"
    if not glob.glob(os.path.join(home, "lib*", "libcudart.so*")):  # what the extension links with
        return f"no libcudart.so in {os.path.join(home, 'lib64')} or {os.path.join(home, 'lib')}"
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"{nvcc} --version failed: {error}"
    release = re.search(r"release (\d+)\.(\d+)", version)
    if release is None:
        return f"{nvcc} --version names no release"
    if release.group(1) != torch.version.cuda.split(".")[0]:
        return f"{nvcc} is CUDA {release.group(1)}.{release.group(2)}, torch was built with CUDA {torch.version.cuda}"
    # A toolkit can be complete and still not compile here (a host compiler it does not support):
    # a few seconds on a two-line kernel, where the real build would fail after minutes.
    with tempfile.TemporaryDirectory() as folder:
        probe = os.path.join(folder, "probe.cu")
        with open(probe, "w") as file:
            file.write("#include <cuda_runtime.h>\n__global__ void probe(float *x) { x[threadIdx.x] = 1.0f; }\n")
        # with the host compiler torch's build will give nvcc: $CC when set (-ccbin), else nvcc's default
        host = ["-ccbin", os.environ["CC"]] if os.environ.get("CC") else []
        try:
            compiled = subprocess.run([nvcc, *host, "-c", probe, "-o", os.path.join(folder, "probe.o")],
                                      capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as error:
            return f"{nvcc} failed to compile a test kernel: {error}"
    if compiled.returncode != 0:
        said = (compiled.stderr or compiled.stdout).strip().splitlines()
        return f"{nvcc} failed to compile a test kernel: {said[0] if said else f'exit {compiled.returncode}'}"
    return ""


def cuda_toolkit() -> tuple:
    """(the toolkit directory, "") or (None, why none can build)."""
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    problems = []
    for where, home in toolkit_candidates():
        if not os.path.isdir(home):
            if where != "standard location":
                problems.append(f"{where}: {home} is not a directory")
            continue
        problem = toolkit_problem(home)
        if not problem:
            return home, ""
        problems.append(f"{where}: {problem}")
    return None, "; ".join(problems) or "no CUDA toolkit found (CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda)"


def build_cuda() -> bool:
    switch = os.environ.get("VLFAST_BUILD_CUDA", "auto")
    if switch not in ("auto", "0", "1"):
        raise SystemExit(f"VLFAST_BUILD_CUDA must be auto, 0 or 1, got {switch!r}")
    if switch == "0":
        return False
    home, problem = cuda_toolkit()
    if home is None:
        if switch == "1":
            raise SystemExit(f"VLFAST_BUILD_CUDA=1 but the CUDA kernels cannot be built: {problem}")
        print(f"vlfast: building the CPU kernels only, CUDA skipped: {problem}. To require the CUDA kernels: "
              "VLFAST_BUILD_CUDA=1 CUDA_HOME=/path/to/cuda python setup.py build_ext --inplace "
              "(or pip install --no-build-isolation .)")
        return False
    print(f"vlfast: building the CPU and CUDA kernels with the CUDA toolkit in {home}")
    cpp_extension.CUDA_HOME = home  # what cpp_extension compiles and links with
    os.environ["CUDA_HOME"] = home  # and what any tool it starts sees
    return True


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


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import its toolkit search
    setup(
        name="vlfast",
        version="0.1.0",
        description="Fused GPU kernels for vision-language pretraining",
        packages=find_packages(include=["vlfast", "vlfast.*"]),
        ext_modules=[extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension},
        install_requires=["torch", "numpy"],
        python_requires=">=3.10",
    )
