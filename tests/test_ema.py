import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from torch import nn

from helpers import DEVICES, needs_extension
from vlfast import _extension
from vlfast.ops import available, ema_decay, ema_update_, ema_update_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Odd sizes, a 0-d tensor, and one spanning several chunks of both kernels (CPU 32768, CUDA 16384).
SHAPES = [(), (1,), (7,), (33, 5), (1023,), (3, 197, 7), (70_001,)]


def random_tensors(shapes, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(device, dtype) for shape in shapes]


def float64_ema(target, source, decay):
    """The update computed in float64 and rounded once into the target's dtype."""
    return [(decay * t.double() + (1 - decay) * s.double()).to(t.dtype) for t, s in zip(target, source)]


@needs_extension  # the kernels' rounding (fp32 math, rounded once); the reference rounds as ALBEF's loop does
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source_dtype", DTYPES)
@pytest.mark.parametrize("target_dtype", DTYPES)
def test_fused_matches_float64_math(device, target_dtype, source_dtype):
    target = random_tensors(SHAPES, target_dtype, device, seed=0)
    source = random_tensors(SHAPES, source_dtype, device, seed=1)
    expected = float64_ema(target, source, 0.995)
    ema_update_(target, source, 0.995)
    for got, want in zip(target, expected):
        assert got.dtype == target_dtype
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_albef_loop_and_foreach_lerp(device, dtype):
    target = random_tensors(SHAPES, dtype, device, seed=2)
    source = random_tensors(SHAPES, dtype, device, seed=3)
    start = [t.clone() for t in target]
    albef = [t.clone() for t in target]
    lerp = [t.clone() for t in target]
    ema_update_reference(albef, source, 0.9)
    torch._foreach_lerp_(lerp, source, 1 - 0.9)
    ema_update_(target, source, 0.9)
    for t, s, got, want_albef, want_lerp in zip(start, source, target, albef, lerp):
        if device == "cpu" and dtype in (torch.float32, torch.float64):
            # Same operations in the same order as ALBEF's loop: bit-identical.
            torch.testing.assert_close(got, want_albef, rtol=0, atol=0)
        # In fp16/bf16 the loop and lerp round each intermediate in that dtype: a few units in
        # the last place of the larger term, which is what they may differ from the fused op by.
        atol = 4 * torch.finfo(dtype).eps * (t.abs() + s.abs()).max().item() if t.numel() else 0
        torch.testing.assert_close(got, want_albef, atol=atol, rtol=0)
        torch.testing.assert_close(got, want_lerp, atol=atol, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_decay_as_float_or_tensor(device, backend, monkeypatch):
    if backend == "fused" and not _extension.has_kernel("ema_update_", device):
        pytest.skip(f"no {device} kernel built")
    monkeypatch.setenv("VLFAST_BACKEND", backend)
    source = random_tensors(SHAPES, torch.float32, device, seed=4)
    start = random_tensors(SHAPES, torch.float32, device, seed=5)
    expected = float64_ema(start, source, 0.75)
    for decay in (0.75, torch.tensor(0.75), torch.tensor(0.75, dtype=torch.float64, device=device)):
        target = [t.clone() for t in start]
        ema_update_(target, source, decay)
        for got, want in zip(target, expected):
            torch.testing.assert_close(got, want)


@pytest.mark.cuda
def test_gpu_decay_costs_no_host_sync():
    target = random_tensors(SHAPES, torch.bfloat16, "cuda", seed=15)
    source = random_tensors(SHAPES, torch.float32, "cuda", seed=16)
    decay = torch.tensor(0.9, device="cuda")
    expected = float64_ema(target, source, 0.9)
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        ema_update_(target, source, decay)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, want in zip(target, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_decay_endpoints_are_exact(device):
    source = random_tensors(SHAPES, torch.float32, device, seed=6)
    target = random_tensors(SHAPES, torch.float32, device, seed=7)
    before = [t.clone() for t in target]
    ema_update_(target, source, 1.0)
    for got, want in zip(target, before):
        assert torch.equal(got, want)
    ema_update_(target, source, 0.0)
    for got, want in zip(target, source):
        assert torch.equal(got, want)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.linear = nn.Linear(6, 5)
        self.norm = nn.BatchNorm1d(5)


@pytest.mark.parametrize("device", DEVICES)
def test_modules_average_floats_and_copy_the_rest(device):
    torch.manual_seed(8)
    online, momentum = Tiny().to(device), Tiny().to(device)
    online.norm(torch.randn(4, 5, device=device))  # moves running stats and num_batches_tracked
    momentum.requires_grad_(False)
    online_state = {k: v.clone() for k, v in online.state_dict().items()}
    momentum_state = {k: v.clone() for k, v in momentum.state_dict().items()}

    ema_update_(momentum, online, 0.995)

    for name, got in momentum.state_dict().items():
        if got.is_floating_point():
            want = float64_ema([momentum_state[name]], [online_state[name]], 0.995)[0]
            torch.testing.assert_close(got, want, msg=name)
        else:
            assert torch.equal(got, online_state[name]), name
    assert momentum.norm.num_batches_tracked.item() == 1


def test_modules_whose_params_require_grad():
    online, momentum = Tiny(), Tiny()
    want = float64_ema([momentum.linear.weight], [online.linear.weight], 0.5)[0]
    ema_update_(momentum, online, 0.5)
    torch.testing.assert_close(momentum.linear.weight.detach(), want)
    assert momentum.linear.weight.requires_grad and momentum.linear.weight.grad_fn is None


@needs_extension  # the kernels' rounding (fp32 math, rounded once); the reference rounds as ALBEF's loop does
def test_mixed_precision_modules():
    online = Tiny().to(torch.bfloat16)
    momentum = Tiny()
    want = float64_ema([momentum.linear.weight], [online.linear.weight], 0.9)[0]
    ema_update_(momentum, online, 0.9)
    assert momentum.linear.weight.dtype == torch.float32
    torch.testing.assert_close(momentum.linear.weight.detach(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    assert ema_update_([], [], 0.5) is None
    ema_update_(nn.Module(), nn.Module(), 0.5)
    # Empty tensors between non-empty ones: skipped without shifting which pairs get updated.
    g = torch.Generator().manual_seed(5)
    sizes = [0, 7, 0, 3, 0]
    target = [torch.randn(n, generator=g).to(device) if n else torch.empty(3, 0, device=device) for n in sizes]
    source = [torch.randn(n, generator=g).to(device) if n else torch.empty(3, 0, device=device) for n in sizes]
    want = float64_ema(target, source, 0.5)
    ema_update_(target, source, 0.5)
    for got, expected in zip(target, want):
        torch.testing.assert_close(got, expected)


@needs_extension  # the kernels' rounding (fp32 math, rounded once); the reference rounds as ALBEF's loop does
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_views_write_nothing_outside(device, dtype):
    # Targets and sources start at odd element offsets of larger buffers, so the kernels take
    # their unaligned paths; the sentinel around each target must stay untouched.
    sizes = [1, 5, 17, 4099, 40_001]
    sentinel = 1234.0
    target_buffer = torch.full((sum(sizes) + 3 * len(sizes) + 3,), sentinel, device=device, dtype=dtype)
    source_buffer = torch.randn(target_buffer.numel() + 1, device=device).to(dtype)
    targets, sources, offset = [], [], 1
    for size in sizes:
        targets.append(target_buffer[offset:offset + size])
        sources.append(source_buffer[offset + 1:offset + 1 + size])
        targets[-1].normal_()
        offset += size + 3
    expected = float64_ema(targets, sources, 0.3)
    untouched = target_buffer.clone()
    ema_update_(targets, sources, 0.3)
    for got, want in zip(targets, expected):
        torch.testing.assert_close(got, want)
    outside = torch.ones_like(target_buffer, dtype=torch.bool)
    offset = 1
    for size in sizes:
        outside[offset:offset + size] = False
        offset += size + 3
    assert torch.equal(target_buffer[outside], untouched[outside])


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_and_strided_sources(device):
    # More tensors than one CUDA launch carries (96), and sources that are transposed views.
    shapes = [(i % 13 + 1, i % 7 + 2) for i in range(250)]
    target = random_tensors(shapes, torch.float32, device, seed=9)
    source = [s.t().contiguous().t() for s in random_tensors(shapes, torch.float32, device, seed=10)]
    assert not source[5].is_contiguous()
    expected = float64_ema(target, source, 0.99)
    ema_update_(target, source, 0.99)
    for got, want in zip(target, expected):
        torch.testing.assert_close(got, want)


def bad_input_cases():
    x, y = torch.zeros(3), torch.zeros(3)
    return [
        ([x], [y, y], 0.5, ValueError, "target has 1 tensors but source has 2"),
        ([x], [torch.zeros(4)], 0.5, ValueError, r"target\[0\] has shape \(3,\) but source\[0\] has shape \(4,\)"),
        ([x, x, x], [y, y, torch.zeros(3, 1)], 0.5, ValueError, r"target\[2\] has shape \(3,\) but source\[2\] has"),
        ([x, x], [y, torch.zeros(3, dtype=torch.bool)], 0.5, TypeError, r"source\[1\] has dtype torch.bool"),
        ([x], [y], 1.5, ValueError, r"decay must be in \[0, 1\], got 1.5"),
        ([x], [y], -0.1, ValueError, r"decay must be in \[0, 1\]"),
        ([x], [y], float("nan"), ValueError, r"decay must be in \[0, 1\], got nan"),
        ([x], [y], torch.tensor(float("nan")), ValueError, r"decay must be in \[0, 1\], got nan"),
        ([x], [y], torch.tensor([0.5]), ValueError, "decay must be a float or a 0-d tensor"),
        ([x], [y], torch.tensor(1), TypeError, "decay must be a floating-point tensor"),
        ([x], [y], "0.5", TypeError, "decay must be a float or a 0-d tensor, got str"),
        ([x], [y], True, TypeError, "decay must be a float or a 0-d tensor, got bool"),
        ([torch.zeros(3, dtype=torch.int64)], [y], 0.5, TypeError, r"target\[0\] has dtype torch.int64"),
        ([x], [torch.zeros(3, dtype=torch.int32)], 0.5, TypeError, r"source\[0\] has dtype torch.int32"),
        ([x, torch.zeros(2, 3).t()], [y, torch.zeros(3, 2)], 0.5, ValueError, r"target\[1\] is not contiguous"),
        ([x, [1.0]], [y, y], 0.5, TypeError, r"target\[1\] must be a tensor, got list"),
        ([x, x], [y, torch.zeros(3, device="meta")], 0.5, ValueError, r"source\[1\] is on meta but the first target is on cpu"),
        ([x], [y], torch.tensor(0.5, device="meta"), ValueError, "decay is on meta"),
        (Tiny(), [y], 0.5, TypeError, "source must be an nn.Module like the other argument, got list"),
        (Tiny(), nn.Linear(6, 5), 0.5, ValueError, r"different parameters: only in target \['embed.weight'"),
    ]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("target, source, decay, error, message", bad_input_cases())
def test_bad_inputs_name_the_argument(target, source, decay, error, message, backend, monkeypatch):
    if backend == "fused" and _extension.LOAD_ERROR is not None:
        pytest.skip("vlfast._C not built")
    monkeypatch.setenv("VLFAST_BACKEND", backend)
    with pytest.raises(error, match=message):
        ema_update_(target, source, decay)


def test_module_shape_mismatch_names_the_parameter():
    small, big = nn.Linear(3, 2), nn.Linear(3, 4)
    with pytest.raises(ValueError, match=r"target parameter 'weight' has shape \(2, 3\) but the source of"):
        ema_update_(small, big, 0.5)


@needs_extension
def test_kernel_checks_guard_direct_calls():
    decay = torch.tensor(0.5)
    for target, source, message in [
        ([torch.zeros(3)], [torch.zeros(4)], r"target\[0\] has shape \[3\] but source\[0\] has shape \[4\]"),
        ([torch.zeros(3)], [torch.zeros(3, dtype=torch.int8)], r"target\[0\] is Float and source\[0\] is Char"),
        ([torch.zeros(3, 2).t()], [torch.zeros(2, 3)], r"target\[0\] is not contiguous"),
        ([torch.zeros(3)], [], "target has 1 tensors but source has 0"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            torch.ops.vlfast.ema_update_(target, source, decay, [])


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("copy_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("source_dtype", DTYPES)
def test_copies_receive_the_updated_target_rounded_once(monkeypatch, backend, device, copy_dtype, source_dtype):
    if backend == "fused" and _extension.LOAD_ERROR is not None:
        pytest.skip("vlfast._C not built")
    monkeypatch.setenv("VLFAST_BACKEND", backend)
    target = random_tensors(SHAPES, torch.float32, device, seed=21)
    source = random_tensors(SHAPES, source_dtype, device, seed=22)
    expected = float64_ema(target, source, 0.995) if backend == "fused" else None
    plain = [t.clone() for t in target]
    ema_update_(plain, source, 0.995)  # the same update without copies
    # every other tensor copied, the rest None or the target itself (both mean: no copy)
    copies = [torch.full(t.shape, float("nan"), device=device, dtype=copy_dtype) if i % 2 == 0 else (None, t)[i % 4 == 3]
              for i, t in enumerate(target)]
    ema_update_(target, source, 0.995, copies=copies)
    for i, (t, c, p) in enumerate(zip(target, copies, plain)):
        torch.testing.assert_close(t, p, rtol=0, atol=0)  # copies change nothing about the update
        if expected is not None:
            torch.testing.assert_close(t, expected[i])
        if i % 2 == 0:
            torch.testing.assert_close(c, t.to(copy_dtype), rtol=0, atol=0)  # what a cast gives: round to nearest


def test_copies_of_a_module_pair_by_name_and_skip_shared_tensors():
    torch.manual_seed(0)
    target, source = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3)), nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3))
    copy = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3))
    copy[0].to(torch.bfloat16)
    copy[1].weight, copy[1].bias = target[1].weight, target[1].bias  # shared: updated once, as the target
    ema_update_(target, source, 0.5, copies=copy)
    for name, t in target.named_parameters():
        assert torch.equal(dict(copy.named_parameters())[name], t.to(dict(copy.named_parameters())[name].dtype)), name
    with pytest.raises(ValueError, match=r"copies has no tensor named \['1.bias', '1.weight'\]"):
        ema_update_(target, source, 0.5, copies=nn.Sequential(nn.Linear(5, 3)))


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_bad_copies_are_named(monkeypatch, backend):
    if backend == "fused" and _extension.LOAD_ERROR is not None:
        pytest.skip("vlfast._C not built")
    monkeypatch.setenv("VLFAST_BACKEND", backend)
    target, source = [torch.zeros(3), torch.zeros(2)], [torch.ones(3), torch.ones(2)]
    for copies, error, message in [
        ([None], ValueError, "copies has 1 entries but target has 2"),
        ([None, torch.zeros(2, dtype=torch.float64)], TypeError, r"the copy of target\[1\] is torch.float64 of a torch.float32 target"),
        ([torch.zeros(4, dtype=torch.bfloat16), None], ValueError, r"the copy of target\[0\] must be contiguous, of shape \(3,\)"),
    ]:
        with pytest.raises(error, match=message):
            ema_update_(target, source, 0.5, copies=copies)
    half_target = [torch.zeros(3, dtype=torch.float16)]
    with pytest.raises(TypeError, match="copies are bfloat16 or float16 copies of float32 targets"):
        ema_update_(half_target, [torch.ones(3)], 0.5, copies=[torch.zeros(3, dtype=torch.bfloat16)])


def test_ema_decay_schedule():
    assert ema_decay(0) == 0.995 and ema_decay(10**6, 0.9) == 0.9
    assert ema_decay(0, 0.999, warmup_power=0.75) == 0.0
    assert ema_decay(4, 0.999, warmup_gamma=4.0, warmup_power=0.5) == pytest.approx(1 - 2**-0.5)
    steps = [ema_decay(t, 0.999, warmup_power=2 / 3) for t in range(0, 100_000, 997)]
    assert steps == sorted(steps) and steps[-1] == 0.999
    for kwargs, message in [
        (dict(step=-1), "step must be >= 0"),
        (dict(step=0, decay=1.1), r"decay must be in \[0, 1\]"),
        (dict(step=0, warmup_power=0.0), "warmup_gamma and warmup_power must be > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            ema_decay(**kwargs)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for decay in (torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.9, device=device)):
        target = random_tensors(SHAPES, torch.float32, device, seed=11) + [torch.randn(4, device=device).half()]
        source = random_tensors(SHAPES, torch.float32, device, seed=12) + [torch.randn(4, device=device)]
        torch.library.opcheck(torch.ops.vlfast.ema_update_.default, (target, source, decay, []))
        copies = [torch.empty(t.shape, device=device, dtype=torch.bfloat16) for t in target[:-1]]
        torch.library.opcheck(torch.ops.vlfast.ema_update_.default, (target[:-1], source[:-1], decay, copies))


@needs_extension
def test_torch_compile_traces_the_op():
    def step(target, source, decay):
        torch.ops.vlfast.ema_update_(target, source, decay, [])
        return target[0] * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    target = random_tensors(SHAPES, torch.float32, "cpu", seed=13)
    source = random_tensors(SHAPES, torch.float32, "cpu", seed=14)
    expected = float64_ema(target, source, 0.9)
    doubled = compiled(target, source, torch.tensor(0.9, dtype=torch.float64))
    for got, want in zip(target, expected):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(doubled, 2 * expected[0])


@needs_extension
def test_available_reports_the_built_kernels():
    assert available()["ema_update_"]["cpu"] == "fused"
    assert available()["ema_update_"]["cuda"] == ("fused" if _extension.has_kernel("ema_update_", "cuda") else "reference")
    assert available()["attention"]["cpu"] == "fused"  # the C++ kernel
    # torch paths by choice, kernel or not (measured faster on an H200, or Triton on the CPU)
    assert available()["itc_loss"]["cpu"] == available()["dropout_add_layer_norm"]["cuda"] == "torch"
    assert available()["attention"]["cuda"] == "torch"


def test_backend_switch(monkeypatch):
    monkeypatch.setenv("VLFAST_BACKEND", "reference")
    assert _extension.implementation("ema_update_", "cpu") == "reference"
    monkeypatch.setenv("VLFAST_BACKEND", "fused")
    monkeypatch.setitem(_extension.KERNELS, "no_such_op", "no_such_kernel")
    with pytest.raises(RuntimeError, match="no cpu kernel for no_such_op.*python setup.py build_ext --inplace"):
        _extension.implementation("no_such_op", "cpu")
    monkeypatch.setenv("VLFAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="VLFAST_BACKEND must be auto, fused or reference, got 'fast'"):
        ema_update_([torch.zeros(1)], [torch.ones(1)], 0.5)


def test_reference_ops_switch_one_op(monkeypatch):
    monkeypatch.setenv("VLFAST_BACKEND", "auto")
    monkeypatch.setenv("VLFAST_REFERENCE_OPS", " attention,unmask ")
    assert _extension.implementation("attention", "cuda") == "reference"
    assert _extension.implementation("itc_loss", "cuda") == (
        "kernel" if _extension.has_kernel("itc_loss_rows", "cuda") else "torch")
    assert _extension.implementation("unmask", "cpu") == "reference"
    assert _extension.implementation("ema_update_", "cpu") == (
        "kernel" if _extension.has_kernel("ema_update_", "cpu") else "reference")
    monkeypatch.setenv("VLFAST_REFERENCE_OPS", "attention,dropout")
    with pytest.raises(ValueError, match=r"VLFAST_REFERENCE_OPS names no op \['dropout'\]; the ops: ema_update_, "):
        ema_update_([torch.zeros(1)], [torch.ones(1)], 0.5)


@needs_extension
@pytest.mark.skipif(not _extension.has_kernel("attention", "cuda"), reason="Triton not installed")
def test_one_function_chooses_every_path_from_one_table(monkeypatch, request):
    request.addfinalizer(lambda: _extension._SETTINGS.update(read=None))  # decide again after the patches
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("VLFAST_BACKEND", "auto")
    for op, device in _extension.TORCH_BY_DEFAULT:  # the table available() reports
        assert _extension.implementation(op, device) == "torch", (op, device)
    assert _extension.implementation("itc_loss", "cuda") == "kernel"
    assert _extension.implementation("attention", "cpu") == "kernel"  # the C++ kernel
    monkeypatch.setitem(_extension._KERNELS_FOUND, ("itc_loss_rows", "cuda"), False)  # as without Triton
    monkeypatch.setenv("VLFAST_REFERENCE_OPS", "unmask")  # new settings: each choice is made again
    assert _extension.implementation("itc_loss", "cuda") == "torch"
    monkeypatch.setenv("VLFAST_BACKEND", "fused")
    with pytest.raises(RuntimeError, match="VLFAST_BACKEND=fused but vlfast has no cuda kernel for itc_loss"):
        _extension.implementation("itc_loss", "cuda")
    assert _extension.implementation("attention", "cuda") == "kernel"
    assert _extension.implementation("attention", "cpu") == "kernel"  # Triton on a CPU: interpreter only
    assert _extension.implementation("itc_loss", "cpu") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _extension.implementation("attention", "cpu") == "interpreted"
    assert _extension.implementation("dropout_add_layer_norm", "cpu") == "kernel"  # its tests call the launchers
    monkeypatch.setenv("VLFAST_BACKEND", "reference")
    assert _extension.implementation("attention", "cuda") == "reference"
    assert available()["attention"] == {"cpu": "reference", "cuda": "reference"}


def test_each_choice_is_made_once_per_setting(monkeypatch):
    monkeypatch.setenv("VLFAST_BACKEND", "auto")
    with mock.patch.object(_extension, "_decide", wraps=_extension._decide) as decide:
        for _ in range(3):
            _extension.implementation("unmask", "cpu")
        monkeypatch.setenv("VLFAST_BACKEND", "reference")
        for _ in range(3):
            _extension.implementation("unmask", "cpu")
    # Every (op, device type) is decided together when the settings are read: once per setting
    # (not at all for the first where an earlier call read it already), never per call.
    unmask_cpu = [c for c in decide.call_args_list if c.args[:2] == ("unmask", "cpu")]
    assert len(unmask_cpu) in (1, 2)
    assert decide.call_count == len(unmask_cpu) * len(_extension.KERNELS) * len(_extension.DEVICE_TYPES)


def test_import_without_extension_warns_once_and_uses_the_reference():
    script = (
        "import sys, warnings, torch\n"
        "sys.modules['vlfast._C'] = None\n"  # makes `from vlfast import _C` fail as if never built
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import vlfast\n"
        "from vlfast.ops import available, ema_update_\n"
        "print(len(caught), caught[0].message)\n"
        "t = [torch.zeros(3)]\n"
        "ema_update_(t, [torch.ones(3)], 0.25)\n"
        "print(t[0].tolist(), available()['ema_update_'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VLFAST_BACKEND"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("1 vlfast._C could not be loaded")
    assert "python setup.py build_ext --inplace" in lines[0]
    assert lines[1] == "[0.75, 0.75, 0.75] {'cpu': 'reference', 'cuda': 'reference'}"


def test_ema_decay_of_an_update_count_on_the_device_follows_the_same_schedule():
    """MomentumModel keeps its update count in a tensor (a CUDA graph's replays advance it): the
    warmup's decay computed from it equals the host's, and the count survives a state_dict."""
    for step in (0, 1, 7, 1000, 10**6):
        got = ema_decay(torch.tensor(step), 0.999, warmup_gamma=2.0, warmup_power=0.75)
        assert isinstance(got, torch.Tensor) and got.item() == pytest.approx(
            ema_decay(step, 0.999, warmup_gamma=2.0, warmup_power=0.75), rel=1e-12, abs=1e-15)
    assert ema_decay(torch.tensor(5), 0.9) == 0.9
    from vlfast.nn import MomentumModel

    online = torch.nn.Linear(3, 2)
    momentum = MomentumModel(online, 0.9, warmup_power=0.75)
    for _ in range(3):
        momentum.update(online)
    assert momentum.step.device == online.weight.device and int(momentum.step) == 3
    restored = MomentumModel(torch.nn.Linear(3, 2), 0.9, warmup_power=0.75)
    restored.load_state_dict(momentum.state_dict())
    assert int(restored.step) == 3
    restored.load_state_dict({**momentum.state_dict(), "_extra_state": {"step": 41}})  # an older checkpoint's int
    assert int(restored.step) == 41
