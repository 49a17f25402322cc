"""The run's settings: dataclasses with their defaults (the synthetic run), filled from a YAML
file and ``key.sub=value`` overrides, checked before anything runs.
"""
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Tuple

import yaml

from vlfast.models import MamoConfig, TextConfig, VisionConfig


@dataclass
class DataConfig:
    # "synthetic"; "karpathy": Flickr30k / COCO JSON; "pretrain": ALBEF-format corpus files (the 4M
    # set) for training, Karpathy val/test JSON for evaluation (vlfast.data.karpathy); "shards":
    # webdataset tar shards (img2dataset's output) for training, Karpathy JSON for evaluation
    # (vlfast.data.shards)
    dataset: str = "synthetic"
    images: int = 2000  # synthetic: training images
    captions_per_image: int = 2  # synthetic
    eval_images: int = 200  # synthetic: images in each of the val and test splits
    train_file: Optional[str] = None  # karpathy: the train JSON
    pretrain_files: Tuple[str, ...] = ()  # pretrain: the corpus JSON files
    # shards: one source per entry, a brace pattern (cc12m/{00000..01242}.tar), a path or a pipe:
    # command (pipe:aws s3 cp s3://bucket/{0000..0999}.tar -: each expanded shard one command)
    shards: Tuple[str, ...] = ()
    shard_weights: Tuple[float, ...] = ()  # shards: each source's share of an epoch's visits (empty: each shard once)
    resample_shards: bool = False  # shards: draw shards with replacement (fewer shards than processes × workers)
    shuffle_buffer: int = 1000  # shards: samples each loader stream shuffles within a shard
    val_file: Optional[str] = None  # karpathy: val JSON (retrieve.py --finetune evaluates on it)
    test_file: Optional[str] = None  # karpathy: test JSON (retrieve.py)
    image_root: Optional[str] = None  # karpathy: the folder the JSON image paths are relative to
    max_text_length: int = 30
    num_workers: int = 1  # DataLoader processes preparing batches (0: in the training process)
    seed: int = 0


@dataclass
class InitConfig:
    # Both must fill every weight of their encoder or stop the run naming the keys (vlfast.models.pretrained)
    vision: Optional[str] = None  # a timm ViT state dict file (torch or .safetensors), e.g. DeiT/ViT-B/16 weights
    text: Optional[str] = None  # a Hugging Face BERT directory: config.json, weights, vocab.txt
    checkpoint: Optional[str] = None  # a vlfast checkpoint whose model weights start the run (fine-tuning)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.02
    warmup_steps: int = 40
    max_steps: int = 400  # about 3 minutes on this project's 2-core CPU machine with the default model
    batch_size: int = 32
    grad_clip: float = 5.0
    log_every: int = 10
    checkpoint_every: int = 200
    eval_every: int = 0  # steps between evaluations (retrieve.py --finetune: one epoch); 0 never


def check_optim(optim: OptimConfig) -> None:
    """Settings that would fail mid-run (a division by zero at the first log) or train nothing."""
    for name, least in (("max_steps", 1), ("batch_size", 1), ("log_every", 1), ("checkpoint_every", 1),
                        ("warmup_steps", 0), ("eval_every", 0)):
        if getattr(optim, name) < least:
            raise ValueError(f"optim.{name} must be at least {least}, got {getattr(optim, name)}")
    for name, bound in (("grad_clip", "> 0"), ("lr", ">= 0"), ("min_lr", ">= 0"), ("weight_decay", ">= 0")):
        value = getattr(optim, name)
        if not (math.isfinite(value) and (value > 0 or (value == 0 and bound == ">= 0"))):
            raise ValueError(f"optim.{name} must be a finite number {bound}, got {value}")


def default_model() -> MamoConfig:
    """Small enough to train in minutes on two CPU cores; configs/ hold ViT-B/16 + BERT-base."""
    return MamoConfig(vision=VisionConfig(image_size=64, patch_size=8, width=128, depth=4, heads=4),
                      text=TextConfig(vocab_size=0, width=128, depth=4, heads=4, intermediate=256, max_positions=32,
                                      fusion_layer=2, encoder_width=128),
                      embed_dim=64,
                      # ALBEF's pure hard negatives (0) left ITM at chance (loss 0.636) through 400
                      # steps here: on this set the hardest "negative" often fits the caption too.
                      # Mixing in uniform draws, it learns (0.49); ITC is unchanged.
                      smoothing=0.05)


@dataclass
class RetrievalConfig:
    """retrieve.py: evaluation and --finetune."""
    split: str = "test"
    k_test: int = 16  # stage 2 re-ranks each query's top k, clipped to the set (ALBEF: 128 Flickr30k, 256 COCO)
    score: str = "itm"  # itm (ALBEF), itm+itc (BLIP) or itc (stage 1 only)
    batch_size: int = 64  # images or texts per embedding batch; ITM pairs per batch are 4x this
    # GiB of the re-ranked images' cross-attention keys and values held at once (docs/training.md,
    # "Retrieval"): 16 fits a 40 GB card at ViT-B/16 + BERT-base, 384 px (10.6 MB per image in bf16)
    cache_gb: float = 16.0
    finetune_epochs: int = 6
    finetune_lr: float = 1.0e-5


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: MamoConfig = field(default_factory=default_model)
    init: InitConfig = field(default_factory=InitConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    # Captions of the same image are all ITC positives and never ITM negatives (retrieval
    # fine-tuning, as ALBEF's); pretraining treats each pair alone, as ALBEF's pretraining does.
    image_id_positives: bool = False
    # One process on a GPU: the step is recorded once as a CUDA graph and replayed (vlfast.trainer.
    # CudaGraphStep), so the host launches one graph per step instead of thousands of kernels.
    # Captions are padded to data.max_text_length (a graph's shapes are fixed); the random state,
    # the learning rate and the target network's update count live on the GPU, so replays advance them.
    cuda_graph: bool = False
    # torch.compile (inductor) over the forward of every objective, backward and clipping, one graph
    # (vlfast.trainer.compile_forward_backward); the first step compiles (minutes on a CPU). One process;
    # captions padded to data.max_text_length, so every step has the shapes the graph was made for.
    compile: bool = False
    # On a GPU (bf16 autocast), with vlfast's ops: the matrix weights are bf16 parameters with fp32
    # masters in the optimizer (vlfast.trainer.MasterWeightAdamW), and the target network's have bf16
    # copies that its EMA update writes, so no weight is cast at each step (vlfast.trainer.bf16_weights).
    # false: fp32 weights that autocast casts at each use. The CPU trains in fp32 either way.
    bf16_weights: bool = True
    seed: int = 0


def load_config(config_class, path: Optional[str] = None, overrides: Iterable[str] = (), base: Optional[dict] = None):
    """A (nested) dataclass from a YAML file plus ``key.sub=value`` overrides (values parsed as
    YAML), over the class defaults or, when given, over ``base`` (e.g. a checkpoint's
    ``dataclasses.asdict`` config). Unknown keys and values of the wrong type raise ValueError
    naming the key."""
    values = {}
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config keys at the top level")
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r} is not key=value")
        *parents, leaf = key.split(".")
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {parent} is not a section")
        node[leaf] = yaml.safe_load(raw)
    defaults = config_class() if base is None else _build(config_class(), base, prefix="")
    return _build(defaults, values, prefix="")


def _build(base, values: dict, prefix: str):
    """``base`` (a dataclass instance: the defaults, nested ones included) with ``values`` applied."""
    config_class = type(base)
    field_types = typing.get_type_hints(config_class)
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]} (known under {prefix or 'the top level'}: {sorted(known)})")
    kwargs = {}
    for name, value in values.items():
        kind = field_types[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ValueError(f"config key {prefix}{name} is a section, got {value!r}")
            kwargs[name] = _build(getattr(base, name), value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(kind, value, f"{prefix}{name}")
    return dataclasses.replace(base, **kwargs)


def _coerce(kind, value, key: str):
    origin = typing.get_origin(kind)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        origin = typing.get_origin(kind)
    if origin in (tuple, list):
        item = typing.get_args(kind)[0]
        if isinstance(value, str) and item is str:  # one string for a list of them (data.shards=pattern)
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key} must be a list, got {value!r}")
        return origin(_coerce(item, v, key) for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"config key {key} must be {kind.__name__}, got {value!r}")
    return value
