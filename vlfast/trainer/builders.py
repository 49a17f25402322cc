"""What a run is built from, given its config: the tokenizer, the data sets and the batch order,
the model (with pretrained weights when given), and the processes (torchrun).
"""
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from transformers import BertTokenizerFast

from vlfast.data import KarpathyDataset, SyntheticImageText, write_vocab
from vlfast.data.karpathy import test_transform
from vlfast.data.shards import BatchInfo, make_plan
from vlfast.data.synthetic import transform as synthetic_transform
from vlfast.models import Mamo, TextConfig
from vlfast.models.pretrained import load_text_weights, load_vision_weights
from vlfast.trainer.config import TrainConfig
from vlfast.trainer.outputs import load_checkpoint


def make_tokenizer(config: TrainConfig, folder: Path) -> BertTokenizerFast:
    """init.text's tokenizer, or the synthetic set's vocabulary written into ``folder``/vocab."""
    if config.init.text:
        return BertTokenizerFast.from_pretrained(config.init.text)
    return BertTokenizerFast.from_pretrained(write_vocab(Path(folder) / "vocab"))


def make_dataset(config: TrainConfig, split: str):
    """The synthetic set or the Karpathy JSON of ``split`` (train, val or test); for shards' train
    split the plan of which shards each loader stream reads (make_loader streams it)."""
    size = config.model.vision.image_size
    if config.data.dataset == "shards" and split == "train":
        if not config.data.shards:
            raise ValueError("data.dataset=shards needs data.shards (a brace pattern, paths or pipe: commands)")
        if config.data.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be at least 1, got {config.data.shuffle_buffer}")
        return make_plan(config.data.shards, config.seed * 1000 + config.data.seed, config.data.shard_weights or None,
                         config.data.resample_shards)
    if config.data.dataset == "synthetic":
        return SyntheticImageText(split, images=config.data.images if split == "train" else config.data.eval_images,
                                  image_size=size, captions_per_image=config.data.captions_per_image,
                                  seed=config.data.seed)
    if config.data.dataset == "pretrain" and split == "train":
        if not config.data.pretrain_files:
            raise ValueError("data.dataset=pretrain needs data.pretrain_files")
        return KarpathyDataset(config.data.pretrain_files, config.data.image_root, "pretrain", image_size=size)
    if config.data.dataset in ("karpathy", "pretrain", "shards"):
        annotations = {"train": config.data.train_file, "val": config.data.val_file, "test": config.data.test_file}[split]
        if not (annotations and config.data.image_root):
            raise ValueError(f"data.dataset={config.data.dataset} needs data.{split}_file and data.image_root")
        return KarpathyDataset(annotations, config.data.image_root, split, image_size=size)
    raise ValueError(f"data.dataset must be synthetic, karpathy, pretrain or shards, got {config.data.dataset!r}")


def image_transform(config: TrainConfig):
    """What the evaluation split does to a PIL image (retrieve.py search applies it to user images)."""
    if config.data.dataset == "synthetic":
        return synthetic_transform(config.model.vision.image_size)
    return test_transform(config.model.vision.image_size)


def caption_tokenizer(tokenizer, config: TrainConfig) -> Callable:
    """captions -> (input_ids, attention_mask), padded to the longest (with cuda_graph or compile to
    data.max_text_length: one shape, one graph), cut at data.max_text_length."""
    def tokenize(captions):
        fixed = config.cuda_graph or config.compile
        text = tokenizer(captions, padding="max_length" if fixed else "longest", truncation=True,
                         max_length=config.data.max_text_length, return_tensors="pt")
        return text["input_ids"], text["attention_mask"]
    return tokenize


def make_model(config: TrainConfig, tokenizer) -> Mamo:
    return Mamo(config.model, mask_token_id=tokenizer.mask_token_id,
                special_ids=[tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id])


def build_training(config: TrainConfig, out: Path):
    """The tokenizer, training data, collate function and model (with pretrained weights when given)."""
    tokenizer = make_tokenizer(config, out)
    if config.init.text:  # its vocabulary and architecture; fusion layers stay ours
        config.model.text = TextConfig.from_hf(config.init.text, fusion_layer=config.model.text.fusion_layer,
                                               encoder_width=config.model.vision.width)
    config.model.text.vocab_size = len(tokenizer)
    dataset = make_dataset(config, "train")

    tokenize = caption_tokenizer(tokenizer, config)

    def collate(items):  # (images, input_ids, attention_mask, image_ids, what was skipped)
        input_ids, attention_mask = tokenize([item["caption"] for item in items])
        return (torch.stack([item["image"] for item in items]), input_ids, attention_mask,
                torch.tensor([item["image_id"] for item in items]),
                BatchInfo(skipped=sum(len(item.get("skipped", ())) for item in items)))

    model = make_model(config, tokenizer)
    if config.init.checkpoint:  # every weight, the target's included; init.text then gives only the tokenizer
        model.load_state_dict(load_checkpoint(config.init.checkpoint)["model"])
        model.restart_itc_ramp()  # a new run: ITC's distillation ramps up again, as ALBEF's fine-tuning
        print(f"model weights from {config.init.checkpoint}")
        return dataset, collate, model
    if config.init.vision:  # every weight filled, or an error naming the keys (vlfast.models.pretrained)
        print(load_vision_weights(model.visual_encoder, config.init.vision))
    if config.init.text:
        print(load_text_weights(model.text_encoder, config.init.text))
    if config.init.vision or config.init.text:
        model.reset_target()
    return dataset, collate, model


class BatchOrder(torch.utils.data.Sampler):
    """Each step's dataset indices, shuffled epoch after epoch from the seed and the step alone,
    so a resumed run sees the same batches whatever the number of loader workers. With several
    processes each takes its slice of one global batch of batch_size × world: the same global
    batches as one process with that batch size."""

    def __init__(self, entries: int, config: TrainConfig, start_step: int, rank: int = 0, world: int = 1):
        self.entries, self.size, self.seed, self.start, self.rank, self.world = \
            entries, config.optim.batch_size, config.seed, start_step, rank, world
        self.per_epoch = entries // (self.size * world)
        if self.per_epoch == 0:
            raise ValueError(f"the train split has {entries} entries, fewer than one global batch of "
                             f"optim.batch_size {self.size} × {world} processes")

    def __iter__(self):
        step = self.start
        while True:
            epoch, offset = divmod(step, self.per_epoch)
            order = torch.randperm(self.entries, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)).tolist()
            for index in range(offset, self.per_epoch):
                first = (index * self.world + self.rank) * self.size
                yield order[first:first + self.size]
                step += 1


def setup_distributed():
    """(rank, world size, device): under torchrun one process per GPU (NCCL) or CPU process (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():  # retrieve.py --finetune sets it up before calling train()
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        # The store's keys under this torchrun attempt's prefix: after a restart (--max-restarts) the
        # agent's store still held the killed group's addresses, and gloo connected to a dead rank
        store, rank, size = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=size,
                                store=dist.PrefixStore(f"vlfast/attempt_{attempt}", store))
    return dist.get_rank(), world, torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
