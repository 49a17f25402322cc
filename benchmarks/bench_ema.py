"""ema_update_ against the code it replaces: ALBEF's momentum loop and timm's `_foreach_lerp_`.

    pytest benchmarks/bench_ema.py --benchmark-enable --benchmark-json=ema.json

Sizes: the parameter list of ViT-B/16 + BERT-base (349 fp32 tensors, 195M values) and of a
small model (width 256, 4 layers: 125 tensors, 6.9M values). extra_info holds the effective
bandwidth (12 bytes per fp32 element: read target, read source, write target) and, on CUDA,
peak memory. The ceiling, a large copy measured in the same run, is in bench_ceilings.py.
"""
import functools
import itertools

import pytest
import torch

from timing import DEVICES, timed
from vlfast.ops import ema_update_

BYTES_PER_ELEMENT = 12


def transformer_shapes(width, mlp, layers, vocab, positions):
    """Parameter shapes of a ViT-B/16-style image encoder plus a BERT-style text encoder."""
    vit_block = [(3 * width, width), (3 * width,), (width, width), (width,), (width,), (width,),
                 (width,), (width,), (mlp, width), (mlp,), (width, mlp), (width,)]
    vit = [(1, 1, width), (1, 197, width), (width, 3, 16, 16), (width,)] + vit_block * layers + [(width,), (width,)]
    bert_layer = [(width, width), (width,)] * 4 + [(width,), (width,), (mlp, width), (mlp,), (width, mlp),
                                                   (width,), (width,), (width,)]
    bert = [(vocab, width), (positions, width), (2, width), (width,), (width,)] + bert_layer * layers
    return vit + bert + [(width, width), (width,)]


SIZES = {
    "small": transformer_shapes(width=256, mlp=1024, layers=4, vocab=1000, positions=64),
    "vit_b16_bert_base": transformer_shapes(width=768, mlp=3072, layers=12, vocab=30522, positions=512),
}


def albef_momentum_update(model_m_params, model_params, m):
    """ALBEF models/model_pretrain.py `_momentum_update`, the loop as written there."""
    for param_m, param in zip(model_m_params, model_params):
        param_m.data = param_m.data * m + param.data * (1.0 - m)


IMPLEMENTATIONS = {
    "vlfast": ema_update_,
    "albef_loop": albef_momentum_update,
    "foreach_lerp": lambda target, source, decay: torch._foreach_lerp_(target, source, 1.0 - decay),
}


@functools.lru_cache(maxsize=2)
def parameter_sets(size, device):
    """Enough (target, source) copies to cycle through 256 MiB, so small sets are not timed from cache."""
    shapes = SIZES[size]
    numel = sum(torch.Size(shape).numel() for shape in shapes)
    copies = max(1, min(16, (256 << 20) // (8 * numel)))
    sets = [([torch.empty(s, device=device).uniform_(-1, 1) for s in shapes],
             [torch.empty(s, device=device).uniform_(-1, 1) for s in shapes]) for _ in range(copies)]
    return sets, numel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def bench_ema(benchmark, implementation, size, device):
    sets, numel = parameter_sets(size, device)
    update = IMPLEMENTATIONS[implementation]
    rotation = itertools.cycle(sets)

    def step():
        target, source = next(rotation)
        update(target, source, 0.995)

    benchmark.extra_info.update(tensors=len(SIZES[size]), elements=numel)
    timed(benchmark, device, step, bytes_moved=BYTES_PER_ELEMENT * numel, warmup=len(sets), graph_replay=True)
