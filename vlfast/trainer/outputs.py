"""What a run writes and reads back: checkpoints (atomic, loaded without running code), the
metrics log (JSON lines), the loss plot, and the stop on a non-finite loss.
"""
import json
import math
from pathlib import Path
from typing import Callable, List, Optional

import torch

from vlfast.files import write_atomically


def save_checkpoint(path, state: dict) -> Path:
    """torch.save, atomically (vlfast.files): a crash leaves the previous checkpoint whole."""
    return write_atomically(path, lambda file: torch.save(state, file), sync=True)


def load_checkpoint(path, map_location="cpu") -> dict:
    """weights_only: a checkpoint from a download link cannot run code when loaded."""
    return torch.load(path, map_location=map_location, weights_only=True)


class MetricsLog:
    """One JSON object per line. Lines are appended and flushed (rewriting the whole file per
    step would cost O(steps²)); a reader skips a last line cut short by a crash."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")

    def read(self) -> List[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash: everything before it is whole
        return records

    def keep(self, wanted: Callable[[dict], bool]) -> None:
        """Rewrite the file with only the ``wanted`` records (a line cut short goes too)."""
        kept = [record for record in self.read() if wanted(record)]
        write_atomically(self.path, lambda file: file.write("".join(json.dumps(r) + "\n" for r in kept)), mode="w")


def check_finite(step: int, losses: dict, last_checkpoint: Optional[Path]) -> None:
    """Stop with the step, every loss term (and the gradient norm, when given) and the last good
    checkpoint when one is NaN/inf."""
    values = {name: float(value.detach() if isinstance(value, torch.Tensor) else value) for name, value in losses.items()}
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        terms = ", ".join(f"{name}={value:.6g}" for name, value in values.items())
        what = "gradient norm" if set(bad) == {"grad_norm"} else "loss"
        raise FloatingPointError(f"step {step}: non-finite {what} {sorted(bad)} ({terms}); "
                                 f"last good checkpoint: {last_checkpoint or 'none yet'}")


def plot_losses(records: List[dict], path, keys: Optional[List[str]] = None) -> Path:
    """A PNG of each loss against the step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = keys or sorted({k for r in records for k in r if k.startswith("loss")})
    figure, axis = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        axis.plot([p[0] for p in points], [p[1] for p in points], label=key)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    try:
        return write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=100))
    finally:
        plt.close(figure)
