"""The training step with the text stream's fusion reading the B images' cross-attention keys and
values from a cache (Mamo.fusion_cache, vlfast.ops.indexed_attention: what the step does) against
the same step with the image tokens gathered per pair (ITM's 3B pairs and MLM's B, as before),
alternating in one process, one step of each per round; the median of the rounds' ratios.

    python benchmarks/fusion_cache_step.py [--config tiny] [--rounds 40]

The gathered variant replaces Mamo.fuse_text and Mamo.fusion_cache for its steps only: the same
model, weights and math, the keys and values projected per pair. Its numbers are in
docs/design.md ("Fewer kernels per step"), with step_cost.py's counts of both.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import train_steps  # noqa: E402
from vlfast.models import Mamo  # noqa: E402

CACHED = {"fuse_text": Mamo.__dict__["fuse_text"], "fusion_cache": Mamo.fusion_cache}


def _gathered_fuse_text(bert, text, text_mask, image, image_index=None, cls_only=False):
    if image_index is not None:  # the tokens of each pair's image, copied per pair
        image, image_index = image[image_index], None
    return CACHED["fuse_text"].__func__(bert, text, text_mask, image, image_index, cls_only)


def use(cached: bool) -> None:
    Mamo.fuse_text = CACHED["fuse_text"] if cached else staticmethod(_gathered_fuse_text)
    Mamo.fusion_cache = CACHED["fusion_cache"] if cached else (lambda self, image: image)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="a train_steps config (tiny: train.py's default model)")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    steps = {}
    for cached in (True, False):
        use(cached)
        steps[cached], _ = train_steps.build_step(args.config, "cpu")
    seconds = {True: [], False: []}
    for index in range(args.rounds):
        for cached in ((True, False) if index % 2 else (False, True)):
            use(cached)
            started = time.perf_counter()
            steps[cached]()
            seconds[cached].append(time.perf_counter() - started)
    use(True)
    warm = slice(2, None)  # the first two rounds warm up
    ratios = [gathered / cached for cached, gathered in zip(seconds[True][warm], seconds[False][warm])]
    print(f"{args.config}, {args.rounds - 2} rounds: cached {statistics.median(seconds[True][warm]) * 1e3:.1f} ms, "
          f"gathered {statistics.median(seconds[False][warm]) * 1e3:.1f} ms per step; "
          f"median ratio gathered/cached {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
