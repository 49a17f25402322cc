import copy
import math
import pickle

import pytest
import torch

from helpers import batch, tiny
from vlfast.models import Mamo
from vlfast.models.mamo import _masked_positions, _patches_at
from vlfast.ops import momentum_itc_loss, random_masking, random_masking_reference
from vlfast.trainer import CudaGraphStep, bf16_weights, make_optimizer, train_step

def test_all_objectives_finite_and_decreasing_on_a_fixed_batch():
    model = tiny()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images, input_ids, mask = batch()
    history = {name: [] for name in ("mrm", "mim", "mlm", "itc", "itm", "loss")}
    for step in range(20):
        losses = model(images, input_ids, mask, generator=torch.Generator().manual_seed(step))
        assert set(losses) == {"mrm", "mim", "mlm", "itc", "itm", "loss"}
        assert all(torch.isfinite(v) for v in losses.values()), losses
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        model.update_target()
        for name, value in losses.items():
            history[name].append(value.item())
    for name, values in history.items():  # every objective learns on the fixed batch
        assert sum(values[-5:]) < sum(values[:5]), (name, values)
    assert sum(history["loss"][-5:]) < 0.9 * sum(history["loss"][:5]), history["loss"]


def test_gradients_reach_every_trainable_parameter_and_never_the_target():
    model = tiny()
    images, input_ids, mask = batch()
    model(images, input_ids, mask, generator=torch.Generator().manual_seed(0))["loss"].backward()
    target = {id(p) for p in model.target.parameters()}
    for name, p in model.named_parameters():
        if id(p) in target:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_the_target_changes_only_through_the_ema():
    model = tiny(("itc", "itm"))
    online = dict(model._encoders().named_parameters())
    before = {name: p.clone() for name, p in model.target.model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images, input_ids, mask = batch()
    model(images, input_ids, mask)["loss"].backward()
    optimizer.step()
    for name, p in model.target.model.named_parameters():
        assert torch.equal(p, before[name]), name  # the optimizer step left it alone
    model.update_target()
    for name, p in model.target.model.named_parameters():
        want = 0.995 * before[name] + 0.005 * online[name].detach()
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7, msg=name)


def _masked_view(model, images, input_ids, mask, ids_restore=None):
    """(fused image stream of f(I', T) (B, 1 + N, W), ids_restore, kept patches L) for one masking."""
    text, _ = model.embed_text(input_ids, mask)
    visible, masking = model.visual_encoder.forward_masked(images, 0.75, torch.Generator().manual_seed(1))
    ids_restore = masking.ids_restore if ids_restore is None else ids_restore
    return model.fuse_masked_image(visible, ids_restore, text, mask), ids_restore, visible.shape[1] - 1


def test_each_masked_patch_reaches_fusion_with_its_own_position():
    model = tiny().eval()
    images, input_ids, mask = batch()
    with torch.no_grad():
        fused, ids_restore, kept = _masked_view(model, images, input_ids, mask)
        for b in range(images.shape[0]):  # without positions the masked rows were equal to 4e-7
            rows = fused[b, 1:][ids_restore[b] >= kept]
            spread = (rows[:, None] - rows[None]).abs().amax(-1)  # (M, M): largest difference of each pair
            assert spread[~torch.eye(len(rows), dtype=torch.bool)].min() > 1e-3, (b, spread)
        # Move image 0's first masked patch p to its first kept position r (and r's encoder output to p):
        # the mask token is the same vector, only its position changes, so its prediction must too.
        p = int((ids_restore[0] >= kept).nonzero()[0])
        r = int((ids_restore[0] < kept).nonzero()[0])
        moved = ids_restore.clone()
        moved[0, p], moved[0, r] = ids_restore[0, r], ids_restore[0, p]
        fused_moved, _, _ = _masked_view(model, images, input_ids, mask, moved)
        before = model.mim_predictor(fused[0, 1 + p])
        after = model.mim_predictor(fused_moved[0, 1 + r])
        assert (before - after).abs().max() > 1e-3, (before - after).abs().max()
        # and the fusion output at the old position now holds the visible patch, not the mask token
        assert (fused_moved[0, 1 + p] - fused[0, 1 + p]).abs().max() > 1e-3


def test_the_target_network_runs_without_dropout_unless_configured():
    model = tiny()
    for module in model.target.model.modules():  # tiny() has no dropout; the BERT layers read p per call
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    images, input_ids, mask = batch()
    model.train()
    outputs = []  # the target's text encoder output in each forward of the model
    hook = model.target.model["bert"].register_forward_hook(lambda module, args, output: outputs.append(output))

    def targets_of_two_steps():
        outputs.clear()
        for seed in (0, 1):
            model(images, input_ids, mask, generator=torch.Generator().manual_seed(seed))
        return outputs[0], outputs[len(outputs) // 2]  # each forward's first target pass (the same input)

    first, second = targets_of_two_steps()
    assert torch.equal(first, second)  # eval mode: the same targets for the same pair
    model.config.target_dropout = True
    first, second = targets_of_two_steps()
    assert not torch.equal(first, second)  # dropout: another draw each time
    model.eval()
    first, second = targets_of_two_steps()
    assert torch.equal(first, second)  # an evaluated model never drops out, target included
    hook.remove()


def test_objectives_are_switchable_and_checked():
    model = tiny(("itc", "itm"))
    losses = model(*batch())
    assert set(losses) == {"itc", "itm", "loss"}
    torch.testing.assert_close(losses["loss"], losses["itc"] + losses["itm"])
    with pytest.raises(ValueError, match="objectives must be a non-empty subset"):
        tiny(("itc", "contrastive"))
    config = tiny().config
    config.text.width = 32
    with pytest.raises(ValueError, match="text width .* must equal the image width"):
        Mamo(config, mask_token_id=4, special_ids=[0])


@pytest.mark.parametrize("masking_op", [random_masking, random_masking_reference])
@pytest.mark.parametrize("patches, ratio", [(7, 0.5), (16, 0.75), (13, 0.1), (1, 0.0)])
def test_masked_patch_rows_are_boolean_indexing_without_its_sync(masking_op, patches, ratio):
    tokens = torch.randn(5, 1 + patches, 3)
    masking = masking_op(torch.randn(5, patches, 3), ratio, generator=torch.Generator().manual_seed(patches))
    rows = _patches_at(tokens, _masked_positions(masking))
    torch.testing.assert_close(rows, tokens[:, 1:][masking.mask.bool()], rtol=0, atol=0)


def test_a_non_finite_step_leaves_the_weights_and_the_optimizer_as_they_were():
    """train_step catches a NaN on the device (no host read): fused AdamW skips the update, so no
    weight, moment or step count takes it; the target stays finite; the next good step trains."""
    model = tiny()
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.02)
    images, input_ids, mask = batch()
    train_step(model, model, optimizer, (images, input_ids, mask), 5.0)  # the optimizer's state exists
    weights = {name: p.clone() for name, p in model.named_parameters()}
    moments = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters() if p.requires_grad]
    poisoned = images.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    losses = train_step(model, model, optimizer, (poisoned, input_ids, mask), 5.0)
    assert not math.isfinite(losses["loss"].item())
    for name, p in model.named_parameters():
        if p.requires_grad:  # the target (frozen) took its EMA step toward these unchanged weights
            assert torch.equal(p, weights[name]), name
    for before, p in zip(moments, [p for p in model.parameters() if p.requires_grad]):
        for key, value in before.items():
            assert torch.equal(optimizer.state[p][key], value), key
    assert all(torch.isfinite(p).all() for p in model.target.parameters())
    losses = train_step(model, model, optimizer, (images, input_ids, mask), 5.0)
    assert math.isfinite(losses["loss"].item())
    assert all(not torch.equal(p, weights[name]) for name, p in model.named_parameters() if p.requires_grad
               and name.startswith("visual_encoder."))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_the_fused_step_never_waits_for_the_gpu(monkeypatch, backend):
    """No .item(), boolean indexing or host-to-GPU copy: the host can queue the next step while the
    GPU runs this one, and the step can be recorded as a CUDA graph."""
    monkeypatch.setenv("VLFAST_BACKEND", backend)
    model = tiny().cuda()
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.02,  # train.py's: bf16 weights, fp32 masters
                               bf16_weights=bf16_weights(model, autocast=True))
    data = [x.cuda() for x in batch()]
    train_step(model, model, optimizer, data, 5.0)  # first calls: Triton compiles, optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(model, model, optimizer, data, 5.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()  # a kernel's error shows here, not in the next test


def tiny_step_on_gpu(lr, graphed, bf16=False):
    """(step, model, batch): train.py's step and optimizer on the tiny model, eager or a
    CudaGraphStep, with fp32 or (train.py's default on a GPU) bf16 weights. Only the step holds
    the optimizer, as in bench_train_step: a CudaGraphStep must keep it alive."""
    model = tiny().cuda()
    optimizer = make_optimizer(model, lr=lr, weight_decay=0.02, cuda_graph=True,
                               bf16_weights=bf16_weights(model, autocast=True, enabled=bf16))
    torch.manual_seed(0)  # masks, negatives and dropout: the same draws for the eager and the graphed run

    def step(*data):
        return train_step(model, model, optimizer, data, 5.0)

    return (CudaGraphStep(step) if graphed else step), model, [x.cuda() for x in batch()]


@pytest.mark.cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_a_graphed_step_equals_the_eager_step(bf16):
    runs = []
    orders = [torch.randperm(6) for _ in range(6)]  # a new batch each call: replays must read it
    for graphed in (False, True):
        step, model, data = tiny_step_on_gpu(1e-3, graphed, bf16)
        runs.append(([{k: v.item() for k, v in step(*(x[order.cuda()] for x in data)).items()} for order in orders],
                     model))
    (eager, eager_model), (graph, graph_model) = runs
    for calls in range(6):  # 2 eager warm-up calls, the recording, 3 replays: the same draws and updates
        for name in eager[calls]:
            assert graph[calls][name] == pytest.approx(eager[calls][name], rel=1e-4, abs=1e-5), (calls, name)
    for a, b in zip(eager_model.parameters(), graph_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_a_graphed_step_learns_and_moves_the_target():
    step, model, data = tiny_step_on_gpu(1e-3, graphed=True)
    step(*data)  # the warm-up, then the recording: freed blocks the graph still used would be reused below
    step(*data)
    step(*data)
    # Freed blocks go back to the allocator per stream: if the graph still wrote into one, the
    # tensors allocated here, on each stream the step ran on, would change under the replays.
    overwrite = []
    for stream in (torch.cuda.current_stream(), step.side):
        with torch.cuda.stream(stream):
            overwrite += [torch.randn(n, device="cuda") for n in (100, 10_000, 1_000_000)]
    torch.cuda.synchronize()
    overwrite_before = [x.clone() for x in overwrite]
    target_before = [p.clone() for p in model.target.parameters()]
    online_before = [p.clone() for p in model.visual_encoder.parameters()]
    history = [{name: value.item() for name, value in step(*data).items()} for _ in range(20)]
    assert all(math.isfinite(v) for losses in history for v in losses.values()), history
    assert sum(h["loss"] for h in history[-5:]) < sum(h["loss"] for h in history[:5]), history
    assert all(not torch.equal(a, b) for a, b in zip(online_before, model.visual_encoder.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(target_before, model.target.parameters()))
    assert all(torch.equal(x, before) for x, before in zip(overwrite, overwrite_before))


@pytest.mark.cuda
def test_each_replay_draws_new_masks_and_negatives():
    step, model, data = tiny_step_on_gpu(0.0, graphed=True)  # the weights stay: only the draws change the losses
    for _ in range(3):
        step(*data)
    weights = [p.clone() for p in model.parameters() if p.requires_grad]
    first = {name: value.item() for name, value in step(*data).items()}
    second = {name: value.item() for name, value in step(*data).items()}
    assert all(torch.equal(a, b) for a, b in zip(weights, (p for p in model.parameters() if p.requires_grad)))
    for name in ("mim", "mlm", "itm"):
        assert second[name] != first[name], name


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped_and_reported():
    """The gradient norm comes back with the losses, so the loop sees a step it skipped even when
    every loss was finite (a bf16 backward overflow, say)."""
    model = tiny()
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.02)
    data = batch()
    train_step(model, model, optimizer, data, 5.0)
    weights = {name: p.clone() for name, p in model.named_parameters() if p.requires_grad}
    hook = model.itm_head.weight.register_hook(lambda grad: grad * float("inf"))
    losses = train_step(model, model, optimizer, data, 5.0)
    hook.remove()
    assert math.isfinite(losses["loss"].item()) and not math.isfinite(losses["grad_norm"].item())
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters() if p.requires_grad)


def test_a_bf16_target_gives_the_losses_of_autocast_casting_it(monkeypatch):
    """vlfast.trainer.bf16_weights: under bf16 autocast the fused path runs the target on bf16 copies of its
    matrix weights that the EMA update writes; autocast would round the same fp32 weights the same way."""
    images, input_ids, mask = batch()
    monkeypatch.setenv("VLFAST_BACKEND", "reference")  # ALBEF's way: fp32 weights, cast at each use
    model = tiny()
    assert not bf16_weights(model, autocast=True) and model.target.compute_model is model.target.model
    monkeypatch.setenv("VLFAST_BACKEND", "auto")
    losses = []
    for copied in (False, True):
        model = tiny()
        optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.02)  # fp32 online weights in both runs
        if copied:
            model.target.set_compute_dtype(torch.bfloat16)
        torch.manual_seed(1)
        steps = []
        for _ in range(2):  # the second step runs on the copies the first update wrote
            with torch.autocast("cpu", dtype=torch.bfloat16):
                steps.append(train_step(model, model, optimizer, (images, input_ids, mask), grad_clip=5.0))
        losses.append(steps)
    for want, got in zip(*losses):
        for name in want:
            assert torch.equal(want[name], got[name]), name


def test_bf16_weights_with_fp32_masters_train_as_autocast_does(monkeypatch):
    """make_optimizer(bf16_weights=True): the forward reads bf16 weights that autocast would have cast
    from the same fp32 values, the gradients are the same bf16 numbers, and the fp32 update is the
    same: steps leave the masters equal to autocast's fp32 weights. The target averages the bf16
    weights (within half a bf16 spacing of the masters): with it frozen the runs stay equal. No
    clipping here: a clipped bf16 gradient is scaled in bf16, one rounding more than autocast's."""
    monkeypatch.setenv("VLFAST_BACKEND", "auto")
    images, input_ids, mask = batch()

    def run(bf16: bool, steps: int):
        model = tiny()
        model.target.decay = 1.0  # the target stays as it is (see the docstring)
        optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.02,
                                   bf16_weights=bf16_weights(model, autocast=True, enabled=bf16))
        torch.manual_seed(1)
        losses = []
        for _ in range(steps):  # autocast per step, as train.py's: its cast cache lives as long as the context
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses.append(train_step(model, model, optimizer, (images, input_ids, mask), grad_clip=1e9))
        return model, optimizer, losses

    (fp32_model, fp32_optimizer, fp32_losses), (model, optimizer, losses) = run(False, 3), run(True, 3)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["visual_encoder.blocks.0.attn.qkv.weight"] == dtypes["text_encoder.bert.encoder.layer.0.output.dense.bias"] \
        == dtypes["visual_encoder.patch_embed.proj.weight"] == torch.bfloat16
    assert dtypes["visual_encoder.blocks.0.norm1.weight"] == dtypes["visual_encoder.pos_embed"] == torch.float32
    # BERT's decoder shares the word embeddings' weight: an embedding is no matrix product, so it stays fp32
    assert dtypes["text_encoder.bert.embeddings.word_embeddings.weight"] == torch.float32
    for step, (want, got) in enumerate(zip(fp32_losses, losses)):
        for name in want:
            assert torch.equal(want[name], got[name]), (step, name)
    fp32_moments, moments = (o.state_dict()["state"] for o in (fp32_optimizer, optimizer))
    for i, state in fp32_moments.items():  # the masters' moments are autocast's weights' moments
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], moments[i][key]), (i, key)
    state, fp32_state = model.state_dict(), fp32_model.state_dict()
    assert state.keys() == fp32_state.keys()
    for name, value in fp32_state.items():  # the masters, saved under the parameters' names
        if isinstance(value, torch.Tensor):
            assert value.dtype == state[name].dtype and torch.equal(value, state[name]), name
    # a checkpoint loads back into masters and bf16 weights
    restored = tiny()
    restored_optimizer = make_optimizer(restored, lr=1e-3, weight_decay=0.02, bf16_weights=True)
    restored.load_state_dict(state)
    restored_optimizer.load_state_dict(optimizer.state_dict())
    for master, want in zip(restored_optimizer.masters, optimizer.masters):
        assert torch.equal(master, want)
    assert torch.equal(restored.visual_encoder.blocks[0].attn.qkv.weight, state["visual_encoder.blocks.0.attn.qkv.weight"].bfloat16())
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # copies save fp32 values too
        copied_state = copied.state_dict()
        assert all(torch.equal(copied_state[name], value) for name, value in state.items()
                   if isinstance(value, torch.Tensor))
        copied.load_state_dict(state)


def test_bf16_weights_skip_a_non_finite_step_and_leave_unused_weights_alone():
    images, input_ids, mask = batch()
    model = tiny(objectives=("itc", "mlm"))  # the ITM head and MIM/MRM heads get no gradient
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.02, bf16_weights=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_step(model, model, optimizer, (images, input_ids, mask), grad_clip=5.0)
    before = {name: p.clone() for name, p in model.state_dict().items() if isinstance(p, torch.Tensor)}
    assert model.itm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.itm_head.weight, tiny().itm_head.weight.bfloat16(), rtol=0, atol=0)
    model.text_proj.weight.register_hook(lambda grad: grad * float("inf"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = train_step(model, model, optimizer, (images, input_ids, mask), grad_clip=5.0)
    assert not torch.isfinite(step["grad_norm"])
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and not name.startswith("target"):
            assert torch.equal(value, before[name]), name
    assert all(torch.isfinite(m).all() for m in optimizer.masters)


def test_momentum_itc_scores_the_target_and_the_queue_and_fills_it():
    """ALBEF's ITC in Mamo: the loss is momentum_itc_loss of the online features against the
    target network's (its own projections) and the queue; a step queues the batch's target
    features; alpha ramps up with the target's updates."""
    model = tiny(("itc", "itm"), itc_queue=10, itc_alpha=0.4, itc_alpha_warmup=4)
    assert {"vision_proj", "text_proj"} <= set(model.target.model)
    images, input_ids, mask = batch(4)
    queue_before = [x.clone() for x in model.itc_queue.keys()[:2]]
    torch.manual_seed(1)
    losses = model(images, input_ids, mask)
    assert int(model.itc_queue.ptr) == 4 and float(model.itc_alpha()) == 0.0  # no update yet: alpha 0
    with torch.no_grad():
        image_feat = model.embed_image(images)[1]
        text_feat = model.embed_text(input_ids, mask)[1]
        target = model.target.model
        image_feat_m = torch.nn.functional.normalize(
            target["vision_proj"](target["visual_encoder"].forward_features(images)[:, 0]), dim=-1)
        text_feat_m = torch.nn.functional.normalize(
            target["text_proj"](target["bert"](input_ids, mask, mode="text")[:, 0]), dim=-1)
        want = momentum_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, model.temp, alpha=0.0,
                                 image_queue=queue_before[0], text_queue=queue_before[1], sample_negatives=False)
    torch.testing.assert_close(losses["itc"].detach(), want.loss)
    torch.testing.assert_close(model.itc_queue.image[:4], image_feat_m)  # the batch's target features queued
    other = momentum_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, model.temp, alpha=0.0,
                              image_queue=-queue_before[0], text_queue=-queue_before[1], sample_negatives=False)
    assert not torch.allclose(other.loss, want.loss)  # the queue's rows are in the loss
    for _ in range(2):
        model.update_target()
    assert float(model.itc_alpha()) == pytest.approx(0.2)
    state = model.state_dict()
    copy_ = tiny(("itc", "itm"), itc_queue=10, itc_alpha=0.4, itc_alpha_warmup=4)
    copy_.load_state_dict(state)
    assert int(copy_.itc_queue.ptr) == 4 and torch.equal(copy_.itc_queue.image, model.itc_queue.image)


def test_momentum_itc_trains_and_fine_tunes_with_ids():
    model = tiny(("itc", "itm"), itc_queue=7, itc_alpha=0.4)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.0)
    images, input_ids, mask = batch(6)
    first = None
    for step in range(8):
        losses = train_step(model, model, optimizer, (images, input_ids, mask), 5.0,
                            image_ids=torch.tensor([0, 1, 2, 0, 3, 4]) if step % 2 else None)
        assert all(torch.isfinite(v) for v in losses.values())
        first = first if first is not None else float(losses["itc"])
    assert float(losses["itc"]) < first
    assert (model.itc_queue.ids[model.itc_queue.ids >= 0].numel()) > 0  # fine-tuning's ids were queued


def test_weights_load_across_the_momentum_itc_switch_and_the_ramp_restarts():
    """A checkpoint without momentum ITC starts one with it (target projections from the online
    ones, ALBEF's queue), and the other way round; each says so. A new run restarts alpha's ramp."""
    plain = tiny(("itc", "itm"))
    queued = tiny(("itc", "itm"), itc_queue=8, itc_alpha=0.4, itc_alpha_warmup=4)
    with pytest.warns(UserWarning, match="no momentum ITC"):
        queued.load_state_dict(plain.state_dict())
    assert torch.equal(queued.target.model["vision_proj"].weight, plain.vision_proj.weight)
    with pytest.warns(UserWarning, match="momentum ITC is off"):
        plain.load_state_dict(queued.state_dict())
    for _ in range(8):
        queued.update_target()
    assert float(queued.itc_alpha()) == pytest.approx(0.4)
    queued.restart_itc_ramp()
    assert float(queued.itc_alpha()) == 0.0
    queued.update_target()
    assert float(queued.itc_alpha()) == pytest.approx(0.1)
