"""Flickr30k / COCO in the Karpathy split, as the JSON files ALBEF and BLIP ship, and ALBEF's
pretraining corpora (the 4M set: COCO, VG, CC3M, SBU) in the same loader.

train entries: {"image": relative path, "caption": str, "image_id": ...}, one per caption;
val/test entries: {"image": relative path, "caption": [str, ...]}, one per image; pretrain
entries: {"image": path, "caption": str or [str, ...]} (one caption drawn per visit), from one or
more files. Images are read from a separate root (paths may also be absolute). A malformed
annotation stops before training with the entry that is wrong; an image that is missing or
unreadable is skipped (the next entry is served instead), counted, and its path kept, so one bad
file never stops an epoch.
"""
import json
from pathlib import Path
from typing import Callable, List, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

# ALBEF/BLIP's normalisation (CLIP's mean and std).
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def train_transform(image_size: int) -> Callable:
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def test_transform(image_size: int) -> Callable:
    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def load_annotations(path, split: str) -> List[dict]:
    """The entries of a Karpathy (train, val, test) or pretraining JSON file, checked; a
    ValueError names the file and entry."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of entries")
    for index, entry in enumerate(entries):
        where = f"{path}: entry {index} ({json.dumps(entry)[:200]})"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
            raise ValueError(f"{where}: needs an 'image' path")
        captions = entry.get("caption")
        if split == "pretrain":
            if not (isinstance(captions, str) and captions.strip() or isinstance(captions, list) and captions
                    and all(isinstance(c, str) and c.strip() for c in captions)):
                raise ValueError(f"{where}: a pretrain entry needs 'caption' as a non-empty string or list of them")
        elif split == "train":
            if not isinstance(captions, str) or not captions.strip():
                raise ValueError(f"{where}: a train entry needs a non-empty 'caption' string")
            if "image_id" not in entry:
                raise ValueError(f"{where}: a train entry needs an 'image_id'")
        elif not (isinstance(captions, list) and captions and all(isinstance(c, str) and c.strip() for c in captions)):
            raise ValueError(f"{where}: a val/test entry needs 'caption' as a list of non-empty strings")
    return entries


CAPTION_SEPARATOR = "\x1e"  # ASCII record separator: joins an entry's captions in the packed buffer
MAX_SKIPS_IN_A_ROW = 100  # then the image root, not a few files, is wrong
MAX_SKIPS_KEPT = 1000


class PackedStrings:
    """Strings in one UTF-8 buffer with offsets (numpy arrays, no per-string Python objects)."""

    def __init__(self, strings: List[str]):
        encoded = [text.encode() for text in strings]
        self.offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.buffer[self.offsets[index]:self.offsets[index + 1]].tobytes().decode()


class KarpathyDataset(Dataset):
    """``split`` "train": items {"image", "caption", "image_id" (an int index of the distinct ids)};
    "val"/"test": items {"image", "caption": [captions], "image_id": the entry index};
    "pretrain" (one or more files, ALBEF's pretraining format): items {"image", "caption" (one of
    the entry's, drawn each visit), "image_id": the entry index}."""

    def __init__(self, annotation_files, image_root, split: str = "train", image_size: int = 384,
                 transform: Optional[Callable] = None):
        if split not in ("train", "val", "test", "pretrain"):
            raise ValueError(f"split must be train, val, test or pretrain, got {split!r}")
        files = [annotation_files] if isinstance(annotation_files, (str, Path)) else list(annotation_files)
        if not files:
            raise ValueError("no annotation files given")
        self.split = split
        entries = [entry for file in files for entry in load_annotations(file, split)]
        # Flat buffers instead of a list of dicts: reading a Python object writes its reference
        # count, so each forked loader worker would copy the pages of a 5M-entry list (GBs).
        self.images = PackedStrings([entry["image"] for entry in entries])
        self.captions = PackedStrings([CAPTION_SEPARATOR.join(c) if isinstance(c, list) else c
                                       for c in (entry["caption"] for entry in entries)])
        self.caption_lists = np.array([isinstance(entry["caption"], list) for entry in entries])
        ids = {}
        self.image_ids = np.array([ids.setdefault(entry["image_id"], len(ids)) if split == "train" else index
                                   for index, entry in enumerate(entries)], dtype=np.int64)
        self.image_root = Path(image_root or "")  # "": the paths are absolute or relative to here
        self.transform = transform or (train_transform if split in ("train", "pretrain") else test_transform)(image_size)
        self.skipped: List[str] = []  # the first MAX_SKIPS_KEPT unreadable images, in the order met

    def __len__(self) -> int:
        return len(self.images)

    def caption(self, index: int) -> Union[str, List[str]]:
        text = self.captions[index]
        return text.split(CAPTION_SEPARATOR) if self.caption_lists[index] else text

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for offset in range(min(len(self), MAX_SKIPS_IN_A_ROW)):
            entry = (index + offset) % len(self)
            path = self.image_root / self.images[entry]
            try:
                with Image.open(path) as image:
                    pixels = self.transform(image.convert("RGB"))
            except OSError:  # missing, unreadable or not an image (PIL raises OSError subclasses)
                if len(self.skipped) < MAX_SKIPS_KEPT:
                    self.skipped.append(str(path))
                skipped.append(str(path))
                continue
            caption = self.caption(entry)
            if self.split == "pretrain" and isinstance(caption, list):
                caption = caption[int(torch.randint(len(caption), ()))]
            # "skipped": what this item stands in for, so a DataLoader worker's skips reach the log.
            return {"image": pixels, "caption": caption, "image_id": int(self.image_ids[entry]), "skipped": skipped}
        raise RuntimeError(f"no readable image under {self.image_root}: {len(skipped)} in a row could not be read, "
                           f"from {skipped[0]} (a wrong data.image_root?)")
