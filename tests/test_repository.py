"""The repository stands on its own: no file points at documents outside it."""
import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ["DESIGN" + ".md", "ANCHORS" + ".md", "../" + "shared"]  # split, so this file does not name them


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout (an archive): no file list")
def test_no_file_refers_to_documents_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    found = [(name, word) for name in files if (ROOT / name).is_file()
             for word in OUTSIDE if word in (ROOT / name).read_text(errors="replace")]
    assert files and not found, found


# The package's layers, lowest first: a module imports only from its own layer or those below it.
LAYERS = [("vlfast._C", "vlfast._extension", "vlfast.files", "vlfast.kernels"), ("vlfast.ops",), ("vlfast.nn",),
          ("vlfast.data", "vlfast.models"), ("vlfast.retrieval",), ("vlfast.trainer",), ("vlfast.search",),
          ("vlfast.__main__",)]
SCRIPTS = {"train", "retrieve", "conftest"}  # command lines and pytest's hooks: never imported


def imported_modules(path: Path):
    """Every absolute module name an import statement in ``path`` names (``from a.b import c``: a.b and a.b.c)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def layer(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: place it there")


def test_the_package_imports_downward_and_nothing_imports_a_script_or_a_test_file():
    """Shared code lives in modules made to be shared: the package, tests/helpers.py,
    benchmarks/timing.py and benchmarks/train_steps.py."""
    python_files = [p for folder in ("vlfast", "tests", "benchmarks", "examples") for p in (ROOT / folder).rglob("*.py")]
    python_files += [ROOT / "train.py", ROOT / "retrieve.py"]
    upward, from_scripts = [], []
    for path in python_files:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in SCRIPTS or top.startswith(("test_", "bench_")):  # a test or benchmark file: pytest's to run
                from_scripts.append((module, top))
            if module.startswith("vlfast") and name.startswith("vlfast.") and name != module:
                if module != "vlfast" and layer(name) > layer(module):
                    upward.append((module, name))
    assert len(python_files) > 40
    assert not upward, f"imports from a higher layer: {upward}"
    assert not from_scripts, f"imports of a script, conftest, a test or a benchmark file: {sorted(set(from_scripts))}"
