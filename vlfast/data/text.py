"""BERT-style masking of caption tokens for masked language modeling (ALBEF's `mask`)."""
from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor


def mask_tokens(input_ids: Tensor, *, vocab_size: int, mask_token_id: int, special_ids: Iterable[int],
                probability: float = 0.25, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Choose each non-special token with ``probability``; of the chosen, 80% become [MASK], 10% a
    random word, 10% stay. Returns (masked ids, labels): labels hold the original id at chosen
    positions and -100 (cross-entropy's ignore index) elsewhere. ``special_ids``: [PAD], [CLS],
    [SEP]... never chosen."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    if input_ids.dtype != torch.int64:
        raise TypeError(f"input_ids must be int64, got {input_ids.dtype}")

    def draw(p: float) -> Tensor:
        return torch.rand(input_ids.shape, device=input_ids.device, generator=generator) < p

    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in special_ids:  # not isin: a tensor of the ids would be a host-to-GPU copy, a sync
        special |= input_ids == token_id
    chosen = draw(probability) & ~special
    labels = torch.where(chosen, input_ids, -100)
    to_mask = chosen & draw(0.8)
    to_random = chosen & ~to_mask & draw(0.5)
    random_words = torch.randint(vocab_size, input_ids.shape, device=input_ids.device, generator=generator)
    masked = torch.where(to_mask, mask_token_id, torch.where(to_random, random_words, input_ids))
    return masked, labels
