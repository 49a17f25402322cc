"""The repository stands on its own: no file points at documents outside it."""
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
