"""Image-text retrieval in the protocol ALBEF and BLIP report: stage 1 ranks every image-text
pair by the ITC similarity of unimodal features (computed once), stage 2 re-scores each query's
top k through the fusion encoder's ITM head, and itm_eval turns the two score matrices into
recall@1/5/10. Works with any model that has embed_image, embed_text and itm_logits (vlfast's Mamo).
"""
import textwrap
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

SCORES = ("itm", "itm+itc", "itc")


@dataclass
class Embeddings:
    """Unimodal outputs of an evaluation set, computed once for both stages."""
    image: Tensor  # (I, 1 + N, W) image tokens
    image_feat: Tensor  # (I, D) normalised ITC features
    text: Tensor  # (T, L, W) text states
    text_mask: Tensor  # (T, L)
    text_feat: Tensor  # (T, D)


@torch.no_grad()
def embed_images(model, images, device, progress: bool = False) -> Tuple[Tensor, Tensor]:
    """(tokens, features) of an iterable of image batches, concatenated."""
    tokens, feats = [], []
    for batch in tqdm(images, desc="images", disable=not progress, leave=False):
        with _autocast(device):
            image, feat = model.embed_image(batch.to(device))
        tokens.append(image)
        feats.append(feat.float())
    return torch.cat(tokens), torch.cat(feats)


@torch.no_grad()
def embed_texts(model, input_ids: Tensor, attention_mask: Tensor, device, batch_size: int,
                progress: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """(states, mask, features) of tokenised texts, in batches."""
    states, feats = [], []
    for start in tqdm(range(0, len(input_ids), batch_size), desc="texts", disable=not progress, leave=False):
        ids, mask = input_ids[start:start + batch_size].to(device), attention_mask[start:start + batch_size].to(device)
        with _autocast(device):
            text, feat = model.embed_text(ids, mask)
        states.append(text)
        feats.append(feat.float())
    return torch.cat(states), attention_mask.to(device), torch.cat(feats)


def _autocast(device):
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# The images whose cross-attention keys and values are held at once while their pairs are
# re-ranked: ViT-B/16 + BERT-base at 384 px hold 10.6 MB per image in bf16 (577 tokens, 6 fusion
# layers, keys and values), so 16 GiB is about 1600 images, and leaves a 40 GB card room for the
# model and a batch of pairs (COCO's 5000 images would need 53 GB at once).
CACHE_GB = 16.0


@torch.no_grad()
def itm_scores(model, embeddings: Embeddings, image_idx: Tensor, text_idx: Tensor) -> Tensor:
    """The ITM "match" logit of each pair (embeddings.image[image_idx[p]], embeddings.text[text_idx[p]]),
    each pair through the fusion encoder on its own copy of the image tokens (ALBEF's way; the
    benchmarks and tests compare rerank_pairs with it)."""
    mask = embeddings.text_mask[text_idx]
    length = int(mask.sum(1).max())  # the batch's longest text (padding is on the right): the rest is masked anyway
    with _autocast(mask.device):
        logits = model.itm_logits(embeddings.image[image_idx], embeddings.text[text_idx, :length], mask[:, :length])
    return logits[:, 1].float()


@torch.no_grad()
def rerank_pairs(model, embeddings: Embeddings, image_idx: Tensor, text_idx: Tensor, pair_batch_size: int = 256,
                 cache_gb: float = CACHE_GB, progress: bool = False, desc: str = "re-rank") -> Tensor:
    """The ITM "match" logit of each pair (image image_idx[p], text text_idx[p]), pairs sorted by
    image: the images' cross-attention keys and values are computed once (Mamo.fusion_cache), for
    as many images at a time as fit in ``cache_gb`` GiB, and each pair's text reads its image's
    entry (vlfast.ops.indexed_attention). The indices are on the embeddings' device. The cost grows with images + pairs × text length, not
    pairs × image tokens. Each batch takes pairs of like text lengths, cut to the longest (text
    padding is on the right and masked). The progress bar counts pairs."""
    if cache_gb <= 0:
        raise ValueError(f"cache_gb must be > 0, got {cache_gb}")
    values = torch.empty(len(image_idx), device=image_idx.device)
    if not len(image_idx):
        return values
    if bool((image_idx[1:] < image_idx[:-1]).any()):
        raise ValueError("rerank_pairs takes pairs sorted by image (each image's cache entry is made once)")
    distinct, entry = torch.unique_consecutive(image_idx, return_inverse=True)
    device = embeddings.image.device
    with _autocast(device):
        per_image = model.fusion_cache(embeddings.image[distinct[:1]]).nbytes()
    chunk = max(1, int(cache_gb * 2**30) // per_image)
    with tqdm(total=len(image_idx), desc=desc, unit="pair", disable=not progress, leave=False) as bar:
        for first in range(0, len(distinct), chunk):
            start, end = torch.searchsorted(entry, torch.tensor([first, first + chunk], device=entry.device)).tolist()
            with _autocast(device):
                cache = model.fusion_cache(embeddings.image[distinct[first:first + chunk]])
            # The chunk's pairs longest text first: a batch is cut to its longest text, so batches of
            # like lengths carry little padding (any order reads the cache alike)
            lengths = embeddings.text_mask[text_idx[start:end]].sum(1)
            order = start + torch.argsort(lengths, descending=True, stable=True)
            for begin in range(0, end - start, pair_batch_size):
                rows = order[begin:begin + pair_batch_size]
                texts = text_idx[rows]
                length = int(lengths[rows[0] - start])
                with _autocast(device):
                    logits = model.itm_logits(cache, embeddings.text[texts, :length],
                                              embeddings.text_mask[texts, :length], image_index=entry[rows] - first)
                values[rows] = logits[:, 1].float()
                bar.update(len(rows))
            del cache  # before the next chunk's is made: one chunk's cache at a time, as cache_gb says
    return values


def check_settings(k: int, score: str, names=("k", "score")) -> None:
    """``names``: what the errors call k and score (retrieve.py: the config keys and flags)."""
    if score not in SCORES:
        raise ValueError(f"{names[1]} must be one of {SCORES}, got {score!r}")
    if k < 1:
        raise ValueError(f"{names[0]} must be at least 1, got {k}")


def pair_ids(i2t_idx: Tensor, t2i_idx: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Each image's top texts (I, k) and each text's top images (T, k') as pair ids image·T + text:
    (the images' rows of ids, the texts' rows, the distinct pairs of both, sorted: grouped by image)."""
    images, texts = i2t_idx.shape[0], t2i_idx.shape[0]
    i2t_pairs = torch.arange(images, device=i2t_idx.device)[:, None] * texts + i2t_idx
    t2i_pairs = t2i_idx * texts + torch.arange(texts, device=t2i_idx.device)[:, None]
    return i2t_pairs, t2i_pairs, torch.unique(torch.cat([i2t_pairs.flatten(), t2i_pairs.flatten()]))


def similarities(embeddings: Embeddings) -> Tensor:
    """(I, T) ITC similarities in fp32, under autocast too (the scores are written into them)."""
    with torch.autocast(embeddings.image_feat.device.type, enabled=False):
        return embeddings.image_feat.float() @ embeddings.text_feat.float().T


def pair_share(image_idx: Tensor, rank: int, world: int) -> Tuple[int, int]:
    """[start, end) of the pairs (sorted by image) a rank re-ranks: about len / world each, cut
    where an image's pairs begin, so no image's cache is made on two ranks (a rank may get none)."""
    cuts = [0]
    for share in range(1, world):
        at = len(image_idx) * share // world
        cuts.append(len(image_idx) if at >= len(image_idx) else
                    max(cuts[-1], int(torch.searchsorted(image_idx, image_idx[at:at + 1])[0])))
    cuts.append(len(image_idx))
    return cuts[rank], cuts[rank + 1]


@torch.no_grad()
def two_stage_scores(model, embeddings: Embeddings, k: int, score: str = "itm", pair_batch_size: int = 256,
                     progress: bool = False, cache_gb: float = CACHE_GB,
                     stages: Optional[Dict[str, float]] = None) -> Tuple[Tensor, Tensor]:
    """(scores_i2t (I, T), scores_t2i (T, I)) as ALBEF's evaluation: the ITC similarity for
    score="itc"; else each query's top k (clipped to the set) by similarity get the ITM logit
    (plus the similarity for "itm+itc", as BLIP) and every other entry its similarity − 100.

    Each pair is scored once, though it may be in an image's top k and in a text's: the two
    directions' pairs are merged and grouped by image, and rerank_pairs computes each image's
    keys and values once. Under torch.distributed each rank re-ranks a share of the pairs (whole
    images, about equal pair counts) and the scores are summed across ranks, so every rank
    returns what one process would. ``stages``, a dict, gets each stage's seconds ("itc",
    "rerank") and the number of pairs re-ranked ("pairs", this rank's)."""
    check_settings(k, score)
    clock = _Clock(embeddings.image_feat.device, stages)
    sims = similarities(embeddings)
    if score == "itc":
        clock("itc")
        return sims, sims.T.contiguous()
    images, texts = sims.shape
    i2t_sim, i2t_idx = sims.topk(min(k, texts), dim=1)
    t2i_sim, t2i_idx = sims.T.topk(min(k, images), dim=1)
    i2t_pairs, t2i_pairs, pairs = pair_ids(i2t_idx, t2i_idx)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    start, end = pair_share(pairs // texts, rank, world)
    clock("itc")
    values = torch.zeros(len(pairs), device=sims.device)  # other ranks' pairs stay 0 for the sum
    values[start:end] = rerank_pairs(model, embeddings, pairs[start:end] // texts, pairs[start:end] % texts,
                                     pair_batch_size, cache_gb, progress and rank == 0, "re-rank pairs")
    if world > 1:
        dist.all_reduce(values)
    clock("rerank", pairs=end - start)
    plus_itc = score == "itm+itc"
    # Past the top k: the similarity's order, 100 below (ALBEF puts a flat -100 there, whose ties
    # sort by index and so decide R@5/R@10 when k < 10).
    scores_i2t = (sims - 100.0).scatter(1, i2t_idx, values[torch.searchsorted(pairs, i2t_pairs)] + plus_itc * i2t_sim)
    scores_t2i = (sims.T.contiguous() - 100.0).scatter(1, t2i_idx, values[torch.searchsorted(pairs, t2i_pairs)] + plus_itc * t2i_sim)
    return scores_i2t, scores_t2i


@torch.no_grad()
def two_stage_scores_reference(model, embeddings: Embeddings, k: int, score: str = "itm",
                               image_queries: Optional[Sequence[int]] = None,
                               text_queries: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor]:
    """ALBEF's evaluation() (Retrieval.py; BLIP's train_retrieval.py is alike): for each image its
    top-k texts through the fusion encoder on its tokens repeated k times, for each text its top-k
    images gathered, one query per batch, the ITM match logit (plus the similarity for "itm+itc")
    into matrices of -100. Every pair recomputes its image's keys and values in every fusion layer,
    and a pair in an image's and a text's top k is scored twice. ``image_queries``,
    ``text_queries``: re-rank those rows only (default all; the benchmarks time a subset)."""
    check_settings(k, score)
    sims = similarities(embeddings)
    scores_i2t, scores_t2i = torch.full_like(sims, -100.0), torch.full_like(sims.T, -100.0)
    images, texts = sims.shape
    for i in range(images) if image_queries is None else image_queries:
        top_sim, top_idx = sims[i].topk(min(k, texts))
        scores_i2t[i, top_idx] = itm_scores(model, embeddings, torch.full_like(top_idx, i), top_idx) + \
            (top_sim if score == "itm+itc" else 0)
    for t in range(texts) if text_queries is None else text_queries:
        top_sim, top_idx = sims[:, t].topk(min(k, images))
        scores_t2i[t, top_idx] = itm_scores(model, embeddings, top_idx, torch.full_like(top_idx, t)) + \
            (top_sim if score == "itm+itc" else 0)
    return scores_i2t, scores_t2i


class _Clock:
    """Each stage's wall seconds since the last, into ``stages`` (None: not kept); on a GPU after
    waiting for it (one wait per stage)."""

    def __init__(self, device, stages: Optional[Dict[str, float]]):
        self.device, self.stages, self.last = torch.device(device), stages, time.perf_counter()

    def __call__(self, stage: str, **counts) -> None:
        if self.stages is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self.last
        self.stages.update(counts)
        self.last = now


@dataclass
class Evaluation:
    metrics: Dict[str, float]
    scores_i2t: Tensor  # (I, T)
    scores_t2i: Tensor  # (T, I)
    captions: List[str]  # the T texts, image by image
    img2txt: List[List[int]]
    txt2img: List[int]
    skipped_images: int  # unreadable images whose next entries stood in (Karpathy JSON): the set is not the split
    stages: Dict[str, float]  # seconds of "embedding", "itc", "rerank"; "pairs" re-ranked (this rank's)


def evaluate(model, dataset, tokenize: Callable[[List[str]], Tuple[Tensor, Tensor]], *, k: int, score: str = "itm",
             batch_size: int = 64, device="cpu", progress: bool = True, cache_gb: float = CACHE_GB) -> Evaluation:
    """Retrieval on an evaluation split whose items are {"image", "caption": [captions]}:
    embeddings, two_stage_scores and itm_eval. ``tokenize`` maps captions to (input_ids, mask)."""
    captions, img2txt, txt2img, skipped = [], [], [], []

    def image_batches():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            for item in items:
                skipped.extend(item.get("skipped", ()))
                img2txt.append(list(range(len(captions), len(captions) + len(item["caption"]))))
                txt2img.extend([len(img2txt) - 1] * len(item["caption"]))
                captions.extend(item["caption"])
            yield torch.stack([item["image"] for item in items])

    stages = {}
    clock = _Clock(device, stages)
    image, image_feat = embed_images(model, image_batches(), device, progress)
    text, text_mask, text_feat = embed_texts(model, *tokenize(captions), device, batch_size, progress)
    clock("embedding")
    embeddings = Embeddings(image, image_feat, text, text_mask, text_feat)
    scores_i2t, scores_t2i = two_stage_scores(model, embeddings, k, score, 4 * batch_size, progress, cache_gb, stages)
    metrics = itm_eval(scores_i2t.cpu().numpy(), scores_t2i.cpu().numpy(), txt2img, img2txt)
    return Evaluation(metrics, scores_i2t.cpu(), scores_t2i.cpu(), captions, img2txt, txt2img, len(skipped), stages)


def top_matches(evaluation: Evaluation, n: int = 10) -> Dict[str, list]:
    """Each query's n best keys with their scores and whether each is a ground-truth match."""
    def rows(scores: Tensor, positives: List[List[int]]):
        values, indices = scores.topk(min(n, scores.shape[1]), dim=1)
        return [{"query": q, "top": [{"index": int(i), "score": round(float(v), 4), "correct": int(i) in positives[q]}
                                     for v, i in zip(values[q], indices[q])]} for q in range(len(scores))]

    text_to_image = rows(evaluation.scores_t2i, [[image] for image in evaluation.txt2img])
    for row in text_to_image:
        row["caption"] = evaluation.captions[row["query"]]
    return {"image_to_text": rows(evaluation.scores_i2t, evaluation.img2txt), "text_to_image": text_to_image}


def contact_sheet(evaluation: Evaluation, image: Callable[[int], Tensor], path, queries: int = 4, top: int = 5) -> None:
    """A PNG: ``queries`` images with their top captions (✓ ground truth, ✗ not), then as many
    captions with their top images (green frame: the ground truth). ``image(i)`` gives image i
    as a (3, H, W) tensor, shown rescaled to its own range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def show(axis, index, frame=None):
        pixels = image(index).float()
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp_min(1e-6)
        axis.imshow(pixels.permute(1, 2, 0).numpy())
        axis.set_xticks([]), axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set_edgecolor(frame or "white")
            spine.set_linewidth(4 if frame else 0)

    matches = top_matches(evaluation, top)
    images, texts = matches["image_to_text"][:queries], matches["text_to_image"][:queries]
    figure, axes = plt.subplots(len(images) + len(texts), top + 1, figsize=(2.2 * (top + 1), 2.2 * (len(images) + len(texts))),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for row, query in enumerate(images):
        axes[row, 0].axis("on")
        show(axes[row, 0], query["query"])
        lines = [f"{'✓' if hit['correct'] else '✗'} {hit['score']:+.2f}  {evaluation.captions[hit['index']]}" for hit in query["top"]]
        axes[row, 1].text(0, 0.5, "\n".join(lines), va="center", fontsize=9, transform=axes[row, 1].transAxes)
    for row, query in enumerate(texts, start=len(images)):
        axes[row, 0].text(0, 0.5, textwrap.fill(query["caption"], 26), va="center", fontsize=9,
                          transform=axes[row, 0].transAxes)
        for column, hit in enumerate(query["top"], start=1):
            axes[row, column].axis("on")
            show(axes[row, column], hit["index"], "green" if hit["correct"] else "lightgrey")
            axes[row, column].set_title(f"{hit['score']:+.2f}", fontsize=8)
    figure.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(figure)


def itm_eval(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: Union[Sequence[int], Mapping[int, int]],
             img2txt: Union[Sequence[Sequence[int]], Mapping[int, Sequence[int]]]) -> Dict[str, float]:
    """Recall@1/5/10 in percent for text retrieval (each image's query ranks all texts; an image
    counts at the best rank among its ground-truth captions) and image retrieval (each text's
    query ranks all images), their means, and r_mean, the mean of the two.

    The arguments are ALBEF's and BLIP's ``itm_eval(scores_i2t, scores_t2i, txt2img, img2txt)``,
    in their order and with their names, so a call ported from them is unchanged:
    scores_i2t: (images, texts); scores_t2i: (texts, images); txt2img[t]: the image of caption t;
    img2txt[i]: the caption indices of image i. Both may be lists or dicts keyed 0..n-1 (ALBEF's
    datasets hold dicts). Given in the other order they are refused (a TypeError says so): txt2img
    holds one index per caption, img2txt a list per image.
    """
    scores_i2t, scores_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)
    if scores_i2t.ndim != 2 or scores_i2t.shape != scores_t2i.shape[::-1]:
        raise ValueError(f"scores_i2t {scores_i2t.shape} and scores_t2i {scores_t2i.shape} must be transposes in shape")
    images, texts = scores_i2t.shape
    txt2img, img2txt = _as_list(txt2img, "txt2img"), _as_list(img2txt, "img2txt")
    if any(isinstance(image, (Sequence, np.ndarray)) for image in txt2img) or \
            not all(isinstance(captions, (Sequence, np.ndarray)) for captions in img2txt):
        raise TypeError("itm_eval(scores_i2t, scores_t2i, txt2img, img2txt): txt2img holds one image index per "
                        "caption and img2txt a list of caption indices per image (ALBEF's order); "
                        "were they passed the other way round?")
    if len(img2txt) != images or len(txt2img) != texts:
        raise ValueError(f"img2txt has {len(img2txt)} images and txt2img {len(txt2img)} texts; "
                         f"the scores are {scores_i2t.shape}")
    text_ranks = _ranks(scores_i2t, [list(captions) for captions in img2txt])
    image_ranks = _ranks(scores_t2i, [[image] for image in txt2img])
    metrics = {}
    for prefix, ranks in (("txt", text_ranks), ("img", image_ranks)):
        for k in (1, 5, 10):
            metrics[f"{prefix}_r{k}"] = 100.0 * float(np.mean(ranks < k))
        metrics[f"{prefix}_r_mean"] = (metrics[f"{prefix}_r1"] + metrics[f"{prefix}_r5"] + metrics[f"{prefix}_r10"]) / 3
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


def _as_list(index, name: str) -> list:
    """A list, or a dict keyed 0..n-1 (ALBEF's img2txt / txt2img), as the list of its values in key order."""
    if isinstance(index, Mapping):
        if sorted(index) != list(range(len(index))):
            raise ValueError(f"{name} as a dict must be keyed 0..{len(index) - 1}, as the rows of the scores")
        return [index[i] for i in range(len(index))]
    return list(index)


def _ranks(scores: np.ndarray, positives: List[List[int]]) -> np.ndarray:
    """Per query row, the best (lowest) 0-based rank of any of its positives under descending scores."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty(len(positives), dtype=np.int64)
    for row, targets in enumerate(positives):
        ranks[row] = np.flatnonzero(np.isin(order[row], targets)).min()
    return ranks
