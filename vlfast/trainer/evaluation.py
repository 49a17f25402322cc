"""Retrieval with a trained checkpoint: its model and config loaded for evaluation, the two-stage
evaluation with its table and output files, and retrieval fine-tuning, which runs the training
loop with this evaluation as its hook.
"""
import json
import time
from pathlib import Path

from vlfast.retrieval import check_settings, contact_sheet, evaluate, top_matches
from vlfast.trainer.builders import BatchOrder, caption_tokenizer, make_dataset, make_model, make_tokenizer
from vlfast.trainer.config import TrainConfig, load_config
from vlfast.trainer.loop import train
from vlfast.trainer.outputs import load_checkpoint


def checkpoint_config(checkpoint: Path, config_file=None, overrides=()):
    """(checkpoint state, config): the checkpoint's own config with a config file and key=value
    overrides on top (data and retrieval settings; the model must match the weights), checked."""
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file (train.py writes runs/<name>/last.pt)")
    state = load_checkpoint(checkpoint)
    config = load_config(TrainConfig, config_file, overrides, base=state["config"])
    settings = config.retrieval
    if settings.split not in ("val", "test"):
        raise ValueError(f"retrieval.split (--split) must be val or test, got {settings.split!r}")
    check_settings(settings.k_test, settings.score, names=("retrieval.k_test (--k-test)", "retrieval.score (--score)"))
    # Evaluation pads captions to the longest, and fine-tuning's image-id positives are read on the
    # host: neither runs a recorded CUDA graph, whatever the pretraining did.
    config.cuda_graph = False
    return state, config


def load_trained(checkpoint: Path, config_file=None, overrides=(), device="cpu"):
    """(config, tokenizer, model in eval mode) of a checkpoint (see checkpoint_config)."""
    state, config = checkpoint_config(checkpoint, config_file, overrides)
    tokenizer = make_tokenizer(config, checkpoint.parent)
    model = make_model(config, tokenizer)
    model.load_state_dict(state["model"])
    return config, tokenizer, model.to(device).eval()


def run_evaluation(model, tokenizer, config: TrainConfig, dataset, split: str, device, rank: int):
    started = time.time()
    result = evaluate(model, dataset, caption_tokenizer(tokenizer, config), k=config.retrieval.k_test,
                      score=config.retrieval.score, batch_size=config.retrieval.batch_size, device=device,
                      progress=rank == 0, cache_gb=config.retrieval.cache_gb)
    if rank == 0 and result.skipped_images:
        print(f"warning: {result.skipped_images} unreadable images in the {split} split; the next entries stood in, "
              f"so these numbers are not the split's")
    if rank == 0:
        print(format_table(result.metrics, f"{split}: {len(result.img2txt)} images, {len(result.captions)} texts, "
                                           f"score {config.retrieval.score}, k {config.retrieval.k_test}, "
                                           f"{time.time() - started:.0f} s"))
        print(format_stages(result.stages))
    return result


def format_stages(stages: dict) -> str:
    """One line: each stage's seconds, and the re-ranked pairs per second."""
    line = "  ".join(f"{name} {stages[name]:.2f} s" for name in ("embedding", "itc", "rerank") if name in stages)
    if stages.get("pairs"):
        line += f"  ({stages['pairs']} pairs, {stages['pairs'] / max(stages['rerank'], 1e-9):.0f} pairs/s)"
    return f"stages: {line}"


def format_table(metrics: dict, title: str) -> str:
    rows = [title, f"{'':16}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'mean':>7}"]
    for name, prefix in (("text retrieval", "txt"), ("image retrieval", "img")):
        rows.append(f"{name:16}" + "".join(f"{metrics[f'{prefix}_{key}']:7.2f}" for key in ("r1", "r5", "r10", "r_mean")))
    rows.append(f"{'r_mean':16}{metrics['r_mean']:28.2f}")
    return "\n".join(rows)


def write_outputs(result, dataset, checkpoint: Path, split: str, config: TrainConfig) -> None:
    stem = checkpoint.parent / f"{checkpoint.stem}_retrieval_{split}"
    record = {"checkpoint": str(checkpoint), "split": split, "score": config.retrieval.score,
              "k_test": config.retrieval.k_test, "metrics": result.metrics, "skipped_images": result.skipped_images,
              **top_matches(result, 10)}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    contact_sheet(result, lambda index: dataset[index]["image"], stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")


def finetune_config(checkpoint: Path, config_file, overrides, world: int) -> TrainConfig:
    """The pretrained checkpoint's config, --config and overrides on top, set for retrieval
    fine-tuning: ITC + ITM with every caption of an image a positive, retrieval.finetune_epochs
    epochs at retrieval.finetune_lr (cosine to 1/100 of it, no warmup), val recall and a checkpoint each epoch;
    with momentum ITC its distillation ramps up again over the first epoch, as ALBEF's."""
    _, config = checkpoint_config(checkpoint, config_file, overrides)
    if config.retrieval.finetune_epochs < 1:
        raise ValueError(f"retrieval.finetune_epochs must be at least 1, got {config.retrieval.finetune_epochs}")
    if config.data.dataset == "shards":
        raise ValueError("retrieval fine-tuning trains on a Karpathy train split with image ids, not on shards: "
                         "--config configs/coco.yaml (or data.dataset=karpathy data.train_file=...)")
    config.model.objectives, config.image_id_positives = ("itc", "itm"), True
    config.init.checkpoint, config.init.vision = str(checkpoint), None
    steps_per_epoch = BatchOrder(len(make_dataset(config, "train")), config, 0, world=world).per_epoch
    config.optim.lr, config.optim.min_lr = config.retrieval.finetune_lr, config.retrieval.finetune_lr / 100
    config.optim.warmup_steps = 0
    config.optim.max_steps = config.retrieval.finetune_epochs * steps_per_epoch
    config.optim.eval_every = config.optim.checkpoint_every = steps_per_epoch
    config.model.itc_alpha_warmup = steps_per_epoch if config.model.itc_alpha else 0  # ALBEF: over epoch one
    return config


def finetune(config: TrainConfig, out: Path, val, test, device, rank: int) -> None:
    """Train (vlfast.trainer.train) with val recall each epoch and best.pt kept by r_mean, then the
    test split on best.pt."""
    tokenizer = make_tokenizer(config, out)

    def validate(model, step):
        return run_evaluation(model, tokenizer, config, val, "val", device, rank).metrics["r_mean"]

    train(config, out, evaluate=validate)
    if rank == 0:
        print(f"best checkpoint (val r_mean): {out / 'best.pt'}")
    _, _, model = load_trained(out / "best.pt", device=device)
    result = run_evaluation(model, tokenizer, config, test, config.retrieval.split, device, rank)
    if rank == 0:
        write_outputs(result, test, out / "best.pt", config.retrieval.split, config)
