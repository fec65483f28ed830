"""The compiled CPU kernels: gradcheck in float64, thread-count independence, missing build."""
from __future__ import annotations

import warnings

import pytest
import torch

import shvit
import shvit_kernels
from conftest import assert_rel_close, load_golden, use_backend, with_threads
from shvit_kernels import backend

# every test once per instruction-set level of the C++ kernels this CPU runs (conftest.each_isa)
pytestmark = pytest.mark.usefixtures("each_isa")


def _gn(x, w, b):
    return shvit_kernels.group_norm_partial(x[:, :5], w, b)


def _attn(qkv, x2):
    return shvit_kernels.shsa_attention(qkv, x2, 8)


def test_gradcheck_group_norm_partial(monkeypatch):
    use_backend(monkeypatch, "cpp", "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(5, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_gn, (x, w, b))


def test_gradcheck_shsa_attention(monkeypatch):
    use_backend(monkeypatch, "cpp", "cpu")
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 2 * 8 + 5, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    x2 = torch.randn(2, 4, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_attn, (qkv, x2))


def test_ops_one_and_two_threads_agree(monkeypatch):
    """float32, SHViT-S4 stage-2 shape: every output and gradient of the fused ops within 1e-6."""
    use_backend(monkeypatch, "cpp", "cpu")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 336, 8, 8, generator=g)
    w, b = torch.rand(72, generator=g) + 0.5, torch.randn(72, generator=g)
    qkv = torch.randn(16, 104, 8, 8, generator=g)
    wi, bi = torch.randn(104, 72, generator=g) * 0.1, torch.randn(104, generator=g)

    def run():
        xg, wg, bg, qg = (t.clone().requires_grad_() for t in (x, w, b, qkv))
        x1, x2 = xg.split([72, 264], dim=1)
        y = shvit_kernels.group_norm_partial(x1, wg, bg)
        out = shvit_kernels.shsa_attention(qg, x2, 16)
        (y.square().sum() + out.square().sum()).backward()
        with torch.no_grad():
            inf = shvit_kernels.shsa_inference(x, wi, bi, 72, 16)
        return y.detach(), out.detach(), inf, xg.grad, wg.grad, bg.grad, qg.grad

    for a, b_ in zip(*with_threads(run)):
        assert_rel_close(a, b_, 1e-6, "1 vs 2 threads")


@pytest.mark.parametrize("mode", ["train", "eval", "fused-eval"])
def test_model_one_and_two_threads_agree(mode, monkeypatch):
    """float64 model (PyTorch's own convolutions and BatchNorms also split work by thread)."""
    use_backend(monkeypatch, "cpp", "cpu")
    gd = load_golden("tiny_b")
    model = shvit.SHViT(**gd["config"], fused=True).double()
    model.load_state_dict(gd["state_dict_official"])
    model.train(mode == "train")
    if mode == "fused-eval":
        model.fuse()
    x = torch.randn(4, 3, 80, 112, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def run():
        xi = x.clone().requires_grad_(mode == "train")
        out = model(xi)
        if mode != "train":
            return (out.detach(),)
        out.square().sum().backward()
        grads = (xi.grad,) + tuple(p.grad.clone() for p in model.parameters())
        model.zero_grad()
        return (out.detach(),) + grads

    for a, b in zip(*with_threads(run)):
        assert_rel_close(a, b, 1e-12, f"{mode}: 1 vs 2 threads")


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv(backend.ENV, "cpp")
    monkeypatch.setattr(backend, "cpp_available", lambda: False)
    monkeypatch.setattr(backend, "_warned", set())
    qkv, x2 = torch.randn(1, 20, 3, 3), torch.randn(1, 2, 3, 3)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ extension .* not built"):
        out = shvit_kernels.shsa_attention(qkv, x2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        again = shvit_kernels.shsa_attention(qkv, x2, 8)
    assert torch.equal(out, again)
    monkeypatch.setenv(backend.ENV, "torch")
    assert torch.equal(out, shvit_kernels.shsa_attention(qkv, x2, 8))


def test_cpp_backend_on_cuda_tensor_is_refused_with_fallback(monkeypatch):
    monkeypatch.setenv(backend.ENV, "cpp")
    monkeypatch.setattr(backend, "_warned", set())
    t = torch.empty(0, device="meta")
    with pytest.warns(RuntimeWarning, match="no fused kernels for meta tensors"):
        assert backend.select(t) == "torch"


@pytest.mark.parametrize("hw", [(4, 4), (9, 11), (1, 70)])
def test_cpp_block_op_any_size(hw, monkeypatch):
    """The C++ residual-block op at sizes on both sides of the cut-over that picks it."""
    use_backend(monkeypatch, "cpp", "cpu")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 30, *hw, generator=g)
    w, b = torch.randn(41, 9, generator=g) * 0.3, torch.randn(41, generator=g)
    wp, bp = torch.randn(30, 30, generator=g) * 0.2, torch.randn(30, generator=g)
    with torch.no_grad():
        out = torch.ops.shvit_cpp.shsa_block_infer(x, w, b, wp, bp, 9, 16, 1e-5)
        monkeypatch.setenv(backend.ENV, "torch")
        xd = x.double()
        z = shvit_kernels.shsa_inference(xd, w.double(), b.double(), 9, 16)
        expected = xd + torch.nn.functional.conv2d(z, wp.double()[:, :, None, None], bp.double())
    assert_rel_close(out, expected, 1e-5, f"block op at {hw}")


@pytest.mark.isa_independent
@pytest.mark.parametrize("built", ["1.13.1", "2.0.0+cu118"])
def test_extension_built_for_another_torch(built, monkeypatch):
    """An extension built against another torch release is a clear ImportError naming both
    versions (loading it would fail with undefined symbols, or crash); the same release with
    another local tag ("+cpu", "+cu126") is accepted."""
    import sys
    import types

    from shvit_kernels import _cpp

    monkeypatch.setitem(sys.modules, "shvit_kernels._build_info", types.SimpleNamespace(TORCH_VERSION=built))
    with pytest.raises(ImportError, match=rf"built against torch {built.replace('+', '[+]')}, but torch "
                                          rf"{torch.__version__.replace('+', '[+]')} is installed"):
        _cpp.check_torch_version()
    same = torch.__version__.split("+")[0] + "+cu999"
    monkeypatch.setitem(sys.modules, "shvit_kernels._build_info", types.SimpleNamespace(TORCH_VERSION=same))
    _cpp.check_torch_version()
