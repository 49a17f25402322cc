"""vlfast.ops.momentum_itc_loss and vlfast.nn.FeatureQueue against ALBEF's formulas, written out
here in float64 (models/model_pretrain.py; model_retrieval.py for the image ids)."""
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DEVICES, chi_square_quantile
from vlfast.nn import FeatureQueue
from vlfast.ops import momentum_itc_loss, momentum_itc_loss_reference


def albef_itc(image_feat, text_feat, image_feat_m, text_feat_m, temp, alpha, image_queue, text_queue, idx=None,
              idx_queue=None):
    """ALBEF's ITC, its queues (D, Q) as ALBEF keeps them."""
    with torch.no_grad():
        image_feat_all = torch.cat([image_feat_m.t(), image_queue.clone().detach()], dim=1)
        text_feat_all = torch.cat([text_feat_m.t(), text_queue.clone().detach()], dim=1)
        sim_i2t_m = image_feat_m @ text_feat_all / temp
        sim_t2i_m = text_feat_m @ image_feat_all / temp
        if idx is None:
            sim_targets = torch.zeros(sim_i2t_m.size(), dtype=sim_i2t_m.dtype, device=sim_i2t_m.device)
            sim_targets.fill_diagonal_(1)
        else:
            idx = idx.view(-1, 1)
            idx_all = torch.cat([idx.t(), idx_queue.view(1, -1).clone().detach()], dim=1)
            pos_idx = torch.eq(idx, idx_all).to(sim_i2t_m.dtype)
            sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all / temp
    sim_t2i = text_feat @ image_feat_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i


def unit(*shape, device="cpu", dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1).to(device, dtype)


def problem(batch, dim, queued, device, dtype=torch.float64, ids=False, seed=0):
    torch.manual_seed(seed)
    online = [unit(batch, dim, device=device, dtype=dtype).requires_grad_() for _ in range(2)]
    momentum = [unit(batch, dim, device=device, dtype=dtype) for _ in range(2)]
    queues = [unit(queued, dim, device=device, dtype=dtype) for _ in range(2)]
    temp = torch.tensor(0.07, dtype=torch.float64, device=device).to(dtype if dtype == torch.float64 else torch.float32)
    image_ids = torch.randint(0, 3, (batch,), device=device) if ids else None
    id_queue = torch.randint(0, 5, (queued,), device=device) if ids else None
    return online, momentum, queues, temp.requires_grad_(), image_ids, id_queue


def against_albef(online, momentum, queues, temp, image_ids, id_queue, alpha, op=momentum_itc_loss, **tolerance):
    out = op(*online, *momentum, temp, alpha=alpha, image_queue=queues[0], text_queue=queues[1],
             image_ids=image_ids, id_queue=id_queue, sample_negatives=False)
    grads = torch.autograd.grad(out.loss, (*online, temp))
    as64 = lambda x: x.detach().double().requires_grad_()  # noqa: E731
    online64, temp64 = [as64(x) for x in online], as64(temp)
    want = albef_itc(*online64, *(m.double() for m in momentum), temp64, alpha, *(q.double().t() for q in queues),
                     image_ids, id_queue)
    want_grads = torch.autograd.grad(want[0], (*online64, temp64))
    for got, expected in zip(out[:3], want):
        torch.testing.assert_close(got.double(), expected, **tolerance)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), expected, **tolerance)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ids", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("batch, dim, queued", [(5, 7, 0), (6, 16, 13), (1, 3, 40)])
def test_loss_and_every_gradient_equal_albefs_formulas(device, ids, alpha, batch, dim, queued):
    online, momentum, queues, temp, image_ids, id_queue = problem(batch, dim, queued, device, ids=ids)
    against_albef(online, momentum, queues, temp, image_ids, id_queue, alpha)
    against_albef(online, momentum, queues, temp, image_ids, id_queue, alpha, op=momentum_itc_loss_reference)
    if alpha:  # a schedule's alpha: a 0-d tensor on the device
        out = momentum_itc_loss(*online, *momentum, temp, alpha=torch.tensor(alpha, dtype=torch.float64, device=device),
                                image_queue=queues[0], text_queue=queues[1], image_ids=image_ids, id_queue=id_queue,
                                sample_negatives=False)
        want = albef_itc(*online, *momentum, temp, alpha, *(q.t() for q in queues), image_ids, id_queue)
        torch.testing.assert_close(out.loss, want[0])


@pytest.mark.parametrize("kernel", ["flash", "tiled"])
def test_each_kernel_under_autocast_equals_albef_in_float64(kernel, monkeypatch):
    """The CPU runs the CUDA kernel's code too (tiles of 7 keys), both under bf16 autocast, as a
    trainer's forward calls the op: the loss and gradients stay fp32-accurate."""
    from vlfast.ops import momentum_contrastive

    if kernel == "tiled":
        monkeypatch.setattr(momentum_contrastive, "_softmax_weighted_keys_flash",
                            momentum_contrastive._softmax_weighted_keys_tiled)
        monkeypatch.setattr(momentum_contrastive, "KEY_TILE", 7)
    online, momentum, queues, temp, image_ids, id_queue = problem(6, 16, 30, "cpu", dtype=torch.float32, ids=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        against_albef(online, momentum, queues, temp, image_ids, id_queue, 0.4, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, dict(rtol=1e-5, atol=1e-5)),
                                              (torch.bfloat16, dict(rtol=2e-2, atol=2e-2)),
                                              (torch.float16, dict(rtol=5e-3, atol=5e-3))])
def test_low_precision_features(device, dtype, tolerance):
    online, momentum, queues, temp, image_ids, id_queue = problem(8, 32, 50, device, dtype=dtype, ids=True)
    out = against_albef(online, momentum, queues, temp, image_ids, id_queue, 0.4, **tolerance)
    assert out.loss.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [momentum_itc_loss, momentum_itc_loss_reference])
def test_a_bf16_batch_against_an_fp32_queue(device, op):
    """The op takes features and queues of different dtypes, and so does the reference (in their
    promoted dtype): torch refused ALBEF's bf16 @ fp32 product outside autocast, which failed every
    reference row of the momentum benchmark on CUDA."""
    online, momentum, queues, temp, image_ids, id_queue = problem(8, 32, 50, device, dtype=torch.bfloat16, ids=True)
    queues = [q.float() for q in queues]
    out = against_albef(online, momentum, queues, temp, image_ids, id_queue, 0.4, op=op, rtol=2e-2, atol=2e-2)
    assert out.loss.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_float_temperature_and_tiled_keys(device, monkeypatch):
    """A float τ gets no gradient; off the CPU kernel the keys are scored in tiles, merged exactly."""
    from vlfast.ops import momentum_contrastive

    online, momentum, queues, _, image_ids, id_queue = problem(4, 8, 45, device, ids=True)
    monkeypatch.setattr(momentum_contrastive, "KEY_TILE", 7)
    query, keys = online[0].detach(), torch.cat([momentum[1], queues[1]])
    scores = query @ keys.t()
    out, lse = momentum_contrastive._softmax_weighted_keys_tiled(query, keys)
    torch.testing.assert_close(lse, scores.logsumexp(1))
    torch.testing.assert_close(out, scores.softmax(1) @ keys)
    got = momentum_itc_loss(*online, *momentum, 0.1, alpha=0.4, image_queue=queues[0], text_queue=queues[1],
                            image_ids=image_ids, id_queue=id_queue, sample_negatives=False)
    want = albef_itc(*online, *momentum, 0.1, 0.4, *(q.t() for q in queues), image_ids, id_queue)
    torch.testing.assert_close(got.loss, want[0])


class LargestOutput(TorchDispatchMode):
    """The largest tensor any op makes (in elements), and the host reads (.item() and the like)."""

    def __init__(self):
        super().__init__()
        self.largest, self.host_reads = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.host_reads += func is torch.ops.aten._local_scalar_dense.default
        for x in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(x, torch.Tensor) and not func.is_view:  # a view allocates nothing
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("kernel", ["flash", "tiled"])
def test_no_batch_by_keys_matrix_and_no_host_read(kernel, monkeypatch):
    """Every op the call runs, the kernel's own included (called here directly: a dispatch mode
    does not see inside a custom op's kernel), makes nothing as large as the scores."""
    from vlfast.ops import momentum_contrastive

    monkeypatch.setattr(momentum_contrastive, "KEY_TILE", 64)
    batch, dim, queued = 16, 8, 3000
    online, momentum, queues, temp, image_ids, id_queue = problem(batch, dim, queued, "cpu", ids=True)
    part = getattr(momentum_contrastive, f"_softmax_weighted_keys_{kernel}")
    with LargestOutput() as watch:
        momentum_contrastive._rows(online[0].detach(), momentum[0], [momentum[1], queues[1]], momentum[1], temp.detach(),
                                   torch.tensor(0.4, dtype=torch.float64), part)
        out = momentum_itc_loss(*online, *momentum, temp, alpha=0.4, image_queue=queues[0], text_queue=queues[1])
        out.loss.backward()
    assert watch.largest <= batch * 64, watch.largest  # a tile of scores at most: the queue is read, not copied
    assert watch.host_reads == 0
    with LargestOutput() as watch:  # with ids: the sums per id, one row per key
        momentum_itc_loss(*online, *momentum, temp, alpha=0.4, image_queue=queues[0], text_queue=queues[1],
                          image_ids=image_ids, id_queue=id_queue, sample_negatives=False).loss.backward()
    assert watch.largest <= (batch + queued) * dim, watch.largest  # the matrix would be 16 × 3016
    assert watch.host_reads == 0
    with LargestOutput() as watch:  # the check: ALBEF's path does form it
        momentum_itc_loss_reference(*online, *momentum, temp, alpha=0.4, image_queue=queues[0],
                                    text_queue=queues[1], sample_negatives=False).loss.backward()
    assert watch.largest >= batch * (batch + queued)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_ids", [False, True])
def test_negatives_follow_albefs_weights(device, with_ids):
    """Row 0's negative text over many calls against ALBEF's weights: softmax of the online image
    against the batch's momentum texts, positives zeroed (the same image id with ids)."""
    batch, dim, draws = 6, 5, 3000
    online, momentum, _, temp, _, _ = problem(batch, dim, 0, device, seed=4)
    image_ids = torch.tensor([0, 1, 0, 2, 3, 4], device=device) if with_ids else None
    generator = torch.Generator(device).manual_seed(5)
    counts = torch.zeros(batch, dtype=torch.float64, device=device)
    for _ in range(draws):
        out = momentum_itc_loss(*online, *momentum, temp, alpha=0.4, image_ids=image_ids, generator=generator)
        counts[out.neg_text_idx[0]] += 1
    weights = F.softmax(online[0][0].detach() @ momentum[1].t() / temp.detach(), dim=0)
    positive = (image_ids == image_ids[0]) if with_ids else torch.arange(batch, device=device) == 0
    assert counts[positive].sum() == 0, "a positive was drawn"
    weights[positive] = 0
    expected = draws * weights / weights.sum()
    chi2 = ((counts[~positive] - expected[~positive]) ** 2 / expected[~positive]).sum().item()
    assert chi2 < chi_square_quantile(int((~positive).sum()) - 1), (chi2, counts)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(alpha=1.5), ValueError, "alpha must be a number in [0, 1]"),
    (dict(image_queue="q"), ValueError, "image_queue and text_queue come together"),
    (dict(image_queue=torch.zeros(3, 5), text_queue=torch.zeros(3, 5)), ValueError, "(ALBEF's buffers are (D, Q)"),
    (dict(image_queue=torch.zeros(3, 4), text_queue=torch.zeros(2, 4)), ValueError, "text_queue has 2 rows"),
    (dict(image_queue=torch.zeros(3, 4), text_queue=torch.zeros(3, 4), image_ids=torch.arange(2)), ValueError,
     "id_queue must give"),
    (dict(id_queue=torch.arange(0)), ValueError, "id_queue is given without image_ids"),
    (dict(image_ids=torch.arange(3)), ValueError, "image_ids must have shape (2,)"),
    (dict(temperature=-1.0), ValueError, "temperature must be a finite float > 0"),
    (dict(image_feat_m=torch.zeros(3, 4)), ValueError, "image_feat_m has shape (3, 4)"),
    (dict(smoothing=-1.0), ValueError, "smoothing must be"),
])
def test_bad_inputs_are_named(kwargs, error, message):
    args = dict(image_feat=unit(2, 4), text_feat=unit(2, 4), image_feat_m=unit(2, 4), text_feat_m=unit(2, 4),
                temperature=0.07)
    args.update(kwargs)
    if isinstance(args.get("image_queue"), str):
        args["image_queue"] = torch.zeros(1, 4)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        momentum_itc_loss(**args)


def ring(rows_so_far, size):
    """The queue's rows by position, from every row enqueued so far in order (a plain model of it)."""
    slots = [None] * size
    for position, row in enumerate(rows_so_far):
        slots[position % size] = row
    return slots


@pytest.mark.parametrize("size, batch, steps", [(13, 5, 4), (8, 4, 3), (3, 5, 2), (7, 7, 2)])
def test_queue_wraps_around_any_size_and_batch(size, batch, steps):
    torch.manual_seed(0)
    queue = FeatureQueue(size, 4, ids=True, fill="empty")
    written = []
    for step in range(steps):
        image, text = unit(batch, 4, dtype=torch.float32), unit(batch, 4, dtype=torch.float32)
        ids = torch.arange(step * batch, (step + 1) * batch)
        queue.enqueue(image, text, ids)
        written += list(zip(image, text, ids))
        image_keys, text_keys, id_keys = queue.keys()
        assert len(image_keys) == min(size, len(written))
        for position, slot in enumerate(ring(written, size)):
            if slot is not None:
                assert torch.equal(image_keys[position], slot[0]) and torch.equal(text_keys[position], slot[1])
                assert id_keys[position] == slot[2]
    assert int(queue.ptr) == len(written) % size


def test_queue_not_yet_full_and_wrapped_against_albef():
    """The loss over a queue being filled, then after it wrapped, equals ALBEF's over the same rows."""
    batch, dim = 4, 8
    queue = FeatureQueue(10, dim, ids=True, fill="empty")
    for step in range(4):  # 0, 4, 8 then 10 (wrapped) rows queued before each loss
        online, momentum, _, temp, image_ids, _ = problem(batch, dim, 0, "cpu", ids=True, seed=step)
        image_queue, text_queue, id_queue = queue.keys()
        against_albef(online, momentum, (image_queue, text_queue), temp, image_ids, id_queue, 0.4)
        queue.enqueue(*momentum, image_ids)


def test_int32_ids_with_the_queues_int64_ids():
    online, momentum, _, temp, _, _ = problem(4, 6, 0, "cpu")
    queue = FeatureQueue(5, 6, ids=True, fill="empty")
    queue.enqueue(momentum[0].float(), momentum[1].float(), torch.arange(4))
    image_ids = torch.tensor([0, 1, 7, 8], dtype=torch.int32)
    image_queue, text_queue, id_queue = queue.keys()
    got = momentum_itc_loss(*online, *momentum, temp, image_queue=image_queue, text_queue=text_queue,
                            image_ids=image_ids, id_queue=id_queue, sample_negatives=False)
    want = albef_itc(*online, *momentum, temp, 0.4, image_queue.t().double(), text_queue.t().double(),
                     image_ids.long(), id_queue)
    torch.testing.assert_close(got.loss, want[0])


def test_queue_state_dict_round_trip_and_albefs_start():
    torch.manual_seed(0)
    queue = FeatureQueue(6, 3, ids=True)
    assert torch.allclose(queue.image.norm(dim=1), torch.ones(6)) and (queue.ids == -100).all()
    queue.enqueue(unit(4, 3, dtype=torch.float32), unit(4, 3, dtype=torch.float32), torch.arange(4))
    copy = FeatureQueue(6, 3, ids=True, fill="empty")
    copy.load_state_dict(queue.state_dict())
    assert copy.filled == 6 and int(copy.ptr) == 4
    for mine, theirs in zip(copy.keys(), queue.keys()):
        assert torch.equal(mine, theirs)
    with LargestOutput() as watch:
        queue.enqueue(unit(4, 3), unit(4, 3), torch.arange(4))
    assert watch.host_reads == 0 and int(queue.ptr) == 2


def _two_ranks(rank, init_file, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    queue = FeatureQueue(11, 4, ids=True)  # the same random start on both ranks, as one process's
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        rows = slice(rank * 3, rank * 3 + 3)
        image, text = torch.randn(2, 6, 4, generator=generator)
        queue.enqueue(image[rows], text[rows], torch.arange(6)[rows] + 6 * step)
    torch.save(queue.state_dict(), f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_queue_over_two_ranks_equals_one_process():
    torch.manual_seed(0)
    one = FeatureQueue(11, 4, ids=True)
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        image, text = torch.randn(2, 6, 4, generator=generator)
        one.enqueue(image, text, torch.arange(6) + 6 * step)
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_two_ranks, args=(f"{tmp}/init", f"{tmp}/queue"), nprocs=2)
        for rank in range(2):
            state = torch.load(f"{tmp}/queue.{rank}", weights_only=True)
            for name, value in one.state_dict().items():
                assert name in state and (state[name] == value if isinstance(value, dict) else
                                          torch.equal(state[name], value)), name


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_no_second_derivative(device):
    """The schema's fake, autograd and kernel agree (torch.library.opcheck), and a second
    derivative raises naming the op."""
    online, momentum, queues, temp, _, _ = problem(5, 8, 11, device, dtype=torch.float32)
    keys = [momentum[1].detach(), queues[1]]
    positive = momentum[1].detach().clone()
    alpha = torch.full((), 0.4, device=device)
    torch.library.opcheck(torch.ops.vlfast.momentum_itc_loss_rows, (online[0], momentum[0], keys, positive, temp, alpha))
    torch.library.opcheck(torch.ops.vlfast.momentum_itc_loss_rows, (online[0], momentum[0], keys, positive, temp, None))
    out = momentum_itc_loss(*online, *momentum, temp, image_queue=queues[0], text_queue=queues[1],
                            sample_negatives=False)
    grad, = torch.autograd.grad(out.loss, online[0], create_graph=True)
    with pytest.raises(NotImplementedError, match="momentum_itc_loss has no second derivative"):
        grad.sum().backward()


def test_reference_backend_runs_albefs_path(monkeypatch):
    online, momentum, queues, temp, _, _ = problem(4, 6, 9, "cpu")
    monkeypatch.setenv("VLFAST_BACKEND", "reference")
    with LargestOutput() as watch:
        out = momentum_itc_loss(*online, *momentum, temp, image_queue=queues[0], text_queue=queues[1])
    assert watch.largest >= 4 * (4 + 9)  # the similarity matrices: ALBEF's path ran
    want = albef_itc(*online, *momentum, temp, 0.4, *(q.t() for q in queues))
    torch.testing.assert_close(out.loss, want[0])


def _gathered_loss(rank, init_file, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    online, momentum, queues, temp, image_ids, id_queue = problem(6, 5, 7, "cpu", ids=True)
    rows = slice(rank * 3, rank * 3 + 3)
    mine = [x.detach()[rows].requires_grad_() for x in online]
    out_rank = momentum_itc_loss(*mine, *(m[rows] for m in momentum), temp, image_queue=queues[0],
                                 text_queue=queues[1], image_ids=image_ids[rows], id_queue=id_queue, all_gather=True,
                                 generator=torch.Generator().manual_seed(rank))
    grads = torch.autograd.grad(out_rank.loss, mine)
    torch.save({"loss": out_rank.loss.detach(), "grads": grads, "negatives": out_rank.neg_text_idx}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_all_gather_over_two_ranks_equals_one_process():
    """Each rank scores its 3 rows against both ranks' momentum keys and the queue: the mean of the
    ranks' losses is one process's on all 6 rows, and each rank's gradients are that process's,
    scaled by the world size (each rank averages over its own rows)."""
    online, momentum, queues, temp, image_ids, id_queue = problem(6, 5, 7, "cpu", ids=True)
    one = momentum_itc_loss(*online, *momentum, temp, image_queue=queues[0], text_queue=queues[1],
                            image_ids=image_ids, id_queue=id_queue)
    grads = torch.autograd.grad(one.loss, online)
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_gathered_loss, args=(f"{tmp}/init", f"{tmp}/out"), nprocs=2)
        ranks = [torch.load(f"{tmp}/out.{rank}", weights_only=True) for rank in range(2)]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, one.loss)
    for rank, got in enumerate(ranks):
        for mine, whole in zip(got["grads"], grads):
            torch.testing.assert_close(mine / 2, whole[rank * 3:rank * 3 + 3])
        assert ((got["negatives"] >= 0) & (got["negatives"] < 6)).all()  # into the gathered batch
