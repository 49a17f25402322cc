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
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vlfast.trainer import TrainConfig, check_optim, load_config, train


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
