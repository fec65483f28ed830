"""GroupNorm on the partial channels: each backend against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from conftest import BACKEND_DEVICES, DTYPE_IDS, assert_close_to_exact, assert_rel_close, use_backend
from shvit_kernels import group_norm_partial

# (B, dim, pdim, H, W): odd and prime sizes, 1x1 and 1xN images, SHViT's pdims
CASES = [
    (2, 20, 9, 5, 7),
    (1, 30, 17, 1, 1),
    (3, 12, 5, 1, 13),
    (2, 84, 66, 7, 7),
    (1, 96, 75, 4, 4),
    (2, 24, 24, 9, 11),
    (2, 5, 1, 3, 3),
]
CASE_IDS = ["B{}-d{}-p{}-{}x{}".format(*c) for c in CASES]


def _inputs(case, dtype, device, layout):
    B, dim, pdim, H, W = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    x = (torch.randn(B, dim, H, W, generator=g) * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(B, dim, W, H, generator=g).to(dtype).transpose(2, 3)  # no flat token stride
    w = (torch.rand(pdim, generator=g) + 0.5).to(dtype)
    b = torch.randn(pdim, generator=g).to(dtype)
    return x.to(device), w.to(device), b.to(device)


def _reference(x, w, b, pdim, dy, dtype=torch.float64):
    """torch's GroupNorm(1 group) on the first pdim channels and its gradients, computed in
    ``dtype`` from the same inputs (float64: the exact reference; the inputs' own dtype:
    the eager error a fused result is held to)."""
    xr, wr, br = (t.detach().to(dtype).requires_grad_() for t in (x, w, b))
    y = torch.nn.functional.group_norm(xr[:, :pdim], 1, wr, br, 1e-5)
    y.backward(dy.to(dtype))
    return y, xr.grad, wr.grad, br.grad


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_group_norm_partial(backend, device, case, dtype, layout, monkeypatch, nan_outputs):
    use_backend(monkeypatch, backend, device)
    pdim = case[2]
    x, w, b = _inputs(case, dtype, device, layout)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    y = group_norm_partial(x[:, :pdim], w, b)
    assert y.dtype == dtype and y.shape == (case[0], pdim, *case[3:])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    y.backward(dy)
    exact = _reference(x, w, b, pdim, dy)
    eager = _reference(x, w, b, pdim, dy, dtype)
    for got, ex, ea, what in zip((y, x.grad, w.grad, b.grad), exact, eager, ("y", "dx", "dweight", "dbias")):
        assert_close_to_exact(got, ex, ea, what)

@pytest.mark.parametrize("backend", ["triton", "cpp", "torch"])
def test_group_norm_partial_float64(backend, monkeypatch):
    use_backend(monkeypatch, backend, "cpu")
    x, w, b = _inputs(CASES[0], torch.float64, "cpu", "contiguous")
    x.requires_grad_()
    y = group_norm_partial(x[:, :9], w, b)
    y.sum().backward()
    ry, rdx, _, _ = _reference(x, w, b, 9, torch.ones_like(y))
    assert_rel_close(y, ry, 1e-12, "y")
    assert_rel_close(x.grad, rdx, 1e-12, "dx")


@pytest.mark.parametrize("backend", ["triton", "cpp", "torch"])
def test_group_norm_partial_empty_batch(backend, monkeypatch):
    use_backend(monkeypatch, backend, "cpu")
    x = torch.randn(0, 20, 5, 5, requires_grad=True)
    w = torch.ones(9, requires_grad=True)
    y = group_norm_partial(x[:, :9], w, torch.zeros(9))
    assert y.shape == (0, 9, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(9))


def test_group_norm_partial_bad_input():
    w, b = torch.ones(9), torch.zeros(9)
    with pytest.raises(ValueError, match="x1 must have shape"):
        group_norm_partial(torch.randn(9, 5, 5), w, b)
    with pytest.raises(ValueError, match="weight and bias"):
        group_norm_partial(torch.randn(2, 8, 5, 5), w, b)
    with pytest.raises(TypeError, match="float32"):
        group_norm_partial(torch.zeros(2, 9, 5, 5, dtype=torch.int32), w, b)
    with pytest.raises(ValueError, match="one device"):
        group_norm_partial(torch.randn(2, 9, 5, 5), w.to("meta"), b)
