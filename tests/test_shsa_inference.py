"""One-pass inference op (BN and GroupNorm affine folded) against the reference SHSA module."""
from __future__ import annotations

import copy

import pytest
import torch

import shvit
import shvit_kernels
from conftest import BACKEND_DEVICES, DTYPE_IDS, assert_close_to_exact, assert_rel_close, randomize_bn, use_backend
from shvit_kernels.shsa_attention import shsa_attn_fwd_torch

# every test once per instruction-set level of the C++ kernels this CPU runs (conftest.each_isa)
pytestmark = pytest.mark.usefixtures("each_isa")

# (B, dim, pdim, qk_dim, H, W); N <= 64 runs the one-pass kernel, larger N the tiled path
CASES = [
    (2, 20, 9, 16, 5, 7),
    (1, 30, 17, 8, 1, 1),
    (3, 24, 12, 16, 8, 8),
    (2, 84, 66, 16, 7, 7),
    (1, 100, 75, 16, 4, 4),
    (1, 21, 10, 24, 9, 11),
    (2, 20, 9, 16, 1, 70),
    (2, 8, 1, 16, 1, 1),
]
CASE_IDS = ["B{}-d{}-p{}-qk{}-{}x{}".format(*c) for c in CASES]


def _modules(case, seed=0):
    B, dim, pdim, qk, H, W = case
    torch.manual_seed(seed)
    ref = randomize_bn(shvit.SHSA(dim, qk, pdim), seed).eval()
    with torch.no_grad():  # proj.1 starts with a zero BN weight
        ref.proj[1].bn.weight.uniform_(0.5, 1.5)
    fused = copy.deepcopy(ref)
    fused.fused = True
    return ref, fused.fuse()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_shsa_inference_module(backend, device, case, dtype, layout, monkeypatch, nan_outputs):
    use_backend(monkeypatch, backend, device)
    ref, fused = _modules(case)
    assert isinstance(fused, shvit.SHSAInference)
    x = torch.randn(case[0], case[1], *case[4:], generator=torch.Generator().manual_seed(3)) * 2
    with torch.no_grad():
        eager = copy.deepcopy(ref).to(dtype)(x.to(dtype))  # the reference in the same dtype
        expected = ref.double()(x.double())
        xin = x.to(dtype)
        if layout == "channels_last":
            xin = xin.to(memory_format=torch.channels_last)
        fused = fused.to(device=device, dtype=dtype)
        out = fused(xin.to(device))
    assert out.dtype == dtype
    assert_close_to_exact(out, expected, eager, "SHSA output")


@pytest.mark.parametrize("backend", ["triton", "cpp", "torch"])
def test_shsa_inference_op_matches_composition(backend, monkeypatch, nan_outputs):
    use_backend(monkeypatch, backend, "cpu")
    for case in (CASES[0], CASES[-1]):
        ref, fused = _modules(case, seed=1)
        x = torch.randn(case[0], case[1], *case[4:])
        with torch.no_grad():
            ref.double()
            x1 = ref.pre_norm(x.double()[:, : case[2]])
            qkv = ref.qkv(x1)
            expected, _ = shsa_attn_fwd_torch(qkv, x.double()[:, case[2] :], case[3], ref.scale)
            out = shvit_kernels.shsa_inference(x, fused.weight, fused.bias, case[2], case[3])
        assert_rel_close(out, expected, 2e-5, f"op {case}")


def test_shsa_inference_with_grad_uses_differentiable_path(monkeypatch):
    use_backend(monkeypatch, "triton", "cpu")
    ref, fused = _modules(CASES[0])
    x = torch.randn(2, 20, 5, 7, requires_grad=True)
    out = fused(x)
    out.sum().backward()
    xr = x.detach().double().requires_grad_()
    ref.double()(xr).sum().backward()
    assert_rel_close(x.grad, xr.grad, 1e-5, "dx through a fused eval module")


@pytest.mark.parametrize("backend", ["triton", "cpp", "torch"])
def test_shsa_inference_empty_batch(backend, monkeypatch):
    use_backend(monkeypatch, backend, "cpu")
    _, fused = _modules(CASES[0])
    with torch.no_grad():
        assert fused(torch.randn(0, 20, 5, 7)).shape == (0, 20, 5, 7)


def test_shsa_inference_bad_input():
    _, fused = _modules(CASES[0])
    with torch.no_grad():
        with pytest.raises(ValueError, match="20 channels"):
            fused(torch.randn(1, 21, 5, 5))
        with pytest.raises(ValueError, match="weight must be"):
            shvit_kernels.shsa_inference(torch.randn(1, 20, 5, 5), fused.weight[:, :-1], fused.bias, 9, 16)
        with pytest.raises(ValueError, match="one device"):
            shvit_kernels.shsa_inference(
                torch.randn(1, 20, 5, 5), fused.weight.to("meta"), fused.bias, 9, 16
            )


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", ["triton", "cpp", "torch"])
def test_shsa_block_inference(backend, case, dtype, layout, monkeypatch, nan_outputs):
    """The residual block x + SHSA(x) after fuse(), against the reference Residual(SHSA)."""
    use_backend(monkeypatch, backend, "cpu")
    ref, _ = _modules(case)
    fused_src = copy.deepcopy(ref).to(dtype)  # fold in the dtype under test
    fused_src.fused = True
    block = shvit.Residual(fused_src).eval().fuse()
    assert isinstance(block, shvit.SHSAInference) and block.residual
    x = torch.randn(case[0], case[1], *case[4:], generator=torch.Generator().manual_seed(4)) * 2
    with torch.no_grad():
        expected = shvit.Residual(copy.deepcopy(ref)).double()(x.double())
        eager = shvit.Residual(copy.deepcopy(ref)).to(dtype)(x.to(dtype))  # the reference in the same dtype
        xin = x.to(dtype)
        if layout == "channels_last":
            xin = xin.to(memory_format=torch.channels_last)
        out = block(xin)
    assert out.dtype == dtype
    if dtype == torch.float64:
        assert_rel_close(out, expected, 1e-11, "x + SHSA(x)")
    else:
        assert_close_to_exact(out, expected, eager, "x + SHSA(x)")


def test_shsa_block_inference_bad_input():
    _, fused = _modules(CASES[0])
    with torch.no_grad():
        with pytest.raises(ValueError, match="proj_weight must be"):
            shvit_kernels.shsa_block_inference(
                torch.randn(1, 20, 5, 5), fused.weight, fused.bias, torch.randn(20, 19), torch.randn(20), 9, 16
            )
