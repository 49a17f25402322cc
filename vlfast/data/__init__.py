"""Data: the built-in synthetic image-text set (more loaders land with the trainer)."""
from vlfast.data.synthetic import SyntheticImageText, write_vocab

__all__ = ["SyntheticImageText", "write_vocab"]
