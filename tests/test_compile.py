"""torch.compile traces the public ops and the model without graph breaks: each op's choice of
implementation is a lookup made outside the traced code (vlfast._extension), not a dispatcher
query or a host read inside it. fullgraph=True turns any break into an error."""
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from helpers import batch, tiny
from vlfast import _extension
from vlfast._extension import implementation
from vlfast.ops import attention, dropout_add_layer_norm, ema_update_, itc_loss, random_masking, unmask


def compiled_equals_eager(function, *args):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = function(*args)
    torch.manual_seed(0)
    traced = torch.compile(function, backend="eager", fullgraph=True)(*args)
    for got, want in zip(torch.utils._pytree.tree_leaves(traced), torch.utils._pytree.tree_leaves(eager)):
        torch.testing.assert_close(got, want)


def test_each_op_compiles_without_a_graph_break():
    g = torch.Generator().manual_seed(0)
    tokens, pos = torch.randn(3, 10, 8, generator=g), torch.randn(1, 10, 8, generator=g)
    compiled_equals_eager(lambda t, p: tuple(random_masking(t, 0.6, pos_embed=p)), tokens, pos)
    masking = random_masking(tokens, 0.6)
    compiled_equals_eager(lambda v, ids, token: unmask(v, ids, token, pos_embed=pos), masking.visible,
                          masking.ids_restore, torch.randn(8, generator=g))
    q, k, v = (torch.randn(2, 3, 7, 16, generator=g) for _ in range(3))
    mask = torch.arange(7) < torch.tensor([[5], [7]])
    compiled_equals_eager(lambda q, k, v, m: attention(q, k, v, key_padding_mask=m), q, k, v, mask)
    x, residual, weight, bias = torch.randn(4, 6, 32, generator=g), torch.randn(4, 6, 32, generator=g), \
        torch.randn(32, generator=g), torch.randn(32, generator=g)
    compiled_equals_eager(lambda *a: dropout_add_layer_norm(*a, 0.1, training=True), x, residual, weight, bias)
    image, text = (F.normalize(torch.randn(6, 16, generator=g), dim=-1) for _ in range(2))
    compiled_equals_eager(lambda i, t, tau: tuple(itc_loss(i, t, tau)), image, text, torch.tensor(0.07))
    target, source = [torch.randn(5, generator=g), torch.randn(3, 2, generator=g)], [torch.randn(5), torch.randn(3, 2)]
    compiled_equals_eager(lambda t, s: (ema_update_(t, s, 0.9), t)[1], [x.clone() for x in target], source)


@pytest.fixture
def fused_then_settings_read_again(monkeypatch):
    """VLFAST_BACKEND=fused for the test; afterwards the environment is read again eagerly, since
    compiled code uses the last eager reading (vlfast._extension.settings)."""
    monkeypatch.setenv("VLFAST_BACKEND", "fused")
    yield
    monkeypatch.undo()
    _extension.settings()


def test_a_triton_op_compiles_through_its_cpp_autograd(fused_then_settings_read_again):
    """itc_loss's kernel (Triton launchers behind a C++ schema and C++ autograd, one SymInt saved):
    aot_eager traces that autograd on fake tensors; the loss and its gradients equal eager's. On
    the CPU the kernel runs in Triton's interpreter (conftest sets it without a GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if implementation("itc_loss", device) not in ("kernel", "interpreted"):
        pytest.skip("no Triton kernel for itc_loss here")
    g = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(6, 16, generator=g), dim=-1).to(device).requires_grad_() for _ in range(2))
    tau = torch.tensor(0.07, device=device, requires_grad=True)

    def loss_and_grads(function):
        loss = function(image, text, tau)
        return loss, torch.autograd.grad(loss, (image, text, tau))

    def function(i, t, temperature):
        return itc_loss(i, t, temperature, sample_negatives=False).loss

    torch._dynamo.reset()
    eager = loss_and_grads(function)
    compiled = loss_and_grads(torch.compile(function, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled, eager)


def test_the_models_forward_is_one_graph():
    """All five objectives' forward, drawing from torch's default generator (an explicit
    torch.Generator argument still breaks the graph at each draw)."""
    model = tiny()
    images, input_ids, mask = batch()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda: model(images, input_ids, mask)["loss"])()
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_the_inductor_compiled_step_equals_the_eager_step():
    """train.py's compile=true: forward of all five objectives, backward and clipping as one
    inductor graph (fullgraph: a break is an error), then fused AdamW and the EMA. Three steps from
    the same weights and seed give the eager step's losses, gradients and weights, within fp32
    tolerances (inductor reorders sums): losses rtol 1e-3; gradients and weights rtol 1e-3, atol 1e-4
    (an element of a conv weight's gradient differed by 3.5e-5 in three steps). fallback_random: inductor draws its
    random numbers as eager torch does, so the masks, negatives and dropout are the same draws."""
    import time

    from vlfast.trainer import compile_forward_backward, forward_backward, make_optimizer, train_step

    runs = []
    for function in (forward_backward, "compiled"):
        torch._dynamo.reset()
        model = tiny()  # seeds 0
        optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.02)
        data = batch()
        history, seconds = [], []
        with torch._inductor.config.patch(fallback_random=True):
            step_function = compile_forward_backward() if function == "compiled" else function
            for _ in range(3):
                started = time.perf_counter()
                losses = train_step(model, model, optimizer, data, 5.0, forward_backward=step_function)
                seconds.append(time.perf_counter() - started)
                history.append(({k: v.item() for k, v in losses.items()},
                                [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        runs.append((history, model, seconds))
    (eager, eager_model, _), (compiled, compiled_model, seconds) = runs
    print(f"first compiled step (compiles) {seconds[0]:.1f} s, then {seconds[-1]:.3f} s")
    for step, ((want_losses, want_grads), (got_losses, got_grads)) in enumerate(zip(eager, compiled)):
        assert got_losses == pytest.approx(want_losses, rel=1e-3, abs=1e-5), step
        assert len(got_grads) == len(want_grads) > 0
        for got, want in zip(got_grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    for got, want in zip(compiled_model.state_dict().values(), eager_model.state_dict().values()):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_the_step_to_compile_is_one_graph():
    from vlfast.trainer import forward_backward

    model = tiny()
    data = batch()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explanation = torch._dynamo.explain(forward_backward)(model, model, data, 5.0)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


@pytest.mark.parametrize("settings_read_first", [True, False], ids=["settings_read_first", "nothing_read_first"])
def test_the_compiled_step_compiles_once(settings_read_first, monkeypatch):
    """Four compiled steps make one dynamo graph, whether or not anything read vlfast's settings
    before the first trace (train.py reads them first; a user's script may not). The choice of each
    op's implementation, written into a dict inside the trace, recompiled at step 2 (and step 3
    without an early read: under CudaGraphStep, inside the graph's capture)."""
    from torch._dynamo.utils import counters

    from vlfast.trainer import compile_forward_backward, make_optimizer, train_step

    if not settings_read_first:  # as in a process where no op has run eagerly yet
        monkeypatch.setitem(_extension._SETTINGS, "read", None)
        monkeypatch.setitem(_extension._SETTINGS, "decided", {})
    else:
        _extension.implementation("itc_loss", "cpu")
    torch._dynamo.reset()
    counters.clear()
    model = tiny()
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.02)
    step_function = compile_forward_backward(backend="eager")
    for _ in range(4):
        train_step(model, model, optimizer, batch(), 5.0, forward_backward=step_function)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["recompiles"] or counters["stats"])


def test_two_model_sizes_compile_in_one_process():
    """A benchmark compiles the tiny step, then a wider one, in one process without resetting dynamo:
    the second must compile as its own static graph (automatic dynamic shapes traced the sizes as
    symbols, and the caption masking's torch.rand failed on them)."""
    from vlfast.trainer import compile_forward_backward, make_optimizer, train_step

    torch._dynamo.reset()
    for size, width in ((6, 64), (4, 96)):
        model = tiny() if width == 64 else _wider_tiny(width)
        optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.02)
        losses = train_step(model, model, optimizer, batch(size), 5.0, forward_backward=compile_forward_backward("eager"))
        assert torch.isfinite(losses["loss"]), (size, width)


def _wider_tiny(width):
    import dataclasses

    from helpers import VOCAB
    from vlfast.models import Mamo

    config = tiny().config
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, width=width),
                                 text=dataclasses.replace(config.text, width=width, encoder_width=width))
    torch.manual_seed(0)
    return Mamo(config, mask_token_id=VOCAB["[MASK]"], special_ids=[VOCAB[t] for t in ("[PAD]", "[CLS]", "[SEP]")])
