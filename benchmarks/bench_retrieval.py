"""Retrieval's re-ranking stage: vlfast's two_stage_scores (the two directions' top-k pairs merged,
grouped by image, each image's cross-attention keys and values computed once and read by index)
against ALBEF's per-query loop (two_stage_scores_reference: each pair through the fusion encoder
on its own copy of the image tokens), on the same model and embeddings in the same run.

    pytest benchmarks/bench_retrieval.py --benchmark-enable --benchmark-json=retrieval.json
    python benchmarks/bench_retrieval.py --flops     # FLOPs of a COCO-5k evaluation, both paths

bench_rerank: the re-ranking of a synthetic evaluation set (random weights, random unit
features, token states and captions of 8 to 30 tokens), both paths in each round, ALBEF's time
over vlfast's per round, the median quoted ("reference/vlfast"), at 577 image tokens (384 px) and 257
(256 px), 6 fusion layers of BERT-base's width (768, 12 heads): the share of the image's keys and
values in a pair's work is the real one. CPU: 12 images, 60 captions (5 per image, as COCO), k 6,
fp32 (about 5 minutes). CUDA: 64 images, 320 captions, k 64, under bf16 autocast.
extra_info: pairs (vlfast's, merged; ALBEF's: every query's k) and each path's pairs/s.
bench_evaluation (CUDA): a COCO-5k-sized evaluation end to end on one card: 5000 random images
at 384 px through ViT-B/16, 25000 random captions through BERT-base, ITC, then the re-ranking at
k 256; ALBEF's loop timed on 8 image and 40 text queries and scaled to its 5000·256 + 25000·256
pairs (extra_info says so). On the CPU (and in the GPU suite's dry run) the same code at a tiny
size. A smoke run (benchmarks disabled) or the CUDA configuration on the CPU takes tiny sizes.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # vlfast from a checkout, when run as a script
from timing import CUDA_CONFIG_ON_CPU, DEVICES, cuda_config, in_turn, timed  # noqa: E402
from vlfast.models import Mamo, MamoConfig, TextConfig, VisionConfig  # noqa: E402
from vlfast.retrieval import (Embeddings, embed_images, embed_texts, pair_ids, two_stage_scores,  # noqa: E402
                              two_stage_scores_reference)

TEXT_LENGTH = 30
# (width, heads, images, captions, k) of bench_rerank
RERANK_SIZES = {"cpu": (768, 12, 12, 60, 6), "cuda": (768, 12, 64, 320, 64), "tiny": (64, 4, 4, 8, 4)}
IMAGE_TOKENS = {577: 384, 257: 256}  # tokens: image size (patch 16)
# bench_evaluation: (images, captions, k, image size, ViT-B/16 + BERT-base widths?, ALBEF's queries timed)
EVALUATION_SIZES = {"cuda": (5000, 25000, 256, 384, True, (8, 40)), "cpu": (6, 30, 4, 64, False, (2, 4))}
IMPLEMENTATIONS = {"vlfast": two_stage_scores, "albef_loop": two_stage_scores_reference}


def model_for(width: int, heads: int, image_size: int, vision_depth: int = 1, text_depth: int = 6) -> MamoConfig:
    """A Mamo whose text stream has 6 fusion layers of this width (BERT-base's 12 layers from 6 on)."""
    return MamoConfig(vision=VisionConfig(image_size=image_size, patch_size=16, width=width, depth=vision_depth,
                                          heads=heads),
                      text=TextConfig(vocab_size=1000, width=width, depth=text_depth, heads=heads,
                                      intermediate=4 * width, fusion_layer=text_depth - 6, encoder_width=width,
                                      max_positions=64),
                      embed_dim=256)


def build(config: MamoConfig, device: str) -> Mamo:
    torch.manual_seed(0)
    with torch.device(device):
        return Mamo(config, mask_token_id=4, special_ids=[0, 2, 3]).eval()


def synthetic_embeddings(images: int, captions: int, tokens: int, width: int, device: str, seed: int = 0) -> Embeddings:
    """Random unit ITC features, image tokens and caption states of 8 to 30 tokens."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda rows: torch.nn.functional.normalize(torch.randn(rows, 256, generator=g), dim=1)  # noqa: E731
    lengths = torch.randint(8, TEXT_LENGTH + 1, (captions, 1), generator=g)
    mask = (torch.arange(TEXT_LENGTH) < lengths).long()
    return Embeddings(torch.randn(images, tokens, width, generator=g).to(device), unit(images).to(device),
                      torch.randn(captions, TEXT_LENGTH, width, generator=g).to(device), mask.to(device),
                      unit(captions).to(device))


def autocast(device: str):
    """The CUDA configuration's bf16 autocast (retrieval's own on a GPU), on the CPU under --cuda-config."""
    return torch.autocast(device, dtype=torch.bfloat16, enabled=cuda_config(device) and device == "cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", IMAGE_TOKENS)
def bench_rerank(benchmark, tokens, device):
    """Paired: each round runs both paths, in turn (the first alternating), and the ratio quoted is
    the median of the rounds' ALBEF / vlfast (a shared machine's speed drifts between runs)."""
    tiny = benchmark.disabled or (CUDA_CONFIG_ON_CPU and device == "cpu")
    width, heads, images, captions, k = RERANK_SIZES["tiny" if tiny else device]
    model = build(model_for(width, heads, IMAGE_TOKENS[tokens]), device)
    embeddings = synthetic_embeddings(images, captions, tokens, width, device)

    def path(rerank):
        def run():
            with autocast(device):
                rerank(model, embeddings, k)
        return run

    runs = {name: path(rerank) for name, rerank in IMPLEMENTATIONS.items()}
    rounds = []

    def pair():
        rounds.append(in_turn(runs, reverse=len(rounds) % 2 == 1, device=device))

    warmup = 1
    timed(benchmark, device, pair, warmup=warmup, busy=False)
    sims = embeddings.image_feat @ embeddings.text_feat.T
    pairs = {"vlfast": merged_pairs(sims, k), "albef_loop": images * min(k, captions) + captions * min(k, images)}
    benchmark.extra_info.update(images=images, captions=captions, k=k, width=width, pairs=pairs["vlfast"],
                                albef_pairs=pairs["albef_loop"])
    if benchmark.stats:
        timed_rounds = rounds[warmup:]
        for name in IMPLEMENTATIONS:
            seconds = statistics.median(r[name] for r in timed_rounds)
            benchmark.extra_info[f"{name} pairs/s"] = round(pairs[name] / seconds, 1)
        benchmark.extra_info["reference/vlfast"] = round(
            statistics.median(r["albef_loop"] / r["vlfast"] for r in timed_rounds), 3)


def merged_pairs(sims, k: int) -> int:
    """The distinct (image, text) pairs of the images' and the texts' top k."""
    images, texts = sims.shape
    return len(pair_ids(sims.topk(min(k, texts), dim=1).indices, sims.T.topk(min(k, images), dim=1).indices)[2])


@pytest.mark.parametrize("device", DEVICES)
def bench_evaluation(benchmark, device):
    """A COCO-5k-sized evaluation end to end on CUDA (the module docstring); a tiny one on the CPU."""
    images, captions, k, image_size, vit_b, (albef_images, albef_texts) = EVALUATION_SIZES[device]
    config = MamoConfig(vision=VisionConfig(image_size=image_size), text=TextConfig(), embed_dim=256) if vit_b else \
        model_for(64, 4, image_size, vision_depth=2, text_depth=8)
    model = build(config, device)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, config.text.vocab_size, (captions, TEXT_LENGTH), generator=g)
    mask = (torch.arange(TEXT_LENGTH) < torch.randint(8, TEXT_LENGTH + 1, (captions, 1), generator=g)).long()
    batch = 256 if device == "cuda" else 4

    def image_batches():
        for start in range(0, images, batch):
            yield torch.randn(min(batch, images - start), 3, image_size, image_size, generator=g)

    stages, result = {}, {}

    def evaluation():
        stages.clear()
        started = time.perf_counter()
        with autocast(device):
            image, image_feat = embed_images(model, image_batches(), device)
            text, text_mask, text_feat = embed_texts(model, input_ids, mask, device, batch)
            if device == "cuda":
                torch.cuda.synchronize()
            stages["embedding"] = time.perf_counter() - started
            result["embeddings"] = Embeddings(image, image_feat, text, text_mask, text_feat)
            two_stage_scores(model, result["embeddings"], k, pair_batch_size=4 * batch, stages=stages,
                             progress=device == "cuda")

    benchmark.pedantic(evaluation, rounds=1, iterations=1, warmup_rounds=0)
    total = sum(stages[name] for name in ("embedding", "itc", "rerank"))
    benchmark.extra_info.update({f"{name}_s": round(stages[name], 3) for name in ("embedding", "itc", "rerank")})
    benchmark.extra_info.update(images=images, captions=captions, k=k, total_s=round(total, 3), pairs=stages["pairs"],
                                **{"pairs/s": round(stages["pairs"] / stages["rerank"], 1)})
    # ALBEF's loop on a few queries of the same embeddings, scaled to all its pairs
    queries = (range(albef_images), range(albef_texts))
    started = time.perf_counter()
    with autocast(device):
        two_stage_scores_reference(model, result["embeddings"], k, image_queries=queries[0], text_queries=queries[1])
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    timed_pairs = albef_images * min(k, captions) + albef_texts * min(k, images)
    all_pairs = images * min(k, captions) + captions * min(k, images)
    albef_rerank = seconds * all_pairs / timed_pairs
    benchmark.extra_info.update({"albef_rerank_s (scaled)": round(albef_rerank, 1), "albef_pairs_timed": timed_pairs,
                                 "albef_pairs": all_pairs,
                                 "rerank speed-up over ALBEF": round(albef_rerank / stages["rerank"], 2)})
    if device == "cuda":
        benchmark.extra_info["card"] = torch.cuda.get_device_name()
        benchmark.extra_info["peak_memory_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20)


def coco5k_flops() -> dict:
    """FLOPs of a COCO-5k evaluation's re-ranking (5000 images, 25000 captions, k 256, 384 px,
    ViT-B/16 + BERT-base, captions of 30 tokens), counted by torch's FlopCounterMode on the meta
    device for one pair (and one image's cache), times the pairs: ALBEF's 5000·256 + 25000·256,
    each through the whole fusion encoder; vlfast's at most as many (merging only removes pairs
    seen from both sides; the count here assumes none), the last layer at [CLS] only, and 5000
    caches. Texts at their full 30 tokens on both paths (vlfast's batches of like lengths, which
    save more on real captions, are not counted). bench_rerank's timed ALBEF loop runs vlfast's
    itm_logits, [CLS]-only last layer included: its ratios favour ALBEF's code."""
    from pytest import MonkeyPatch
    from torch.utils.flop_counter import FlopCounterMode

    images, captions, k = 5000, 25000, 256
    config = MamoConfig(vision=VisionConfig(image_size=384), text=TextConfig(), embed_dim=256)
    with MonkeyPatch.context() as patch:
        patch.setenv("VLFAST_BACKEND", "reference")  # attention as matrix products the counter sees
        with torch.device("meta"):
            model = Mamo(config, mask_token_id=4, special_ids=[0, 2, 3]).eval()
            image = torch.randn(1, 577, 768)
            text, mask = torch.randn(1, TEXT_LENGTH, 768), torch.ones(1, TEXT_LENGTH, dtype=torch.long)
            counted = {}
            bert = model.text_encoder.bert
            # ALBEF's pair: every position through every fusion layer, the head on [CLS]
            for name, run in (("albef_pair", lambda: model.itm_head(model.fuse_text(bert, text, mask, image)[:, 0])),
                              ("cache_per_image", lambda: model.fusion_cache(image)),
                              ("cached_pair", lambda: model.itm_logits(cache, text, mask,
                                                                       image_index=torch.zeros(1, dtype=torch.long)))):
                cache = model.fusion_cache(image)
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    run()
                counted[name] = counter.get_total_flops()
    pairs = images * k + captions * k
    albef = pairs * counted["albef_pair"]
    vlfast = images * counted["cache_per_image"] + pairs * counted["cached_pair"]
    return {"pairs": pairs, **{f"{name}_gflops": round(value / 1e9, 3) for name, value in counted.items()},
            "albef_pflops": round(albef / 1e15, 2), "vlfast_pflops_at_most": round(vlfast / 1e15, 2),
            "ratio_at_least": round(albef / vlfast, 2)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops", action="store_true", help="print the FLOPs of a COCO-5k evaluation, both paths")
    if parser.parse_args().flops:
        print(coco5k_flops())
    else:
        parser.print_help()
