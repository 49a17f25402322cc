"""The swap docs/porting.md describes, checked on an ALBEF-structured module (examples/)."""
import pytest
import torch

from examples.albef_style_step import AlbefStyle, random_batch
from helpers import DEVICES
from vlfast.nn import Attention, MomentumModel, key_padding_mask


def pair(device, dtype=torch.float64):
    torch.manual_seed(0)
    original = AlbefStyle(width=64, embed_dim=32, heads=4, fused=False).to(device, dtype)
    torch.manual_seed(0)
    swapped = AlbefStyle(width=64, embed_dim=32, heads=4, fused=True).to(device, dtype)
    for name, value in original.state_dict().items():  # same weights, momentum copies included
        swapped.state_dict()[name.replace("_m.", "_m.model.")].copy_(value)
    return original, swapped


@pytest.mark.parametrize("device", DEVICES)
def test_same_losses_and_gradients(device):
    original, swapped = pair(device)
    batch = random_batch(12, device, torch.float64, width=64)
    generator = torch.Generator(device).manual_seed(1)
    loss_ita, loss_itm, negatives = swapped(*batch, generator=generator)
    # ITM depends on the draw: give ALBEF's code the same negatives (the draw's distribution is
    # tested against ALBEF's weights in tests/test_contrastive.py).
    want_ita, want_itm, _ = original(*batch, negatives=negatives)
    torch.testing.assert_close(loss_ita, want_ita, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_itm, want_itm, rtol=1e-12, atol=1e-12)
    for neg, role in zip(negatives, ("image", "text")):
        assert (neg != torch.arange(12, device=device)).all(), f"a positive drawn as the negative {role}"

    (loss_ita + loss_itm).backward()
    (want_ita + want_itm).backward()
    swapped_params = dict(swapped.named_parameters())
    for name, param in original.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(swapped_params[name].grad, param.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_queue_itc_same_losses_gradients_and_queues_over_steps(device):
    """ALBEF's pretraining ITC (momentum keys, queue, distillation, _dequeue_and_enqueue) against
    momentum_itc_loss with a FeatureQueue: three steps, the queue wrapping around."""
    torch.manual_seed(0)
    original = AlbefStyle(width=64, embed_dim=32, heads=4, fused=False, queue_size=24).to(device, torch.float64)
    torch.manual_seed(0)
    swapped = AlbefStyle(width=64, embed_dim=32, heads=4, fused=True, queue_size=24).to(device, torch.float64)
    state = original.state_dict()
    for name, value in state.items():
        if "queue" not in name:
            swapped.state_dict()[name.replace("_m.", "_m.model.")].copy_(value)
    swapped.queue.image.copy_(state["image_queue"].t())  # ALBEF's (D, Q) are FeatureQueue's rows transposed
    swapped.queue.text.copy_(state["text_queue"].t())
    generator = torch.Generator(device).manual_seed(1)
    for step in range(3):
        batch = random_batch(12, device, torch.float64, width=64, seed=step)
        loss_ita, loss_itm, negatives = swapped(*batch, generator=generator)
        want_ita, want_itm, _ = original(*batch, negatives=negatives)
        torch.testing.assert_close(loss_ita, want_ita, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss_itm, want_itm, rtol=1e-12, atol=1e-12)
        for model, loss in ((swapped, loss_ita + loss_itm), (original, want_ita + want_itm)):
            model.zero_grad()
            loss.backward()
        swapped_params = dict(swapped.named_parameters())
        for name, param in original.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(swapped_params[name].grad, param.grad, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(swapped.queue.image, original.image_queue.t(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(swapped.queue.text, original.text_queue.t(), rtol=1e-12, atol=1e-14)
        assert int(swapped.queue.ptr) == int(original.queue_ptr)


@pytest.mark.parametrize("device", DEVICES)
def test_same_momentum_weights_after_steps(device):
    original, swapped = pair(device, torch.float32)
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):  # the same parameter steps on both, then each one's momentum update
        steps = {name: torch.randn(p.shape, generator=generator).to(device) * 1e-2
                 for name, p in original.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for model in (original, swapped):
                for name, p in model.named_parameters():
                    if name in steps:
                        p.add_(steps[name])
        original._momentum_update()
        swapped._momentum_update()
    for name in ("vision_proj_m", "text_proj_m"):
        for (_, want), (_, got) in zip(getattr(original, name).named_parameters(),
                                       getattr(swapped, name).model.named_parameters()):
            if device == "cpu":  # the same two products and one sum as ALBEF's loop
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            torch.testing.assert_close(got, want)
    assert swapped.vision_proj_m.step == 5


@pytest.mark.parametrize("device", DEVICES)
def test_same_attention_for_the_extended_additive_mask(device):
    original, swapped = pair(device, torch.float32)
    _, text_embeds, extended_mask = random_batch(6, device, width=64)
    torch.testing.assert_close(swapped.encode_text(text_embeds, extended_mask),
                               original.encode_text(text_embeds, extended_mask), rtol=1e-5, atol=1e-5)


def test_key_padding_mask_forms():
    hf = torch.tensor([[1, 1, 0], [1, 0, 0]])
    want = hf.bool()
    assert key_padding_mask(None) is None
    for form in (hf, hf.bool(), hf.float(), (1.0 - hf[:, None, None, :].float()) * -10000.0,
                 torch.where(hf[:, None, None, :].bool(), 0.0, torch.finfo(torch.float32).min)):
        assert torch.equal(key_padding_mask(form), want)
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, Lk\) or the extended \(B, 1, 1, Lk\)"):
        key_padding_mask(torch.zeros(2, 1, 3, 3))
    q = torch.randn(2, 2, 3, 16)
    torch.testing.assert_close(Attention()(q, q, q, hf), Attention()(q, q, q, (1.0 - hf[:, None, None, :]) * -10000.0))


def test_momentum_model_state_dict_round_trip():
    online = torch.nn.Linear(4, 3)
    momentum = MomentumModel(online, 0.9, warmup_power=0.75)
    assert all(not p.requires_grad for p in momentum.parameters())
    with torch.no_grad():
        online.weight.add_(1.0)
    momentum.update(online)  # warmup: the first update copies
    torch.testing.assert_close(momentum.model.weight, online.weight)
    momentum.update(online)
    state = momentum.state_dict()
    restored = MomentumModel(torch.nn.Linear(4, 3), 0.9, warmup_power=0.75)
    restored.load_state_dict(state)
    assert restored.step == 2
    torch.testing.assert_close(restored(torch.ones(1, 4)), momentum(torch.ones(1, 4)))
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        MomentumModel(online, 1.5)


def test_momentum_model_in_bf16_runs_as_autocast_would_and_keeps_fp32_state():
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Conv1d(16, 4, 1))
    plain = MomentumModel(online, 0.9)
    momentum = MomentumModel(online, 0.9, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 5, 8)
    run = lambda m: m.compute_model[2](m.compute_model[:2](x).transpose(1, 2))  # noqa: E731
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    for _ in range(2):  # the copies follow each update
        plain.update(online)
        momentum.update(online)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # autocast casts the fp32 weights to bf16 (round to nearest) at each use: the same numbers
            assert torch.equal(run(momentum), run(plain))
    dtypes = {name: p.dtype for name, p in momentum.compute_model.named_parameters()}
    assert dtypes == {"0.weight": torch.bfloat16, "0.bias": torch.bfloat16, "1.weight": torch.float32,
                      "1.bias": torch.float32, "2.weight": torch.bfloat16, "2.bias": torch.bfloat16}
    assert momentum.compute_model[1].weight is momentum.model[1].weight  # shared, not copied
    state = momentum.state_dict()
    assert state.keys() == plain.state_dict().keys() and all(v.dtype == torch.float32 for k, v in state.items() if k != "_extra_state")
    for k, v in state.items():
        if k != "_extra_state":
            assert torch.equal(v, plain.state_dict()[k]), k  # the fp32 EMA is the same with or without copies
    restored = MomentumModel(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Conv1d(16, 4, 1)),
                             0.9, compute_dtype=torch.bfloat16)
    restored.load_state_dict(state)  # the copies are rewritten from what was loaded
    assert torch.equal(restored.compute_model[0].weight, state["model.0.weight"].to(torch.bfloat16))
    other = {name: value + 1 for name, value in plain.model.state_dict().items()}
    restored.model.load_state_dict(other)  # also when loading into the module directly
    assert torch.equal(restored.compute_model[2].bias, other["2.bias"].to(torch.bfloat16))
    restored.eval()  # the copy the calls run follows the mode
    assert not restored.compute_model.training
    tied = torch.nn.ModuleDict({"embed": torch.nn.Embedding(5, 4), "head": torch.nn.Linear(4, 5)})
    tied.head.weight = tied.embed.weight
    shared = MomentumModel(tied, 0.5, compute_dtype=torch.bfloat16)
    assert shared.compute_model.head.weight is shared.model.embed.weight  # tied to an embedding: no copy
    assert shared.compute_model.head.bias.dtype == torch.bfloat16
    with torch.no_grad():
        tied.head.bias.add_(1)
    shared.update(tied)
    assert torch.equal(shared.compute_model.head.bias, shared.model.head.bias.bfloat16())
    restored.double()  # a conversion makes the copies again from the converted weights
    assert restored.compute_model[0].weight.dtype == torch.float64  # only float32 weights get copies
    with pytest.raises(ValueError, match="compute_dtype must be torch.bfloat16, torch.float16 or None"):
        MomentumModel(online, compute_dtype=torch.float64)
