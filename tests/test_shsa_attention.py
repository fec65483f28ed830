"""Attention + concat + ReLU: each backend against the float64 reference composition."""
from __future__ import annotations

import pytest
import torch

from conftest import BACKEND_DEVICES, DTYPE_IDS, KERNEL_TOL, assert_close_to_exact, assert_rel_close, use_backend
from shvit_kernels import shsa_attention
from shvit_kernels.shsa_attention import shsa_attention_torch

# every test once per instruction-set level of the C++ kernels this CPU runs (conftest.each_isa)
pytestmark = pytest.mark.usefixtures("each_isa")

# (B, qk_dim, pdim, C2, H, W): N from 1 to 130 (several query/key tiles), odd pdims
CASES = [
    (2, 16, 9, 5, 5, 7),
    (1, 8, 17, 3, 1, 1),
    (3, 16, 12, 4, 8, 8),
    (1, 24, 10, 7, 9, 11),
    (2, 16, 66, 18, 7, 7),
    (1, 16, 75, 9, 4, 4),
    (1, 16, 20, 12, 1, 130),
    (2, 16, 1, 1, 1, 1),
]
CASE_IDS = ["B{}-qk{}-p{}-c{}-{}x{}".format(*c) for c in CASES]


def _inputs(case, dtype, device, layout):
    B, qk, pd, c2, H, W = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    qkv = torch.randn(B, 2 * qk + pd, H, W, generator=g) * 1.5
    x2 = torch.randn(B, c2, H, W, generator=g)
    if layout == "channels_last":
        qkv, x2 = qkv.to(memory_format=torch.channels_last), x2.to(memory_format=torch.channels_last)
    elif layout == "slices":  # x2 a channel slice of a larger tensor, as in the model
        x2 = torch.cat([torch.randn(B, 3, H, W, generator=g), x2], dim=1)[:, 3:]
    return qkv.to(dtype).to(device).requires_grad_(), x2.to(dtype).to(device).requires_grad_()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slices"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_shsa_attention(backend, device, case, dtype, layout, monkeypatch, nan_outputs):
    use_backend(monkeypatch, backend, device)
    qk = case[1]
    qkv, x2 = _inputs(case, dtype, device, layout)
    out = shsa_attention(qkv, x2, qk)
    assert out.dtype == dtype and out.shape == (case[0], case[2] + case[3], *case[4:])
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    out.backward(dout)
    rq, rx = (t.detach().double().requires_grad_() for t in (qkv, x2))
    ref = shsa_attention_torch(rq, rx, qk, qk ** -0.5)
    ref.backward(dout.double())
    eq, ex = (t.detach().clone().requires_grad_() for t in (qkv, x2))
    eager = shsa_attention_torch(eq, ex, qk, qk ** -0.5)  # the composition in the same dtype
    eager.backward(dout)
    assert_close_to_exact(out, ref, eager, "out")
    assert_close_to_exact(qkv.grad, rq.grad, eq.grad, "dqkv")
    assert_close_to_exact(x2.grad, rx.grad, ex.grad, "dx2")


def test_shsa_attention_mixed_dtypes_promote(monkeypatch):
    use_backend(monkeypatch, "triton", "cpu")
    qkv, _ = _inputs(CASES[0], torch.float16, "cpu", "contiguous")
    _, x2 = _inputs(CASES[0], torch.float32, "cpu", "contiguous")
    out = shsa_attention(qkv, x2, 16)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert qkv.grad.dtype == torch.float16 and x2.grad.dtype == torch.float32
    ref = shsa_attention_torch(qkv.detach().double(), x2.detach().double(), 16, 0.25)
    eager = shsa_attention_torch(qkv.detach(), x2.detach(), 16, 0.25)  # attention in float16
    assert eager.dtype == torch.float32
    assert_close_to_exact(out, ref, eager, "out", dtype=torch.float16)


@pytest.mark.parametrize("backend", ["triton", "cpp", "torch"])
def test_shsa_attention_empty_batch(backend, monkeypatch):
    use_backend(monkeypatch, backend, "cpu")
    qkv = torch.randn(0, 41, 5, 5, requires_grad=True)
    x2 = torch.randn(0, 5, 5, 5, requires_grad=True)
    out = shsa_attention(qkv, x2, 16)
    assert out.shape == (0, 14, 5, 5)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and x2.grad.shape == x2.shape


def test_shsa_attention_bad_input():
    with pytest.raises(ValueError, match="more than 2\\*qk_dim"):
        shsa_attention(torch.randn(1, 32, 4, 4), torch.randn(1, 3, 4, 4), 16)
    with pytest.raises(ValueError, match="must match qkv"):
        shsa_attention(torch.randn(1, 40, 4, 4), torch.randn(1, 3, 4, 5), 16)
    with pytest.raises(ValueError, match="x2 must have shape"):
        shsa_attention(torch.randn(1, 40, 4, 4), torch.randn(3, 4, 4), 16)


@pytest.mark.parametrize("where", ["q", "k", "q-inf", "k-inf"])
@pytest.mark.parametrize("N", [(3, 5), (9, 11)])  # one and two query chunks
def test_shsa_attention_nan_inf_like_the_composition(where, N, monkeypatch):
    """A NaN (or inf) in one query's channel poisons that query's outputs, one in a key's
    channel every query of the image: the same entries as the eager composition (the
    score GEMM's column maxima ignore NaN; the sums carry it)."""
    use_backend(monkeypatch, "cpp", "cpu")
    qkv, x2 = _inputs((2, 16, 12, 4, *N), torch.float32, "cpu", "contiguous")
    qkv = qkv.detach().clone()
    val = float("inf") if where.endswith("inf") else float("nan")
    qkv[1, 3 if where.startswith("q") else 16 + 5, N[0] // 2, 1] = val
    with torch.no_grad():
        out = shsa_attention(qkv, x2, 16)
        ref = shsa_attention_torch(qkv.double(), x2.double(), 16, 0.25)
    assert ref.isnan().any()
    assert torch.equal(out.isnan(), ref.isnan())
    assert_rel_close(out.nan_to_num(), ref.nan_to_num(), KERNEL_TOL[torch.float32], "finite entries")
