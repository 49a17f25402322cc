"""Every op on every path this machine runs (the C++ kernels, the Triton kernels in the
interpreter, the torch paths) takes strided and non-contiguous inputs as users hand them over
(a column of a wider matrix, a transpose, ALBEF's (D, Q) queue buffers transposed, an id column of
a table) and gives what it gives on contiguous copies of them; and no op builds a tensor from host
data on a call (a blocking copy on a GPU, and illegal in a CUDA graph's capture)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import needs_extension
from vlfast import _extension
from vlfast.ops import (attention, dropout_add_layer_norm, ema_update_, indexed_attention, itc_loss, momentum_itc_loss,
                        random_masking, unmask)

# auto: the C++ kernels and torch paths; fused: the Triton kernels too, under the interpreter
# (conftest sets TRITON_INTERPRET=1 without a GPU); reference: the plain-torch references.
BACKENDS = ["auto", "fused", "reference"]


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values, every dimension strided: a view into a larger buffer, every other element."""
    wide = torch.zeros(*(2 * n for n in x.shape), dtype=x.dtype)
    view = wide[tuple(slice(None, None, 2) for _ in x.shape)]
    view.copy_(x)
    assert x.ndim == 0 or not view.is_contiguous()
    return view


def transposed(x: torch.Tensor) -> torch.Tensor:
    """The same values as the transpose of a contiguous (D, N) buffer, as ALBEF's queues are held."""
    return x.t().contiguous().t()


def unit(rows, dim, seed):
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
                       dim=1).float()


def run_itc(make):
    image, text = unit(9, 20, 0), unit(9, 20, 1)
    ids = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5, 6])
    image, text = make(image).requires_grad_(), make(text).requires_grad_()
    out = itc_loss(image, text, 0.07, image_ids=make(ids), sample_negatives=False)
    return (out.loss, *torch.autograd.grad(out.loss, (image, text)))


def run_momentum_itc(make):
    image, text, image_m, text_m = (unit(6, 16, seed) for seed in range(4))
    queues = unit(11, 16, 4), unit(11, 16, 5)
    ids, id_queue = torch.tensor([0, 1, 2, 0, 3, 4]), torch.tensor([1, 7, 8, 2, 9, 3, 4, 5, 6, 0, 7])
    image, text = make(image).requires_grad_(), make(text).requires_grad_()
    out = momentum_itc_loss(image, text, make(image_m), make(text_m), 0.07, alpha=0.4, image_queue=make(queues[0]),
                            text_queue=make(queues[1]), image_ids=make(ids), id_queue=make(id_queue),
                            sample_negatives=False)
    return (out.loss, *torch.autograd.grad(out.loss, (image, text)))


def run_attention(make):
    g = torch.Generator().manual_seed(3)
    q, k, v = (make(torch.randn(2, 3, 5 + i, 16, generator=g)).requires_grad_() for i in (0, 2, 2))
    mask = make(torch.arange(7) < torch.tensor([[7], [4]]))
    out = attention(q, k, v, key_padding_mask=mask)
    return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))


def run_indexed_attention(make):
    g = torch.Generator().manual_seed(9)
    q = make(torch.randn(4, 3, 5, 16, generator=g)).requires_grad_()
    k, v = (make(torch.randn(3, 3, 7, 16, generator=g)).requires_grad_() for _ in range(2))
    index = make(torch.tensor([2, 0, 2, 1]))
    mask = make(torch.arange(7) < torch.tensor([[7], [4], [6]]))
    out = indexed_attention(q, k, v, index, key_padding_mask=mask)
    return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))


def run_dropout_add_layer_norm(make):
    g = torch.Generator().manual_seed(4)
    x, residual = (make(torch.randn(3, 5, 24, generator=g)).requires_grad_() for _ in range(2))
    weight, bias = (make(torch.randn(24, generator=g)).requires_grad_() for _ in range(2))
    torch.manual_seed(5)  # the dropout mask
    out = dropout_add_layer_norm(x, residual, weight, bias, 0.2, training=True)
    return (out, *torch.autograd.grad(out.square().sum(), (x, residual, weight, bias)))


def run_patch_gather(make):
    g = torch.Generator().manual_seed(6)
    tokens, pos = make(torch.randn(3, 10, 8, generator=g)).requires_grad_(), make(torch.randn(1, 10, 8, generator=g))
    masking = random_masking(tokens, 0.6, pos_embed=pos, generator=torch.Generator().manual_seed(7))
    token = make(torch.randn(8, generator=g)).requires_grad_()
    full = unmask(make(masking.visible.detach()).requires_grad_(), make(masking.ids_restore), token, pos_embed=pos)
    return (masking.visible, masking.ids_restore, full,
            *torch.autograd.grad(masking.visible.square().sum() + full.square().sum(), (tokens, token)))


def run_ema(make):
    g = torch.Generator().manual_seed(8)
    target = [torch.randn(4, 6, generator=g), torch.randn(5, generator=g)]  # targets must be contiguous: written in place
    source = [make(torch.randn(4, 6, generator=g)), make(torch.randn(5, generator=g))]
    ema_update_(target, source, 0.9)
    return tuple(target)


OPS = {"itc_loss": run_itc, "momentum_itc_loss": run_momentum_itc, "attention": run_attention,
       "indexed_attention": run_indexed_attention,
       "dropout_add_layer_norm": run_dropout_add_layer_norm, "random_masking_unmask": run_patch_gather,
       "ema_update_": run_ema}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", [strided, transposed])
@pytest.mark.parametrize("op", OPS)
def test_strided_inputs_give_what_contiguous_ones_give(op, layout, backend, monkeypatch):
    if layout is transposed and op in ("attention", "indexed_attention", "dropout_add_layer_norm", "random_masking_unmask",
                                       "ema_update_"):
        pytest.skip("2-d transposes are the features' and queues' layout")
    if backend == "fused" and op in ("momentum_itc_loss", "indexed_attention", "random_masking_unmask",
                                     "dropout_add_layer_norm") \
            and _extension.LOAD_ERROR is not None:
        pytest.skip("fused needs vlfast._C")
    monkeypatch.setenv("VLFAST_BACKEND", backend)
    keep_2d = (lambda x: layout(x) if x.ndim == 2 else x) if layout is transposed else layout
    try:
        want = OPS[op](lambda x: x.clone())
    except RuntimeError as error:  # fused where this machine has no kernel for the op
        if backend == "fused" and "no" in str(error):
            pytest.skip(str(error).splitlines()[0])
        raise
    got = OPS[op](keep_2d)
    for index, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=lambda m: f"output {index}: {m}")


class HostData(TorchDispatchMode):
    """Records the tensors made from host data (torch.tensor or torch.as_tensor of a Python value)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("lift_fresh"):
            self.made.append(func.__name__)
        return func(*args, **(kwargs or {}))


def number_arguments():
    """Each op called with its Python-number arguments (temperature, alpha, p, scale, ratio), inputs
    made beforehand, as a caller's are. ema_update_'s float decay is left out: it goes to the
    kernel as a host scalar, read on the host, with no copy to the device."""
    image, text, image_m, text_m = (unit(6, 16, seed).requires_grad_(seed < 2) for seed in range(4))
    queue = unit(5, 16, 4)
    q = torch.randn(2, 3, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    index = torch.arange(2)
    x, weight = torch.randn(3, 24), torch.randn(24)
    tokens = torch.randn(2, 10, 8)
    return {
        "itc_loss": lambda: itc_loss(image, text, 0.07).loss.backward(),
        "momentum_itc_loss": lambda: momentum_itc_loss(image, text, image_m, text_m, 0.07, alpha=0.4, image_queue=queue,
                                                       text_queue=queue).loss.backward(),
        "attention": lambda: attention(q, q, q, key_padding_mask=mask, scale=0.3),
        "indexed_attention": lambda: indexed_attention(q, q, q, index, key_padding_mask=mask, scale=0.3),
        "dropout_add_layer_norm": lambda: dropout_add_layer_norm(x, x, weight, weight, 0.1),
        "random_masking": lambda: random_masking(tokens, 0.5),
    }


@pytest.mark.parametrize("backend", ["auto", "fused"])
@pytest.mark.parametrize("op", list(number_arguments()))
def test_no_op_makes_a_tensor_from_host_data_per_call(op, backend, monkeypatch):
    """A float temperature made torch.tensor(τ, device=...) on every call of itc_loss's kernel path."""
    monkeypatch.setenv("VLFAST_BACKEND", backend)
    call = number_arguments()[op]
    with HostData() as seen:
        try:
            call()
        except RuntimeError as error:  # fused where this machine has no kernel for the op
            if backend == "fused" and "no" in str(error):
                pytest.skip(str(error).splitlines()[0])
            raise
    assert seen.made == [], seen.made
