"""Search with a trained checkpoint: images in a folder by a text, or the lines of a captions
file by an image; ITC similarity, optionally re-ranked by the ITM head. Image features are
cached beside the checkpoint.
"""
import hashlib
import sys
from pathlib import Path
from typing import List, Optional

import torch
from PIL import Image
from tqdm import tqdm

from vlfast.retrieval import CACHE_GB, Embeddings, embed_images, embed_texts, rerank_pairs
from vlfast.trainer.builders import caption_tokenizer, image_transform
from vlfast.trainer.evaluation import load_trained
from vlfast.trainer.outputs import load_checkpoint, save_checkpoint

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def check_arguments(text, images, image, captions, top: int, rerank: int) -> None:
    """search()'s arguments that go together, checked before anything is read (ValueError)."""
    if (text is None) == (image is None):
        raise ValueError("give a text to search images with, or an image to search captions with")
    if text is not None and images is None:
        raise ValueError("--text searches a folder: give --images DIR")
    if image is not None and captions is None:
        raise ValueError("--image searches captions: give --captions FILE")
    if top < 1 or rerank < 0:
        raise ValueError(f"--top must be at least 1 and --rerank at least 0, got {top} and {rerank}")


def search(checkpoint: Path, *, text: Optional[str] = None, images: Optional[Path] = None,
           image: Optional[Path] = None, captions: Optional[Path] = None, top: int = 5, rerank: int = 0,
           device: Optional[torch.device] = None, cache_gb: float = CACHE_GB) -> List[dict]:
    """The ``top`` matches, best first: images under ``images`` for ``text`` ({"path", "itc"}), or
    lines of ``captions`` for ``image`` ({"caption", "itc"}); with ``rerank`` K the K best by ITC
    are re-scored by the ITM head (retrieval's stage 2, vlfast.retrieval.rerank_pairs: each
    image's keys and values once, at most ``cache_gb`` GiB of them at a time) and get an "itm" score.
    Raises FileNotFoundError, ValueError or OSError naming a bad path or file."""
    check_arguments(text, images, image, captions, top, rerank)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config, tokenizer, model = load_trained(checkpoint, device=device)
    transform = image_transform(config)
    if text is not None:
        paths, image_feat = folder_features(model, transform, checkpoint, images, device)
        texts = [text]
    else:
        texts = read_captions(captions)
        query_image = read_image(image, transform)
    text_tokens, text_mask, text_feat = embed_texts(model, *caption_tokenizer(tokenizer, config)(texts), device,
                                                    batch_size=256)
    if text is not None:
        sims = image_feat.to(device) @ text_feat[0]  # one score per image
    else:
        image_tokens, image_feat = embed_images(model, [query_image[None]], device)
        sims = text_feat @ image_feat[0]  # one score per caption
    order = sims.argsort(descending=True).tolist()
    scores = {index: {"itc": round(float(sims[index]), 4)} for index in order}
    if rerank:  # ITM on the shortlist, as retrieval's stage 2 (image tokens are not kept on disk: they are large)
        shortlist = order[:rerank]
        pairs = torch.arange(len(shortlist), device=device), torch.zeros(len(shortlist), dtype=torch.long, device=device)
        if text is not None:
            image_tokens, _ = embed_images(model, [torch.stack([read_image(paths[i], transform) for i in shortlist])],
                                           device)
        else:  # one image, its keys and values once, read by every caption
            pairs = pairs[1], torch.tensor(shortlist, device=device)
        itm = rerank_pairs(model, Embeddings(image_tokens, None, text_tokens, text_mask, None), *pairs,
                           cache_gb=cache_gb)
        for index, value in zip(shortlist, itm.tolist()):
            scores[index]["itm"] = round(value, 4)
        order = sorted(shortlist, key=lambda index: -scores[index]["itm"]) + order[rerank:]
    matches = [{"path": str(paths[i])} if text is not None else {"caption": texts[i]} for i in order[:top]]
    for match, index in zip(matches, order):
        match.update(scores[index])
    return matches


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
