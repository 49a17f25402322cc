import importlib
import os
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICES, needs_extension
from vlfast import _extension
from vlfast.ops import dropout_add_layer_norm, dropout_add_layer_norm_reference
from vlfast.ops.residual_layer_norm import _draw_seed, triton, triton_backward, triton_forward

pytestmark = pytest.mark.usefixtures("poisoned_memory")  # conftest: NaN in every torch.empty

# (..., D): one element, D below a block of 32 elements, odd sizes (rows start mid-block),
# BERT-base's width, a (B, L, D) batch as the models pass it.
SHAPES = [(1, 1), (3, 5), (7, 33), (5, 768), (2, 7, 33)]
# (x, residual): one dtype, and autocast's bf16 dense output onto an fp32 residual stream.
DTYPE_PAIRS = [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.float16), (torch.bfloat16, torch.float32)]
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=2e-5),
             torch.bfloat16: dict(rtol=2e-2, atol=4e-2), torch.float16: dict(rtol=2e-3, atol=4e-3)}
# Triton against C++: the same math in fp32, sums in another order, so one rounding of the
# stored dtype apart (the interpreter also truncates fp32 -> bf16 stores).
ONE_ROUNDING = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
                torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
UINT32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counters: np.ndarray, key: int) -> np.ndarray:
    """(N, 4) uint32: Philox4x32-10 of counters (c0, c1 from the uint64 counter, c2 = c3 = 0) under
    a 64-bit key, written from the paper (Salmon et al., SC'11) apart from the kernels."""
    c0, c1 = counters.astype(np.uint64) & UINT32, counters.astype(np.uint64) >> np.uint64(32)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    for _ in range(10):
        a, b = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (b >> np.uint64(32)) ^ c1 ^ k0, b & UINT32, (a >> np.uint64(32)) ^ c3 ^ k1, a & UINT32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & UINT32, (k1 + np.uint64(0xBB67AE85)) & UINT32
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def keep_mask(shape, p: float, seed: int) -> torch.Tensor:
    """The documented mask: element e = 32·b + 8·w + j takes word w of counter 8·b + j and is kept
    iff word >> 1 >= floor(p·2³¹)."""
    e = np.arange(int(np.prod(shape)), dtype=np.uint64)
    counters = ((e >> np.uint64(5)) << np.uint64(3)) + (e & np.uint64(7))
    words = philox4x32_10(counters, seed)[np.arange(e.size), ((e >> np.uint64(3)) & np.uint64(3)).astype(np.int64)]
    return torch.from_numpy((words >> 1) >= int(p * 2 ** 31)).reshape(shape)


def oracle(x, residual, weight, bias, p, eps, keep):
    """LayerNorm(x·keep/(1 − p) + residual) in float64, differentiable (gradients come back in
    each input's dtype, so they are computed in float64 through float64 leaves)."""
    dropped = x * keep.to(x.device) / (1 - p) if p < 1 else x * 0
    h = dropped + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


def make_inputs(shape, x_dtype, residual_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = shape[-1]
    x = torch.randn(shape, generator=g).to(device, x_dtype).requires_grad_()
    residual = (3 * torch.randn(shape, generator=g) + 1).to(device, residual_dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(dim, generator=g)).to(device, residual_dtype).requires_grad_()
    bias = torch.randn(dim, generator=g).to(device, residual_dtype).requires_grad_()
    return x, residual, weight, bias


def test_philox_matches_the_published_known_answer():
    # Random123's kat_vectors: philox4x32 10 rounds, counter 0, key 0.
    assert philox4x32_10(np.zeros(1, dtype=np.uint64), 0)[0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype, residual_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_kernel_equals_layer_norm_of_the_philox_mask(device, x_dtype, residual_dtype, shape, p):
    if device == "cuda" and torch.float64 in (x_dtype, residual_dtype):
        pytest.skip("the GPU kernel takes no fp64 (test_triton_launcher_refuses_what_it_cannot_take)")
    x, residual, weight, bias = make_inputs(shape, x_dtype, residual_dtype, device)
    seed = 0x1234_5678_9ABC_DEF  # both key words non-zero
    out, mean, rstd = torch.ops.vlfast.dropout_add_layer_norm(x, residual, weight, bias, p, 1e-5,
                                                              torch.tensor([seed], device=device))
    assert out.dtype == residual_dtype and mean.dtype == rstd.dtype == (torch.float64 if x_dtype == torch.float64 else torch.float32)
    assert out.shape == shape and mean.shape == rstd.shape == (x.numel() // shape[-1],)
    keep = keep_mask(shape, p, seed)
    leaves = [t.detach().double().requires_grad_() for t in (x, residual, weight, bias)]
    want = oracle(*leaves, p, 1e-5, keep)
    # Each result at its own dtype's tolerance: with bf16 x onto an fp32 residual the output and
    # three of the gradients are fp32, and the oracle starts from the same rounded inputs.
    torch.testing.assert_close(out.double(), want, **TOLERANCE[out.dtype])

    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, residual_dtype)
    got = torch.autograd.grad(out, (x, residual, weight, bias), grad)
    expected = torch.autograd.grad(want, leaves, grad.double())
    for name, g, e, like in zip(("x", "residual", "weight", "bias"), got, expected, (x, residual, weight, bias)):
        assert g.dtype == like.dtype, name
        scale = 1 + e.abs().max().item()  # the weight and bias gradients sum over rows
        torch.testing.assert_close(g.double() / scale, e / scale, **TOLERANCE[g.dtype], msg=lambda m: f"{name}: {m}")
    if p > 0:  # a dropped element passes no gradient to x
        assert torch.all(got[0][~keep.to(device)] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype, residual_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("training, p", [(False, 0.1), (True, 0.0)])
@pytest.mark.parametrize("backend", ["auto", pytest.param("fused", marks=needs_extension)])
def test_without_dropout_equals_hugging_face_and_draws_nothing(device, x_dtype, residual_dtype, training, p, backend,
                                                               monkeypatch):
    if backend == "fused" and device == "cuda" and torch.float64 in (x_dtype, residual_dtype):
        pytest.skip("the GPU kernel takes no fp64")
    monkeypatch.setenv("VLFAST_BACKEND", backend)  # on the GPU auto runs Hugging Face's code, fused the kernel
    x, residual, weight, bias = make_inputs((2, 9, 40), x_dtype, residual_dtype, device)
    rng = torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
    got = dropout_add_layer_norm(x, residual, weight, bias, p, eps=1e-12, training=training)
    assert torch.equal(rng, torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state())
    h = F.dropout(x, p, training) + residual  # BertSelfOutput after its dense layer
    want = F.layer_norm(h.double(), (40,), weight.double(), bias.double(), 1e-12)
    assert got.shape == x.shape and got.dtype == torch.promote_types(x_dtype, residual_dtype)
    torch.testing.assert_close(got.double(), want, **TOLERANCE[got.dtype])
    reference = dropout_add_layer_norm_reference(x, residual, weight, bias, p, eps=1e-12, training=training)
    torch.testing.assert_close(reference.double(), want, **TOLERANCE[reference.dtype])


@pytest.mark.cuda
def test_gpu_runs_hugging_face_by_default_and_the_kernel_when_fused(monkeypatch):
    x, residual, weight, bias = make_inputs((3, 5, 32), torch.bfloat16, torch.float32, "cuda")
    module = importlib.import_module("vlfast.ops.residual_layer_norm")
    with mock.patch.object(module, "dropout_add_layer_norm_reference", wraps=dropout_add_layer_norm_reference) as ref:
        monkeypatch.setenv("VLFAST_BACKEND", "auto")
        dropout_add_layer_norm(x, residual, weight, bias, 0.1)
        assert ref.call_count == 1
        monkeypatch.setenv("VLFAST_BACKEND", "fused")
        dropout_add_layer_norm(x, residual, weight, bias, 0.1)
        assert ref.call_count == 1
        with pytest.raises(RuntimeError, match="dropout_add_layer_norm has no Triton kernel for this call"):
            dropout_add_layer_norm(x.double(), residual, weight, bias, 0.1)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_public_op_draws_its_seed_from_the_default_generator(device, monkeypatch):
    monkeypatch.setenv("VLFAST_BACKEND", "fused")  # on the GPU, auto runs Hugging Face's code
    x, residual, weight, bias = make_inputs((4, 6, 24), torch.float32, torch.float32, device)
    torch.manual_seed(5)
    first = dropout_add_layer_norm(x, residual, weight, bias, 0.25)
    second = dropout_add_layer_norm(x, residual, weight, bias, 0.25)
    torch.manual_seed(5)
    seed = _draw_seed(0.25, torch.device(device))
    want = oracle(*(t.double() for t in (x, residual, weight, bias)), 0.25, 1e-12, keep_mask((4, 6, 24), 0.25, seed.item()))
    torch.testing.assert_close(first.double(), want, **TOLERANCE[torch.float32])
    torch.manual_seed(5)
    assert torch.equal(dropout_add_layer_norm(x, residual, weight, bias, 0.25), first)  # reproducible
    assert not torch.equal(first, second)  # a fresh mask each call


@needs_extension
def test_masks_keep_one_minus_p_at_every_block_position_and_differ_between_seeds():
    rows, dim, p = 1000, 1001, 0.3  # rows start at every offset within a block of 32
    x, residual = torch.randn(rows, dim, requires_grad=True), torch.randn(rows, dim)
    weight, bias = torch.ones(dim), torch.zeros(dim)
    kept = []
    for seed in (1, 2):  # the mask read back from x's gradient, which is 0 exactly where dropped
        out, _, _ = torch.ops.vlfast.dropout_add_layer_norm(x, residual, weight, bias, p, 1e-5, torch.tensor([seed]))
        (grad,) = torch.autograd.grad(out, x, torch.randn_like(out))
        kept.append(grad != 0)
    for mask in kept:  # each of a block's 32 positions (4 words × 8 counters) keeps 1 − p
        lanes = mask.flatten()[: (rows * dim) // 32 * 32].view(-1, 32).double().mean(0)
        bound = 5 * (p * (1 - p) / (rows * dim / 32)) ** 0.5  # five standard errors per position
        assert torch.all((lanes - (1 - p)).abs() < bound), lanes
    agreement = (kept[0] == kept[1]).double().mean().item()
    assert abs(agreement - (p * p + (1 - p) ** 2)) < 0.005  # independent masks agree at p² + (1 − p)²


@needs_extension
@pytest.mark.skipif(triton is None, reason="Triton not installed")
@pytest.mark.parametrize("x_dtype, residual_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                     (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape, p", [((7, 33), 0.1), ((37, 100), 0.5), ((2, 5, 24), 0.0)])
def test_triton_kernel_draws_the_cpu_mask_and_equals_it(x_dtype, residual_dtype, shape, p):
    """The GPU kernel, run by the Triton interpreter (TRITON_INTERPRET=1 from conftest without a GPU)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or the Triton interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, residual, weight, bias = (t.detach() for t in make_inputs(shape, x_dtype, residual_dtype, device))
    seed = torch.tensor([987654321987], device=device)
    got = triton_forward(x, residual, weight, bias, p, 1e-5, seed)
    want = torch.ops.vlfast.dropout_add_layer_norm(x.cpu(), residual.cpu(), weight.cpu(), bias.cpu(), p, 1e-5, seed.cpu())
    for g, w in zip(got, want):  # one rounding apart at most: sums in another order
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.cpu(), w, **ONE_ROUNDING[g.dtype])
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device, residual_dtype)
    got_grads = triton_backward(grad, x, residual, weight, got[1], got[2], p, seed)
    want_grads = torch.ops.vlfast.dropout_add_layer_norm_backward(grad.cpu(), x.cpu(), residual.cpu(), weight.cpu(),
                                                                  want[1], want[2], p, seed.cpu())
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.cpu(), w, **ONE_ROUNDING[g.dtype])


@pytest.mark.skipif(triton is None, reason="Triton not installed")
def test_triton_launcher_refuses_what_it_cannot_take():
    x, w, seed = torch.zeros(2, 8), torch.ones(8), torch.zeros(1, dtype=torch.int64)
    cases = [((x.double(), x.double(), w.double(), w.double()), seed, "no fp64"),
             ((torch.zeros(1, 16385), torch.zeros(1, 16385), torch.ones(16385), torch.ones(16385)), seed, "D <= 16384"),
             ((x.t(), x.t(), torch.ones(2), torch.ones(2)), seed, "contiguous"),
             ((x, x, w.half(), w.half()), seed, "residual's dtype"),
             ((torch.zeros(2, 0), torch.zeros(2, 0), torch.ones(0), torch.ones(0)), seed, "D >= 1"),
             ((x, x, w, w), seed.int(), "seed must be one int64")]
    for (x_, r_, w_, b_), s_, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            triton_forward(x_, r_, w_, b_, 0.1, 1e-5, s_)


@needs_extension
def test_gradcheck_and_opcheck():
    g = torch.Generator().manual_seed(4)
    x, residual = (torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    seed = torch.tensor([77])
    assert torch.autograd.gradcheck(lambda *t: torch.ops.vlfast.dropout_add_layer_norm(*t, 0.3, 1e-5, seed)[0],
                                    (x, residual, weight, bias))
    for args in [(x, residual, weight, bias, 0.3, 1e-5, seed), (x.float(), residual.float(), weight.float(), bias.float(), 0.0, 1e-12, seed),
                 (x.bfloat16(), residual.float(), weight.float(), bias.float(), 0.5, 1e-5, seed)]:
        torch.library.opcheck(torch.ops.vlfast.dropout_add_layer_norm.default, args)


@needs_extension
def test_a_second_derivative_raises_when_taken():
    """create_graph=True gives the same gradients, with a graph; differentiating through the
    backward kernel raises."""
    x, residual, weight, bias = make_inputs((3, 8), torch.float32, torch.float32, "cpu")
    out = torch.ops.vlfast.dropout_add_layer_norm(x, residual, weight, bias, 0.1, 1e-5, torch.tensor([5]))[0]
    plain = torch.autograd.grad((out * out).sum(), (x, residual), retain_graph=True)
    grad_x, grad_residual = torch.autograd.grad((out * out).sum(), (x, residual), create_graph=True)
    assert grad_x.requires_grad
    assert torch.equal(grad_x, plain[0]) and torch.equal(grad_residual, plain[1])
    with pytest.raises(NotImplementedError, match="dropout_add_layer_norm has no second derivative"):
        grad_x.sum().backward()


def bad_cases():
    x, w = torch.zeros(2, 3, 4), torch.ones(4)
    return [
        (([[0.0]], x, w, w, 0.1), {}, TypeError, "x must be a tensor, got list"),
        ((x.long(), x, w, w, 0.1), {}, TypeError, "x must be a float tensor, got torch.int64"),
        ((x, x[:, :2], w, w, 0.1), {}, ValueError, r"residual must have x's shape \(2, 3, 4\), got \(2, 2, 4\)"),
        ((x, x, torch.ones(5), w, 0.1), {}, ValueError, r"weight must be \(4,\), got \(5,\)"),
        ((x, x, w, torch.ones(1, 4), 0.1), {}, ValueError, r"bias must be \(4,\), got \(1, 4\)"),
        ((x, x, w, w, 1.5), {}, ValueError, r"p must be a float in \[0, 1\], got 1.5"),
        ((x, x, w, w, float("nan")), {}, ValueError, r"p must be a float in \[0, 1\], got nan"),
        ((x, x, w, w, "0.1"), {}, ValueError, r"p must be a float in \[0, 1\], got '0.1'"),
        ((x, x, w, w, 0.1), dict(eps=0.0), ValueError, "eps must be a finite positive float, got 0.0"),
        ((x, x, w, w, 0.1), dict(eps=float("inf")), ValueError, "eps must be a finite positive float, got inf"),
        ((x, x, w.long(), w, 0.1), {}, TypeError, "weight must be a float tensor, got torch.int64"),
        ((x, x, w, "0", 0.1), {}, TypeError, "bias must be a tensor, got str"),
        ((x, x, w, w.to("meta"), 0.1), {}, ValueError, "bias is on meta but x on cpu"),
        ((x, x.to("meta"), w, w, 0.1), {}, ValueError, "residual is on meta but x on cpu"),
        ((torch.zeros(2, 0), torch.zeros(2, 0), torch.ones(0), torch.ones(0), 0.1), {}, ValueError, "D >= 1"),
    ]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("args, kwargs, error, message", bad_cases())
def test_bad_inputs_name_the_argument(args, kwargs, error, message, backend, monkeypatch):
    monkeypatch.setenv("VLFAST_BACKEND", backend if _extension.LOAD_ERROR is None else "reference")
    with pytest.raises(error, match=message):
        dropout_add_layer_norm(*args, **kwargs)


@needs_extension
def test_empty_batch_and_p_one():
    x, residual = torch.zeros(0, 5, requires_grad=True), torch.zeros(0, 5)
    out = dropout_add_layer_norm(x, residual, torch.ones(5), torch.zeros(5), 0.1)
    out.sum().backward()
    assert out.shape == (0, 5) and x.grad.shape == (0, 5)
    x, residual = make_inputs((3, 8), torch.float32, torch.float32, "cpu")[:2]
    out = dropout_add_layer_norm(x, residual, torch.ones(8), torch.zeros(8), 1.0)  # everything dropped
    torch.testing.assert_close(out, F.layer_norm(residual, (8,), eps=1e-12))


def test_the_shared_seed_of_calls_that_drop_nothing_survives_inference_mode(monkeypatch):
    # calls with p = 0 share one seed tensor, made at the first such call: one made under
    # inference_mode would be an inference tensor, which a later training call cannot save for backward
    import sys

    module = sys.modules["vlfast.ops.residual_layer_norm"]
    monkeypatch.setattr(module, "_NO_SEED", {})
    x, weight, bias = torch.randn(3, 8), torch.ones(8), torch.zeros(8)
    with torch.inference_mode():
        module.dropout_add_layer_norm(x, x, weight, bias, 0.0)
    trained = x.clone().requires_grad_()
    module.dropout_add_layer_norm(trained, x, weight, bias, 0.0).sum().backward()
    assert trained.grad is not None and torch.isfinite(trained.grad).all()
