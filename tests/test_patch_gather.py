import pytest
import torch

from helpers import DEVICES, chi_square_quantile, needs_extension
from vlfast import _extension
from vlfast.ops import random_masking, random_masking_reference, unmask, unmask_reference

pytestmark = pytest.mark.usefixtures("poisoned_memory")  # conftest: NaN in every torch.empty

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (B, N, D): B = 1, odd N, D not a multiple of 8, and the ViT-B/16 patch grid.
SHAPES = [(1, 7, 5), (3, 13, 24), (2, 49, 12), (4, 196, 64)]
exact = dict(rtol=0, atol=0)


def seeded(device, seed):
    return torch.Generator(device).manual_seed(seed)


def make_inputs(shape, dtype, device, pos, seed):
    batch, patches, dim = shape
    g = seeded("cpu", seed)
    tokens = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    pos_shape = {"none": None, "shared": (1, patches, dim), "per_sample": (batch, patches, dim)}[pos]
    pos_embed = None if pos_shape is None else torch.randn(pos_shape, generator=g).to(device, dtype).requires_grad_()
    return tokens, pos_embed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pos", ["none", "shared", "per_sample"])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.0])
def test_random_masking_equals_mae_forward_and_backward(device, dtype, shape, pos, mask_ratio):
    tokens, pos_embed = make_inputs(shape, dtype, device, pos, seed=0)
    got = random_masking(tokens, mask_ratio, pos_embed=pos_embed, generator=seeded(device, 1))
    want = random_masking_reference(tokens, mask_ratio, pos_embed=pos_embed, generator=seeded(device, 1))
    for name in got._fields:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **exact, msg=name)

    grad = torch.randn(got.visible.shape, generator=seeded("cpu", 2)).to(device, dtype)
    inputs = [tokens] + ([pos_embed] if pos_embed is not None else [])
    got_grads = torch.autograd.grad(got.visible, inputs, grad)
    want_grads = torch.autograd.grad(want.visible, inputs, grad)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, **exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pos", ["none", "shared", "per_sample"])
def test_unmask_equals_mae_forward_and_backward(device, dtype, shape, pos):
    batch, patches, dim = shape
    kept = max(1, patches // 4)
    g = seeded("cpu", 3)
    ids_restore = torch.stack([torch.randperm(patches, generator=g) for _ in range(batch)]).to(device)
    visible = torch.randn(batch, kept, dim, generator=g).to(device, dtype).requires_grad_()
    mask_token = torch.randn(1, 1, dim, generator=g).to(device, dtype).requires_grad_()
    _, pos_embed = make_inputs(shape, dtype, device, pos, seed=4)

    got = unmask(visible, ids_restore, mask_token, pos_embed=pos_embed)
    want = unmask_reference(visible, ids_restore, mask_token, pos_embed=pos_embed)
    torch.testing.assert_close(got, want, **exact)

    grad = torch.randn(shape, generator=g).to(device, dtype)
    inputs = [visible, mask_token] + ([pos_embed] if pos_embed is not None else [])
    got_grads = torch.autograd.grad(got, inputs, grad)
    want_grads = torch.autograd.grad(want, inputs, grad)
    torch.testing.assert_close(got_grads[0], want_grads[0], **exact)
    # The mask token's gradient is a sum over the masked positions, reduced in another order.
    torch.testing.assert_close(got_grads[1], want_grads[1], rtol=1e-5 if dtype.itemsize >= 4 else 2e-2, atol=1e-5)
    for got_grad, want_grad in zip(got_grads[2:], want_grads[2:]):
        torch.testing.assert_close(got_grad, want_grad, **exact)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_promote_like_torch(device):
    tokens, _ = make_inputs((2, 13, 24), torch.bfloat16, device, "none", seed=5)
    pos_embed = torch.randn(1, 13, 24, device=device, requires_grad=True)
    got = random_masking(tokens, 0.5, pos_embed=pos_embed, generator=seeded(device, 6))
    want = random_masking_reference(tokens, 0.5, pos_embed=pos_embed, generator=seeded(device, 6))
    assert got.visible.dtype == torch.float32
    torch.testing.assert_close(got.visible, want.visible, **exact)
    mask_token = torch.zeros(1, 1, 24, device=device, requires_grad=True)
    restored = unmask(got.visible.bfloat16(), got.ids_restore, mask_token)
    assert restored.dtype == torch.float32
    torch.testing.assert_close(restored, unmask_reference(got.visible.bfloat16(), got.ids_restore, mask_token), **exact)
    restored.sum().backward()
    assert mask_token.grad.dtype == torch.float32 and mask_token.grad.eq(2 * 7).all()  # 7 of 13 masked, B = 2
    assert tokens.grad.dtype == torch.bfloat16
    torch.testing.assert_close(tokens.grad, (1 - got.mask)[..., None].expand(2, 13, 24).bfloat16(), **exact)


@pytest.mark.parametrize("device", DEVICES)
def test_masking_outputs_are_consistent_and_round_trip(device):
    batch, patches, dim = 5, 49, 12
    tokens = torch.randn(batch, patches, dim, device=device)
    m = random_masking(tokens, 0.75, generator=seeded(device, 7))
    kept = int(patches * 0.25)
    assert m.visible.shape == (batch, kept, dim) and m.ids_keep.shape == (batch, kept)
    assert m.mask.dtype == torch.float32 and m.mask.sum(1).eq(patches - kept).all()
    torch.testing.assert_close(m.mask, (m.ids_restore >= kept).float(), **exact)
    arange = torch.arange(kept, device=device).expand(batch, kept)
    torch.testing.assert_close(torch.gather(m.ids_restore, 1, m.ids_keep), arange, **exact)
    torch.testing.assert_close(torch.sort(m.ids_restore, dim=1).values,
                               torch.arange(patches, device=device).expand(batch, patches), **exact)
    token = torch.full((dim,), -7.0, device=device)
    restored = unmask(m.visible, m.ids_restore, token)
    masked = m.mask.bool()
    torch.testing.assert_close(restored[~masked], tokens[~masked], **exact)
    assert restored[masked].eq(-7.0).all()


def test_kept_sets_are_uniform():
    # 6 patches, keep 2: all 15 subsets should come up equally often. Chi-square with 14 degrees
    # of freedom against its 1 - 1e-6 quantile; the seed is fixed.
    samples, patches = 30_000, 6
    tokens = torch.zeros(samples, patches, 1)
    m = random_masking(tokens, 4 / 6, generator=seeded("cpu", 8))
    assert m.ids_keep.shape == (samples, 2)
    first, second = m.ids_keep.sort(dim=1).values.unbind(1)
    counts = torch.bincount(first * patches + second, minlength=patches * patches).double()
    subsets = counts[counts > 0]
    assert len(subsets) == 15
    expected = samples / 15
    chi2 = ((subsets - expected) ** 2 / expected).sum().item()
    assert chi2 < chi_square_quantile(14), chi2
    position_counts = torch.bincount(m.ids_keep.flatten(), minlength=patches).double()
    assert (position_counts / (samples * 2 / patches) - 1).abs().max() < 0.03


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    g = seeded("cpu", 9)
    tokens = torch.randn(2, 9, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    pos_embed = torch.randn(1, 9, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    ids_keep = torch.stack([torch.randperm(9, generator=g)[:4] for _ in range(2)]).to(device)
    assert torch.autograd.gradcheck(torch.ops.vlfast.random_masking, (tokens, pos_embed, ids_keep))
    ids_restore = torch.stack([torch.randperm(9, generator=g) for _ in range(2)]).to(device)
    visible = tokens[:, :4].detach().contiguous().requires_grad_()
    fill = torch.randn(5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    pos_per_sample = torch.randn(2, 9, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(torch.ops.vlfast.unmask, (visible, ids_restore, fill, pos_per_sample))
    assert torch.autograd.gradgradcheck(torch.ops.vlfast.unmask, (visible, ids_restore, fill, pos_embed))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_what_cuda_autocast_feeds(device):
    """Under a GPU's autocast the patch embedding (a convolution) gives bf16 tokens, the position
    embedding stays an fp32 parameter, and the encoder's output after its LayerNorm is fp32 (CPU
    autocast gives bf16 for all three): MAE's add promotes, so do the ops."""
    tokens, _ = make_inputs((3, 13, 24), torch.bfloat16, device, "none", seed=11)
    _, pos_embed = make_inputs((3, 13, 24), torch.float32, device, "shared", seed=12)
    got = random_masking(tokens, 0.75, pos_embed=pos_embed, generator=seeded(device, 1))
    want = random_masking_reference(tokens, 0.75, pos_embed=pos_embed, generator=seeded(device, 1))
    assert got.visible.dtype == want.visible.dtype == torch.float32
    torch.testing.assert_close(got.visible, want.visible, **exact)
    got_grads = torch.autograd.grad(got.visible.square().sum(), (tokens, pos_embed))
    want_grads = torch.autograd.grad(want.visible.square().sum(), (tokens, pos_embed))
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert got_grad.dtype == want_grad.dtype
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = seeded("cpu", 10)
    tokens = torch.randn(3, 11, 6, generator=g).to(device).requires_grad_()
    pos_embed = torch.randn(1, 11, 6, generator=g).to(device).requires_grad_()
    ids_keep = torch.stack([torch.randperm(11, generator=g)[:5] for _ in range(3)]).to(device)
    ids_restore = torch.stack([torch.randperm(11, generator=g) for _ in range(3)]).to(device)
    visible = torch.randn(3, 5, 6, generator=g).to(device, torch.bfloat16).requires_grad_()
    fill = torch.randn(6, generator=g).to(device).requires_grad_()
    for args in [(tokens, pos_embed, ids_keep), (tokens, None, ids_keep), (tokens.half(), pos_embed, ids_keep)]:
        torch.library.opcheck(torch.ops.vlfast.random_masking.default, args)
    for args in [(visible, ids_restore, fill, pos_embed), (visible, ids_restore, None, None),
                 (tokens[:, :5].contiguous(), ids_restore, fill, None)]:
        torch.library.opcheck(torch.ops.vlfast.unmask.default, args)


@needs_extension
def test_torch_compile_traces_masking_and_unmask():
    def step(tokens, pos_embed, mask_token, ids_keep, ids_restore):
        visible = torch.ops.vlfast.random_masking(tokens, pos_embed, ids_keep)
        return torch.ops.vlfast.unmask(visible * 2, ids_restore, mask_token, None).square().sum()

    tokens = torch.randn(2, 9, 8, requires_grad=True)
    pos_embed = torch.randn(1, 9, 8)
    mask_token = torch.randn(8, requires_grad=True)
    m = random_masking(tokens.detach(), 0.5, generator=seeded("cpu", 11))
    args = (tokens, pos_embed, mask_token, m.ids_keep, m.ids_restore)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*args), (tokens, mask_token))
    want = torch.autograd.grad(step(*args), (tokens, mask_token))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def bad_masking_cases():
    tokens = torch.zeros(2, 9, 4)
    return [
        (torch.zeros(9, 4), 0.5, {}, ValueError, r"tokens must be \(B, N, D\), got shape \(9, 4\)"),
        (tokens.long(), 0.5, {}, TypeError, "tokens must be a float tensor"),
        ([[0.0]], 0.5, {}, TypeError, "tokens must be a tensor, got list"),
        (tokens, 1.0, {}, ValueError, r"mask_ratio must be in \[0, 1\), got 1.0"),
        (tokens, -0.1, {}, ValueError, r"mask_ratio must be in \[0, 1\)"),
        (tokens, float("nan"), {}, ValueError, r"mask_ratio must be in \[0, 1\), got nan"),
        (tokens, "0.5", {}, TypeError, "mask_ratio must be a float, got str"),
        (tokens, 0.5, dict(pos_embed=torch.zeros(1, 8, 4)), ValueError, r"pos_embed must be \(1, 9, 4\) or \(2, 9, 4\), got \(1, 8, 4\)"),
        (tokens, 0.5, dict(pos_embed=torch.zeros(3, 9, 4)), ValueError, "pos_embed must be"),
        (tokens, 0.5, dict(pos_embed=torch.zeros(9, 4)), ValueError, "pos_embed must be"),
        (tokens, 0.5, dict(pos_embed=torch.zeros(1, 9, 4, device="meta")), ValueError, "pos_embed is on meta"),
        (tokens.to("meta"), 0.5, dict(generator=torch.Generator()), ValueError, "generator is on cpu, tokens on meta"),
    ]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("tokens, mask_ratio, kwargs, error, message", bad_masking_cases())
def test_random_masking_bad_inputs(tokens, mask_ratio, kwargs, error, message, backend, monkeypatch):
    monkeypatch.setenv("VLFAST_BACKEND", backend if _extension.LOAD_ERROR is None else "reference")
    with pytest.raises(error, match=message):
        random_masking(tokens, mask_ratio, **kwargs)


def bad_unmask_cases():
    visible, ids, token = torch.zeros(2, 3, 4), torch.stack([torch.randperm(9), torch.randperm(9)]), torch.zeros(1, 1, 4)
    return [
        (torch.zeros(3, 4), ids, token, {}, ValueError, r"visible must be \(B, N, D\)"),
        (visible, ids.int(), token, {}, TypeError, "ids_restore must be an int64 tensor, got torch.int32"),
        (visible, ids[:, :2], token, {}, ValueError, r"ids_restore must be \(B=2, N >= L=3\), got \(2, 2\)"),
        (visible, ids[:1], token, {}, ValueError, r"ids_restore must be \(B=2"),
        (visible, ids[0], token, {}, ValueError, r"ids_restore must be \(B=2"),
        (visible, ids, torch.zeros(1, 1, 5), {}, ValueError, r"mask_token must be \(1, 1, 4\) or \(4,\)"),
        (visible, ids, token.long(), {}, TypeError, "mask_token must be a float tensor, got torch.int64"),
        (visible, ids, token.to("meta"), {}, ValueError, "mask_token is on meta, visible on cpu"),
        (visible.long(), ids, token, {}, TypeError, "visible must be a float tensor, got torch.int64"),
        (visible, ids.to("meta"), token, {}, ValueError, "ids_restore is on meta, visible on cpu"),
        (visible, ids, token, dict(pos_embed=torch.zeros(1, 3, 4)), ValueError, r"pos_embed must be \(1, 9, 4\)"),
        (visible, ids, token, dict(pos_embed=torch.zeros(1, 9, 4, dtype=torch.int64)), TypeError,
         "pos_embed must be a float tensor, got torch.int64"),
    ]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("visible, ids_restore, mask_token, kwargs, error, message", bad_unmask_cases())
def test_unmask_bad_inputs(visible, ids_restore, mask_token, kwargs, error, message, backend, monkeypatch):
    monkeypatch.setenv("VLFAST_BACKEND", backend if _extension.LOAD_ERROR is None else "reference")
    with pytest.raises(error, match=message):
        unmask(visible, ids_restore, mask_token, **kwargs)


@needs_extension
def test_out_of_range_ids_raise_on_cpu():
    visible, token = torch.zeros(1, 2, 4), torch.zeros(4)
    with pytest.raises(IndexError, match=r"ids_restore holds 9, outside \[0, 5\)"):
        unmask(visible, torch.tensor([[0, 1, 2, 3, 9]]), token)
    with pytest.raises(IndexError, match=r"index holds -1, outside \[0, 5\)"):
        torch.ops.vlfast.random_masking(torch.zeros(1, 5, 4), None, torch.tensor([[0, -1]]))


@pytest.mark.cuda
def test_out_of_range_ids_give_nan_rows_on_gpu():
    visible, token = torch.ones(1, 2, 4, device="cuda"), torch.zeros(4, device="cuda")
    out = unmask(visible, torch.tensor([[0, 1, 2, 3, 9]], device="cuda"), token)
    assert out[0, 4].isnan().all() and not out[0, :4].isnan().any()
