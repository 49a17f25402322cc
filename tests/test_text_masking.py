import pytest
import torch

from vlfast.data.text import mask_tokens

PAD, CLS, SEP, MASK, VOCAB = 0, 2, 3, 4, 1000


def batch(rows=400, length=30):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, VOCAB, (rows, length), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[: rows // 2, 20:] = PAD
    return ids


def run(ids, seed=1, probability=0.25):
    return mask_tokens(ids, vocab_size=VOCAB, mask_token_id=MASK, special_ids=(PAD, CLS, SEP),
                       probability=probability, generator=torch.Generator().manual_seed(seed))


def test_rates_labels_and_special_tokens():
    ids = batch()
    masked, labels = run(ids)
    special = (ids == PAD) | (ids == CLS) | (ids == SEP)
    chosen = labels != -100
    assert not (chosen & special).any() and torch.equal(masked[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    rate = chosen.sum() / (~special).sum()
    assert abs(rate - 0.25) < 0.01
    as_mask = (masked[chosen] == MASK).float().mean()
    unchanged = (masked[chosen] == ids[chosen]).float().mean()
    assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02  # ~0.1% of random words land on themselves


def test_reproducible_and_bad_arguments():
    ids = batch(8)
    assert all(torch.equal(a, b) for a, b in zip(run(ids, seed=5), run(ids, seed=5)))
    assert torch.equal(run(ids, probability=0.0)[0], ids)
    with pytest.raises(ValueError, match=r"probability must be in \[0, 1\]"):
        run(ids, probability=1.5)
    with pytest.raises(TypeError, match="input_ids must be int64"):
        run(ids.int())
