"""The training loop: set up (processes, model, optimizer, resume), then step after step with
the losses read once per log interval, checkpoints, an optional evaluation hook, and a stop at
max_steps, after ``stop_after`` steps or at a time limit.
"""
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from vlfast.data.karpathy import train_transform
from vlfast.data.shards import Position, ShardPlan, ShardStream
from vlfast.models import Mamo
from vlfast.models.mamo import OBJECTIVES
from vlfast.trainer.builders import BatchOrder, build_training, setup_distributed
from vlfast.trainer.config import TrainConfig, check_optim
from vlfast.trainer.optimizer import bf16_weights, learning_rate, make_optimizer
from vlfast.trainer.outputs import MetricsLog, check_finite, load_checkpoint, plot_losses, save_checkpoint
from vlfast.trainer.step import CudaGraphStep, check_whole_step_options, compile_forward_backward, forward_backward, \
    train_step


def train(config: TrainConfig, out: Path, resume: Path = None, stop_after: int = None,
          time_limit: float = None, evaluate: Callable[[Mamo, int], float] = None) -> Tuple[Path, Optional[int]]:
    """Train to config.optim.max_steps, or stop early (checkpoint written) after ``stop_after``
    steps or ``time_limit`` seconds of this invocation; ``resume`` continues exactly (with as many
    processes as the run that wrote the checkpoint).
    Every optim.eval_every steps ``evaluate(model, step)`` (called on every rank, model in eval
    mode) scores the model; the best-scoring weights are kept in best.pt.
    Returns (checkpoint path, the step it holds)."""
    check_optim(config.optim)
    rank, world, device = setup_distributed()
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and written_by_this_torchrun(out / "last.pt"):
        # torchrun restarted the group (a process died; --max-restarts): on from this run's last
        # checkpoint, also where the first attempt had resumed from another
        resume = out / "last.pt"
        print(f"rank {rank}: torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: resuming from {resume}")
    check_whole_step_options(config, device, world)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    dataset, collate, model = build_training(config, out)
    model.to(device)
    bf16 = bf16_weights(model, autocast=device.type == "cuda", enabled=config.bf16_weights)
    if rank > 0:  # then each rank its own draws (rank 0 keeps the stream one process has)
        torch.manual_seed(config.seed + rank)
    optimizer = make_optimizer(model, config.optim.lr, config.optim.weight_decay, config.cuda_graph, bf16)
    start, best, positions = restore(resume, model, optimizer, rank, world, device, config.data.num_workers) \
        if resume is not None else (0, -math.inf, {})
    set_optimizer_settings(optimizer, config.cuda_graph, device)
    # Objectives left out leave parameters without gradients, which DDP must be told about.
    # No buffer needs broadcasting: each (the target's update count, the ITC queue, which every rank
    # fills with the same gathered rows) is the same on every rank.
    runner = model if world == 1 else DDP(model, find_unused_parameters=set(config.model.objectives) != set(OBJECTIVES),
                                          broadcast_buffers=False)
    log = MetricsLog(out / "metrics.jsonl")
    if rank == 0:  # a new run starts a new log; a resumed one drops what it will log again (steps
        # logged after its checkpoint by a run that then crashed). An eval record's step counts steps done.
        log.keep(lambda record: record["step"] - ("eval_score" in record) < start)
    step_function = compile_forward_backward() if config.compile else forward_backward
    graphed = None
    if config.cuda_graph:
        graphed = CudaGraphStep(lambda *batch: train_step(runner, model, optimizer, batch, config.optim.grad_clip,
                                                          forward_backward=step_function))
    checkpoint, total, optim = out / "last.pt", config.optim.max_steps, config.optim

    def save(step):
        save_run(checkpoint, model, optimizer, step, config, best, rank, world, device, positions,
                 streams=world * max(1, config.data.num_workers))

    progress = tqdm(total=total, initial=start, desc="train", disable=rank != 0)
    saved_at = start if resume is not None else None
    losses_read = LossReader(world, lambda: checkpoint if saved_at is not None else None)
    clock = StopClock(stop_after, time_limit, start, world, optim.log_every, device)
    skips = Skips()
    loader = make_loader(dataset, collate, config, start, rank, world, device, positions)
    for step, (images, input_ids, attention_mask, image_ids, info) in enumerate(loader, start=start):
        stopping = clock.stopping(step)
        if step >= total or stopping:
            losses_read()  # checked before anything is saved
            if stopping and saved_at != step:
                save(step)
                saved_at = step
            break
        skips.add(info)
        if info.stream is not None:  # a shard stream's position after this batch: what a resume starts from
            positions[info.stream] = info.position
        lr = learning_rate(step, base_lr=optim.lr, warmup_steps=optim.warmup_steps, total_steps=total,
                           min_lr=optim.min_lr)
        set_learning_rate(optimizer, lr, config.cuda_graph)
        batch = tuple(x.to(device, non_blocking=True) for x in (images, input_ids, attention_mask))
        if graphed is not None:
            losses = graphed(*batch)
        else:
            image_ids = image_ids.to(device, non_blocking=True) if config.image_id_positives else None
            losses = train_step(runner, model, optimizer, batch, optim.grad_clip, image_ids, step_function)
        losses_read.add(step, losses)
        progress.update()
        evaluating = evaluate is not None and optim.eval_every and (step + 1) % optim.eval_every == 0
        saving = (step + 1) % optim.checkpoint_every == 0 or step + 1 == total
        if step % optim.log_every == 0 or saving or evaluating:  # saving: the last step too
            values = losses_read()  # before anything is saved: no checkpoint follows a non-finite loss unseen
            if step % optim.log_every == 0 or step == total - 1:
                record = skips.record(world)  # every rank's (a collective: every rank logs at these steps)
                if rank == 0:
                    log.write({"step": step, "lr": lr, **values, **record})
            progress.set_postfix(values, refresh=False)
        if evaluating:
            best = evaluate_and_keep_best(evaluate, model, step + 1, best, config, out / "best.pt", log, rank)
        if saving:
            save(step + 1)
            saved_at = step + 1
    progress.close()
    if skips.count:
        print(f"rank {rank}: {skips.summary()}")
    if rank == 0:
        plot_losses(log.read(), out / "loss.png")
    return checkpoint, saved_at


class Skips:
    """The samples skipped for bad data: counted, and for shards each one's shard, key and reason,
    logged with the next record (metrics.jsonl) and summed up at the end."""
    KEPT_PER_RECORD = 100

    def __init__(self):
        self.count, self.pending, self.dropped, self.reasons = 0, [], 0, {}

    def add(self, info) -> None:
        self.count += info.skipped
        for skip in info.skips:
            reason = skip["reason"].split(" (")[0].split(":")[0]
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
            if len(self.pending) < self.KEPT_PER_RECORD:
                self.pending.append(skip)
            else:
                self.dropped += 1

    def record(self, world: int = 1) -> dict:
        """What a metrics record carries: the count so far (as the Karpathy loader's skips), and the
        skips since the last record, of every rank (gathered: called on every rank)."""
        mine = (self.count, bool(self.reasons), self.pending, self.dropped)
        self.pending, self.dropped = [], 0
        everyone = [mine] * world
        if world > 1:
            dist.all_gather_object(everyone, mine)
        count = sum(rank[0] for rank in everyone)
        if not count:
            return {}
        record = {"skipped_samples" if any(rank[1] for rank in everyone) else "skipped_images": count}
        skips = [{**skip, **({"rank": index} if world > 1 else {})} for index, rank in enumerate(everyone)
                 for skip in rank[2]]
        dropped = sum(rank[3] for rank in everyone)
        if skips or dropped:
            record["skips"] = skips + ([{"more": dropped}] if dropped else [])
        return record

    def summary(self) -> str:
        if not self.reasons:
            return f"{self.count} unreadable images skipped (their next entries served instead)"
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.reasons.items(), key=lambda r: -r[1]))
        return f"{self.count} samples skipped for bad data ({reasons}); each one's shard and key: metrics.jsonl (rank 0's log)"


def restore(resume: Path, model: Mamo, optimizer, rank: int, world: int, device: torch.device,
            workers: int = 0) -> Tuple[int, float, dict]:
    """Weights, optimizer state and this rank's random state from a run's checkpoint; returns
    (the step it holds, the best evaluation score so far, this rank's shard streams' positions:
    none when the run had another number of streams, which would split the shards otherwise)."""
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
    positions = {}
    if "data_positions" in state:  # shard streams: where each stopped (vlfast.data.shards.Position)
        positions = {stream: Position(*position) for stream, position in state["data_positions"][rank % len(saved)].items()}
        if len(saved) != world or state.get("data_streams") != world * max(1, workers):
            print(f"warning: {resume}'s shard streams were {state.get('data_streams')} (processes × workers), this run "
                  f"has {world * max(1, workers)}: the shards start again from the beginning of an epoch")
            positions = {}
    print(f"resumed from {resume} at step {state['step']}")
    return state["step"], state.get("best_score", -math.inf), positions


def set_optimizer_settings(optimizer, cuda_graph: bool, device: torch.device) -> None:
    """This run's settings: a resumed optimizer comes with those of the run that saved it (older
    runs: not fused; a recorded step reads its learning rate from the GPU)."""
    for group in optimizer.param_groups:
        group["fused"], group["capturable"] = True, cuda_graph
        group["lr"] = torch.tensor(float(group["lr"]), device=device) if cuda_graph else float(group["lr"])
    for parameter_state in optimizer.state.values():  # fused AdamW keeps its step counts beside the weights
        parameter_state["step"] = parameter_state["step"].to(device, torch.float32)


def set_learning_rate(optimizer, lr: float, cuda_graph: bool) -> None:
    """In place on the GPU tensor a recorded step reads, else as a number."""
    for group in optimizer.param_groups:
        if cuda_graph:
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def make_loader(dataset, collate, config: TrainConfig, start: int, rank: int, world: int, device: torch.device,
                positions: Optional[dict] = None):
    """Workers decode and augment the next batches while this process trains. The loader's own
    generator keeps it from drawing on the global RNG (dropout's, restored on resume); random
    augmentation (Karpathy training) restarts its draws on resume, so there it is not exact.
    Shards (a ShardPlan): each worker is one stream of batches (vlfast.data.shards), started at
    ``positions`` and rotated so the first batch comes from the stream whose turn it was."""
    workers = config.data.num_workers
    if isinstance(dataset, ShardPlan):
        dataset.check(world * max(1, workers))
        stream = ShardStream(dataset, train_transform(config.model.vision.image_size), collate, config.optim.batch_size,
                             rank, world, positions, first_worker=start % max(1, workers),
                             shuffle_buffer=config.data.shuffle_buffer)
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                                           generator=torch.Generator().manual_seed(config.seed * 1000 + rank))
    return torch.utils.data.DataLoader(dataset, batch_sampler=BatchOrder(len(dataset), config, start, rank, world),
                                       collate_fn=collate, num_workers=config.data.num_workers,
                                       pin_memory=device.type == "cuda",
                                       generator=torch.Generator().manual_seed(config.seed * 1000 + rank))


class LossReader:
    """Each step's losses stay on the device until a read: the host's one wait for the GPU per
    interval. A read averages every pending step's losses over the ranks and checks them (a
    non-finite one stops every rank at the same step; train_step skipped its update), and returns
    the last step's, rounded. ``last_checkpoint()``: the checkpoint a stop names."""

    def __init__(self, world: int, last_checkpoint: Callable[[], Optional[Path]]):
        self.world, self.last_checkpoint = world, last_checkpoint
        self.pending: List[Tuple[int, torch.Tensor]] = []
        self.names = None

    def add(self, step: int, losses: dict) -> None:
        self.names = self.names or [k if k in ("loss", "grad_norm") else f"loss_{k}" for k in losses]
        self.pending.append((step, torch.stack([v.float() for v in losses.values()])))  # a copy: a graph overwrites its outputs

    def __call__(self) -> dict:
        if not self.pending:
            return {}
        steps = [step for step, _ in self.pending]
        values = torch.stack([value for _, value in self.pending])
        self.pending.clear()
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        for step, row in zip(steps, values.tolist()):
            row = dict(zip(self.names, row))
            check_finite(step, row, self.last_checkpoint())
        return {name: round(value, 5) for name, value in row.items()}


class StopClock:
    """Whether to stop before a step: after ``stop_after`` steps of this invocation, or past
    ``time_limit`` seconds, checked at every step with one process and, with several, agreed at
    the log interval (where the host reads anyway) so every rank stops at the same step."""

    def __init__(self, stop_after: Optional[int], time_limit: Optional[float], start: int, world: int,
                 log_every: int, device: torch.device):
        self.stop_after, self.time_limit, self.start, self.world, self.log_every, self.device = \
            stop_after, time_limit, start, world, log_every, device
        self.started = time.time()

    def stopping(self, step: int) -> bool:
        stopping = self.stop_after is not None and step >= self.start + self.stop_after
        if self.time_limit is not None and (self.world == 1 or step % self.log_every == 0):
            stopping = stopping or time.time() - self.started > self.time_limit
            if self.world > 1:
                agreed = torch.tensor(float(stopping), device=self.device)  # NCCL reduces CUDA tensors only
                dist.all_reduce(agreed)
                stopping = bool(agreed)
        return stopping


def save_run(path: Path, model: Mamo, optimizer, step: int, config: TrainConfig, best: float, rank: int,
             world: int, device: torch.device, positions: Optional[dict] = None, streams: int = 0) -> None:
    """The checkpoint a run resumes from. Called on every rank: each one's random state goes in, and
    its shard streams' positions."""
    rng = [{"torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}] * world
    data = [{stream: tuple(position) for stream, position in (positions or {}).items()}] * world
    if world > 1:
        dist.all_gather_object(rng, rng[0])
        dist.all_gather_object(data, data[0])
    if rank == 0:
        save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "step": step, "rng": rng, "config": asdict(config), "best_score": best,
                               "torchrun_id": os.environ.get("TORCHELASTIC_RUN_ID"),
                               **({"data_positions": data, "data_streams": streams} if positions else {})})


def written_by_this_torchrun(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` exists and was written by this torchrun (its run id), not by an
    earlier run in the same folder."""
    if not checkpoint.exists():
        return False
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)  # mmap: the weights stay unread
    return state.get("torchrun_id") is not None and state["torchrun_id"] == os.environ.get("TORCHELASTIC_RUN_ID")


def evaluate_and_keep_best(evaluate: Callable[[Mamo, int], float], model: Mamo, steps_done: int, best: float,
                           config: TrainConfig, path: Path, log: MetricsLog, rank: int) -> float:
    """Scores the model (eval mode, every rank), logs the score and keeps the best weights at
    ``path``; returns the best score so far."""
    model.eval()
    score = evaluate(model, steps_done)
    model.train()
    improved, best = score > best, max(best, score)
    if rank == 0:
        log.write({"step": steps_done, "eval_score": score})
        if improved:
            save_checkpoint(path, {"model": model.state_dict(), "step": steps_done,
                                   "config": asdict(config), "best_score": best})
    return best
