"""Pretrain a MAMO-style model with the vlfast ops.

    python train.py                                   # the built-in synthetic set, a few minutes on a CPU
    python train.py --config configs/synthetic.yaml optim.max_steps=50 --out runs/quick
    python train.py --resume runs/synthetic/last.pt   # continue exactly where it stopped
    python train.py --ops reference                   # the plain-torch references everywhere (A/B)
    python train.py compile=true cuda_graph=true      # one GPU: compiled forward + backward, the step replayed as a graph

Writes to --out: metrics.jsonl (one line per logged step), last.pt (atomic checkpoint), the
vocabulary the tokenizer used, loss.png. Several GPUs or CPU processes, one or more nodes:
    torchrun --nproc_per_node=8 train.py ...     (optim.batch_size is per process)
"""
import argparse
import collections
import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import BertTokenizerFast

from vlfast._extension import backend as ops_backend
from vlfast.data import KarpathyDataset, SyntheticImageText, write_vocab
from vlfast.data.karpathy import test_transform
from vlfast.data.synthetic import transform as synthetic_transform
from vlfast.models import Mamo, MamoConfig, TextConfig, VisionConfig
from vlfast.models.mamo import OBJECTIVES
from vlfast.models.pretrained import load_text_weights, load_vision_weights
from vlfast.training import (CudaGraphStep, MasterWeightAdamW, MetricsLog, check_finite, learning_rate, load_checkpoint,
                             load_config, plot_losses, save_checkpoint)


@dataclass
class DataConfig:
    # "synthetic"; "karpathy": Flickr30k / COCO JSON; "pretrain": ALBEF-format corpus files (the 4M
    # set) for training, Karpathy val/test JSON for evaluation (vlfast.data.karpathy)
    dataset: str = "synthetic"
    images: int = 2000  # synthetic: training images
    captions_per_image: int = 2  # synthetic
    eval_images: int = 200  # synthetic: images in each of the val and test splits
    train_file: Optional[str] = None  # karpathy: the train JSON
    pretrain_files: Tuple[str, ...] = ()  # pretrain: the corpus JSON files
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
                      # Mixing in uniform draws, it learns (0.49); ITC is unchanged (see README).
                      smoothing=0.05)


@dataclass
class RetrievalConfig:
    """retrieve.py: evaluation and --finetune."""
    split: str = "test"
    k_test: int = 16  # stage 2 re-ranks each query's top k, clipped to the set (ALBEF: 128 Flickr30k, 256 COCO)
    score: str = "itm"  # itm (ALBEF), itm+itc (BLIP) or itc (stage 1 only)
    batch_size: int = 64  # images or texts per embedding batch; ITM pairs per batch are 4x this
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
    # One process on a GPU: the step is recorded once as a CUDA graph and replayed (vlfast.training.
    # CudaGraphStep), so the host launches one graph per step instead of thousands of kernels.
    # Captions are padded to data.max_text_length (a graph's shapes are fixed); the random state,
    # the learning rate and the target network's update count live on the GPU, so replays advance them.
    cuda_graph: bool = False
    # torch.compile (inductor) over the forward of every objective, backward and clipping, one graph
    # (train.compile_forward_backward); the first step compiles (minutes on a CPU). One process;
    # captions padded to data.max_text_length, so every step has the shapes the graph was made for.
    compile: bool = False
    # On a GPU (bf16 autocast), with vlfast's ops: the matrix weights are bf16 parameters with fp32
    # masters in the optimizer (vlfast.training.MasterWeightAdamW), and the target network's have bf16
    # copies that its EMA update writes, so no weight is cast at each step (train.bf16_weights).
    # false: fp32 weights that autocast casts at each use. The CPU trains in fp32 either way.
    bf16_weights: bool = True
    seed: int = 0


def make_tokenizer(config: TrainConfig, folder: Path) -> BertTokenizerFast:
    """init.text's tokenizer, or the synthetic set's vocabulary written into ``folder``/vocab."""
    if config.init.text:
        return BertTokenizerFast.from_pretrained(config.init.text)
    return BertTokenizerFast.from_pretrained(write_vocab(Path(folder) / "vocab"))


def make_dataset(config: TrainConfig, split: str):
    """The synthetic set or the Karpathy JSON of ``split`` (train, val or test)."""
    size = config.model.vision.image_size
    if config.data.dataset == "synthetic":
        return SyntheticImageText(split, images=config.data.images if split == "train" else config.data.eval_images,
                                  image_size=size, captions_per_image=config.data.captions_per_image,
                                  seed=config.data.seed)
    if config.data.dataset == "pretrain" and split == "train":
        if not config.data.pretrain_files:
            raise ValueError("data.dataset=pretrain needs data.pretrain_files")
        return KarpathyDataset(config.data.pretrain_files, config.data.image_root, "pretrain", image_size=size)
    if config.data.dataset in ("karpathy", "pretrain"):
        annotations = {"train": config.data.train_file, "val": config.data.val_file, "test": config.data.test_file}[split]
        if not (annotations and config.data.image_root):
            raise ValueError(f"data.dataset={config.data.dataset} needs data.{split}_file and data.image_root")
        return KarpathyDataset(annotations, config.data.image_root, split, image_size=size)
    raise ValueError(f"data.dataset must be synthetic, karpathy or pretrain, got {config.data.dataset!r}")


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


def build(config: TrainConfig, out: Path):
    """The tokenizer, training data, collate function and model (with pretrained weights when given)."""
    tokenizer = make_tokenizer(config, out)
    if config.init.text:  # its vocabulary and architecture; fusion layers stay ours
        config.model.text = TextConfig.from_hf(config.init.text, fusion_layer=config.model.text.fusion_layer,
                                               encoder_width=config.model.vision.width)
    config.model.text.vocab_size = len(tokenizer)
    dataset = make_dataset(config, "train")

    tokenize = caption_tokenizer(tokenizer, config)

    def collate(items):
        input_ids, attention_mask = tokenize([item["caption"] for item in items])
        return (torch.stack([item["image"] for item in items]), input_ids, attention_mask,
                torch.tensor([item["image_id"] for item in items]), sum(len(item.get("skipped", ())) for item in items))

    model = make_model(config, tokenizer)
    if config.init.checkpoint:  # every weight, the target's included; init.text then gives only the tokenizer
        model.load_state_dict(load_checkpoint(config.init.checkpoint)["model"])
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
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, cuda_graph: bool = False,
                   bf16_weights: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, LayerNorms, tokens and position
    embeddings). torch's fused kernel: the default (foreach) one made a dozen passes over the
    weights and took 14.7 ms of host time per ViT-B/16 + BERT-base step on an H200
    (benchmarks/results/NVIDIA-H200-2026-11-27-profile-vit_b16_bert_base_224_b64.txt), in a step
    the host paces. ``cuda_graph``: capturable, for a recorded step (vlfast.training.CudaGraphStep).
    ``bf16_weights``: the model's matrix weights become bf16, their fp32 masters live in the
    optimizer (vlfast.training.MasterWeightAdamW)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "token" in name or "pos_embed" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if bf16_weights:
        return MasterWeightAdamW(model, groups, torch.bfloat16, lr=lr, fused=True, capturable=cuda_graph)
    return torch.optim.AdamW(groups, lr=lr, fused=True, capturable=cuda_graph)


def bf16_weights(model: Mamo, autocast: bool, enabled: bool = True) -> bool:
    """Whether the step keeps its matrix weights in bf16: under bf16 autocast (a GPU's step), on
    vlfast's path (the reference casts at every use, as ALBEF's code does), unless not ``enabled``.
    If so, the target network gets bf16 copies of its weights, written by each EMA update beside
    their fp32 values (vlfast.nn.MomentumModel's compute_dtype); make_optimizer(bf16_weights=True)
    does the same for the online model. Autocast caches casts only of weights that require grad,
    so it re-cast every frozen target weight at every use; the online model's it casts once per
    step, and casts each one's gradient back in the backward: 1707 casts per ViT-B/16 + BERT-base
    step (benchmarks/step_cost_record.json)."""
    if not (autocast and enabled and ops_backend() != "reference"):
        return False
    model.target.set_compute_dtype(torch.bfloat16)
    return True


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm), with each gradient's norm computed into fp32 by the
    multi-tensor norm itself: torch's takes bf16 gradients' norms in bf16 and stacks them with one
    cast each (312 casts per ViT-B/16 + BERT-base step with bf16 weights). The same numbers for
    fp32 gradients; the norm before clipping is returned. The norms are summed in the parameters'
    order whatever their dtypes, so bf16 and fp32 weights with the same gradients clip alike."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    groups = collections.defaultdict(list)  # (device, dtype) -> positions in grads
    for i, grad in enumerate(grads):
        groups[(grad.device, grad.dtype)].append(i)
    norms = [None] * len(grads)
    for positions in groups.values():
        for i, norm in zip(positions, torch._foreach_norm([grads[i] for i in positions], 2.0, dtype=torch.float32)):
            norms[i] = norm
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for positions in groups.values():
        torch._foreach_mul_([grads[i] for i in positions], scale)
    return total


def forward_backward(runner, model: Mamo, batch, grad_clip: float, image_ids=None):
    """The forward of every objective (bf16 autocast on a GPU), backward and gradient clipping:
    the part of the step that torch.compile traces as one graph (``compile=true``). Returns
    (losses, gradient norm), detached."""
    images, input_ids, attention_mask = batch
    # bf16 autocast on a GPU; on the CPU whatever the caller set (step_cost.py counts under CPU autocast)
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if images.is_cuda else contextlib.nullcontext()
    with precision:
        losses = runner(images, input_ids, attention_mask, image_ids=image_ids)
    losses["loss"].backward()
    norm = clip_grad_norm(model.parameters(), grad_clip)
    return {name: value.detach() for name, value in losses.items()}, norm


def check_whole_step_options(config: TrainConfig, device: torch.device, world: int) -> None:
    """compile=true and cuda_graph=true take the step of one process as a whole: DDP's hooks are not
    traced, and the image ids' check and ALBEF's sampling (itc_loss's reference: --ops reference or
    VLFAST_REFERENCE_OPS) read values on the host mid-step. A CUDA graph also needs a GPU."""
    itc = ops_backend("itc_loss")
    refused = world > 1 or config.image_id_positives or itc == "reference"
    this_run = (f"this run: {device.type}, {world} processes, image_id_positives={config.image_id_positives}, "
                f"itc_loss {itc}")
    for option, wanted, gpu in (("compile=true compiles", config.compile, False),
                                ("cuda_graph=true records", config.cuda_graph, True)):
        if wanted and (refused or (gpu and device.type != "cuda")):
            raise ValueError(f"{option} the step of one process{' on a GPU' if gpu else ''}, without "
                             f"image_id_positives and itc_loss's reference (--ops reference or "
                             f"VLFAST_REFERENCE_OPS; both read values on the host mid-step; DDP's hooks are "
                             f"not traced); {this_run}")


def compile_forward_backward():
    """train.forward_backward compiled as one graph (an error, not a silent split, if it cannot be): dynamo
    traces the backward call too (trace_autograd_ops), so inductor fuses forward and backward.
    The optimizer and the EMA stay eager: each is already one multi-tensor kernel per dtype
    (fused AdamW is not traceable), and a CUDA graph records them with the rest."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):  # older torch: the backward splits the graph
        return torch.compile(forward_backward)
    compiled = torch.compile(forward_backward, fullgraph=True)

    def run(*args, **kwargs):
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(*args, **kwargs)
    return run


def train_step(runner, model: Mamo, optimizer, batch, grad_clip: float, image_ids=None,
               forward_backward=forward_backward) -> dict:
    """One step: ``forward_backward`` (the objectives, backward, clipping; or its compiled form),
    AdamW, EMA of the target network. ``runner`` is the model or its DDP wrapper; ``batch``
    (images, input_ids, attention_mask). Returns the losses and the gradient norm, detached, on
    the device.

    The host never waits for the GPU here, so it can queue the next step, and the step can be
    recorded as a CUDA graph. The random draws (masks, negatives, dropout) come from torch's
    default generator, whose state checkpoints save and graphs and torch.compile advance. A
    non-finite loss or gradient norm is caught on the device: fused AdamW skips the update
    where ``found_inf`` is 1 (as under torch.amp.GradScaler: weights, moments and step count
    stay as they were), and the target then averages toward unchanged weights. Returns the losses
    and the gradient norm (before clipping); the caller reads them when it likes and stops on a
    non-finite one, so a skipped step never goes unseen and no weight ever holds it."""
    optimizer.zero_grad(set_to_none=True)
    losses, norm = forward_backward(runner, model, batch, grad_clip, image_ids)
    optimizer.found_inf = (~torch.isfinite(losses["loss"].float() + norm)).float()
    optimizer.step()
    model.update_target()
    return {**losses, "grad_norm": norm}


def train(config: TrainConfig, out: Path, resume: Path = None, stop_after: int = None,
          time_limit: float = None, evaluate: Callable[[Mamo, int], float] = None):
    """Train to config.optim.max_steps, or stop early (checkpoint written) after ``stop_after``
    steps or ``time_limit`` seconds of this invocation; --resume continues exactly (with as many
    processes as the run that wrote the checkpoint).
    Every optim.eval_every steps ``evaluate(model, step)`` (called on every rank, model in eval
    mode) scores the model; the best-scoring weights are kept in best.pt.
    Returns (checkpoint path, the step it holds)."""
    check_optim(config.optim)
    rank, world, device = setup_distributed()
    check_whole_step_options(config, device, world)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    dataset, collate, model = build(config, out)
    model.to(device)
    bf16 = bf16_weights(model, autocast=device.type == "cuda", enabled=config.bf16_weights)
    if rank > 0:  # then each rank its own draws (rank 0 keeps the stream one process has)
        torch.manual_seed(config.seed + rank)
    optimizer = make_optimizer(model, config.optim.lr, config.optim.weight_decay, config.cuda_graph, bf16)
    start, checkpoint, best = 0, out / "last.pt", -math.inf
    if resume is not None:
        state = load_checkpoint(resume)
        if "rng" not in state:
            raise ValueError(f"--resume {resume}: no optimizer and random state in it (best.pt holds weights "
                             f"only): start a new run from it with init.checkpoint={resume}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        saved = state["rng"]  # one entry per process of the run that wrote it
        if len(saved) != world:
            print(f"warning: {resume} was written by {len(saved)} processes, this run has {world}: "
                  "batches and random draws will not continue exactly")
        if "generator" in saved[0]:
            print(f"warning: {resume} comes from a vlfast whose masks and negatives had their own generator: "
                  "they continue from the default one, so the random draws will not continue exactly")
        torch.set_rng_state(saved[rank % len(saved)]["torch"])  # masks, negatives and dropout on the CPU
        if device.type == "cuda":
            torch.cuda.set_rng_state(saved[rank % len(saved)]["cuda"], device)  # and on the GPU
        start, best = state["step"], state.get("best_score", best)
        print(f"resumed from {resume} at step {start}")
    # A resumed optimizer comes with the settings of the run that saved it (older runs: not fused;
    # a recorded step reads its learning rate from the GPU), so this run's are set again.
    for group in optimizer.param_groups:
        group["fused"], group["capturable"] = True, config.cuda_graph
        group["lr"] = torch.tensor(float(group["lr"]), device=device) if config.cuda_graph else float(group["lr"])
    for parameter_state in optimizer.state.values():  # fused AdamW keeps its step counts beside the weights
        parameter_state["step"] = parameter_state["step"].to(device, torch.float32)
    # Objectives left out leave parameters without gradients, which DDP must be told about.
    # No buffer needs broadcasting: the only one, the target's update count, is the same on every rank.
    runner = model if world == 1 else DDP(model, find_unused_parameters=set(config.model.objectives) != set(OBJECTIVES),
                                          broadcast_buffers=False)
    log = MetricsLog(out / "metrics.jsonl")
    if rank == 0:  # a new run starts a new log; a resumed one drops what it will log again (steps
        # logged after its checkpoint by a run that then crashed). An eval record's step counts steps done.
        log.keep(lambda record: record["step"] - ("eval_score" in record) < start)
    total = config.optim.max_steps
    step_function = compile_forward_backward() if config.compile else forward_backward
    graphed = None
    if config.cuda_graph:
        graphed = CudaGraphStep(lambda *batch: train_step(runner, model, optimizer, batch, config.optim.grad_clip,
                                                          forward_backward=step_function))

    def save(step):  # called on every rank: each one's random state goes into the checkpoint
        rng = [{"torch": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}] * world
        if world > 1:
            dist.all_gather_object(rng, rng[0])
        if rank == 0:
            save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "step": step, "rng": rng, "config": asdict(config), "best_score": best})

    progress = tqdm(total=total, initial=start, desc="train", disable=rank != 0)
    saved_at = start if resume is not None else None
    started = time.time()
    # Workers decode and augment the next batches while this process trains. The loader's own
    # generator keeps it from drawing on the global RNG (dropout's, restored on resume); random
    # augmentation (Karpathy training) restarts its draws on resume, so there it is not exact.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=BatchOrder(len(dataset), config, start, rank, world),
                                         collate_fn=collate, num_workers=config.data.num_workers,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(config.seed * 1000 + rank))
    skipped, pending, names = 0, [], None  # pending: each step's losses, on the device, until the next read

    def read_losses():
        """The host's one wait for the GPU per interval: every pending step's losses, averaged over
        the ranks, checked (a non-finite one stops every rank at the same step; train_step skipped
        its update). Returns the last step's."""
        steps = [step for step, _ in pending]
        values = torch.stack([value for _, value in pending])
        pending.clear()
        if world > 1:
            dist.all_reduce(values)
            values /= world
        for step, row in zip(steps, values.tolist()):
            row = dict(zip(names, row))
            check_finite(step, row, checkpoint if saved_at is not None else None)
        return {name: round(value, 5) for name, value in row.items()}

    for step, (images, input_ids, attention_mask, image_ids, skipped_now) in enumerate(loader, start=start):
        skipped += skipped_now
        stopping = stop_after is not None and step >= start + stop_after
        # The time limit: every step with one process; with several, agreed where the host reads anyway.
        if time_limit is not None and (world == 1 or step % config.optim.log_every == 0):
            stopping = stopping or time.time() - started > time_limit
            if world > 1:  # every rank stops at the same step
                stopping = torch.tensor(float(stopping), device=device)  # NCCL reduces CUDA tensors only
                dist.all_reduce(stopping)
                stopping = bool(stopping)
        if step >= total or stopping:
            if pending:  # checked before anything is saved
                read_losses()
            if stopping and saved_at != step:
                save(step)
                saved_at = step
            break
        lr = learning_rate(step, base_lr=config.optim.lr, warmup_steps=config.optim.warmup_steps,
                           total_steps=total, min_lr=config.optim.min_lr)
        for group in optimizer.param_groups:
            if config.cuda_graph:
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        batch = tuple(x.to(device, non_blocking=True) for x in (images, input_ids, attention_mask))
        if graphed is not None:
            losses = graphed(*batch)
        else:
            image_ids = image_ids.to(device, non_blocking=True) if config.image_id_positives else None
            losses = train_step(runner, model, optimizer, batch, config.optim.grad_clip, image_ids, step_function)
        names = names or [k if k in ("loss", "grad_norm") else f"loss_{k}" for k in losses]
        pending.append((step, torch.stack([v.float() for v in losses.values()])))  # a copy: a graph overwrites its outputs
        progress.update()
        evaluating = evaluate is not None and config.optim.eval_every and (step + 1) % config.optim.eval_every == 0
        saving = (step + 1) % config.optim.checkpoint_every == 0 or step + 1 == total
        if step % config.optim.log_every == 0 or saving or evaluating:  # saving: the last step too
            values = read_losses()  # before anything is saved: no checkpoint follows a non-finite loss unseen
            if rank == 0 and (step % config.optim.log_every == 0 or step == total - 1):
                log.write({"step": step, "lr": lr, **values, **({"skipped_images": skipped} if skipped else {})})
            progress.set_postfix(values, refresh=False)
        if evaluating:
            model.eval()
            score = evaluate(model, step + 1)
            model.train()
            improved, best = score > best, max(best, score)
            if rank == 0:
                log.write({"step": step + 1, "eval_score": score})
                if improved:
                    save_checkpoint(out / "best.pt", {"model": model.state_dict(), "step": step + 1,
                                                      "config": asdict(config), "best_score": best})
        if saving:
            save(step + 1)
            saved_at = step + 1
    progress.close()
    if skipped:
        print(f"rank {rank}: {skipped} unreadable images skipped (their next entries served instead)")
    if rank == 0:
        plot_losses(log.read(), out / "loss.png")
    return checkpoint, saved_at


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file (configs/); defaults to the synthetic run")
    parser.add_argument("--out", default="runs/synthetic", help="run folder (checkpoint, metrics, plot)")
    parser.add_argument("--resume", help="checkpoint to continue from; its config is the base that --config "
                                         "and overrides change")
    parser.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this many steps of this run")
    parser.add_argument("--time-limit", type=float, help="stop (with a checkpoint) after this many minutes")
    parser.add_argument("--ops", choices=["fused", "reference", "auto"],
                        help="vlfast kernels or the plain-torch references everywhere (default: VLFAST_BACKEND, "
                             "else auto)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.max_steps=100")
    args = parser.parse_args()
    if args.ops:
        os.environ["VLFAST_BACKEND"] = args.ops  # read by every op call
    base = None
    if args.resume:  # the run continues with its own config (mmap: the weights are read later, once)
        if not Path(args.resume).is_file():
            parser.error(f"--resume {args.resume}: no such file")
        base = torch.load(args.resume, map_location="cpu", weights_only=True, mmap=True).get("config")
    try:
        config = load_config(TrainConfig, args.config, args.overrides, base=base)
        check_optim(config.optim)
    except ValueError as error:
        parser.error(str(error))
    started = time.time()
    checkpoint, step = train(config, Path(args.out), Path(args.resume) if args.resume else None, args.stop_after,
                             args.time_limit * 60 if args.time_limit else None)
    if dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another still uses them
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"{step}/{config.optim.max_steps} steps, {time.time() - started:.0f} s in this run; checkpoint: {checkpoint}; "
          f"metrics: {Path(args.out) / 'metrics.jsonl'}; loss curve: {Path(args.out) / 'loss.png'}")
    if step < config.optim.max_steps:
        print(f"next: python train.py --resume {checkpoint} --out {args.out}" + (f" --ops {args.ops}" if args.ops else ""))
    else:
        print(f"next: python retrieve.py --checkpoint {checkpoint}")


if __name__ == "__main__":
    main()
