"""What several test files share: the devices to run on, the marks for what needs a build or a
GPU, a statistical bound, the tiny model with a batch for it, and tiny settings for train.py.
(conftest.py holds pytest's hooks and fixtures.)"""
import math
from pathlib import Path

import pytest
import torch

from vlfast import _extension
from vlfast.data import SyntheticImageText
from vlfast.data.synthetic import SPECIAL_TOKENS, WORDS
from vlfast.models import Mamo, MamoConfig, TextConfig, VisionConfig

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Tests of what only the compiled kernels do (their rounding, their registration): without
# vlfast._C the ops run their references, which these tests do not describe.
needs_extension = pytest.mark.skipif(_extension.LOAD_ERROR is not None,
                                     reason="vlfast._C is not built: python setup.py build_ext --inplace")


def chi_square_quantile(dof: int, z: float = 4.753) -> float:
    """Upper quantile of chi-square(dof) at the normal z (4.753: 1 - 1e-6), Wilson-Hilferty."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


WIDTH = 64
VOCAB = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *WORDS])}


def tiny(objectives=("mrm", "mim", "mlm", "itc", "itm"), **settings) -> Mamo:
    """A Mamo small enough for a test (seeded: the same weights at each call); ``settings``: other
    MamoConfig fields."""
    config = MamoConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=WIDTH, depth=2, heads=4),
        text=TextConfig(vocab_size=len(VOCAB), width=WIDTH, depth=3, heads=4, intermediate=128, max_positions=24,
                        fusion_layer=1, encoder_width=WIDTH, dropout=0.0),
        embed_dim=32, objectives=tuple(objectives), **settings)
    torch.manual_seed(0)
    return Mamo(config, mask_token_id=VOCAB["[MASK]"], special_ids=[VOCAB[t] for t in ("[PAD]", "[CLS]", "[SEP]")])


def batch(size=6):
    """(images, input_ids, attention_mask) of ``size`` synthetic pairs for ``tiny``."""
    data = SyntheticImageText("train", images=size, image_size=32, captions_per_image=1)
    items = [data[i] for i in range(size)]
    words = [[VOCAB["[CLS]"], *(VOCAB[w] for w in item["caption"].split()), VOCAB["[SEP]"]] for item in items]
    length = max(map(len, words))
    input_ids = torch.tensor([w + [VOCAB["[PAD]"]] * (length - len(w)) for w in words])
    return torch.stack([item["image"] for item in items]), input_ids, (input_ids != VOCAB["[PAD]"]).long()


# train.py's and retrieve.py's overrides for a run of seconds
TINY = ["data.images=24", "data.captions_per_image=1", "optim.batch_size=4",
        "optim.max_steps=6", "optim.warmup_steps=2", "optim.log_every=1", "optim.checkpoint_every=100",
        "model.vision.image_size=32", "model.vision.width=32", "model.vision.heads=2", "model.vision.depth=1",
        "model.text.width=32", "model.text.heads=2", "model.text.depth=2", "model.text.fusion_layer=1",
        "model.text.intermediate=64", "model.text.encoder_width=32", "model.embed_dim=16"]
