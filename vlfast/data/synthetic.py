"""The built-in synthetic image-text set: procedurally drawn scenes of coloured shapes, captioned
from the same attributes, so a pretraining run and its retrieval evaluation need no download.

Each image holds 2-3 objects (shape, colour, size, position on a 3×3 grid); a caption names two
of them with their relation ("a large red circle left of a small blue square"), sometimes a
third. Retrieval must tell apart scenes that share shapes and colours but differ in sizes and
relations, so it is not trivial; the captions are exact, so it is learnable. Everything is
deterministic from (seed, split, index). `write_vocab` writes the WordPiece vocabulary a
`transformers.BertTokenizerFast` loads from a local directory, the same path as for real data.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from vlfast.files import write_atomically

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 45, 40), "green": (45, 170, 70), "blue": (45, 85, 215), "yellow": (230, 205, 45),
           "purple": (145, 60, 185), "white": (245, 245, 245)}
SIZES = {"small": 0.11, "large": 0.19}  # half-extent, as a fraction of the image side
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS = ("a", "and", "left", "right", "of", "above", "below", *SHAPES, *COLOURS, *SIZES)
SPLIT_SEEDS = {"train": 0, "test": 1, "val": 2}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    column: int  # 0..2, left to right
    row: int  # 0..2, top to bottom

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


def make_scene(rng: np.random.Generator) -> List[SceneObject]:
    """2 or 3 objects in distinct cells of a 3×3 grid, no two with the same shape and colour."""
    cells = rng.choice(9, size=rng.integers(2, 4), replace=False)
    kinds = rng.choice(len(SHAPES) * len(COLOURS), size=len(cells), replace=False)
    colours = list(COLOURS)
    return [SceneObject(SHAPES[kind % len(SHAPES)], colours[kind // len(SHAPES)], rng.choice(list(SIZES)),
                        int(cell % 3), int(cell // 3)) for cell, kind in zip(cells, kinds)]


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where a is relative to b: the larger of the column and row offsets decides."""
    dx, dy = a.column - b.column, a.row - b.row
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def caption(objects: List[SceneObject], rng: np.random.Generator) -> str:
    first, second, *rest = (objects[i] for i in rng.permutation(len(objects)))
    text = f"{first.phrase()} {relation(first, second)} {second.phrase()}"
    if rest and rng.random() < 0.5:
        text += f" and {rest[0].phrase()}"
    return text


def render(objects: List[SceneObject], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: a noisy grey background and each object filled in its colour."""
    image = rng.normal(110, 12, size=(image_size, image_size, 3))
    ys, xs = (np.mgrid[0:image_size, 0:image_size] + 0.5) / image_size
    for obj in objects:
        cx = (obj.column + 0.5 + rng.uniform(-0.15, 0.15)) / 3
        cy = (obj.row + 0.5 + rng.uniform(-0.15, 0.15)) / 3
        r = SIZES[obj.size]
        if obj.shape == "circle":
            inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= r ** 2
        elif obj.shape == "square":
            inside = (abs(xs - cx) <= r) & (abs(ys - cy) <= r)
        else:  # an upward triangle in the same box
            inside = (ys <= cy + r) & (ys >= cy - r) & (abs(xs - cx) <= (ys - (cy - r)) / 2)
        image[inside] = COLOURS[obj.colour]
    return np.clip(image, 0, 255).astype(np.uint8)


MEAN, STD = 0.45, 0.25  # of the rendered pixels in [0, 1], about


def transform(image_size: int):
    """A PIL image (e.g. a saved render) to the tensor the set's items hold."""
    return transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                               transforms.Normalize([MEAN] * 3, [STD] * 3)])


class SyntheticImageText(Dataset):
    """`split` "train": one entry per caption, {"image", "caption", "image_id"} (as Karpathy's
    train JSON); "val" and "test": one entry per image, {"image", "caption": [captions], "image_id"}.
    Images are (3, H, W) float tensors normalised to about zero mean, unit variance."""

    def __init__(self, split: str = "train", images: int = 2000, image_size: int = 64, captions_per_image: int = 2,
                 seed: int = 0):
        if split not in SPLIT_SEEDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
        if images < 1 or captions_per_image < 1 or image_size < 16:
            raise ValueError(f"need images >= 1, captions_per_image >= 1, image_size >= 16; got "
                             f"{images}, {captions_per_image}, {image_size}")
        self.split, self.image_size, self.captions_per_image = split, image_size, captions_per_image
        self.seed, self.images = seed, images

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, SPLIT_SEEDS[self.split], index))

    def scene(self, index: int) -> List[SceneObject]:
        return make_scene(self._rng(index))

    def captions(self, index: int) -> List[str]:
        rng = self._rng(index)
        objects = make_scene(rng)
        return [caption(objects, rng) for _ in range(self.captions_per_image)]

    def image(self, index: int) -> torch.Tensor:
        # Its own stream for the jitter and noise, so images do not depend on captions_per_image.
        rng = np.random.default_rng((self.seed, SPLIT_SEEDS[self.split], index, 1))
        pixels = torch.from_numpy(render(self.scene(index), self.image_size, rng))
        return (pixels.permute(2, 0, 1).float() / 255 - MEAN) / STD

    def __len__(self) -> int:
        return self.images * (self.captions_per_image if self.split == "train" else 1)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} entries")
        image_id = index // self.captions_per_image if self.split == "train" else index
        captions = self.captions(image_id)
        text = captions[index % self.captions_per_image] if self.split == "train" else captions
        return {"image": self.image(image_id), "caption": text, "image_id": image_id}


def write_vocab(directory) -> Path:
    """vocab.txt with BERT's special tokens and every word the captions use; returns the directory,
    which `transformers.BertTokenizerFast.from_pretrained` then loads."""
    directory = Path(directory)
    # Atomically: every rank of a torchrun run writes it while the others may be reading it.
    text = "\n".join([*SPECIAL_TOKENS, *WORDS]) + "\n"
    write_atomically(directory / "vocab.txt", lambda file: file.write(text), mode="w")
    return directory
