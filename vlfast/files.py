"""Files replaced whole, so that a reader (another rank, a run resumed after a crash) sees the
old file or the new one, never half of one."""
import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def write_atomically(path, write: Callable[[IO], None], mode: str = "wb", sync: bool = False) -> Path:
    """``write(file)`` into a temporary file of its own beside ``path``, then renamed over it (two
    writers of one path never share a temporary file). ``sync``: on disk before the rename, so a
    crash leaves the previous file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as file:
        try:
            write(file)
            if sync:
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            os.unlink(file.name)
            raise
    os.chmod(file.name, 0o644)  # a temporary file is readable by its owner alone
    os.replace(file.name, path)
    return path
