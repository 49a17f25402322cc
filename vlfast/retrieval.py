"""Image-text retrieval metrics in the protocol ALBEF and BLIP report (their itm_eval)."""
from typing import Dict, List, Sequence

import numpy as np


def itm_eval(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt: Sequence[Sequence[int]],
             txt2img: Sequence[int]) -> Dict[str, float]:
    """Recall@1/5/10 in percent for text retrieval (each image's query ranks all texts; an image
    counts at the best rank among its ground-truth captions) and image retrieval (each text's
    query ranks all images), their means, and r_mean, the mean of the two.

    scores_i2t: (images, texts); scores_t2i: (texts, images); img2txt[i]: caption indices of image
    i; txt2img[t]: the image of caption t.
    """
    scores_i2t, scores_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)
    if scores_i2t.shape != scores_t2i.shape[::-1]:
        raise ValueError(f"scores_i2t {scores_i2t.shape} and scores_t2i {scores_t2i.shape} must be transposes in shape")
    if len(img2txt) != scores_i2t.shape[0] or len(txt2img) != scores_i2t.shape[1]:
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


def _ranks(scores: np.ndarray, positives: List[List[int]]) -> np.ndarray:
    """Per query row, the best (lowest) 0-based rank of any of its positives under descending scores."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty(len(positives), dtype=np.int64)
    for row, targets in enumerate(positives):
        ranks[row] = np.flatnonzero(np.isin(order[row], targets)).min()
    return ranks
