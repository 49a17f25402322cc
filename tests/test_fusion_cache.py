"""The text stream's fusion from a cache of the images' cross-attention keys and values
(Mamo.fusion_cache, BertModel.context_cache): each image's projections once, each pair reading its
image's entry by index, equals the uncached pass on the pairs' repeated image tokens, in value and
in every gradient."""
import pytest
import torch

from helpers import DEVICES, tiny
from vlfast.models import ContextCache


def pairs(seed=0, images=3, texts=5, tokens=17, length=9):
    """Image tokens (I, 1 + N, W), text states (T, L, W) with padded masks, and 11 pairs that repeat
    some images and leave one out, as a re-ranking batch does."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(images, tokens, 64, generator=g)
    text = torch.randn(texts, length, 64, generator=g)
    mask = (torch.arange(length) < torch.randint(3, length + 1, (texts, 1), generator=g)).long()
    image_index = torch.tensor([0, 2, 2, 0, 2, 0, 0, 2, 2, 2, 0])  # image 1 unused
    text_index = torch.randint(0, texts, (len(image_index),), generator=g)
    return image, text[text_index], mask[text_index], image_index


def on(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
def test_itm_logits_from_the_cache_equal_the_uncached_pass(backend, device, monkeypatch):
    monkeypatch.setenv("VLFAST_BACKEND", backend)  # fused: the Triton kernels (on the CPU in the interpreter)
    model = tiny().eval().to(device)
    image, text, mask, index = on(device, *pairs())
    with torch.no_grad():
        cache = model.fusion_cache(image)
        assert isinstance(cache, ContextCache) and len(cache) == 3 and len(cache.keys) == 2  # 2 fusion layers
        got = model.itm_logits(cache, text, mask, image_index=index)
        want = model.itm_logits(image[index], text, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_within_the_rounding_of_the_uncached_bf16_pass(device):
    """Under bf16 autocast both passes round the same projections; they differ in the order of the
    attention's sums, so by bf16 rounding (8 bits: 2^-8 of the logits' size) at most. On a GPU
    the cached pass runs the Triton kernels in bf16, the uncached one SDPA."""
    model = tiny().eval().to(device)
    image, text, mask, index = on(device, *pairs(seed=1))
    with torch.no_grad():
        with torch.autocast(device, dtype=torch.bfloat16):
            got = model.itm_logits(model.fusion_cache(image), text, mask, image_index=index).float()
            want = model.itm_logits(image[index], text, mask).float()
        exact = model.itm_logits(image[index], text, mask)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 2 ** -7 * scale, (got, want)
    assert (want - exact).abs().max().item() > 0  # it ran in bf16


def test_gradients_flow_to_the_images_and_the_projections_as_uncached():
    """A training step's use: the entries' gradients are summed over the pairs that read them, and
    reach the image tokens and the key and value weights as the repeated tokens' do."""
    model = tiny()
    model.eval()  # no dropout: the two passes draw nothing
    image, text, mask, index = pairs(seed=2)
    results = []
    for cached in (True, False):
        model.zero_grad()
        tokens = image.clone().requires_grad_()
        states = text.clone().requires_grad_()
        if cached:
            logits = model.itm_logits(model.fusion_cache(tokens), states, mask, image_index=index)
        else:
            logits = model.itm_logits(tokens[index], states, mask)
        logits.square().sum().backward()
        projections = [p.grad.clone() for name, p in model.text_encoder.bert.named_parameters()
                       if "crossattention.self.key" in name or "crossattention.self.value" in name]
        results.append((tokens.grad, states.grad, projections))
    (cached_image, cached_text, cached_weights), (image_grad, text_grad, weights) = results
    assert cached_image[1].abs().max() == 0 and image_grad[0].abs().max() > 0  # the unused image gets none
    torch.testing.assert_close(cached_image, image_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached_text, text_grad, rtol=1e-5, atol=1e-6)
    assert len(weights) == 8
    for got, want in zip(cached_weights, weights):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_cache_takes_an_index_and_no_mask_of_its_own():
    model = tiny().eval()
    image, text, mask, index = pairs()
    cache = model.fusion_cache(image)
    bert = model.text_encoder.bert
    with pytest.raises(ValueError, match="a ContextCache context takes context_index"):
        bert(attention_mask=mask, mode="fusion", states=text, context=cache)
    with pytest.raises(ValueError, match="context_index reads a ContextCache"):
        bert(attention_mask=mask, mode="fusion", states=text, context=image[index], context_index=index)


def test_itm_logits_compute_the_last_layer_at_cls_only_and_equal_the_full_pass():
    """ITM reads the fused [CLS]: itm_logits runs the last fusion layer there alone, and equals the
    head on the full pass's [CLS] (cached and not)."""
    model = tiny().eval()
    image, text, mask, index = pairs(seed=3)
    bert = model.text_encoder.bert
    with torch.no_grad():
        full = model.itm_head(model.fuse_text(bert, text, mask, image[index])[:, 0])
        assert model.fuse_text(bert, text, mask, image[index], cls_only=True).shape == (len(index), 1, 64)
        torch.testing.assert_close(model.itm_logits(image[index], text, mask), full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.itm_logits(model.fusion_cache(image), text, mask, image_index=index), full,
                                   rtol=1e-5, atol=1e-6)


def test_the_training_forward_from_the_cache_equals_the_gathered_one(monkeypatch):
    """Mamo.forward's text stream (ITM's 3B pairs, MLM's B) reads the B images' cached keys and
    values: every loss and every gradient equal the pass with each pair's image tokens gathered
    (the step before), within fp32 rounding."""
    from helpers import ROOT, batch
    from vlfast.models import Mamo

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import fusion_cache_step  # the gathered step the benchmark times against

    results = []
    for cached in (True, False):
        if not cached:
            monkeypatch.setattr(Mamo, "fuse_text", staticmethod(fusion_cache_step._gathered_fuse_text))
            monkeypatch.setattr(Mamo, "fusion_cache", lambda self, image: image)
        model = tiny()
        torch.manual_seed(1)
        losses = model(*batch(8))
        losses["loss"].backward()
        results.append(({name: value.item() for name, value in losses.items()},
                        {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    (losses, grads), (want_losses, want_grads) = results
    assert losses == pytest.approx(want_losses, rel=1e-6, abs=1e-6)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():  # (attention key biases: 0 in exact arithmetic, noise either way)
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=2e-6, msg=name)
