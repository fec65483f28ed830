"""bfloat16 inference of a folded fused model on CPU: the oneDNN path (bfloat16 hardware), the
same with its GEMM blocks on our bfloat16 GEMM (AMX tiles where the CPU has them, and
AVX512-BF16), and the float32 path a bfloat16 model takes on CPUs without bfloat16 hardware, as
``model.to(torch.bfloat16)`` and under ``torch.autocast("cpu", torch.bfloat16)``, against the
float64 reference within twice the error of the eager model computed the same way,
element-wise."""
from __future__ import annotations

import copy

import pytest
import torch

import shvit
from conftest import assert_close_to_exact, load_golden, randomize_bn, use_backend, with_threads
import shvit_kernels
from shvit_kernels import backend, onednn
from shvit_kernels.plan import call

pytestmark = pytest.mark.skipif(not backend.cpp_available(), reason="needs the C++ extension")

BF16 = torch.bfloat16
# the oneDNN path runs wherever oneDNN computes bfloat16 (natively with AMX/AVX512-BF16,
# emulated on other AVX-512 CPUs, where the model would not choose it): forced in the tests
ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
OWN_GEMM = backend.cpp_available() and torch.ops.shvit_cpp.bf16_gemm_available()
# our GEMM's kernels on this CPU: AMX tiles (where the CPU has them) and AVX512-BF16
KERNELS = (["amx"] if OWN_GEMM and torch.ops.shvit_cpp.bf16_gemm_kernel() == "amx" else []) + ["avx512_bf16"]
PATHS = ["onednn", *(f"own-gemm-{k}" for k in KERNELS), "float32"]


@pytest.fixture
def bf16_kernel(request):
    """Our bfloat16 GEMM on ``request.param`` (one of KERNELS), restored after."""
    if not OWN_GEMM:
        pytest.skip("our bfloat16 GEMM needs AVX512-BF16 (and the avx512 level)")
    before = torch.ops.shvit_cpp.bf16_gemm_kernel()
    torch.ops.shvit_cpp.bf16_gemm_kernel(request.param)
    yield request.param
    torch.ops.shvit_cpp.bf16_gemm_kernel(before)


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Which path bfloat16 inference takes ("own-gemm-<kernel>": the GEMM blocks on our
    bfloat16 GEMM with that kernel), and a record of the functions that made its bfloat16
    steps."""
    if request.param != "float32" and not ONEDNN_BF16:
        pytest.skip("oneDNN has no bfloat16 support on this CPU (needs AVX-512)")
    if request.param != "float32" and not shvit_kernels._cpp.gemm_available():
        pytest.skip("the bfloat16 blocks need the packed GEMM (the avx2 level or above)")
    own = request.param.startswith("own-gemm")
    if own and not OWN_GEMM:
        pytest.skip("our bfloat16 GEMM needs AVX512-BF16 (and the avx512 level)")
    use_backend(monkeypatch, "cpp", "cpu")
    monkeypatch.setattr(onednn, "_hardware", request.param != "float32")
    monkeypatch.setattr(onednn, "_own", own)
    if own:
        before = torch.ops.shvit_cpp.bf16_gemm_kernel()
        torch.ops.shvit_cpp.bf16_gemm_kernel(request.param.removeprefix("own-gemm-"))
        request.addfinalizer(lambda: torch.ops.shvit_cpp.bf16_gemm_kernel(before))
    calls = []  # the functions that make oneDNN steps (run by a module, or planned by a model)
    for name in ("conv1x1", "conv_step", "ffn_step", "shsa_step", "se_step"):
        real = getattr(onednn, name)
        monkeypatch.setattr(onednn, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return request.param, calls


def _models(config: dict, state: dict):
    ref = shvit.SHViT(**config).eval()
    ref.load_state_dict(state)
    fused = shvit.SHViT(**config, fused=True).eval()
    fused.load_state_dict(state)
    return ref, fused.fuse()


def _check_path(path, calls, out):
    name, calls = path
    assert out.dtype == BF16
    if name != "float32":
        # the SE gate is one step in a model's plan, two conv1x1 calls module by module (autocast)
        assert {"conv_step", "ffn_step", "shsa_step"} <= set(calls), "every kind of layer ran on oneDNN"
        assert {"se_step", "conv1x1"} & set(calls), "the SE gate's 1x1 convs ran on oneDNN"
    else:
        assert not calls, "CPUs without bfloat16 hardware run the float32 kernels"


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
def test_golden_bf16_model(name, path):
    """``model.to(torch.bfloat16)`` on the golden batch: logits within twice eager bfloat16's
    error (eager: the folded reference model in bfloat16, channels_last)."""
    g = load_golden(name)
    ref, fused = _models(g["config"], g["state_dict_official"])
    exact = g["eval_logits"]
    x = g["input"].to(BF16)
    eager = copy.deepcopy(ref).fuse().to(BF16).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = eager(x.contiguous(memory_format=torch.channels_last))
        got = fused.to(BF16)(x)
    _check_path(path, path[1], got)
    assert_close_to_exact(got, exact, want, f"{name} bfloat16 logits ({path[0]} path)")


def test_golden_autocast(path):
    """A float32 folded fused model under CPU bfloat16 autocast, against the float32 reference
    model under the same autocast."""
    g = load_golden("tiny_b")
    ref, fused = _models(g["config"], g["state_dict_official"])
    x = g["input"].float()
    with torch.inference_mode(), torch.autocast("cpu", BF16):
        want = ref(x)
        got = fused(x)
    if path[0] != "float32":
        _check_path(path, path[1], got)
    assert_close_to_exact(got, g["eval_logits"], want, "autocast logits", dtype=BF16)


@pytest.mark.parametrize("variant", sorted(shvit.VARIANTS))
def test_variants_bf16(variant, path):
    """Every variant with non-trivial BatchNorms, batch 3 at 80x112 px (5x7, 3x4 and 2x2 token
    grids), against the float64 reference."""
    ref = randomize_bn(shvit.create_model(variant), seed=2).eval()
    fused = shvit.create_model(variant, fused=True).eval()
    fused.load_state_dict(ref.state_dict())
    fused.fuse().to(BF16)
    x = torch.randn(3, 3, 80, 112, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        exact = ref.double()(x.double())
        eager = copy.deepcopy(ref).fuse().to(BF16).to(memory_format=torch.channels_last)
        want = eager(x.to(BF16).contiguous(memory_format=torch.channels_last))
        got = fused(x.to(BF16))
    _check_path(path, path[1], got)
    assert_close_to_exact(got, exact, want, f"{variant} bfloat16 logits ({path[0]} path)")


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "autocast"])
@pytest.mark.parametrize("variant", ["shvit_s1", "shvit_s3"])
def test_plan_matches_modules(variant, autocast, path):
    """With bfloat16 hardware a bfloat16 model (or a float32 one under bfloat16 autocast) runs
    as one plan of C++ blocks: with one thread, features bit for bit those of its modules run
    one by one (the same calls); with two (each on half of the batch) bit for bit where no
    oneDNN op runs (our AVX512-BF16 GEMM), while oneDNN may block a half batch's GEMM
    otherwise (seen on an AMX CPU), so there the logits are held to the bound below; logits
    within twice eager bfloat16's error; batch 4 at 80x112 px. Without the hardware no
    bfloat16 plan is made (the float32 copy runs, or the modules under autocast)."""
    ref = randomize_bn(shvit.create_model(variant), seed=3).eval()
    fused = shvit.create_model(variant, fused=True).eval()
    fused.load_state_dict(ref.state_dict())
    fused.fuse()
    x = torch.randn(4, 3, 80, 112, generator=torch.Generator().manual_seed(1))
    if not autocast:
        fused, x = fused.to(BF16), x.to(BF16)
    with torch.inference_mode(), torch.autocast("cpu", BF16, enabled=autocast):
        plan = fused._cpu_plan(x)
        if path[0] == "float32":
            assert plan is None
            return
        assert plan is not None
        got = with_threads(lambda: fused(x))
        features = with_threads(lambda: fused._features(x, plan))
        modules = with_threads(lambda: fused._features(x, None), (1,))[0]
    bitwise = features if path[0] == "own-gemm-avx512_bf16" else features[:1]
    assert all(f.dtype == BF16 and torch.equal(f, modules) for f in bitwise)
    with torch.inference_mode():
        exact = ref.double()(x.double())
        eager = copy.deepcopy(ref).fuse().to(BF16).to(memory_format=torch.channels_last)
        want = eager(x.to(BF16).contiguous(memory_format=torch.channels_last))
    for logits, threads in zip(got, (1, 2)):
        _check_path(path, path[1], logits)
        assert_close_to_exact(logits, exact, want,
                              f"{variant} bfloat16 plan logits (autocast {autocast}, {threads} threads)")


def test_weight_changes_reach_the_cached_weights(path):
    """Packed (oneDNN) and float32 (fallback) copies of the weights follow in-place updates."""
    g = load_golden("tiny_a")
    _, fused = _models(g["config"], g["state_dict_official"])
    fused.to(BF16)
    x = g["input"].to(BF16)
    with torch.no_grad():
        before = fused(x)
        for p in fused.parameters():
            p.mul_(0.5)
        after = fused(x)
        want = copy.deepcopy(fused)(x)  # new tensors: nothing cached
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, want, rtol=0, atol=0)


def test_conditions(path):
    """The oneDNN path is for bfloat16 (or float32 under bfloat16 autocast) CPU inference only."""
    x = torch.randn(2, 8, 4, 4)
    w = torch.randn(8, 8, 1, 1)
    on = path[0] != "float32"
    assert onednn.applies(x.to(BF16), w.to(BF16)) == on
    assert not onednn.applies(x, w)
    assert not onednn.applies(x.half(), w.half())
    assert not onednn.applies(x[:0].to(BF16), w.to(BF16))
    with torch.autocast("cpu", BF16):
        assert onednn.applies(x, w) == on
    with torch.enable_grad():
        assert not onednn.applies(x.to(BF16), w.to(BF16).requires_grad_())
    with torch.no_grad():
        assert onednn.applies(x.to(BF16), w.to(BF16).requires_grad_()) == on


def test_empty_batch_and_gradients(path):
    g = load_golden("tiny_a")
    ref, fused = _models(g["config"], g["state_dict_official"])
    fused.to(BF16)
    with torch.no_grad():
        assert fused(torch.empty(0, 3, 64, 64, dtype=BF16)).shape == (0, g["config"].get("num_classes", 1000))
    # with a gradient to compute, the model runs the bfloat16 composition (no cached copies)
    x = g["input"].to(BF16).requires_grad_()
    fused(x).float().sum().backward()
    assert x.grad is not None and x.grad.dtype == BF16
    assert not path[1]


@pytest.mark.skipif(not shvit_kernels.pointwise.gemm_available(), reason="the attention op runs on the packed GEMM (AVX2)")
@pytest.mark.parametrize("shape", [(2, 24, 5, 7), (3, 40, 1, 1), (1, 56, 14, 14), (0, 24, 3, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_block_helper_ops_match_composition(shape, dtype):
    """The two C++ steps of the bfloat16 SHSA block against their torch composition in float64:
    GroupNorm rows of x1, and ReLU(concat(attention, x2)) from token rows of q, k, v; odd
    token counts, one token, an empty batch."""
    B, C, H, W = shape
    pdim, qk = C // 4 + 1, 16
    g = torch.Generator().manual_seed(C + H)
    x = (torch.randn(B, C, H, W, generator=g) * 2 + 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
    rows = x.permute(0, 2, 3, 1).reshape(B, H * W, C).double()
    x1 = rows[..., :pdim]
    d = x1 - x1.mean((1, 2), keepdim=True)
    want_xh = d / (d.square().mean((1, 2), keepdim=True) + 1e-5).sqrt()
    got_xh = torch.ops.shvit_cpp.gn_rows(x, pdim, 1e-5)
    assert got_xh.dtype == dtype and got_xh.shape == (B * H * W, pdim)
    qkv = (torch.randn(B * H * W, 2 * qk + pdim, generator=g) * 0.5).to(dtype)
    q, k, v = qkv.double().view(B, H * W, 2 * qk + pdim).split([qk, qk, pdim], dim=2)
    want_z = torch.cat([torch.softmax(q @ k.transpose(1, 2), -1) @ v, rows[..., pdim:]], dim=2).relu()
    got_z = torch.ops.shvit_cpp.attend_concat_relu(qkv, x, pdim, qk)
    assert got_z.dtype == dtype and got_z.shape == (B * H * W, C)
    # float32 math, one rounding to the output dtype
    tol = 2 * torch.finfo(dtype).eps if dtype == BF16 else 1e-5
    for got, want in ((got_xh, want_xh.reshape(-1, pdim)), (got_z, want_z.reshape(-1, C))):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item() if want.numel() else 1))


@pytest.mark.parametrize("relu", [False, True])
def test_conv1x1_with_residual(path, relu):
    """The public ``conv1x1`` with a residual (no layer of SHViT uses it so) in bfloat16, against
    the float64 composition within twice the bfloat16 composition's error."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 24, 5, 3, generator=g).to(BF16)
    w, b = torch.randn(40, 24, 1, 1, generator=g).to(BF16) / 5, torch.randn(40, generator=g).to(BF16)
    res = torch.randn(2, 40, 5, 3, generator=g).to(BF16)

    def compose(*t):
        y = torch.nn.functional.conv2d(t[0], t[1], t[2]) + t[3]
        return y.relu() if relu else y

    with torch.no_grad():
        got = shvit_kernels.conv1x1(x, w, b, relu=relu, residual=res)
        exact = compose(*(t.double() for t in (x, w, b, res)))
        eager = compose(x, w, b, res)
    assert ("conv1x1" in path[1]) == (path[0] != "float32")
    assert_close_to_exact(got, exact, eager, f"conv1x1 + residual, relu {relu}")


@pytest.mark.parametrize("cin,cout,stride,groups", [(96, 192, 2, 1), (24, 48, 2, 1), (40, 40, 1, 40), (48, 48, 2, 48)])
def test_conv_weight_per_input_shape(path, cin, cout, stride, groups):
    """One bfloat16 conv over inputs of ten shapes (batch, odd and even sizes, down to 1x1),
    then the first again: its weight is reordered for each input shape (more shapes than the
    cache keeps), every output within twice the eager bfloat16 error of the float64 conv."""
    g = torch.Generator().manual_seed(cin + cout)
    conv = torch.nn.Conv2d(cin, cout, 3, stride, 1, groups=groups).to(BF16)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (cin // groups * 9) ** 0.5)
    shapes = [(1, 28), (16, 28), (1, 56), (3, 13), (2, 7), (1, 1), (4, 9), (1, 5), (2, 30), (5, 3), (1, 28)]
    for b, h in shapes:
        x = torch.randn(b, cin, h, h + 1, generator=g).to(BF16)
        with torch.no_grad():
            got = shvit_kernels.conv_act(x, conv, relu=True)
            exact = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride, 1, 1,
                                               groups).relu()
            eager = conv(x.contiguous(memory_format=torch.channels_last)).relu()
        assert got.shape == exact.shape
        assert_close_to_exact(got, exact, eager, f"conv {cin}->{cout} stride {stride} on {(b, h, h + 1)}")
    assert ("conv_step" in path[1]) == (path[0] != "float32")


@pytest.mark.parametrize("bf16_kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("shape,n", [((2, 37, 3, 5), 51), ((1, 320, 4, 4), 640), ((3, 16, 1, 1), 16),
                                     ((1, 7, 2, 3), 100), ((2, 96, 7, 7), 200), ((2, 224, 5, 4), 448)], ids=str)
def test_own_gemm_ops(shape, n, bf16_kernel):
    """bf16_pw (every epilogue) and bf16_ffn on odd shapes (k odd, n not a multiple of 16,
    rows not a multiple of 6 or 16, k past a multiple of 32), inputs in float32 and in another
    layout, against the float64 composition within twice the bfloat16 composition's error;
    each of our GEMM's kernels on this CPU."""
    ops = torch.ops.shvit_cpp
    g = torch.Generator().manual_seed(7)
    c = shape[1]
    x = torch.randn(shape, generator=g).to(BF16)
    w = (torch.randn(n, c, 1, 1, generator=g) / c**0.5).to(BF16)
    b = torch.randn(n, generator=g).to(BF16)
    res = torch.randn(shape[0], n, *shape[2:], generator=g).to(BF16)
    wp = ops.pack_weight_bf16(w)

    def pw(x, w, b, relu, res):
        y = torch.nn.functional.conv2d(x, w, b)
        y = y if res is None else y + res
        return y.relu() if relu else y

    for relu in (False, True):
        for r in (None, res):
            for xin in (x, x.float(), x.contiguous(memory_format=torch.channels_last)):
                got = ops.bf16_pw(xin, wp, b.float(), relu, r)
                assert got.dtype == BF16 and got.is_contiguous(memory_format=torch.channels_last)
                exact = pw(x.double(), w.double(), b.double(), relu, None if r is None else r.double())
                assert_close_to_exact(got, exact, pw(x, w, b, relu, r), f"bf16_pw {shape}->{n} relu {relu}")
    w2 = (torch.randn(c, n, 1, 1, generator=g) / n**0.5).to(BF16)
    b2 = torch.randn(c, generator=g).to(BF16)
    got = ops.bf16_ffn(x, wp, b.float(), ops.pack_weight_bf16(w2), b2.float())
    exact = pw(pw(x.double(), w.double(), b.double(), True, None), w2.double(), b2.double(), False, x.double())
    eager = pw(pw(x, w, b, True, None), w2, b2, False, x)
    assert_close_to_exact(got, exact, eager, f"bf16_ffn {shape} hidden {n}")
    assert ops.bf16_ffn(x[:0], wp, b.float(), ops.pack_weight_bf16(w2), b2.float()).shape == (0, *shape[1:])
    with pytest.raises(RuntimeError, match="pack_weight_bf16"):
        ops.bf16_pw(x, ops.pack_weight_bf16(w[:, :-1]), b.float(), False, None)


@pytest.mark.parametrize("shape,pdim,qk", [((2, 40, 3, 5), 10, 16), ((1, 66, 7, 7), 22, 16), ((3, 20, 1, 1), 4, 8)],
                         ids=str)
def test_gemm_blocks_match_composition(path, shape, pdim, qk):
    """The bfloat16 SHSA, SqueezeExcite and pooling + classifier blocks (oneDNN or our GEMM)
    against the float64 composition within twice the bfloat16 composition's error."""
    if path[0] == "float32":
        pytest.skip("the float32 path has no bfloat16 blocks")
    F = torch.nn.functional
    g = torch.Generator().manual_seed(11)
    B, C, H, W = shape
    x = torch.randn(shape, generator=g).to(BF16)
    wq = (torch.randn(2 * qk + pdim, pdim, generator=g) / pdim**0.5).to(BF16)
    bq = torch.randn(2 * qk + pdim, generator=g).to(BF16)
    wp, bp = (torch.randn(C, C, generator=g) / C**0.5).to(BF16), torch.randn(C, generator=g).to(BF16)

    def shsa(x, wq, bq, wp, bp):
        x1 = F.group_norm(x[:, :pdim], 1, eps=1e-5)
        q, k, v = F.conv2d(x1, wq[..., None, None], bq).flatten(2).split([qk, qk, pdim], dim=1)
        attn = (q.transpose(-2, -1) @ k).softmax(dim=-1)
        x1 = (v @ attn.transpose(-2, -1)).reshape(B, pdim, H, W)
        return x + F.conv2d(torch.cat([x1, x[:, pdim:]], 1).relu(), wp[..., None, None], bp)

    def se(x, w1, b1, w2, b2):
        s = F.conv2d(F.conv2d(x.mean((2, 3), keepdim=True), w1[..., None, None], b1).relu(), w2[..., None, None], b2)
        return x * s.sigmoid()

    def pool_linear(x, w, b):
        return F.linear(x.mean((2, 3)), w, b)

    w1, b1 = (torch.randn(C // 4 + 1, C, generator=g) / C**0.5).to(BF16), torch.randn(C // 4 + 1, generator=g).to(BF16)
    w2, b2 = (torch.randn(C, C // 4 + 1, generator=g)).to(BF16), torch.randn(C, generator=g).to(BF16)
    wc, bc = (torch.randn(13, C, generator=g) / C**0.5).to(BF16), torch.randn(13, generator=g).to(BF16)
    cases = [("shsa", onednn.shsa_step(wq, bq, wp, bp, pdim, qk, 1e-5), shsa, (wq, bq, wp, bp)),
             ("se", onednn.se_step(w1[..., None, None], b1, w2[..., None, None], b2), se, (w1, b1, w2, b2)),
             ("pool_linear", onednn.pool_linear_step(wc, bc), pool_linear, (wc, bc))]
    with torch.no_grad():
        for name, step, compose, params in cases:
            assert step[0].startswith("bf16_" if path[0].startswith("own-gemm") else "onednn_"), step[0]
            got = call(step, x)
            exact = compose(x.double(), *(p.double() for p in params))
            assert_close_to_exact(got, exact, compose(x, *params), f"{name} {shape}")


@pytest.mark.skipif(not backend.cpp_available() or shvit_kernels._cpp.isa() != "avx512",
                    reason="stem_conv3x3_bf16 runs at the avx512 level")
@pytest.mark.parametrize("cout,stride,hw", [(16, 2, (13, 18)), (24, 1, (7, 5)), (32, 2, (1, 1)), (8, 2, (40, 29))],
                         ids=str)
def test_stem_conv_bf16(cout, stride, hw):
    """The bfloat16 plan's first conv (an NCHW image, float32 sums, one rounding) against the
    float64 convolution within twice the bfloat16 convolution's error; a float32 image is
    rounded to bfloat16 first, as autocast would."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 3, *hw, generator=g).to(BF16)
    w, b = (torch.randn(cout, 3, 3, 3, generator=g) / 5).to(BF16), torch.randn(cout, generator=g).to(BF16)
    with torch.no_grad():
        got = torch.ops.shvit_cpp.stem_conv3x3_bf16(x, w.float(), b.float(), stride, True)
        exact = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), stride, 1).relu()
        eager = torch.nn.functional.conv2d(x, w, b, stride, 1).relu()
        assert got.dtype == BF16 and got.is_contiguous(memory_format=torch.channels_last)
        assert_close_to_exact(got, exact, eager, f"stem conv {cout} stride {stride} {hw}")
        assert torch.equal(torch.ops.shvit_cpp.stem_conv3x3_bf16(x.float(), w.float(), b.float(), stride, True), got)
        nan = x.clone()
        nan[0, 0, 0, 0] = float("nan")
        out = torch.ops.shvit_cpp.stem_conv3x3_bf16(nan, w.float(), b.float(), stride, False)
        assert out[0, :, 0, 0].isnan().all() and not out[1:].isnan().any()
