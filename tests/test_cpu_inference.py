"""The CPU inference path of a folded fused model: the packed GEMM ops (``pw_conv``,
``ffn_block``), the fused conv + ReLU, the modules that ``fuse()`` puts in place, and the
whole network against the reference for every variant."""
from __future__ import annotations

import copy
import os
import pathlib
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import shvit
import shvit_kernels
from conftest import assert_rel_close, isa_levels, randomize_bn, use_backend, with_threads
from shvit.layers import ConvAct, FFNInference, PatchMergingInference, SqueezeExciteInference
from shvit_kernels import _cpp, backend, pointwise
from shvit_kernels.shsa_inference import shsa_infer_torch

# every test once per instruction-set level of the C++ kernels this CPU runs (conftest.each_isa)
pytestmark = [
    pytest.mark.skipif(not backend.cpp_available(), reason="needs the C++ extension (its absence is tested in test_cpu_backend.py)"),
    pytest.mark.usefixtures("each_isa"),
]

# the kernels under test run from the avx2 level up (conftest: skipped on CPUs without AVX2+FMA,
# not repeated at the baseline level, where the composition runs: tested below)
needs_gemm = pytest.mark.needs_gemm

# float32 GEMMs against a float64 reference from the same inputs
TOL = 2e-6


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _conv_ref(x, w, b, relu=False, residual=None):
    y = F.conv2d(x.double(), w.double(), b.double())
    if residual is not None:
        y = y + residual.double()
    return F.relu(y) if relu else y


# (B, C_in, C_out, H, W): channels off the 16-column panels, rows off the 6-row tiles, K past
# one k-block (384) and past two, a single token, a single image
PW_SHAPES = [(2, 24, 40, 5, 7), (3, 37, 19, 3, 3), (1, 800, 33, 4, 5), (2, 1344, 448, 2, 2), (1, 16, 16, 1, 1), (4, 5, 3, 6, 1)]


@needs_gemm
@pytest.mark.parametrize("shape", PW_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_pw_conv_matches_conv2d(shape, relu, residual):
    B, ci, co, H, W = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = _cl(torch.randn(B, ci, H, W, generator=g))
    w = torch.randn(co, ci, 1, 1, generator=g) / ci**0.5
    b = torch.randn(co, generator=g)
    r = _cl(torch.randn(B, co, H, W, generator=g)) if residual else None
    out = torch.ops.shvit_cpp.pw_conv(x, torch.ops.shvit_cpp.pack_weight(w), b, relu, r)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(out, _conv_ref(x, w, b, relu, r), TOL, f"pw_conv {shape} relu={relu} residual={residual}")


@needs_gemm
@pytest.mark.parametrize("shape", [(2, 24, 5, 7), (3, 37, 4, 4), (1, 224, 16, 16), (2, 200, 3, 5), (1, 8, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_ffn_block_matches_composition(shape):
    B, C, H, W = shape
    g = torch.Generator().manual_seed(C)
    x = _cl(torch.randn(B, C, H, W, generator=g))
    w1, b1 = torch.randn(2 * C, C, 1, 1, generator=g) / C**0.5, torch.randn(2 * C, generator=g)
    w2, b2 = torch.randn(C, 2 * C, 1, 1, generator=g) / (2 * C) ** 0.5, torch.randn(C, generator=g)
    p = torch.ops.shvit_cpp.pack_weight
    out = torch.ops.shvit_cpp.ffn_block(x, p(w1), b1, p(w2), b2)
    ref = x.double() + F.conv2d(F.relu(F.conv2d(x.double(), w1.double(), b1.double())), w2.double(), b2.double())
    assert_rel_close(out, ref, TOL, f"ffn_block {shape}")
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(2, 24, 5, 7), (3, 37, 4, 4), (1, 40, 1, 1), (2, 13, 6, 3), (1, 896, 4, 5), (2, 40, 9, 21)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dw_conv3x3_matches_conv2d(shape, stride, relu, dtype):
    """Channels off the 32- and 8-wide vector blocks, odd sizes (stride 2 rounds up), one pixel.
    bfloat16 x (float32 weights, as the bfloat16 path passes them): float32 sums rounded once,
    so each output within half a bfloat16 unit of the exact result (plus the float32 sums'
    error), NaN kept."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(C + stride)
    x = _cl(torch.randn(B, C, H, W, generator=g)).to(dtype)
    if dtype == torch.bfloat16:
        x[0, C // 2, H // 2, W // 2] = float("nan")
    w, b = torch.randn(C, 1, 3, 3, generator=g) / 3, torch.randn(C, generator=g)
    out = torch.ops.shvit_cpp.dw_conv3x3(x, w, b, stride, relu)
    ref = F.conv2d(x.double(), w.double(), b.double(), stride, 1, 1, C)
    ref = F.relu(ref) if relu else ref
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        assert_rel_close(out, ref, TOL, f"dw {shape} stride {stride} relu {relu}")
        return
    assert torch.equal(out.isnan(), ref.isnan()), "NaN where the exact result has one"
    ok = ~ref.isnan()
    torch.testing.assert_close(out.double()[ok], ref[ok], rtol=2.0**-8, atol=1e-5 * ref[ok].abs().max().item(),
                               msg=lambda m: f"dw bfloat16 {shape} stride {stride} relu {relu}: {m}")


def test_dw_conv3x3_rejects_bad_arguments():
    ops = torch.ops.shvit_cpp
    x = _cl(torch.randn(1, 8, 4, 4))
    w, b = torch.randn(8, 1, 3, 3), torch.randn(8)
    nchw = x.contiguous()  # other layouts are read through a channels_last copy
    assert torch.equal(ops.dw_conv3x3(nchw, w, b, 1, False), ops.dw_conv3x3(x, w, b, 1, False))
    with pytest.raises(RuntimeError, match="stride"):
        ops.dw_conv3x3(x, w, b, 3, False)
    with pytest.raises(RuntimeError, match="depthwise"):
        ops.dw_conv3x3(x, torch.randn(8, 1, 5, 5), b, 1, False)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.dw_conv3x3(x.double(), w.double(), b.double(), 1, False)
    with pytest.raises(RuntimeError, match="float32"):  # weights in float32 for either
        ops.dw_conv3x3(x.bfloat16(), w.bfloat16(), b, 1, False)
    assert ops.dw_conv3x3(_cl(torch.randn(0, 8, 4, 4)), w, b, 2, True).shape == (0, 8, 2, 2)


@needs_gemm
@pytest.mark.parametrize("shape", [(2, 40, 5, 7, 12), (3, 96, 4, 4, 24), (1, 130, 3, 3, 66)], ids=str)
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_shsa_block_packed_gemms_match(shape, channels_last):
    """The SHSA block op with pre-packed qkv/projection weights (projection + bias + residual in
    the GEMM's epilogue) equals the op without them and the composition."""
    B, C, H, W, pdim = shape
    qk = 16
    g = torch.Generator().manual_seed(C)
    x = torch.randn(B, C, H, W, generator=g)
    x = _cl(x) if channels_last else x
    wq, bq = torch.randn(2 * qk + pdim, pdim, generator=g) / pdim**0.5, torch.randn(2 * qk + pdim, generator=g)
    wp, bp = torch.randn(C, C, 1, 1, generator=g) / C**0.5, torch.randn(C, generator=g)
    ops = torch.ops.shvit_cpp
    plain = ops.shsa_block_infer(x, wq, bq, wp.view(C, C), bp, pdim, qk, 1e-5)
    packed = ops.shsa_block_infer(x, wq, bq, wp.view(C, C), bp, pdim, qk, 1e-5, ops.pack_weight(wq), ops.pack_weight(wp))
    z = shsa_infer_torch(x.double(), wq.double(), bq.double(), pdim, qk, 1e-5)
    ref = x.double() + F.conv2d(z, wp.double(), bp.double())
    assert_rel_close(plain, ref, TOL, "block op, ATen GEMMs")
    assert_rel_close(packed, ref, TOL, "block op, packed GEMMs")
    assert packed.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@needs_gemm
@pytest.mark.parametrize("shape", [(2, 3, 17, 13), (1, 3, 1, 1), (3, 1, 8, 9), (1, 7, 5, 4), (1, 3, 2, 30), (2, 3, 7, 61)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cout", [5, 16, 28, 32])
@pytest.mark.parametrize("stride", [1, 2])
def test_stem_conv3x3_matches_conv2d(shape, cout, stride):
    """The first stem conv from the NCHW image: odd sizes, one pixel, output channels below,
    at and between the 16/32 vector widths; channels_last output."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(H * W + C + cout)
    x = torch.randn(B, C, H, W, generator=g)
    w, b = torch.randn(cout, C, 3, 3, generator=g) / 3, torch.randn(cout, generator=g)
    for relu in (False, True):
        out = torch.ops.shvit_cpp.stem_conv3x3(x, w, b, stride, relu)
        ref = F.conv2d(x.double(), w.double(), b.double(), stride, 1)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_rel_close(out, F.relu(ref) if relu else ref, TOL, f"stem {shape} cout {cout} s{stride} relu {relu}")


@needs_gemm
def test_stem_conv3x3_rejects_bad_arguments():
    ops = torch.ops.shvit_cpp
    w, b = torch.randn(8, 3, 3, 3), torch.randn(8)
    x = torch.randn(1, 3, 5, 5)  # other layouts are read through an NCHW copy
    assert torch.equal(ops.stem_conv3x3(_cl(x), w, b, 2, False), ops.stem_conv3x3(x, w, b, 2, False))
    with pytest.raises(RuntimeError, match="float32"):
        ops.stem_conv3x3(x.double(), w, b, 2, False)
    with pytest.raises(RuntimeError, match="Cout <= 32"):
        ops.stem_conv3x3(torch.randn(1, 3, 5, 5), torch.randn(40, 3, 3, 3), torch.randn(40), 2, False)
    with pytest.raises(RuntimeError, match="weight"):
        ops.stem_conv3x3(torch.randn(1, 4, 5, 5), w, b, 2, False)
    with pytest.raises(RuntimeError, match="stride"):
        ops.stem_conv3x3(torch.randn(1, 3, 5, 5), w, b, 3, False)
    assert ops.stem_conv3x3(torch.randn(0, 3, 5, 5), w, b, 2, True).shape == (0, 8, 3, 3)


def _pack3x3(w):
    return torch.ops.shvit_cpp.pack_weight(w.permute(0, 2, 3, 1).reshape(w.shape[0], -1))


@needs_gemm
@pytest.mark.parametrize("shape", [(2, 16, 17, 13), (1, 5, 1, 1), (3, 43, 8, 9), (2, 112, 6, 5)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cout", [7, 32, 56, 130])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv3x3_matches_conv2d(shape, cout, stride):
    """The dense 3x3 conv on gathered patches: odd sizes (tiles of 96 pixels split across
    images and rows), one pixel, output channels off the 16-column panels."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(H * W + C + cout)
    x = _cl(torch.randn(B, C, H, W, generator=g))
    w, b = torch.randn(cout, C, 3, 3, generator=g) / (3 * C**0.5), torch.randn(cout, generator=g)
    for relu in (False, True):
        out = torch.ops.shvit_cpp.conv3x3(x, _pack3x3(w), b, stride, relu)
        ref = F.conv2d(x.double(), w.double(), b.double(), stride, 1)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_rel_close(out, F.relu(ref) if relu else ref, TOL, f"conv3x3 {shape} cout {cout} s{stride} relu {relu}")


@needs_gemm
def test_conv3x3_rejects_bad_arguments():
    ops = torch.ops.shvit_cpp
    w, b = torch.randn(8, 4, 3, 3), torch.randn(8)
    x = _cl(torch.randn(1, 4, 5, 5))
    nchw = x.contiguous()  # other layouts are read through a channels_last copy
    assert torch.equal(ops.conv3x3(nchw, _pack3x3(w), b, 2, False), ops.conv3x3(x, _pack3x3(w), b, 2, False))
    with pytest.raises(RuntimeError, match="packed"):
        ops.conv3x3(x, ops.pack_weight(w.reshape(8, -1)[:, :9]), b, 2, False)
    with pytest.raises(RuntimeError, match="stride"):
        ops.conv3x3(x, _pack3x3(w), b, 3, False)
    assert ops.conv3x3(_cl(torch.randn(0, 4, 5, 5)), _pack3x3(w), b, 2, True).shape == (0, 8, 3, 3)


# n (output channels) around the AVX-512 kernel's 64-column panel quads, 32-column pairs and
# the lone last panel; k (input channels) below, between and past the k-blocks of both kernel
# families (128 and 384); m (tokens) off the 6- and 12-row tiles, and split into 5- and 6-row ones
GEMM_N = [1, 8, 9, 16, 17, 31, 32, 33, 48, 50, 64, 65, 97, 113]
GEMM_K = [1, 5, 72, 200, 400]


@needs_gemm
@pytest.mark.isa_independent  # runs every level itself
@pytest.mark.parametrize("cout", GEMM_N)
@pytest.mark.parametrize("cin", GEMM_K)
# rows: 12 + 12 + 2 or 5 + 5 + 5 + 5 + 6, 12 + 7 or 6 + 6 + 6 + 1, 6 + 5 + 5, 6 x 4 + 5 x 5
@pytest.mark.parametrize("tokens", [(2, 13), (1, 19), (1, 16), (1, 49)], ids=["m26", "m19", "m16", "m49"])
def test_gemm_levels_agree(cout, cin, tokens):
    """The packed GEMM at every level this CPU runs it (avx2, avx512) against float64, and the
    levels with each other: all accumulate each output in the same k order, so their results
    are identical."""
    ops = torch.ops.shvit_cpp
    g = torch.Generator().manual_seed(cout * 1000 + cin)
    B, W = tokens
    x = _cl(torch.randn(B, cin, 1, W, generator=g))
    w, b = torch.randn(cout, cin, 1, 1, generator=g), torch.randn(cout, generator=g)
    r = _cl(torch.randn(B, cout, 1, W, generator=g))
    ref = _conv_ref(x, w, b, True, r)
    before = _cpp.isa()
    outs = {}
    try:
        for isa in isa_levels()[1:]:
            _cpp.isa(isa)
            outs[isa] = ops.pw_conv(x, ops.pack_weight(w), b, True, r)
            assert_rel_close(outs[isa], ref, TOL, f"pw_conv {isa} n={cout} k={cin}")
    finally:
        _cpp.isa(before)
    first = outs.pop("avx2")
    for isa, out in outs.items():
        assert torch.equal(out, first), f"{isa} differs from avx2: {(out - first).abs().max().item():.3e}"


@needs_gemm
@pytest.mark.isa_independent  # runs every level itself
@pytest.mark.parametrize("kind", ["stem", "conv3x3", "dw"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 24, 19, 30), (1, 40, 9, 5)], ids=["19x30", "9x5"])
def test_conv_levels_agree(kind, stride, shape):
    """The 3x3 convolutions at avx2 and avx512 (their AVX-512 kernels: 12-pixel stem steps,
    the implicit GEMM, depthwise rows with weights in registers) give identical results:
    each output sums its taps in the same order at every level."""
    ops = torch.ops.shvit_cpp
    B, C, H, W = shape
    C, cout = (3, 28) if kind == "stem" else (C, C)  # the stem kernel takes an image (Cin * 9 <= 64)
    g = torch.Generator().manual_seed(H * W + stride)
    x = torch.randn(B, C, H, W, generator=g)
    w = torch.randn(cout, 1 if kind == "dw" else C, 3, 3, generator=g) / 3
    b = torch.randn(cout, generator=g)
    run = {
        "stem": lambda: ops.stem_conv3x3(x, w, b, stride, True),
        "conv3x3": lambda: ops.conv3x3(_cl(x), _pack3x3(w), b, stride, True),
        "dw": lambda: ops.dw_conv3x3(_cl(x), w, b, stride, True),
    }[kind]
    before = _cpp.isa()
    outs = {}
    try:
        for isa in isa_levels()[1:]:
            _cpp.isa(isa)
            outs[isa] = run()
    finally:
        _cpp.isa(before)
    ref = F.relu(F.conv2d(x.double(), w.double(), b.double(), stride, 1, 1, C if kind == "dw" else 1))
    first = outs.pop("avx2")
    assert_rel_close(first, ref, TOL, f"{kind} avx2")
    for isa, out in outs.items():
        assert torch.equal(out, first), f"{kind} {isa} differs from avx2: {(out - first).abs().max().item():.3e}"


@pytest.mark.isa_independent
def test_isa_switch():
    levels = isa_levels()
    before = _cpp.isa()
    assert levels[0] == "baseline" and before == levels[-1]  # the start-up level by default
    try:
        assert _cpp.isa("baseline") == "baseline" and _cpp.isa() == "baseline"
        assert not pointwise.gemm_available()  # the packed GEMM needs avx2
        assert _cpp.isa("auto") == levels[-1]
        assert pointwise.gemm_available() == (len(levels) > 1)
        with pytest.raises(RuntimeError, match="expected"):
            _cpp.isa("sse")
    finally:
        _cpp.isa(before)


@pytest.mark.isa_independent
@pytest.mark.parametrize("env", ["baseline", "avx512", "sse"])
def test_isa_environment_variable(env):
    """SHVIT_KERNELS_ISA lowers the start-up level; a level this CPU does not run, or a name
    that is no level, is a clear error at the extension's first use."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("reads the CPU's flags from /proc/cpuinfo (Linux)")
    flags = set(next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "").split())
    code = "from shvit_kernels import _cpp; _cpp.available(); print(_cpp.isa(), _cpp.levels())"
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SHVIT_KERNELS_ISA": env},
                         capture_output=True, text=True)
    if env == "sse":
        assert "SHVIT_KERNELS_ISA=sse is not one of" in run.stderr
    elif env == "baseline" or {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"} <= flags:
        assert run.returncode == 0, run.stderr
        assert run.stdout.split()[0] == env
    else:
        assert "this CPU runs at most" in run.stderr


@needs_gemm
def test_gemm_keeps_nan_and_inf():
    x = _cl(torch.randn(1, 20, 3, 4))
    x[0, 3, 1, 2] = float("nan")
    x[0, 5, 2, 0] = float("inf")
    w, b = torch.randn(18, 20, 1, 1), torch.randn(18)
    out = torch.ops.shvit_cpp.pw_conv(x, torch.ops.shvit_cpp.pack_weight(w), b, True, None)
    ref = F.relu(F.conv2d(x, w, b))
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.isnan(out[0, :, 1, 2]).all()  # relu keeps NaN, as torch.relu does


@needs_gemm
@pytest.mark.parametrize("shape", [(2, 24, 5, 7), (3, 37, 4, 4), (1, 896, 7, 7), (16, 200, 2, 3), (1, 8, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_se_gate_matches_composition(shape, layout):
    """SqueezeExcite in one op: x * sigmoid(fc2(relu(fc1(mean(x))))) against the float64
    composition of torch ops (the reference module's forward)."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(C + B)
    x = torch.randn(B, C, H, W, generator=g)
    x = _cl(x) if layout == "channels_last" else x
    h = max(1, C // 4)
    w1, b1 = torch.randn(h, C, 1, 1, generator=g) / C**0.5, torch.randn(h, generator=g)
    w2, b2 = torch.randn(C, h, 1, 1, generator=g) / h**0.5, torch.randn(C, generator=g)
    p = torch.ops.shvit_cpp.pack_weight
    out = torch.ops.shvit_cpp.se_gate(x, p(w1), b1, p(w2), b2)
    xd = x.double()
    s = F.conv2d(F.relu(F.conv2d(xd.mean((2, 3), keepdim=True), w1.double(), b1.double())), w2.double(), b2.double())
    assert_rel_close(out, xd * s.sigmoid(), TOL, f"se_gate {shape} {layout}")
    assert out.is_contiguous(memory_format=torch.channels_last)


@needs_gemm
@pytest.mark.parametrize("shape", [(2, 24, 5, 7), (3, 37, 4, 4), (1, 320, 4, 4), (16, 448, 4, 4), (2, 8, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("classes", [1000, 7, 40])
def test_pool_linear_matches_composition(shape, classes):
    """Global average pooling and a Linear in one op, against the float64 torch ops."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(C + classes)
    x = _cl(torch.randn(B, C, H, W, generator=g))
    w, b = torch.randn(classes, C, generator=g) / C**0.5, torch.randn(classes, generator=g)
    out = torch.ops.shvit_cpp.pool_linear(x, torch.ops.shvit_cpp.pack_weight(w), b)
    ref = F.linear(F.adaptive_avg_pool2d(x.double(), 1).flatten(1), w.double(), b.double())
    assert out.shape == (B, classes)
    assert_rel_close(out, ref, TOL, f"pool_linear {shape} -> {classes}")


@needs_gemm
def test_ops_reject_bad_arguments():
    ops = torch.ops.shvit_cpp
    x = _cl(torch.randn(2, 8, 3, 3))
    w, b = torch.randn(4, 8, 1, 1), torch.randn(4)
    wp = ops.pack_weight(w)
    nchw = x.contiguous()  # other layouts are read through a channels_last copy
    assert torch.equal(ops.pw_conv(nchw, wp, b, False, nchw[:, :4]), ops.pw_conv(x, wp, b, False, x[:, :4]))
    with pytest.raises(RuntimeError, match="float32"):
        ops.pw_conv(x.double(), wp, b, False, None)
    with pytest.raises(RuntimeError, match="packed"):
        ops.pw_conv(x, w, b, False, None)
    with pytest.raises(RuntimeError, match="packed"):
        ops.pw_conv(_cl(torch.randn(2, 9, 3, 3)), wp, b, False, None)
    with pytest.raises(RuntimeError, match="residual"):
        ops.pw_conv(x, wp, b, False, _cl(torch.randn(2, 5, 3, 3)))
    with pytest.raises(RuntimeError, match="1x1"):
        ops.pack_weight(torch.randn(4, 8, 3, 3))
    with pytest.raises(RuntimeError, match="map back"):
        ops.ffn_block(x, wp, b, ops.pack_weight(torch.randn(5, 4, 1, 1)), torch.randn(5))
    with pytest.raises(RuntimeError, match="map back"):
        ops.se_gate(x, wp, b, ops.pack_weight(torch.randn(5, 4, 1, 1)), torch.randn(5))
    with pytest.raises(RuntimeError, match="packed"):
        ops.se_gate(x, w, b, wp, b)
    with pytest.raises(RuntimeError, match="float32"):
        ops.pool_linear(x.double(), wp, b)
    with pytest.raises(RuntimeError, match="packed"):
        ops.pool_linear(_cl(torch.randn(2, 9, 3, 3)), wp, b)


@needs_gemm
def test_empty_batch():
    x = _cl(torch.randn(0, 8, 3, 3))
    p = torch.ops.shvit_cpp.pack_weight
    w1, w2 = torch.randn(16, 8, 1, 1), torch.randn(8, 16, 1, 1)
    assert torch.ops.shvit_cpp.pw_conv(x, p(w1), torch.randn(16), True, None).shape == (0, 16, 3, 3)
    assert torch.ops.shvit_cpp.ffn_block(x, p(w1), torch.randn(16), p(w2), torch.randn(8)).shape == (0, 8, 3, 3)
    assert torch.ops.shvit_cpp.se_gate(x, p(w1), torch.randn(16), p(w2), torch.randn(8)).shape == (0, 8, 3, 3)
    assert torch.ops.shvit_cpp.pool_linear(x, p(w1), torch.randn(16)).shape == (0, 16)


# ------------------------------------------------------------------ the Python entry points
def _modules(seed=0):
    g = torch.Generator().manual_seed(seed)
    pw1, pw2 = torch.nn.Conv2d(24, 48, 1), torch.nn.Conv2d(48, 24, 1)
    dw = torch.nn.Conv2d(48, 48, 3, 2, 1, groups=48)
    stem = torch.nn.Conv2d(3, 24, 3, 2, 1)
    for m in (pw1, pw2, dw, stem):
        with torch.no_grad():
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return pw1, pw2, dw, stem


@pytest.mark.parametrize("backend_name", ["cpp", "torch"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_entry_points_match_composition(backend_name, layout, monkeypatch):
    """conv1x1 / ffn_block / conv_act on any input layout equal the eager composition."""
    use_backend(monkeypatch, backend_name, "cpu")
    pw1, pw2, dw, stem = _modules()
    x = torch.randn(2, 30, 7, 9)[:, 3:27]  # a channel slice: neither contiguous nor channels_last
    if layout == "nchw":
        x = x.contiguous()
    elif layout == "channels_last":
        x = _cl(x)
    img = torch.randn(2, 3, 11, 13)
    with torch.no_grad():
        h = pw1(x)
        cases = {
            "conv1x1 relu": (shvit_kernels.conv1x1(x, pw1.weight, pw1.bias, relu=True), F.relu(h)),
            "conv1x1 residual": (
                shvit_kernels.conv1x1(F.relu(h), pw2.weight, pw2.bias, residual=x),
                x + pw2(F.relu(h)),
            ),
            "ffn_block": (shvit_kernels.ffn_block(x, pw1.weight, pw1.bias, pw2.weight, pw2.bias), x + pw2(F.relu(h))),
            "conv_act dw relu": (shvit_kernels.conv_act(h, dw, relu=True), F.relu(dw(h))),
            "conv_act dense": (shvit_kernels.conv_act(img, stem), stem(img)),
        }
    for name, (got, want) in cases.items():
        assert_rel_close(got, want, TOL, f"{backend_name} {layout}: {name}")


def test_fast_path_conditions(monkeypatch):
    """The fast path runs only where it is exact: CPU float32 inference on the cpp backend."""
    use_backend(monkeypatch, "cpp", "cpu")
    x, w = torch.randn(1, 4, 2, 2), torch.randn(3, 4, 1, 1)
    with torch.no_grad():
        assert pointwise.fast_path_applies(x, w)
        assert not pointwise.fast_path_applies(x.double(), w.double())
        assert not pointwise.fast_path_applies(x.bfloat16(), w)
    assert not pointwise.fast_path_applies(x, w.requires_grad_())  # autograd: the composition
    monkeypatch.setenv(backend.ENV, "torch")
    with torch.no_grad():
        assert not pointwise.fast_path_applies(x, w)


def test_gradients_take_the_composition(monkeypatch):
    use_backend(monkeypatch, "cpp", "cpu")
    pw1, pw2, _, _ = _modules(1)
    x = torch.randn(2, 24, 3, 5, requires_grad=True)
    out = shvit_kernels.ffn_block(x, pw1.weight, pw1.bias, pw2.weight, pw2.bias)
    out.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    pw1b, pw2b = copy.deepcopy(pw1), copy.deepcopy(pw2)
    (x2 + pw2b(F.relu(pw1b(x2)))).square().sum().backward()
    assert_rel_close(x.grad, x2.grad, 1e-6, "input gradient")
    assert_rel_close(pw1.weight.grad, pw1b.weight.grad, 1e-6, "pw1 weight gradient")


@needs_gemm
def test_packed_weight_follows_in_place_updates(monkeypatch):
    use_backend(monkeypatch, "cpp", "cpu")
    pw1, _, _, _ = _modules(2)
    x = torch.randn(1, 24, 2, 3)
    with torch.no_grad():
        before = shvit_kernels.conv1x1(x, pw1.weight, pw1.bias)
        pw1.weight.mul_(-2)
        after = shvit_kernels.conv1x1(x, pw1.weight, pw1.bias)
    assert_rel_close(after, pw1(x), TOL, "after an in-place weight update")
    assert_rel_close(after - pw1.bias[:, None, None], -2 * (before - pw1.bias[:, None, None]), TOL, "scaled")


def test_entry_points_reject_bad_shapes():
    pw1, pw2, dw, _ = _modules()
    x = torch.randn(1, 24, 2, 2)
    with pytest.raises(ValueError, match="weight"):
        shvit_kernels.conv1x1(x, pw2.weight, pw2.bias)
    with pytest.raises(ValueError, match="residual"):
        shvit_kernels.conv1x1(x, pw1.weight, pw1.bias, residual=x)
    with pytest.raises(ValueError, match="w2"):
        shvit_kernels.ffn_block(x, pw1.weight, pw1.bias, pw1.weight, pw1.bias)
    with pytest.raises(ValueError, match="x must be"):
        shvit_kernels.conv_act(x, dw)


# ------------------------------------------------------------------ the whole network
def _pair(variant: str, seed: int = 0):
    ref = randomize_bn(shvit.create_model(variant), seed).eval()
    fused = shvit.create_model(variant, fused=True).eval()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("route", ["plan", "modules"])
@pytest.mark.parametrize("variant", sorted(shvit.VARIANTS))
def test_variants_folded_fused_match_reference(variant, route, monkeypatch):
    """Every variant, folded and fused, equals the float64 reference within 1e-4 relative
    (batch 3 at 80x112 px: 5x7 / 3x4 / 2x2 token grids), through the fast path: as the
    cached plan of C++ calls (one per kernel module), and module by module."""
    use_backend(monkeypatch, "cpp", "cpu")
    ref, fused = _pair(variant, seed=1)
    fused.fuse()
    kinds = {type(m) for m in fused.modules()}
    assert {FFNInference, PatchMergingInference, ConvAct, shvit.SHSAInference} <= kinds
    x = torch.randn(3, 3, 80, 112, generator=torch.Generator().manual_seed(0))
    calls = []
    if route == "plan":
        kernels = (FFNInference, ConvAct, shvit.SHSAInference, SqueezeExciteInference)
        with torch.no_grad():
            cpu = fused._cpu_plan(x)
        if pointwise.gemm_available():
            plan, features = cpu
            assert features == sum(isinstance(m, kernels) for m in fused.modules())
            assert len(plan) == features + 1, "pooling and the classifier as the last step"
            with torch.no_grad():
                assert_rel_close(fused.forward_features(x), ref.double().forward_features(x.double()), 1e-4,
                                 f"{variant} features")
        else:
            assert cpu is None, "without the packed GEMM the modules run one by one"
    else:
        monkeypatch.setattr(fused, "_cpu_plan", lambda x: None)
        real = pointwise.fast_path_applies
        monkeypatch.setattr(pointwise, "fast_path_applies", lambda *a: calls.append(real(*a)) or calls[-1])
    with torch.no_grad():
        got = fused(x)
        want = ref.double()(x.double())
    if route == "modules":
        assert calls and all(calls), "every folded conv took the CPU fast path"
    assert_rel_close(got, want, 1e-4, f"{variant} folded fused vs float64 reference ({route})")


def test_golden_through_the_fast_path(golden, monkeypatch):
    use_backend(monkeypatch, "cpp", "cpu")
    model = shvit.SHViT(**golden["config"], fused=True).eval()
    model.load_state_dict(golden["state_dict_official"])
    model.fuse()
    assert any(isinstance(m, FFNInference) for m in model.modules())
    with torch.no_grad():
        assert_rel_close(model(golden["input"]), golden["eval_logits"], 1e-4, "golden logits, folded fused")


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_same_result_with_one_and_two_threads(batch):
    """One thread, or two: a batch split between them (4: in a plan each image computed as
    with one thread, the same bits), with a remainder on both (5), or each op's rows split (1)."""
    _, fused = _pair("shvit_s1")
    fused.fuse()
    x = torch.randn(batch, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        one, two = with_threads(lambda: fused(x))
        planned = fused._cpu_plan(x) is not None
    assert_rel_close(two, one, 1e-6, f"2 threads vs 1, batch {batch}")
    assert batch != 4 or not planned or torch.equal(two, one)


def _no_plan(model):
    twin = copy.deepcopy(model)
    twin._cpu_plan = lambda x: None
    return twin


@needs_gemm
def test_plan_follows_weight_changes_and_replacements():
    """The cached plan holds packed weights: after an in-place update, a replaced parameter
    or a replaced module, the model still equals the same model run module by module."""
    _, fused = _pair("shvit_s1")
    fused.fuse()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        first = fused(x)
        ffn = fused.blocks2[3].ffn
        ffn.pw1.weight.mul_(-0.5)  # in place
        assert_rel_close(fused.forward_features(x), _no_plan(fused).forward_features(x), 1e-6,
                         "features after an in-place update")
        ffn.pw1.weight.mul_(-1.0)
        assert_rel_close(fused(x), _no_plan(fused)(x), 1e-6, "after an in-place update")
        fused.blocks1[0].conv.conv.weight = torch.nn.Parameter(fused.blocks1[0].conv.conv.weight * 2)
        assert_rel_close(fused(x), _no_plan(fused)(x), 1e-6, "after a replaced parameter")
        fused.blocks3[4].ffn = copy.deepcopy(fused.blocks3[5].ffn)
        got = fused(x)
        assert_rel_close(got, _no_plan(fused)(x), 1e-6, "after a replaced module")
        plan = fused._cpu_plan(x)
        torch.nn.Linear(2, 2)  # a registration elsewhere: the plan stays
        assert fused._cpu_plan(x) is plan
        fused.blocks1[0].mixer = _Double()  # no tensors: only the module tree shows it
        assert fused._cpu_plan(x) is None  # no cpu_kernel: the modules run
        assert_rel_close(fused(x), _no_plan(fused)(x), 1e-6, "after a module without tensors was swapped in")
    assert (got - first).abs().max() > 1e-3, "the changes changed the logits"


def test_plan_runs_its_steps_and_watches_its_tensors():
    """A Plan equals its steps called one by one (any prefix of them), does not run once a
    watched tensor changes in place or is replaced by other storage, and refuses ops it cannot
    chain."""
    from shvit_kernels.plan import Plan, call

    g = torch.Generator().manual_seed(6)
    w, b = torch.randn(8, 1, 3, 3, generator=g), torch.randn(8, generator=g)
    steps = [("dw_conv3x3", (w, b, 1, True)), ("dw_conv3x3", (w, b, 2, False))]
    plan = Plan(steps, [w, b])
    x = torch.randn(2, 8, 7, 5, generator=g)
    one = call(steps[0], x)
    assert len(plan) == 2
    assert torch.equal(plan.run(x, 1), one)
    assert torch.equal(plan.run(x), call(steps[1], one))
    assert torch.equal(plan.run(x, 0), x)
    b.add_(1)
    assert plan.run(x) is None and plan.run(x, 0) is None  # stale: not run
    plan = Plan(steps, [w, b])
    assert torch.equal(plan.run(x), call(steps[1], call(steps[0], x)))
    w.data = w.data.clone()
    assert plan.run(x) is None
    plan = Plan(steps, [w, b])
    x5 = torch.randn(5, 8, 7, 5, generator=g).contiguous(memory_format=torch.channels_last)
    whole = plan.run(x5)
    plan.chunk_prefix(1, 4.0, 4 * 35 * 2 // torch.get_num_threads())  # step 0 on 2 images at a time
    chunked = plan.run(x5)
    assert torch.equal(chunked, whole) and chunked.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plan.run(x5, 1), call(steps[0], x5))
    with pytest.raises(RuntimeError, match="arguments after x"):
        Plan([("dw_conv3x3", (w, b))], [])
    with pytest.raises(RuntimeError, match="one tensor"):
        Plan([("gn_partial_fwd", (w, b, 1e-5))], [])
    with pytest.raises(RuntimeError):
        Plan([("no_such_op", ())], [])


def test_plan_splits_the_batch_among_threads():
    """With two threads a plan runs each thread's images on their own (and a remainder on
    both): the same bits as one thread, for every batch size and prefix; the caller's grad and
    inference mode hold in the threads; an op's error reaches the caller."""
    from shvit_kernels.plan import Plan

    g = torch.Generator().manual_seed(8)
    w = torch.randn(8, 1, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    steps = [("dw_conv3x3", (w, b, 1, True)), ("dw_conv3x3", (w, b, 2, False))]
    plan = Plan(steps, [w, b])
    plan.chunk_prefix(1, 4.0, 4 * 35)  # step 0 on one image at a time per thread
    for batch in (1, 2, 3, 4, 5, 7):
        x = torch.randn(batch, 8, 7, 5, generator=g)
        for end in (1, 2):
            with torch.no_grad():
                one, two = with_threads(lambda: plan.run(x, end))
            assert torch.equal(one, two), (batch, end)
            assert not two.requires_grad and two.is_contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            assert all(y.is_inference() for y in with_threads(lambda: plan.run(x)))
    with pytest.raises(RuntimeError, match="depthwise kernel"):
        with torch.no_grad():
            with_threads(lambda: plan.run(torch.randn(4, 6, 7, 5)), (2,))


class _Double(torch.nn.Module):
    def forward(self, x):
        return 2 * x


@needs_gemm
def test_plan_inputs_and_fallbacks():
    """channels_last, non-contiguous and empty batches run the plan; with a gradient to
    compute the modules run (autograd), and a model that used its plan pickles."""
    _, fused = _pair("shvit_s1")
    fused.fuse()
    x = torch.randn(3, 3, 64, 80, generator=torch.Generator().manual_seed(5))
    reference = _no_plan(fused)
    with torch.no_grad():
        want = reference(x)
        assert fused._cpu_plan(x) is not None
        assert_rel_close(fused(x.contiguous(memory_format=torch.channels_last)), want, 1e-6, "channels_last input")
        wide = torch.cat([x, x], dim=3)[..., ::2]
        assert_rel_close(fused(wide), reference(wide), 1e-6, "non-contiguous input")
        assert fused(x[:0]).shape == (0, 1000)
    assert fused._cpu_plan(x) is None  # grad mode with parameters that require grad
    y = fused(x)
    y.sum().backward()
    assert fused.head.weight.grad is not None
    assert_rel_close(y.detach(), want, 1e-6, "grad mode through the modules")
    again = pickle.loads(pickle.dumps(fused))
    with torch.no_grad():
        assert_rel_close(again(x), want, 1e-6, "unpickled")


@needs_gemm
def test_plan_stem_in_chunks_of_images(monkeypatch):
    """The stem runs on chunks of the batch (here one image each, with one and two threads):
    the logits equal those of the modules run on the whole batch."""
    _, fused = _pair("shvit_s1")
    fused.fuse()
    monkeypatch.setattr(shvit.model, "STEM_CHUNK_BYTES", 0)
    x = torch.randn(3, 3, 64, 80, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = _no_plan(fused)(x)
        for threads, got in zip((1, 2), with_threads(lambda: fused(x))):
            assert_rel_close(got, want, 1e-6, f"stem in chunks, {threads} threads")


def test_training_path_unaffected_and_fuse_keeps_reference_names():
    """Before fuse() nothing changes (same state dict keys, training path as before); the new
    modules appear only in folded fused models, and a folded reference model has none."""
    ref, fused = _pair("shvit_s1")
    assert list(ref.state_dict()) == list(fused.state_dict())
    assert not any(isinstance(m, (ConvAct, FFNInference, PatchMergingInference)) for m in fused.modules())
    ref.fuse()
    assert not any(isinstance(m, (ConvAct, FFNInference, PatchMergingInference)) for m in ref.modules())
    # the ReLUs that the fused convs absorbed are gone from the folded fused stem
    fused.fuse()
    assert not any(isinstance(m, torch.nn.ReLU) for m in fused.patch_embed)


@pytest.mark.parametrize("where", ["x1", "x2"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_propagates_like_the_composition(where, layout, monkeypatch):
    """A NaN in the attention channels poisons its image (softmax), one in the pass-through
    channels only its own entries (ReLU keeps NaN): the same entries as the eager composition."""
    use_backend(monkeypatch, "cpp", "cpu")
    B, C, H, W, pdim, qk = 2, 40, 3, 5, 12, 16
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, C, H, W, generator=g)
    x[1, 3 if where == "x1" else 30, 1, 2] = float("nan")
    if layout == "channels_last":
        x = _cl(x)
    wq, bq = torch.randn(2 * qk + pdim, pdim, generator=g), torch.randn(2 * qk + pdim, generator=g)
    wp, bp = torch.randn(C, C, 1, 1, generator=g), torch.randn(C, generator=g)
    with torch.no_grad():
        z = shvit_kernels.shsa_inference(x, wq, bq, pdim, qk)
        blk = shvit_kernels.shsa_block_inference(x, wq, bq, wp, bp, pdim, qk)
    monkeypatch.setenv(backend.ENV, "torch")
    with torch.no_grad():
        z_ref = shvit_kernels.shsa_inference(x, wq, bq, pdim, qk)
        blk_ref = x + F.conv2d(z_ref, wp, bp)
    assert torch.equal(z.isnan(), z_ref.isnan()) and z.isnan().any()
    assert torch.equal(blk.isnan(), blk_ref.isnan())
    assert_rel_close(z.nan_to_num(), z_ref.nan_to_num(), TOL, "finite entries")


@pytest.mark.isa_independent  # sets its own level
@pytest.mark.parametrize("missing", ["extension", "avx2"])
def test_folded_fused_model_without_extension_or_avx2(missing, monkeypatch):
    """Without the C++ build (one warning, then the eager composition) or at the baseline level
    (a CPU without AVX2: the composition for the convolutions, no packed weights for the SHSA
    op), the folded fused model still gives the reference's logits."""
    use_backend(monkeypatch, "cpp", "cpu")
    monkeypatch.setattr(backend, "_warned", set())
    if missing == "extension":
        monkeypatch.setattr(backend, "cpp_available", lambda: False)
    else:
        before = _cpp.isa()
        _cpp.isa("baseline")
    ref, fused = _pair("shvit_s1", seed=2)
    fused.fuse()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    ctx = pytest.warns(RuntimeWarning, match="not built") if missing == "extension" else torch.no_grad()
    try:
        with ctx, torch.no_grad():
            got = fused(x)
    finally:
        if missing == "avx2":
            _cpp.isa(before)
    with torch.no_grad():
        want = ref.double()(x.double())
    assert_rel_close(got, want, 1e-4, f"folded fused model, {missing} missing")


# (B, C, pdim, qk_dim, H, W) for the channel-major NCHW float32 paths: tokens off the 16-query
# panels, a single token, more keys than one k-block (384) and several query chunks, qk_dim
# off 16, and SHViT-S4's stage-2/3 shapes
CM_SHAPES = [
    (2, 30, 9, 16, 5, 7),
    (1, 40, 17, 8, 1, 1),
    (3, 50, 24, 24, 20, 21),
    (2, 336, 72, 16, 8, 8),
    (2, 448, 96, 16, 4, 4),
    (3, 36, 10, 8, 3, 3),  # at most one token panel: the block's projection runs token-major
    (2, 30, 9, 16, 13, 15),  # 195 queries: a last query chunk of 3
]


def _cm_inputs(shape, seed):
    B, C, pdim, qk, H, W = shape
    g = torch.Generator().manual_seed(seed)
    cq = 2 * qk + pdim
    x = torch.randn(B, C, H, W, generator=g) * 2
    wq, bq = torch.randn(cq, pdim, generator=g) / pdim**0.5, torch.randn(cq, generator=g)
    wp, bp = torch.randn(C, C, generator=g) / C**0.5, torch.randn(C, generator=g)
    return x, wq, bq, wp, bp


def _region_ref(x, wq, bq, pdim, qk):
    # float64 composition: GroupNorm (no affine, folded into wq) -> qkv -> attention -> concat -> ReLU
    xd = x.double()
    x1 = F.group_norm(xd[:, :pdim], 1, eps=1e-5)
    qkv = F.conv2d(x1, wq.double()[:, :, None, None], bq.double())
    return shvit_kernels.shsa_attention(qkv, xd[:, pdim:], qk, 1.0)


@needs_gemm
@pytest.mark.parametrize("view", ["contiguous", "channel_slice", "strided"])
@pytest.mark.parametrize("shape", CM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_nchw_float32_region_and_block(shape, view, monkeypatch):
    """shsa_infer and the block op on NCHW float32 (the channel-major packed-GEMM path) against
    the float64 composition; x as given, as a channel slice of a wider tensor, and strided."""
    use_backend(monkeypatch, "cpp", "cpu")
    B, C, pdim, qk, H, W = shape
    x, wq, bq, wp, bp = _cm_inputs(shape, sum(shape))
    if view == "channel_slice":
        x = torch.cat([torch.randn(B, 3, H, W), x, torch.randn(B, 2, H, W)], 1)[:, 3 : 3 + C]
    elif view == "strided":
        x = torch.randn(B, C, H, 2 * W)[..., ::2].copy_(x)
    with torch.no_grad():
        z = torch.ops.shvit_cpp.shsa_infer(x, wq, bq, pdim, qk, 1e-5)
        blk = torch.ops.shvit_cpp.shsa_block_infer(x, wq, bq, wp, bp, pdim, qk, 1e-5, None, None)
        via_api = shvit_kernels.shsa_block_inference(x, wq, bq, wp, bp, pdim, qk)
    z_ref = _region_ref(x, wq, bq, pdim, qk)
    blk_ref = x.double() + F.conv2d(z_ref, wp.double()[:, :, None, None], bp.double())
    assert z.is_contiguous() and blk.is_contiguous()
    assert_rel_close(z, z_ref, 1e-5, f"region {shape} {view}")
    assert_rel_close(blk, blk_ref, 1e-5, f"block {shape} {view}")
    assert torch.equal(via_api, blk)


@needs_gemm
def test_nchw_float32_paths_same_with_one_and_two_threads():
    """Images are independent work items: the same bits with one and two threads."""
    x, wq, bq, wp, bp = _cm_inputs(CM_SHAPES[2], 1)
    with torch.no_grad():
        outs = with_threads(lambda: (torch.ops.shvit_cpp.shsa_infer(x, wq, bq, 24, 24, 1e-5),
                                     torch.ops.shvit_cpp.shsa_block_infer(x, wq, bq, wp, bp, 24, 24, 1e-5, None, None)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
