"""vlfast.ops.indexed_attention against its reference (the gathered copy into eager attention) in
float64: odd sizes, padded cache entries, repeated and unused entries, every gradient; on the CPU
kernel (torch's flash kernel per entry), the Triton kernels in the interpreter, and the paths
without a kernel; every float dtype, opcheck, torch.compile, and errors that name the argument."""
import pytest
import torch

from helpers import DEVICES, needs_extension
from vlfast import _extension
from vlfast.ops import attention_reference, indexed_attention, indexed_attention_reference
from vlfast.ops.padded_attention import triton, triton_backward, triton_forward

pytestmark = pytest.mark.usefixtures("poisoned_memory")  # conftest: NaN in every torch.empty

# "kernel": the schema's kernel (CPU: torch's flash kernel per entry; CUDA: Triton); "triton": the
# Triton kernels, in the interpreter on the CPU; "reference": VLFAST_BACKEND=reference.
needs_triton = pytest.mark.skipif(triton is None or _extension.LOAD_ERROR is not None,
                                  reason="Triton not installed or vlfast._C not built")
PATHS = [pytest.param("kernel", marks=needs_extension), pytest.param("triton", marks=needs_triton), "reference"]


@pytest.fixture
def path(request, monkeypatch):
    monkeypatch.setenv("VLFAST_BACKEND", {"kernel": "auto", "triton": "fused", "reference": "reference"}[request.param])
    runs = _extension.implementation("indexed_attention", "cuda" if torch.cuda.is_available() else "cpu")
    assert runs == {"kernel": "kernel", "triton": "kernel" if torch.cuda.is_available() else "interpreted",
                    "reference": "reference"}[request.param]  # the path the test is named for
    return request.param


def problem(pairs, entries, queries, keys, dim, heads=3, masked=True, seed=0, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(pairs, heads, queries, dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(entries, heads, keys, dim, generator=g, dtype=torch.float64) for _ in range(2))
    index = torch.randint(0, entries, (pairs,), generator=g)
    mask = None
    if masked:  # each entry keeps its first n keys, 1 <= n <= Lk, as padded captions or image crops
        lengths = torch.randint(1, keys + 1, (entries, 1), generator=g)
        mask = torch.arange(keys) < lengths
    return [x.to(device, dtype) for x in (q, k, v)], index.to(device), None if mask is None else mask.to(device)


def check(q, k, v, index, mask, tol, scale=None):
    """Output and the gradients of q, k and v against the reference on float64 copies."""
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    inputs64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    got = indexed_attention(*inputs, index, key_padding_mask=mask, scale=scale)
    want = indexed_attention_reference(*inputs64, index, key_padding_mask=mask, scale=scale)
    assert got.dtype == q.dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(q.device)
    got_grads = torch.autograd.grad(got, inputs, grad.to(got.dtype))
    want_grads = torch.autograd.grad(want, inputs64, grad)
    for name, g, w in zip("qkv", got_grads, want_grads):
        assert g.dtype == q.dtype, name
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * max(1.0, w.abs().max().item()), msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("pairs, entries, queries, keys, dim", [(1, 1, 1, 1, 16), (7, 3, 5, 11, 16), (9, 5, 17, 33, 24),
                                                                (4, 6, 30, 65, 64)])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_the_gathered_reference(device, path, pairs, entries, queries, keys, dim, masked):
    dtype = torch.float32 if path == "triton" else torch.float64  # Triton takes no fp64
    (q, k, v), index, mask = problem(pairs, entries, queries, keys, dim, masked=masked, device=device, dtype=dtype)
    check(q, k, v, index, mask, tol=2e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_repeated_unused_and_empty_entries(device, path):
    """Entry 0 read by four batches, entry 2 by none (its gradient is 0), entry 3's mask empty (its
    batches get 0 and zero gradients, as vlfast.ops.attention), a custom scale."""
    dtype = torch.float32 if path == "triton" else torch.float64
    (q, k, v), _, mask = problem(7, 4, 6, 9, 32, device=device, dtype=dtype, seed=3)
    index = torch.tensor([0, 3, 0, 1, 0, 3, 0], device=device)
    mask[3] = False
    check(q, k, v, index, mask, tol=2e-5 if dtype == torch.float32 else 1e-10, scale=0.3)
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    out = indexed_attention(*inputs, index, key_padding_mask=mask)
    assert (out[index == 3] == 0).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), inputs)
    assert (dk[2] == 0).all() and (dv[2] == 0).all() and (dk[3] == 0).all() and (dv[3] == 0).all()
    assert (dq[index == 3] == 0).all()
    int32 = indexed_attention(*inputs, index.int(), key_padding_mask=mask)  # an int32 index reads the same
    torch.testing.assert_close(int32, out, rtol=0, atol=0)


def test_equals_attention_on_repeated_copies():
    """What ALBEF's re-ranking computes: the image's tokens repeated for each of its texts."""
    (q, k, v), index, mask = problem(6, 2, 4, 10, 16, seed=5)
    repeated = attention_reference(q, k[index], v[index], key_padding_mask=mask[index])
    torch.testing.assert_close(indexed_attention(q, k, v, index, key_padding_mask=mask), repeated, rtol=1e-12, atol=1e-12)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_every_float_dtype(device, dtype, tol):
    (q, k, v), index, mask = problem(5, 3, 7, 13, 16, device=device, dtype=dtype, seed=6)
    check(q, k, v, index, mask, tol=tol)


@needs_triton
def test_triton_kernel_gives_nan_rows_for_an_index_out_of_range():
    """The GPU's kernel cannot raise without making the host wait: a batch reading no entry gets NaN."""
    (q, k, v), _, _ = problem(3, 2, 4, 5, 16, masked=False, dtype=torch.float32)
    for bad in (2, -1):
        index = torch.tensor([0, bad, 1])
        out, lse = triton_forward(q, k, v, None, 0.25, index)
        assert out[1].isnan().all() and not out[[0, 2]].isnan().any()
        grad = torch.ones_like(out)
        grad[1] = 0  # a loss that leaves the bad rows out
        dq, dk, dv = triton_backward(grad, q, k, v, None, out, lse, 0.25, index)
        assert (dq[1] == 0).all() and not any(x.isnan().any() for x in (dq, dk, dv))  # its queries get no gradient


@needs_extension
def test_opcheck():
    (q, k, v), index, mask = problem(5, 3, 4, 7, 16, seed=7)
    for args in [(q, k, v, index, mask, 0.25), (q, k, v, index, None, 0.5)]:
        args = [x.requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args]
        torch.library.opcheck(torch.ops.vlfast.indexed_attention.default, args)


@needs_extension
def test_compiles_without_a_graph_break():
    (q, k, v), index, mask = problem(5, 3, 4, 7, 16, seed=8, dtype=torch.float32)
    function = lambda q, k, v: indexed_attention(q, k, v, index, key_padding_mask=mask)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(function, backend="aot_eager", fullgraph=True)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    got, want = compiled(*inputs), function(*inputs)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), inputs))


@needs_extension
def test_second_derivative_raises():
    (q, k, v), index, mask = problem(3, 2, 4, 5, 16, seed=9)
    q.requires_grad_()
    out = indexed_attention(q, k, v, index, key_padding_mask=mask)
    (grad,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="indexed_attention has no second derivative"):
        grad.sum().backward()


def bad_cases():
    (q, k, v), index, mask = problem(4, 3, 5, 6, 16, seed=10)
    return [
        (dict(index=torch.tensor([0, 1, 3, 2])), IndexError, r"index holds 3, outside the cache's entries \[0, 3\)"),
        (dict(index=torch.tensor([0, -1, 1, 2])), IndexError, r"index holds -1"),
        (dict(index=index.double()), TypeError, "index must be an int64 or int32 tensor, got torch.float64"),
        (dict(index=[0, 1, 2, 0]), TypeError, "index must be an int64 or int32 tensor, got list"),
        (dict(index=index[:3]), ValueError, r"index must have shape \(P=4,\)"),
        (dict(index=index.to("meta")), ValueError, "index is on meta but q on cpu"),
        (dict(k=k[:, :2]), ValueError, r"k must be \(I >= 1, H=3, Lk, Dh=16\)"),
        (dict(v=v[:2]), ValueError, "v must have k's shape"),
        (dict(k=k.float()), TypeError, "k must be a float tensor of q's dtype"),
        (dict(key_padding_mask=mask[:2]), ValueError, r"key_padding_mask must be \(I=3, Lk=6\)"),
        (dict(key_padding_mask=mask.double()), TypeError, "key_padding_mask must be bool or 0/1 integers"),
        (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
    ], dict(q=q, k=k, v=v, index=index, key_padding_mask=mask)


@pytest.mark.parametrize("case", range(len(bad_cases()[0])))
def test_bad_inputs_are_named(case):
    cases, good = bad_cases()
    change, error, message = cases[case]
    arguments = {**good, **change}
    with pytest.raises(error, match=message):
        indexed_attention(arguments.pop("q"), arguments.pop("k"), arguments.pop("v"), arguments.pop("index"), **arguments)
