"""The training region op of the cpp backend (``shvit_cpp::shsa_region_train``): GroupNorm,
qkv conv + BatchNorm with batch statistics and attention in one op, against the reference
SHSA module: outputs, input and parameter gradients, BatchNorm running statistics."""
from __future__ import annotations

import copy

import pytest
import torch

import shvit
import shvit.layers
from conftest import assert_rel_close, gemm_isas, use_backend

# every test once per packed-GEMM kernel family this CPU runs (conftest.each_gemm_isa)
pytestmark = pytest.mark.usefixtures("each_gemm_isa")


def _module(dim, pdim, qk_dim, dtype, seed=0):
    torch.manual_seed(seed)
    m = shvit.SHSA(dim, qk_dim, pdim)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_var.uniform_(0.5, 1.5)
                mod.running_mean.normal_(0, 0.1)
    return m.to(dtype).train()


def _input(B, C, H, W, dtype, layout):
    g = torch.Generator().manual_seed(7)
    if layout == "sliced":  # a channel slice of a larger tensor: non-contiguous
        return torch.randn(B, C + 5, H, W, generator=g, dtype=dtype)[:, 2 : 2 + C]
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _count_calls(monkeypatch, name):
    """Counts the calls that shvit.layers makes to its function ``name``."""
    calls = []
    real = getattr(shvit.layers, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(shvit.layers, name, counting)
    return calls


SHAPES = [  # (B, dim, pdim, qk_dim, H, W)
    (16, 336, 72, 16, 8, 8),
    (3, 40, 9, 8, 3, 5),
    (2, 24, 8, 16, 3, 3),
    (2, 19, 1, 16, 7, 1),
    (2, 40, 9, 24, 20, 21),  # several query chunks
    (2, 24, 8, 16, 14, 14),  # 196 queries: query chunks of 64, 64, 64 and 4
]


def _check(actual, ref, exact, what, noise=0.0):
    """float64: within 1e-12 of the float64 reference. float32: the error against the float64
    reference is at most twice the float32 reference's own error (+2e-5, + noise: the float32
    noise floor of an ill-conditioned result, see _GroupNormWeightNoise) -- some of these
    gradients are ill-conditioned (BatchNorm over few tokens, pdim 1), so a fixed relative
    tolerance against the float32 reference would measure the reference's rounding."""
    if actual.dtype == torch.float64:
        assert_rel_close(actual, exact, 1e-12, what)
        return
    rel = lambda a: ((a.double() - exact).norm() / exact.norm().clamp_min(1e-30)).item()
    bound = 2 * rel(ref) + 2e-5 + noise
    assert rel(actual) <= bound, f"{what}: fused {rel(actual):.2e}, reference {rel(ref):.2e}, bound {bound:.2e}"


class _GroupNormWeightNoise:
    """The float32 noise floor of the GroupNorm weight's gradient, from the float64 module's
    GroupNorm (hooked). That gradient is the sum over tokens of dY * xhat per channel, and the
    BatchNorm after the qkv conv removes most of it (the conv output's component along
    y = GroupNorm(x1) is normalised away), so the sum cancels: with pdim 1 every qkv channel
    is an affine function of the one normalised channel, and the sum came out a few hundred
    times smaller than the sum of its terms' magnitudes. Rounding errors of relative size u
    (float32's unit roundoff) and random sign in the terms move such a sum by about
    u * sqrt(sum (dY * xhat)^2); dY itself carries a few of them (dz rounded, then the conv's
    sum over the qkv channels), hence 4 u. relative() returns that over the result's norm:
    about 4e-5 at the pdim-1 shape, below 4e-7 at the others (where the sum does not cancel)."""

    def __init__(self, norm):
        self.sq_sum = None
        self._handle = norm.register_forward_hook(self._forward)

    def _forward(self, mod, inputs, out):
        x1 = inputs[0].detach()
        xhat = torch.nn.functional.group_norm(x1, mod.num_groups, eps=mod.eps)

        def grad_hook(dy):
            t = (dy.detach() * xhat).pow(2).sum((0, 2, 3))
            self.sq_sum = t if self.sq_sum is None else self.sq_sum + t

        out.register_hook(grad_hook)

    def relative(self, grad, dtype):
        self._handle.remove()
        u = torch.finfo(dtype).eps / 2
        return 4 * u * (self.sq_sum.sqrt().norm() / grad.norm().clamp_min(1e-30)).item()


def _two_steps_match_reference(ref, fused, exact, shape, dtype, layout, exact_norm):
    """Two training steps of ref, fused (both in dtype) and exact (float64) on the same inputs:
    outputs, input gradients, then parameter gradients and buffers, checked with _check
    (exact_norm: exact's GroupNorm, whose bias gradient is rounding noise around 0)."""
    B, dim, _, _, H, W = shape
    gn_noise = _GroupNormWeightNoise(exact_norm)
    for step in range(2):  # the second step sees the running statistics of the first
        x = _input(B, dim, H, W, dtype, layout).requires_grad_()
        xf = x.detach().clone().requires_grad_()
        xe = x.detach().double().requires_grad_()
        out_r, out_f, out_e = ref(x), fused(xf), exact(xe)
        _check(out_f, out_r, out_e, f"step {step}: output")
        g = torch.randn_like(out_e)
        out_r.backward(g.to(dtype))
        out_f.backward(g.to(dtype))
        out_e.backward(g)
        _check(xf.grad, x.grad, xe.grad, f"step {step}: input grad")
    params_f, params_r = dict(fused.named_parameters()), dict(ref.named_parameters())
    for name, p in exact.named_parameters():
        if p is exact_norm.bias:
            # rounding noise around 0 (a per-channel shift of the conv input is removed by the
            # BatchNorm): bounded on the scale of the GroupNorm weight's gradient
            scale = exact_norm.weight.grad.norm().item()
            assert params_f[name].grad.norm().item() <= 1e-4 * scale + 1e-12
            continue
        noise = gn_noise.relative(p.grad, dtype) if p is exact_norm.weight else 0.0
        _check(params_f[name].grad, params_r[name].grad, p.grad, f"grad of {name}", noise)
    buffers_f, buffers_r = dict(fused.named_buffers()), dict(ref.named_buffers())
    for name, b in exact.named_buffers():
        assert buffers_f[name].dtype == buffers_r[name].dtype
        if name.endswith("num_batches_tracked"):
            assert torch.equal(buffers_f[name], buffers_r[name]), name
        else:
            _check(buffers_f[name], buffers_r[name], b, f"buffer {name}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_region_train_matches_reference(shape, dtype, momentum, layout, monkeypatch):
    use_backend(monkeypatch, "cpp", "cpu")
    calls = _count_calls(monkeypatch, "shsa_region_train")
    conv_calls = _count_calls(monkeypatch, "conv1x1_train")
    bn_calls = _count_calls(monkeypatch, "bn_train")
    _, dim, pdim, qk_dim, _, _ = shape
    ref = _module(dim, pdim, qk_dim, dtype)
    ref.qkv.bn.momentum = momentum
    exact = copy.deepcopy(ref).double()
    fused = copy.deepcopy(ref)
    fused.fused = True
    _two_steps_match_reference(ref, fused, exact, shape, dtype, layout, exact.pre_norm)
    assert len(calls) == 2, "the region op must run in training on the cpp backend"
    gemm = torch.ops.shvit_cpp.gemm_available()
    assert len(conv_calls) == len(bn_calls) == (2 if dtype == torch.float32 and gemm else 0), "projection ops"


def test_region_train_without_grad_updates_running_stats(monkeypatch):
    use_backend(monkeypatch, "cpp", "cpu")
    calls = _count_calls(monkeypatch, "shsa_region_train")
    ref = _module(40, 9, 8, torch.float32)
    fused = copy.deepcopy(ref)
    fused.fused = True
    x = _input(3, 40, 4, 4, torch.float32, "contiguous")
    with torch.no_grad():
        assert_rel_close(fused(x), ref(x), 2e-5, "output")
    for (name, b), bf in zip(ref.named_buffers(), fused.buffers()):
        assert_rel_close(bf, b, 2e-5, name)
    assert len(calls) == 1


def test_region_train_one_value_per_channel_is_refused_like_reference(monkeypatch):
    use_backend(monkeypatch, "cpp", "cpu")
    ref = _module(24, 8, 16, torch.float32)
    fused = copy.deepcopy(ref)
    fused.fused = True
    x = torch.randn(1, 24, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ref(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fused(x)


def test_region_train_gradcheck(monkeypatch):
    use_backend(monkeypatch, "cpp", "cpu")
    g = torch.Generator().manual_seed(4)
    dt = torch.float64
    P, QK, C = 5, 4, 9
    CQ = 2 * QK + P
    x = torch.randn(2, C, 3, 4, dtype=dt, generator=g, requires_grad=True)
    gw = (torch.rand(P, dtype=dt, generator=g) + 0.5).requires_grad_()
    gb = torch.randn(P, dtype=dt, generator=g, requires_grad=True)
    cw = torch.randn(CQ, P, 1, 1, dtype=dt, generator=g, requires_grad=True)
    bw = (torch.rand(CQ, dtype=dt, generator=g) + 0.5).requires_grad_()
    bb = torch.randn(CQ, dtype=dt, generator=g, requires_grad=True)

    def f(x, gw, gb, cw, bw, bb):
        rm, rv = torch.zeros(CQ, dtype=dt), torch.ones(CQ, dtype=dt)
        return torch.ops.shvit_cpp.shsa_region_train(x, gw, gb, cw, bw, bb, rm, rv, 0.1, 1e-5, 1e-5, P, QK, 0.5)

    assert torch.autograd.gradcheck(f, (x, gw, gb, cw, bw, bb))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(cw=torch.randn(12, 5, 1, 1, dtype=torch.float64)), "conv_weight"),
        (dict(gw=torch.randn(4, dtype=torch.float64)), "gn_weight"),
        (dict(rv=torch.ones(3, dtype=torch.float64)), "running_var"),
        (dict(x=torch.randn(2, 9, 3, 4, dtype=torch.float64).to(torch.int64)), "floating-point"),
        (dict(x=torch.randn(2, 9, 3, dtype=torch.float64)), "shape"),
        (dict(x=torch.randn(2, 9, 3, 4, dtype=torch.float16)), "float32 and float64"),
    ],
)
def test_region_train_op_rejects_bad_arguments(change, match):
    dt = torch.float64
    args = dict(
        x=torch.randn(2, 9, 3, 4, dtype=dt), gw=torch.ones(5, dtype=dt), gb=torch.zeros(5, dtype=dt),
        cw=torch.randn(13, 5, 1, 1, dtype=dt), bw=torch.ones(13, dtype=dt), bb=torch.zeros(13, dtype=dt),
        rm=torch.zeros(13, dtype=dt), rv=torch.ones(13, dtype=dt),
    )
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.shvit_cpp.shsa_region_train(*args.values(), 0.1, 1e-5, 1e-5, 5, 4, 0.5)


def test_region_op_not_used_under_autocast_or_other_backends(monkeypatch):
    calls = _count_calls(monkeypatch, "shsa_region_train")
    m = _module(40, 9, 8, torch.float32)
    m.fused = True
    x = _input(3, 40, 4, 4, torch.float32, "contiguous")
    use_backend(monkeypatch, "torch", "cpu")
    m(x)
    use_backend(monkeypatch, "cpp", "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
    m.eval()(x)
    assert calls == []


def test_region_train_large_image_recomputes_probabilities(monkeypatch):
    """Past the score budget the forward keeps no probabilities and the backward recomputes
    them, one chunk of queries at a time (float32: the channel-major kernels both ways)."""
    use_backend(monkeypatch, "cpp", "cpu")
    B, dim, pdim, qk_dim, H, W = 1, 24, 8, 16, 42, 50  # N = 2100: 1 x N x N floats > 16 MiB
    ref = _module(dim, pdim, qk_dim, torch.float32)
    exact = copy.deepcopy(ref).double()
    fused = copy.deepcopy(ref)
    fused.fused = True
    x = _input(B, dim, H, W, torch.float32, "contiguous").requires_grad_()
    xf = x.detach().clone().requires_grad_()
    xe = x.detach().double().requires_grad_()
    out_r, out_f, out_e = ref(x), fused(xf), exact(xe)
    _check(out_f, out_r, out_e, "output")
    g = torch.randn_like(out_e)
    out_r.backward(g.float())
    out_f.backward(g.float())
    out_e.backward(g)
    _check(xf.grad, x.grad, xe.grad, "input grad")
    _check(fused.qkv.c.weight.grad, ref.qkv.c.weight.grad, exact.qkv.c.weight.grad, "qkv weight grad")


def _fused_float32_case(shape):
    """(fused SHSA module in training, contiguous float32 input, output gradient) for shape."""
    B, dim, pdim, qk_dim, H, W = shape
    base = _module(dim, pdim, qk_dim, torch.float32)
    base.fused = True
    x = _input(B, dim, H, W, torch.float32, "contiguous")
    return base, x, torch.randn(x.shape, generator=torch.Generator().manual_seed(5))


def _training_step(base, x, g):
    """Output, input gradient, parameter gradients and buffers of one step of a copy of base."""
    m = copy.deepcopy(base)
    xi = x.clone().requires_grad_()
    out = m(xi)
    out.backward(g)
    return [out.detach(), xi.grad] + [p.grad for p in m.parameters()] + list(m.buffers())


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
def test_region_train_float32_one_and_two_threads_agree(shape, monkeypatch):
    """float32 (the packed-GEMM path): the whole SHSA training step -- output, every gradient and
    the running statistics -- within 1e-6 with 1 and 2 threads."""
    use_backend(monkeypatch, "cpp", "cpu")
    base, x, g = _fused_float32_case(shape)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_training_step(base, x, g))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert_rel_close(a.double(), b.double(), 1e-6, f"{shape}: 1 vs 2 threads")


def test_region_train_op_counts_the_batch_when_given_its_counter():
    dt = torch.float32
    args = (
        torch.randn(2, 9, 3, 4, dtype=dt), torch.ones(5, dtype=dt), torch.zeros(5, dtype=dt),
        torch.randn(13, 5, 1, 1, dtype=dt), torch.ones(13, dtype=dt), torch.zeros(13, dtype=dt),
        torch.zeros(13, dtype=dt), torch.ones(13, dtype=dt), 0.1, 1e-5, 1e-5, 5, 4, 0.5,
    )
    n = torch.tensor(0, dtype=torch.long)
    torch.ops.shvit_cpp.shsa_region_train(*args, n)
    torch.ops.shvit_cpp.shsa_region_train(*args, n)
    assert int(n) == 2
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        torch.ops.shvit_cpp.shsa_region_train(*args, torch.zeros(1, dtype=torch.int32))
    assert int(n) == 2


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
def test_float32_kernel_families_give_identical_results(shape, monkeypatch):
    """The packed GEMM's kernel families (AVX2, and AVX-512 where the CPU has it) accumulate in
    the same order: the SHSA training step (output, every gradient, the running statistics)
    and the inference ops are bit-identical under each."""
    if len(gemm_isas()) < 2:
        pytest.skip("this CPU runs one kernel family of the packed GEMM")
    use_backend(monkeypatch, "cpp", "cpu")
    base, x, g = _fused_float32_case(shape)
    ops = torch.ops.shvit_cpp
    before = ops.gemm_isa("")
    results = {}
    try:
        for isa in gemm_isas():
            ops.gemm_isa(isa)
            step = _training_step(base, x, g)
            folded = copy.deepcopy(base).eval().fuse(residual=True)
            with torch.no_grad():
                infer = [folded(x), folded(x.contiguous(memory_format=torch.channels_last))]
            results[isa] = step + infer
    finally:
        ops.gemm_isa(before)
    first = results.pop("avx2")
    for isa, res in results.items():
        for i, (a, b) in enumerate(zip(res, first)):
            assert torch.equal(a, b), f"{shape}: result {i} differs between {isa} and avx2"
