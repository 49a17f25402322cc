import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import CUDA, DEVICES, chi_square_quantile
from vlfast import _extension
from vlfast.ops import contrastive, itc_loss, itc_loss_reference

pytestmark = pytest.mark.usefixtures("poisoned_memory")  # conftest: NaN in every torch.empty

# The Triton kernels register with vlfast._C's schemas: without it they do not run.
has_triton = contrastive.triton is not None and _extension.LOAD_ERROR is None
needs_triton = pytest.mark.skipif(not has_triton, reason="Triton not installed or vlfast._C not built")
# "torch": the vectorised path the CPU runs; "triton": the kernels (interpreted on the CPU).
PATHS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.fixture
def path(request, monkeypatch):
    monkeypatch.setenv("VLFAST_BACKEND", "fused" if request.param == "triton" else "auto")
    return request.param


def run_on(path, device):
    if path == "torch" and device == "cuda":
        pytest.skip("the torch path is the CPU's")


def features(batch, dim, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=1)
    return image.to(device, dtype).requires_grad_(), text.to(device, dtype).requires_grad_()


# Against fp64 on the same rounded inputs: the loss is computed in fp32 at least, so what is left is
# the gradients' own rounding to the input dtype (worst seen: 7e-4 of the largest in fp16, 3.4e-3 in bf16).
TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
# D beyond one chunk of the kernels (1 KiB per row: fp64 128, fp32 256, 16-bit 512) is summed in chunks
@pytest.mark.parametrize("batch, dim", [(1, 5), (3, 5), (7, 12), (33, 64), (70, 256), (9, 300), (5, 600)])
@pytest.mark.parametrize("with_ids", [False, True])
def test_loss_and_gradients_equal_the_reference(device, path, dtype, batch, dim, with_ids):
    run_on(path, device)
    if path == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter mis-computes bf16 dots (docs/design.md): bf16 is checked on a GPU")
    image, text = features(batch, dim, dtype, device, seed=batch)
    image_ids = torch.arange(batch, device=device) % max(1, batch // 2) if with_ids else None
    tau = torch.tensor(0.07, dtype=torch.float64, device=device, requires_grad=True)
    got = itc_loss(image, text, tau, image_ids=image_ids, sample_negatives=False)
    image64, text64 = (x.detach().double().requires_grad_() for x in (image, text))
    want = itc_loss_reference(image64, text64, tau, image_ids=image_ids, sample_negatives=False)
    tol = TOLERANCE[dtype]
    for name in ("loss", "loss_i2t", "loss_t2i"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(want, name), rtol=tol, atol=tol, msg=name)
    got_grads = torch.autograd.grad(got.loss, (image, text, tau))
    want_grads = torch.autograd.grad(want.loss, (image64, text64, tau))
    for name, g, w in zip(("image", "text", "temperature"), got_grads, want_grads):
        # atol relative to the largest gradient: the gradients here are at most 0.2, so a fixed
        # 16-bit atol would pass a zero gradient.
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * w.abs().max().item(), msg=name)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_ids", [False, True])
def test_gathered_keys_rectangular(device, with_ids):
    # The kernels see B local queries against N = 3B gathered keys, row b's positive at offset + b.
    batch, keys, dim, offset = 5, 15, 9, 5
    query, key = (x.detach() for x in features(keys, dim, torch.float64, device, seed=1))
    query = query[:batch].clone().requires_grad_()
    key = key.clone().requires_grad_()
    tau = torch.tensor(0.2, dtype=torch.float64, device=device, requires_grad=True)
    key_ids = (torch.arange(keys, device=device) % 4) if with_ids else None
    query_ids = key_ids[offset:offset + batch] if with_ids else None
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    rows, negative, _, npos = torch.ops.vlfast.itc_loss_rows(query, key, tau, query_ids, key_ids, offset, seed, 0.0, True)

    # Written out here, not vlfast's _positives: the torch path shares that helper with the reference.
    positives = torch.zeros(batch, keys, dtype=torch.bool, device=device)
    positives[torch.arange(batch), offset + torch.arange(batch)] = True
    if with_ids:
        positives |= query_ids[:, None] == key_ids[None, :]
    log_p = F.log_softmax(query @ key.t() / tau, dim=1)
    want = -(log_p * positives).sum(1) / positives.sum(1)
    torch.testing.assert_close(rows, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(npos, positives.sum(1).int())
    assert not positives.gather(1, negative[:, None]).any()
    weights = torch.rand(batch, dtype=torch.float64, device=device)
    got = torch.autograd.grad((rows * weights).sum(), (query, key, tau))
    expected = torch.autograd.grad((want * weights).sum(), (query, key, tau))
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda q, k, t: torch.ops.vlfast.itc_loss_rows(q, k, t, query_ids, key_ids, offset, seed, 0.0, False)[0],
        (query, key, tau))


def draw_negatives(path, query, key, tau, query_ids, key_ids, smoothing, draws, seed):
    """`draws` independent negatives for one query row: the row repeated, one pass."""
    queries = query.expand(draws, -1).contiguous()
    ids = query_ids.expand(draws).contiguous()
    generator = torch.Generator(query.device).manual_seed(seed)
    if path == "triton":
        seeds = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=query.device)
        return torch.ops.vlfast.itc_loss_rows(queries, key, tau, ids, key_ids, 0, seeds, smoothing, True)[1]
    positives = ids[:, None] == key_ids[None, :]
    return contrastive._rows_torch(queries @ key.t() / tau, positives, smoothing, True, generator)[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_negatives_follow_the_reference_weights(device, path, smoothing):
    run_on(path, device)
    keys, dim, draws = 9, 6, 6000
    _, key = (x.detach() for x in features(keys, dim, torch.float64, device, seed=2))
    query = key[:1] + 0.1
    key_ids = torch.tensor([0, 1, 2, 0, 3, 4, 5, 6, 7], device=device)  # two positives of id 0
    tau = torch.tensor(0.5, dtype=torch.float64, device=device)
    negative = draw_negatives(path, query, key, tau, key_ids[:1], key_ids, smoothing, draws, seed=3)

    counts = torch.bincount(negative, minlength=keys).double()
    assert counts[key_ids == 0].sum() == 0, "a positive was drawn"
    negatives = key_ids != 0

    def chi2(smoothing):  # against ALBEF/BLIP's weights: softmax + smoothing, positives zeroed, renormalised
        weights = F.softmax(query @ key.t() / tau, dim=1)[0] + smoothing
        weights[key_ids == 0] = 0
        expected = draws * weights / weights.sum()
        return ((counts[negatives] - expected[negatives]) ** 2 / expected[negatives]).sum().item()

    quantile = chi_square_quantile(int(negatives.sum()) - 1)
    assert chi2(smoothing) < quantile, (chi2(smoothing), counts)
    if smoothing:  # and the draws tell the smoothing apart
        assert chi2(0.0) > quantile, (chi2(0.0), counts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_sampling_is_reproducible_in_range_and_never_positive(device, path):
    run_on(path, device)
    image, text = features(12, 8, torch.float32, device, seed=4)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 7], device=device)
    runs = [itc_loss(image, text, 0.1, image_ids=ids, smoothing=1e-4, generator=torch.Generator(device).manual_seed(5))
            for _ in range(2)]
    assert torch.equal(runs[0].neg_text_idx, runs[1].neg_text_idx)
    assert torch.equal(runs[0].neg_image_idx, runs[1].neg_image_idx)
    for negative in (runs[0].neg_text_idx, runs[0].neg_image_idx):
        assert negative.dtype == torch.int64 and negative.shape == (12,)
        assert ((negative >= 0) & (negative < 12)).all()
        assert (ids[negative] != ids).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_negatives_when_the_positive_takes_all_the_mass(device, path):
    # τ = 0.001 on well-separated pairs: every negative's softmax underflows to 0 in fp32, where
    # ALBEF's torch.multinomial raises; the draw still returns a negative.
    run_on(path, device)
    image = torch.eye(6, 8, device=device)
    out = itc_loss(image, image.clone(), 0.001, generator=torch.Generator(device).manual_seed(6))
    for negative in (out.neg_text_idx, out.neg_image_idx):
        assert (negative != torch.arange(6, device=device)).all()
    if device == "cpu":  # on CUDA, multinomial's failure is a device-side assert: it would end the process's CUDA context
        with pytest.raises(RuntimeError):
            itc_loss_reference(image, image.clone(), 0.001)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_nan_features_give_a_nan_loss_and_indices_in_range(device, path):
    # Diverged weights: the step must end with a NaN loss for the trainer to report, not an
    # out-of-range index that fails in the ITM gather.
    run_on(path, device)
    image, text = features(6, 8, torch.float32, device, seed=7)
    image = image.detach().index_fill(0, torch.tensor([2], device=device), float("nan"))
    out = itc_loss(image, text, 0.1, generator=torch.Generator(device).manual_seed(7))
    assert out.loss.isnan()
    for negative in (out.neg_text_idx, out.neg_image_idx):
        assert ((negative >= 0) & (negative < 6)).all(), negative


def bad_cases():
    x = torch.zeros(4, 8)
    return [
        (dict(image_feat=torch.zeros(4)), ValueError, r"image_feat must be \(B, D\) with B, D >= 1, got shape \(4,\)"),
        (dict(image_feat=torch.zeros(0, 8), text_feat=torch.zeros(0, 8)), ValueError, r"image_feat must be \(B, D\) with B, D >= 1"),
        (dict(text_feat=torch.zeros(5, 8)), ValueError, r"text_feat has shape \(5, 8\) but image_feat has \(4, 8\)"),
        (dict(text_feat=x.double()), TypeError, "text_feat is torch.float64 but image_feat is torch.float32"),
        (dict(image_feat=x.long()), TypeError, "image_feat must be a float tensor"),
        (dict(text_feat=x.to("meta")), ValueError, "text_feat is on meta"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite float > 0, got 0.0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite float > 0, got nan"),
        (dict(temperature=torch.tensor(-1.0)), RuntimeError, "temperature must be > 0"),
        (dict(temperature=torch.tensor(float("nan"))), RuntimeError, "temperature must be > 0"),
        (dict(temperature=torch.ones(2)), ValueError, "temperature must be a float or a 0-d float tensor"),
        (dict(temperature="hot"), TypeError, "temperature must be a float or a 0-d tensor, got str"),
        (dict(image_ids=torch.zeros(3, dtype=torch.int64)), ValueError, r"image_ids must have shape \(4,\), got \(3,\)"),
        (dict(image_ids=torch.zeros(4)), TypeError, "image_ids must be an int64 or int32 tensor"),
        (dict(smoothing=-1e-4), ValueError, "smoothing must be a finite float >= 0"),
        (dict(smoothing=float("nan")), ValueError, "smoothing must be a finite float >= 0, got nan"),
        (dict(image_feat=[[0.0] * 8] * 4), TypeError, "image_feat must be a tensor, got list"),
        (dict(temperature=float("inf")), ValueError, "temperature must be a finite float > 0, got inf"),
        (dict(temperature=torch.tensor(0.1, device="meta")), ValueError, "temperature is on meta but the features on cpu"),
        (dict(image_ids=torch.zeros(4, dtype=torch.int64, device="meta")), ValueError,
         "image_ids is on meta but the features on cpu"),
        (dict(image_ids=torch.zeros(4, dtype=torch.int64)), ValueError, "no hard negative to sample"),
        (dict(image_feat=torch.ones(1, 8), text_feat=torch.ones(1, 8)), ValueError, "no hard negative to sample"),
        (dict(all_gather=True), ValueError, "all_gather=True needs torch.distributed initialised"),
        (dict(image_feat=x.to("meta"), text_feat=x.to("meta"), temperature=0.1, generator=torch.Generator()),
         ValueError, "generator is on cpu but the features on meta"),
    ]


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("kwargs, error, message", bad_cases())
def test_bad_inputs(path, kwargs, error, message):
    arguments = dict(image_feat=torch.randn(4, 8), text_feat=torch.randn(4, 8), temperature=0.1)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        itc_loss(arguments.pop("image_feat"), arguments.pop("text_feat"), arguments.pop("temperature"), **arguments)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    query, key = (x.detach().float().requires_grad_() for x in features(6, 16, torch.float32, device, seed=7))
    tau = torch.tensor(0.1, device=device, requires_grad=True)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    ids = torch.tensor([0, 1, 0, 2, 3, 3], device=device)
    for args in [(query, key, tau, None, None, 0, seed, 0.0, True), (query, key, tau, ids, ids, 0, seed, 1e-4, True)]:
        torch.library.opcheck(torch.ops.vlfast.itc_loss_rows.default, args)
    _, _, lse, npos = torch.ops.vlfast.itc_loss_rows(query, key, tau, ids, ids, 0, seed, 0.0, False)
    grad = torch.rand(6, device=device)
    # No second derivative (double backward raises): the backward op is checked on plain tensors.
    plain = [x.detach() for x in (query, key, tau)]
    torch.library.opcheck(torch.ops.vlfast.itc_loss_rows_backward.default, (grad, *plain, ids, ids, 0, lse, npos))


def _distributed_worker(rank, world, init_file, backend, batch, result_dir):
    os.environ["VLFAST_BACKEND"] = backend
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    inputs, projection, tau, image_ids = _distributed_problem(world * batch)
    rows = slice(rank * batch, (rank + 1) * batch)
    image, text = (x[rows] @ projection for x in inputs)
    out = itc_loss(image, text, tau, image_ids=image_ids[rows], all_gather=True, sample_negatives=False)
    out.loss.backward()
    for parameter in (projection, tau):  # what DDP does: average the gradients over ranks
        torch.distributed.all_reduce(parameter.grad)
        parameter.grad /= world
    torch.distributed.all_reduce(out.loss.detach_())
    torch.save({"loss": out.loss / world, "projection": projection.grad, "tau": tau.grad}, f"{result_dir}/{rank}.pt")
    torch.distributed.barrier()  # no rank tears its connections down while the other still uses them
    torch.distributed.destroy_process_group()


def _distributed_problem(total):
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(total, 10, generator=g, dtype=torch.float64) for _ in range(2)]
    projection = torch.randn(10, 6, generator=g, dtype=torch.float64).requires_grad_()
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    image_ids = torch.arange(total) % (total - 2)  # two ids repeat across the ranks
    return inputs, projection, tau, image_ids


@pytest.mark.parametrize("backend", ["auto", pytest.param("fused", marks=needs_triton)])
def test_all_gather_over_two_ranks_equals_one_process(backend, monkeypatch):
    world, batch = 2, 5
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_distributed_worker, args=(world, f"{tmp}/init", backend, batch, tmp), nprocs=world)
        results = [torch.load(f"{tmp}/{rank}.pt") for rank in range(world)]
    monkeypatch.setenv("VLFAST_BACKEND", backend)
    inputs, projection, tau, image_ids = _distributed_problem(world * batch)
    image, text = (x @ projection for x in inputs)
    out = itc_loss(image, text, tau, image_ids=image_ids, sample_negatives=False)
    out.loss.backward()
    for result in results:
        torch.testing.assert_close(result["loss"], out.loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result["projection"], projection.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result["tau"], tau.grad, rtol=1e-10, atol=1e-12)


@needs_triton
@pytest.mark.skipif(CUDA, reason="with a GPU the kernels compile and run in the other tests")
def test_triton_kernels_compile_for_sm80_and_sm90():
    # The interpreter never compiles; Triton's own ptxas builds real cubins without a GPU.
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    result = subprocess.run([sys.executable, "tests/compile_kernels_for_gpu.py"], cwd=root, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.splitlines() == ["sm_80: ok", "sm_90: ok"]
