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
import json
import sys
from pathlib import Path

import torch.distributed as dist

from vlfast.retrieval import SCORES
from vlfast.search import check_arguments, search
from vlfast.trainer import finetune, finetune_config, load_trained, make_dataset, run_evaluation, setup_distributed, \
    write_outputs


def search_command(argv) -> None:
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
    try:  # a usage error, before anything is read
        check_arguments(args.text, args.images, args.image, args.captions, args.top, args.rerank)
    except ValueError as error:
        parser.error(str(error))
    try:
        matches = search(args.checkpoint, text=args.text, images=args.images, image=args.image, captions=args.captions,
                         top=args.top, rerank=args.rerank)
    except (FileNotFoundError, ValueError, OSError) as error:
        sys.exit(f"retrieve.py search: {error}")
    if args.json:
        print(json.dumps(matches, indent=1))
        return
    for place, match in enumerate(matches, start=1):
        values = "  ".join(f"{key} {match[key]:+.3f}" for key in ("itm", "itc") if key in match)
        print(f"{place:3}  {values}  {match.get('path', match.get('caption'))}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["search"]:
        return search_command(argv[1:])
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
                config = finetune_config(args.checkpoint, args.config, args.overrides, world)
                val, test = make_dataset(config, "val"), make_dataset(config, config.retrieval.split)
            else:
                config, tokenizer, model = load_trained(args.checkpoint, args.config, args.overrides, device)
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
