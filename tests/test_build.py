"""setup.py's search for a CUDA toolkit: VLFAST_BUILD_CUDA=auto builds the CUDA kernels only with a
toolkit it has checked, else the CPU kernels with one line saying why; =1 fails naming what is missing.
Each test lays out fake toolkits (an nvcc script that prints a release, a cuda_runtime.h) in tmp_path."""
import importlib.util
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_PATH = os.environ["PATH"]
TORCH_CUDA = torch.version.cuda


@pytest.fixture
def setup_py(monkeypatch, tmp_path):
    """setup.py as a module (its setup() call runs only as __main__), with no CUDA variables, an
    empty PATH but for tmp_path/bin, no standard locations, and torch taken to be a CUDA 13.0 build."""
    spec = importlib.util.spec_from_file_location("vlfast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variable in ("CUDA_HOME", "CUDA_PATH", "VLFAST_BUILD_CUDA", "CC"):
        monkeypatch.setenv(variable, "")  # recorded, so what build_cuda sets is undone after the test
        monkeypatch.delenv(variable)
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(module, "STANDARD_TOOLKITS", [])
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(module.cpp_extension, "CUDA_HOME", None)
    return module


def toolkit(where: Path, release="13.0", header=True, compiles=True) -> Path:
    """A fake toolkit whose nvcc prints its release and compiles (exit 0) or not."""
    (where / "bin").mkdir(parents=True)
    (where / "include").mkdir()
    nvcc = where / "bin" / "nvcc"
    failure = "" if compiles else "echo 'error -- unsupported GNU version! gcc versions later than 99 are not supported!' >&2; exit 1"
    nvcc.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'Cuda compilation tools, release {release}, "
                    f"V{release}.88'; exit 0; fi\n{failure}\n")
    nvcc.chmod(0o755)
    if header:
        (where / "include" / "cuda_runtime.h").write_text("")
    (where / "lib64").mkdir()
    (where / "lib64" / "libcudart.so").write_text("")
    return where


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def test_a_wrapper_script_on_path_leads_to_its_toolkit(setup_py, tmp_path):
    home = toolkit(tmp_path / "cuda-13.0")
    # what this project's machines have: /usr/local/bin/nvcc, outside the toolkit, runs the real one
    executable(tmp_path / "bin" / "nvcc", f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    assert setup_py.cuda_toolkit() == (str(home), "")
    assert setup_py.build_cuda() is True
    assert setup_py.cpp_extension.CUDA_HOME == str(home) == os.environ["CUDA_HOME"]


def test_a_link_on_path_leads_to_its_toolkit(setup_py, tmp_path):
    home = toolkit(tmp_path / "cuda")
    (tmp_path / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    assert setup_py.cuda_toolkit() == (str(home), "")


def test_the_standard_location_when_nvcc_is_not_on_path(setup_py, tmp_path, monkeypatch):
    monkeypatch.setattr(setup_py, "STANDARD_TOOLKITS", [str(tmp_path / "absent"), str(toolkit(tmp_path / "cuda"))])
    assert setup_py.cuda_toolkit() == (str(tmp_path / "cuda"), "")


def test_an_incomplete_toolkit_builds_the_cpu_kernels_and_says_why(setup_py, tmp_path, capsys):
    home = toolkit(tmp_path / "cuda", header=False)
    executable(tmp_path / "bin" / "nvcc", f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    assert setup_py.build_cuda() is False
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and "CUDA skipped" in said and "cuda_runtime.h" in said
    assert "VLFAST_BUILD_CUDA=1" in said  # how to force it
    assert setup_py.cpp_extension.CUDA_HOME is None


def test_forcing_cuda_without_a_toolkit_fails_naming_what_is_missing(setup_py, tmp_path, monkeypatch):
    home = toolkit(tmp_path / "cuda", header=False)
    monkeypatch.setenv("VLFAST_BUILD_CUDA", "1")
    monkeypatch.setenv("CUDA_HOME", str(home))
    with pytest.raises(SystemExit, match=f"VLFAST_BUILD_CUDA=1 .*CUDA_HOME: no {home}/include/cuda_runtime.h"):
        setup_py.build_cuda()
    monkeypatch.delenv("CUDA_HOME")
    with pytest.raises(SystemExit, match="VLFAST_BUILD_CUDA=1 .*no CUDA toolkit found"):
        setup_py.build_cuda()


def test_cuda_home_is_the_only_candidate_when_set(setup_py, tmp_path, monkeypatch):
    good = toolkit(tmp_path / "good")
    (tmp_path / "bin" / "nvcc").symlink_to(good / "bin" / "nvcc")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # one level too high, as torch's own guess was
    home, problem = setup_py.cuda_toolkit()
    assert home is None and problem == f"CUDA_HOME: no {tmp_path}/include/cuda_runtime.h"  # not the good one


def test_a_toolkit_of_another_cuda_major_than_torch_is_skipped(setup_py, tmp_path):
    old = toolkit(tmp_path / "cuda-12.4", release="12.4")
    (tmp_path / "bin" / "nvcc").symlink_to(old / "bin" / "nvcc")
    home, problem = setup_py.cuda_toolkit()
    assert home is None and "is CUDA 12.4, torch was built with CUDA 13.0" in problem


def test_a_cpu_build_of_torch_builds_no_cuda(setup_py, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    home, problem = setup_py.cuda_toolkit()
    assert home is None and "is not a CUDA build" in problem


def test_the_switch_is_checked(setup_py, monkeypatch):
    monkeypatch.setenv("VLFAST_BUILD_CUDA", "yes")
    with pytest.raises(SystemExit, match="VLFAST_BUILD_CUDA must be auto, 0 or 1, got 'yes'"):
        setup_py.build_cuda()


def test_a_toolkit_that_cannot_compile_here_is_skipped(setup_py, tmp_path, capsys):
    home = toolkit(tmp_path / "cuda", compiles=False)
    (tmp_path / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    assert setup_py.build_cuda() is False
    said = capsys.readouterr().out
    assert "failed to compile a test kernel: error -- unsupported GNU version" in said


def test_the_real_toolkit_of_this_machine_compiles_its_test_kernel(setup_py, monkeypatch):
    """Where a CUDA toolkit is installed at the standard place (this project's machines), the test
    kernel compiles with it: the check does not refuse a toolkit that works."""
    nvcc = Path("/usr/local/cuda/bin/nvcc")
    if TORCH_CUDA is None or not nvcc.exists():
        pytest.skip("torch is not a CUDA build, or no CUDA toolkit in /usr/local/cuda")
    monkeypatch.setenv("PATH", ORIGINAL_PATH)  # nvcc runs the host compiler
    monkeypatch.setattr(torch.version, "cuda", TORCH_CUDA)
    release = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    if f"release {TORCH_CUDA.split('.')[0]}." not in release:
        pytest.skip(f"/usr/local/cuda is not CUDA {TORCH_CUDA}'s major version")
    with tempfile.TemporaryDirectory() as folder:  # the same kernel compiled outside setup.py
        (Path(folder) / "k.cu").write_text("__global__ void k(float *x) { x[0] = 1.0f; }\n")
        if subprocess.run([nvcc, "-c", f"{folder}/k.cu", "-o", f"{folder}/k.o"], capture_output=True).returncode:
            pytest.skip("this machine's host compiler does not work with /usr/local/cuda's nvcc")
    assert setup_py.toolkit_problem("/usr/local/cuda") == ""


def test_a_relative_cuda_home_is_made_absolute(setup_py, tmp_path, monkeypatch):
    toolkit(tmp_path / "cuda")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_HOME", "cuda")  # torch's ninja file runs in another folder
    assert setup_py.cuda_toolkit() == (str(tmp_path / "cuda"), "")


def test_each_toolkit_is_tried_once(setup_py, tmp_path, monkeypatch):
    home = toolkit(tmp_path / "cuda-12.4", release="12.4")
    (tmp_path / "cuda").symlink_to(home)
    (tmp_path / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    monkeypatch.setattr(setup_py, "STANDARD_TOOLKITS", [str(tmp_path / "cuda"), str(home)])
    home_found, problem = setup_py.cuda_toolkit()
    assert home_found is None and problem.count("is CUDA 12.4") == 1, problem


def test_no_runtime_library_is_no_toolkit(setup_py, tmp_path):
    home = toolkit(tmp_path / "cuda")
    (home / "lib64" / "libcudart.so").unlink()
    assert "no libcudart.so in" in setup_py.toolkit_problem(str(home))


def test_the_test_kernel_uses_cc_as_the_host_compiler(setup_py, tmp_path, monkeypatch):
    home = toolkit(tmp_path / "cuda")
    calls = tmp_path / "calls"
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(nvcc.read_text() + f'echo "$@" >> {calls}\n')
    monkeypatch.setenv("CC", "/opt/gcc-12/bin/gcc")
    assert setup_py.toolkit_problem(str(home)) == ""
    assert calls.read_text().startswith("-ccbin /opt/gcc-12/bin/gcc -c ")
