"""SHSA's projection in training: the 1x1 conv on the packed GEMM (``shvit_cpp::conv1x1_train``)
against float64 ``conv2d``, and the C++ training BatchNorm (``shvit_cpp::bn_train``) against
``nn.BatchNorm2d``: outputs, input and parameter gradients, running statistics, odd shapes
and layouts."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_rel_close
from shvit_kernels import backend
from shvit_kernels.shsa_train import bn_train

# every test once per packed-GEMM kernel family this CPU runs (conftest.each_gemm_isa)
pytestmark = [
    pytest.mark.skipif(not backend.cpp_available(), reason="needs the C++ extension"),
    pytest.mark.usefixtures("each_gemm_isa"),
]
needs_gemm = pytest.mark.skipif(
    not (backend.cpp_available() and torch.ops.shvit_cpp.gemm_available()),
    reason="the packed GEMM needs an x86-64 CPU with AVX2+FMA (elsewhere SHSA's projection runs "
    "as PyTorch's conv, which test_region_train covers)",
)

# (B, C_in, C_out, H, W): channels off the 16-column panels and 6-row tiles, C_in past one
# k-block (384), B*N past one k-block of the weight gradient, a single token, one image
# N = 420 splits each image's k-range of the weight gradient; 30 images of N = 16 make two k-blocks of
# whole images; odd channel counts leave partial weight panels; 49 tokens (S1-S3's stage 2) and
# 24 input channels end in panels of 1 and 8 valid columns (the 8-column kernel), 25 tokens
# and 25 channels in panels of 9; 256 and 272 tokens (whole 64-byte rows) are read in place by
# the GEMM instead of packed
SHAPES = [(2, 37, 19, 5, 7), (3, 400, 45, 20, 21), (1, 16, 16, 1, 1), (16, 336, 336, 4, 4), (2, 5, 3, 6, 1),
          (30, 20, 24, 4, 4), (2, 24, 30, 7, 7), (3, 25, 14, 5, 5), (2, 37, 19, 16, 16), (3, 20, 33, 16, 17),
          (2, 600, 24, 3, 5), (2, 20, 530, 16, 16)]  # the last two: sums over more than one k-block


def _run(x, w, g):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = torch.ops.shvit_cpp.conv1x1_train(x, w)
    y.backward(g)
    return y, x.grad, w.grad


@needs_gemm
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv1x1_train_matches_conv2d(shape, layout):
    B, ci, co, H, W = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(B, ci, H, W, generator=gen)
    w = torch.randn(co, ci, 1, 1, generator=gen) / ci**0.5
    g = torch.randn(B, co, H, W, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":
        x = torch.cat([torch.randn(B, 2, H, W), x], 1)[:, 2:]
    y, dx, dw = _run(x, w, g)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    yd = F.conv2d(xd, wd)
    yd.backward(g.double())
    assert y.is_contiguous()
    assert_rel_close(y, yd, 2e-6, f"y {shape} {layout}")
    assert_rel_close(dx, xd.grad, 2e-6, f"dx {shape} {layout}")
    assert_rel_close(dw, wd.grad, 2e-6, f"dw {shape} {layout}")


@needs_gemm
def test_conv1x1_train_one_gradient_at_a_time_and_empty_batch():
    x, w = torch.randn(2, 20, 3, 5), torch.randn(24, 20, 1, 1)
    g = torch.randn(2, 24, 3, 5)
    xr = x.clone().requires_grad_()
    torch.ops.shvit_cpp.conv1x1_train(xr, w).backward(g)
    assert_rel_close(xr.grad, F.conv_transpose2d(g.double(), w.double()), 2e-6, "dx alone")
    wr = w.clone().requires_grad_()
    torch.ops.shvit_cpp.conv1x1_train(x, wr).backward(g)
    assert_rel_close(wr.grad, torch.einsum("bohw,bihw->oi", g.double(), x.double())[:, :, None, None], 2e-6, "dw alone")
    x0 = torch.randn(0, 20, 3, 5, requires_grad=True)
    w0 = w.clone().requires_grad_()
    y0 = torch.ops.shvit_cpp.conv1x1_train(x0, w0)
    assert y0.shape == (0, 24, 3, 5)
    y0.sum().backward()
    assert torch.equal(w0.grad, torch.zeros_like(w0))


@needs_gemm
@pytest.mark.parametrize("B,H,W", [(5, 9, 9), (7, 4, 4)], ids=["9x9", "4x4-image-panels"])
def test_conv1x1_train_same_bits_with_one_and_two_threads(B, H, W):
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(B, 50, H, W, generator=gen), torch.randn(60, 50, 1, 1, generator=gen)
    g = torch.randn(B, 60, H, W, generator=gen)
    prev = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(_run(x, w, g))
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@needs_gemm
@pytest.mark.parametrize(
    "x,w,match",
    [
        (torch.randn(1, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 1, 1), "float32"),
        (torch.randn(1, 4, 2, 2), torch.randn(3, 5, 1, 1), "input channels"),
        (torch.randn(1, 4, 2, 2), torch.randn(3, 4, 3, 3), r"\(out, in, 1, 1\)"),
        (torch.randn(4, 2, 2), torch.randn(3, 4, 1, 1), r"\(B, C, H, W\)"),
    ],
)
def test_conv1x1_train_rejects_bad_arguments(x, w, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.shvit_cpp.conv1x1_train(x, w)


# (B, C, H, W): a few tokens per row (SHViT's stage 3), one token, odd sizes, one image
BN_SHAPES = [(16, 448, 4, 4), (3, 19, 1, 1), (2, 37, 5, 7), (1, 8, 9, 11)]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_train_matches_batchnorm2d(shape, dtype, layout, momentum):
    B, C, H, W = shape
    gen = torch.Generator().manual_seed(sum(shape))
    ref = torch.nn.BatchNorm2d(C, momentum=momentum).to(dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=gen)
        ref.bias.normal_(0, 0.5, generator=gen)
        ref.running_var.uniform_(0.5, 1.5, generator=gen)
    exact = copy.deepcopy(ref).double()
    ours = copy.deepcopy(ref)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for step in range(2):  # the second step starts from the first one's running statistics
        x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64) * 3 + 1
        g = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
        xin = x.to(dtype)
        if layout == "channels_last":
            xin = xin.contiguous(memory_format=torch.channels_last)
        elif layout == "channel_slice":
            xin = torch.cat([xin, xin[:, :3]], 1)[:, :C]
        xo = xin.detach().requires_grad_()
        xe = x.clone().requires_grad_()
        y, ye = bn_train(xo, ours), exact(xe)
        y.backward(g.to(dtype))
        ye.backward(g)
        assert y.dtype == dtype and y.is_contiguous()
        assert_rel_close(y, ye, tol, f"step {step}: y")
        assert_rel_close(xo.grad, xe.grad, tol * 5, f"step {step}: dx")
    assert_rel_close(ours.weight.grad, exact.weight.grad, tol * 5, "dweight")
    assert_rel_close(ours.bias.grad, exact.bias.grad, tol * 5, "dbias")
    for name in ("running_mean", "running_var"):
        assert_rel_close(getattr(ours, name), getattr(exact, name), tol, name)
    assert int(ours.num_batches_tracked) == int(exact.num_batches_tracked) == 2


def test_bn_train_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(5, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
        return torch.ops.shvit_cpp.bn_train(x, w, b, rm, rv, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_bn_train_same_bits_with_one_and_two_threads():
    x, g = torch.randn(6, 40, 5, 5), torch.randn(6, 40, 5, 5)
    outs = []
    prev = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            bn = torch.nn.BatchNorm2d(40)
            xr = x.clone().requires_grad_()
            y = bn_train(xr, bn)
            y.backward(g)
            outs.append((y, xr.grad, bn.weight.grad, bn.running_var))
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "x,c,match",
    [
        (torch.randn(1, 4, 2, 2, dtype=torch.float16), 4, "float32 and float64"),
        (torch.randn(1, 4, 2, 2), 5, "elements"),
        (torch.randn(1, 4, 1, 1), 4, "more than 1 value per channel"),
    ],
)
def test_bn_train_rejects_bad_arguments(x, c, match):
    w, b, rm, rv = torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.shvit_cpp.bn_train(x, w, b, rm, rv, 0.1, 1e-5)


def test_bn_train_counts_the_batch_when_given_its_counter():
    x = torch.randn(2, 4, 3, 3)
    w, b, rm, rv = torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4)
    n = torch.tensor(5, dtype=torch.long)
    version = n._version
    torch.ops.shvit_cpp.bn_train(x, w, b, rm, rv, 0.1, 1e-5, n)
    assert int(n) == 6 and n._version > version
    torch.ops.shvit_cpp.bn_train(x, w, b, rm, rv, 0.1, 1e-5)  # no counter: nothing counted
    assert int(n) == 6
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        torch.ops.shvit_cpp.bn_train(x, w, b, rm, rv, 0.1, 1e-5, torch.zeros(1))
    assert int(n) == 6
