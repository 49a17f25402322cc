"""Image-text retrieval with a vlfast checkpoint: evaluation in the ALBEF/BLIP protocol, retrieval
fine-tuning, and search over a folder of images.

    python retrieve.py                          # runs/synthetic/last.pt on its synthetic test split
    python retrieve.py --checkpoint CKPT --config configs/flickr30k.yaml data.test_file=... data.image_root=...
    python retrieve.py --finetune --checkpoint PRETRAINED --config configs/flickr30k.yaml --out runs/flickr30k-ft
    python retrieve.py search --checkpoint CKPT --images DIR --text "a red circle left of a blue square"
    python retrieve.py search --checkpoint CKPT --image photo.png --captions captions.txt
    torchrun --nproc_per_node=8 retrieve.py ...     (the re-ranking queries are split across processes)

Evaluation prints the recall table and writes, next to the checkpoint, <name>_retrieval_<split>.json
(metrics and each query's top 10) and <name>_retrieval_<split>.png (a contact sheet).
"""
import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from train import (BatchOrder, TrainConfig, caption_tokenizer, image_transform, make_dataset, make_model, make_tokenizer,
                   setup_distributed, train)
from vlfast.retrieval import (SCORES, Embeddings, check_settings, contact_sheet, embed_images, embed_texts, evaluate,
                              itm_scores, top_matches)
from vlfast.training import load_checkpoint, load_config, save_checkpoint

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


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


def load(checkpoint: Path, config_file=None, overrides=(), device="cpu"):
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
                      progress=rank == 0)
    if rank == 0 and result.skipped_images:
        print(f"warning: {result.skipped_images} unreadable images in the {split} split; the next entries stood in, "
              f"so these numbers are not the split's")
    if rank == 0:
        print(format_table(result.metrics, f"{split}: {len(result.img2txt)} images, {len(result.captions)} texts, "
                                           f"score {config.retrieval.score}, k {config.retrieval.k_test}, "
                                           f"{time.time() - started:.0f} s"))
    return result


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


def finetune_config(args, world: int) -> TrainConfig:
    """The pretrained checkpoint's config, --config and overrides on top, set for retrieval
    fine-tuning: ITC + ITM with every caption of an image a positive, retrieval.finetune_epochs
    epochs at retrieval.finetune_lr (cosine to 1/100 of it, no warmup), val recall and a checkpoint each epoch."""
    _, config = checkpoint_config(args.checkpoint, args.config, args.overrides)
    if config.retrieval.finetune_epochs < 1:
        raise ValueError(f"retrieval.finetune_epochs must be at least 1, got {config.retrieval.finetune_epochs}")
    config.model.objectives, config.image_id_positives = ("itc", "itm"), True
    config.init.checkpoint, config.init.vision = str(args.checkpoint), None
    steps_per_epoch = BatchOrder(len(make_dataset(config, "train")), config, 0, world=world).per_epoch
    config.optim.lr, config.optim.min_lr = config.retrieval.finetune_lr, config.retrieval.finetune_lr / 100
    config.optim.warmup_steps = 0
    config.optim.max_steps = config.retrieval.finetune_epochs * steps_per_epoch
    config.optim.eval_every = config.optim.checkpoint_every = steps_per_epoch
    return config


def finetune(config: TrainConfig, out: Path, val, test, device, rank: int) -> None:
    """Train (train.py's loop) with val recall each epoch and best.pt kept by r_mean, then the
    test split on best.pt."""
    tokenizer = make_tokenizer(config, out)

    def validate(model, step):
        return run_evaluation(model, tokenizer, config, val, "val", device, rank).metrics["r_mean"]

    train(config, out, evaluate=validate)
    if rank == 0:
        print(f"best checkpoint (val r_mean): {out / 'best.pt'}")
    _, _, model = load(out / "best.pt", device=device)
    result = run_evaluation(model, tokenizer, config, test, config.retrieval.split, device, rank)
    if rank == 0:
        write_outputs(result, test, out / "best.pt", config.retrieval.split, config)


def search(argv) -> None:
    parser = argparse.ArgumentParser(prog="retrieve.py search", description="Search images by text, or captions by image.")
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/synthetic/last.pt"))
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="find the images under --images that best match this text")
    query.add_argument("--image", type=Path, help="find the lines of --captions that best match this image")
    parser.add_argument("--images", type=Path, help="a folder of images (searched recursively); embeddings are cached")
    parser.add_argument("--captions", type=Path, help="a text file, one caption per line")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--rerank", type=int, default=0, metavar="K",
                        help="re-score the K best by the ITM head (as retrieval's stage 2); 0: ITC only")
    parser.add_argument("--json", action="store_true", help="print the matches as JSON")
    args = parser.parse_args(argv)
    if args.text is not None and args.images is None:
        parser.error("--text searches a folder: give --images DIR")
    if args.image is not None and args.captions is None:
        parser.error("--image searches captions: give --captions FILE")
    if args.top < 1 or args.rerank < 0:
        parser.error("--top must be at least 1 and --rerank at least 0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        config, tokenizer, model = load(args.checkpoint, device=device)
        transform = image_transform(config)
        if args.text is not None:
            paths, image_feat = folder_features(model, transform, args.checkpoint, args.images, device)
            texts = [args.text]
        else:
            texts = read_captions(args.captions)
            query_image = read_image(args.image, transform)
    except (FileNotFoundError, ValueError, OSError) as error:
        sys.exit(f"retrieve.py search: {error}")
    text, text_mask, text_feat = embed_texts(model, *caption_tokenizer(tokenizer, config)(texts), device, batch_size=256)
    if args.text is not None:
        sims = image_feat.to(device) @ text_feat[0]  # one score per image
    else:
        image, image_feat = embed_images(model, [query_image[None]], device)
        sims = text_feat @ image_feat[0]  # one score per caption
    order = sims.argsort(descending=True).tolist()
    scores = {index: {"itc": round(float(sims[index]), 4)} for index in order}
    if args.rerank:  # ITM on the shortlist: image tokens are not cached (they are large), so recomputed here
        shortlist = order[:args.rerank]
        pairs = torch.arange(len(shortlist), device=device), torch.zeros(len(shortlist), dtype=torch.long, device=device)
        if args.text is not None:
            image, _ = embed_images(model, [torch.stack([read_image(paths[i], transform) for i in shortlist])], device)
        else:
            pairs = pairs[1], torch.tensor(shortlist, device=device)
        itm = itm_scores(model, Embeddings(image, None, text, text_mask, None), *pairs)
        for index, value in zip(shortlist, itm.tolist()):
            scores[index]["itm"] = round(value, 4)
        order = sorted(shortlist, key=lambda index: -scores[index]["itm"]) + order[args.rerank:]
    matches = [{"path": str(paths[i])} if args.text is not None else {"caption": texts[i]} for i in order[:args.top]]
    for match, index in zip(matches, order):
        match.update(scores[index])
    if args.json:
        print(json.dumps(matches, indent=1))
        return
    for place, match in enumerate(matches, start=1):
        values = "  ".join(f"{key} {match[key]:+.3f}" for key in ("itm", "itc") if key in match)
        print(f"{place:3}  {values}  {match.get('path', match.get('caption'))}")


def read_captions(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"--captions {path}: no such file")
    captions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not captions:
        raise ValueError(f"--captions {path}: no captions in it")
    return captions


def read_image(path: Path, transform) -> torch.Tensor:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            return transform(image.convert("RGB"))
    except OSError as error:  # PIL's errors for truncated or non-image files
        raise OSError(f"{path}: not a readable image ({error})") from None


def folder_features(model, transform, checkpoint: Path, folder: Path, device, batch_size: int = 64):
    """(paths, ITC features) of the images under ``folder``, through a cache file beside the
    checkpoint: an image whose size and modification time are unchanged is not read again, new
    or changed ones are embedded, removed ones dropped, unreadable ones skipped with a warning."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder}: not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"--images {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
    cache_file = checkpoint.parent / "search_cache" / f"{hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]}.pt"
    stamp = lambda path: [path.stat().st_size, path.stat().st_mtime_ns]  # noqa: E731
    try:
        cache = load_checkpoint(cache_file) if cache_file.exists() else {}
    except Exception as error:  # a cut-short or foreign file: rebuilt, never a dead end
        print(f"ignoring the unreadable cache {cache_file} ({type(error).__name__})", file=sys.stderr)
        cache = {}
    entries = cache["entries"] if cache.get("checkpoint") == stamp(checkpoint) else {}  # new weights: all stale
    names = [str(path.relative_to(folder)) for path in paths]
    fresh = [i for i, name in enumerate(names) if entries.get(name, {}).get("stamp") != stamp(paths[i])]
    if fresh:
        print(f"embedding {len(fresh)} of {len(paths)} images (cache: {cache_file})", file=sys.stderr)
    for start in tqdm(range(0, len(fresh), batch_size), desc="images", disable=not fresh, file=sys.stderr):
        pixels, readable = [], []
        for i in fresh[start:start + batch_size]:
            try:
                pixels.append(read_image(paths[i], transform))
                readable.append(i)
            except OSError as error:
                print(f"skipped: {error}", file=sys.stderr)
                entries[names[i]] = {"stamp": stamp(paths[i]), "feature": None}
        if readable:
            _, feats = embed_images(model, [torch.stack(pixels)], device)
            for i, feat in zip(readable, feats.cpu()):
                entries[names[i]] = {"stamp": stamp(paths[i]), "feature": feat.clone()}
    entries = {name: entries[name] for name in names}
    if fresh or len(entries) != len(cache.get("entries", {})):
        save_checkpoint(cache_file, {"checkpoint": stamp(checkpoint), "entries": entries})
    kept = [i for i, name in enumerate(names) if entries[name]["feature"] is not None]
    if not kept:
        raise ValueError(f"--images {folder}: none of its {len(paths)} image files could be read")
    return [paths[i] for i in kept], torch.stack([entries[names[i]]["feature"] for i in kept])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["search"]:
        return search(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="search: python retrieve.py search --help")
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/synthetic/last.pt"))
    parser.add_argument("--config", help="YAML file whose data/retrieval settings apply over the checkpoint's config")
    parser.add_argument("--split", choices=["val", "test"], help="evaluation split (default retrieval.split: test)")
    parser.add_argument("--score", choices=SCORES, help="itm (ALBEF), itm+itc (BLIP) or itc (no re-ranking)")
    parser.add_argument("--k-test", type=int, help="queries' top k re-ranked by ITM (default retrieval.k_test)")
    parser.add_argument("--finetune", action="store_true", help="fine-tune for retrieval from --checkpoint")
    parser.add_argument("--out", default="runs/finetune", help="--finetune: the run folder")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.eval_images=100")
    args = parser.parse_args(argv)
    args.overrides += [f"retrieval.{key}={value}" for key, value in
                       (("split", args.split), ("score", args.score), ("k_test", args.k_test)) if value is not None]
    rank, world, device = setup_distributed()
    try:
        try:  # every bad path or setting is found before any training or evaluation starts
            if args.finetune:
                config = finetune_config(args, world)
                val, test = make_dataset(config, "val"), make_dataset(config, config.retrieval.split)
            else:
                config, tokenizer, model = load(args.checkpoint, args.config, args.overrides, device)
                test = make_dataset(config, config.retrieval.split)
        except (FileNotFoundError, ValueError) as error:
            parser.error(str(error))
        if args.finetune:
            finetune(config, Path(args.out), val, test, device, rank)
        else:
            result = run_evaluation(model, tokenizer, config, test, config.retrieval.split, device, rank)
            if rank == 0:
                write_outputs(result, test, args.checkpoint, config.retrieval.split, config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
