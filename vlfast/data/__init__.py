"""Data: the built-in synthetic set, Karpathy-split Flickr30k/COCO, BERT-style caption masking."""
from vlfast.data.karpathy import KarpathyDataset, load_annotations
from vlfast.data.synthetic import SyntheticImageText, write_vocab
from vlfast.data.text import mask_tokens

__all__ = ["KarpathyDataset", "SyntheticImageText", "load_annotations", "mask_tokens", "write_vocab"]
