"""Shared test helpers: the reference fixtures and a comparison that says where and how much."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; it must be
# switched on before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# float32 comparisons on CUDA mean IEEE float32 (cuDNN would otherwise use TF32 convolutions)
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
GOLDEN = {
    "tiny_a": FIXTURES / "golden_tiny_a_r96x64.pt",
    "tiny_b": FIXTURES / "golden_tiny_b_r80x112.pt",
}


def load_golden(name: str) -> dict:
    return torch.load(GOLDEN[name], weights_only=False)


def read_keys(layout: str, variant: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for line in (FIXTURES / f"keys_{layout}_{variant}.txt").read_text().splitlines():
        name, _, shape = line.partition("\t")
        out.append((name, tuple(int(s) for s in shape.split("x")) if shape else ()))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ computed in float64 (inf when a has NaN/Inf)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "", atol: float = 1e-10) -> None:
    """‖actual − expected‖ <= tol·‖expected‖ + atol (atol only matters where the expected value
    is itself rounding noise around 0); a failure locates the worst element."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff_norm = (a - b).norm().item() if torch.isfinite(a).all() else float("inf")
    if not diff_norm <= tol * b.norm().item() + atol:
        diff = (a - b).abs().nan_to_num(float("inf"))
        idx = int(diff.argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape))
        raise AssertionError(
            f"{what}: relative error {rel_err(a, b):.3e} > {tol:.1e}; worst at {where}: "
            f"{a.flatten()[idx].item():.6g} vs {b.flatten()[idx].item():.6g}; "
            f"NaN in actual: {int(torch.isnan(a).sum())}"
        )


@torch.no_grad()
def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial affine and running statistics (SHViT zero-inits
    the last BN of each residual branch, which would hide bugs in those branches)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
        elif isinstance(m, torch.nn.GroupNorm):
            m.weight.copy_(torch.rand(m.num_channels, generator=g) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(m.num_channels, generator=g) * 0.1)
    return model


@pytest.fixture(params=sorted(GOLDEN), ids=lambda n: n)
def golden(request) -> dict:
    return load_golden(request.param)


# ---------------------------------------------------------------- kernel test helpers
# Relative-norm bounds against a float64 reference computed from the same (upcast) inputs.
KERNEL_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def tol_vs_eager(dtype: torch.dtype, eager_err: float) -> float:
    """Bound for a fused result: the fixed bound of its dtype, or, in half precision, twice the
    error that the eager composition itself shows in that dtype (a ReLU whose input rounds to
    the other sign flips a gradient entry in either)."""
    if dtype in (torch.float16, torch.bfloat16):
        return max(KERNEL_TOL[dtype], 2 * eager_err)
    return KERNEL_TOL[dtype]


def kernel_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# every (backend, device) pair a fused op can run on here
BACKEND_DEVICES = [("triton", "cpu"), ("cpp", "cpu"), ("torch", "cpu")] + (
    [("triton", "cuda"), ("torch", "cuda")] if torch.cuda.is_available() else []
)


def use_backend(monkeypatch, name: str, device: str) -> None:
    """Select a backend for this test; the Triton backend must really be usable there."""
    from shvit_kernels import backend

    monkeypatch.setenv(backend.ENV, name)
    if name == "triton":
        assert backend.triton_available(), "Triton must be installed for the triton backend tests"
        if device == "cpu" and not backend.triton_interpreting():
            # only on a CUDA machine (conftest enables the interpreter everywhere else),
            # where the same kernels are tested compiled on CUDA tensors
            assert torch.cuda.is_available()
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1; the CUDA tests cover the kernels here")
    if name == "cpp":
        assert backend.cpp_available(), "the C++ extension must be built for the cpp backend tests"


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every ``torch.empty`` made from Python during the test starts as NaN, so a kernel that
    leaves part of its output unwritten fails loudly."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)


def gemm_isas() -> list[str]:
    """The packed GEMM's kernel families this CPU runs: "avx2", and "avx512" where the CPU has
    AVX-512F (empty without the C++ extension or without AVX2+FMA)."""
    from shvit_kernels import _cpp

    if not _cpp.available() or not torch.ops.shvit_cpp.gemm_available():
        return []
    ops = torch.ops.shvit_cpp
    before = ops.gemm_isa("")
    isas = ["avx2"]
    try:
        ops.gemm_isa("avx512")
        isas.append("avx512")
    except RuntimeError:  # "this CPU does not run the avx512 kernels"
        pass
    finally:
        ops.gemm_isa(before)
    return isas


@pytest.fixture(params=gemm_isas() or ["no-gemm"])
def each_gemm_isa(request):
    """Runs a test once per kernel family of the packed GEMM this CPU has (once, unchanged,
    where the GEMM does not run), restoring the family in use afterwards."""
    if request.param == "no-gemm":
        yield None
        return
    ops = torch.ops.shvit_cpp
    before = ops.gemm_isa("")
    ops.gemm_isa(request.param)
    try:
        yield request.param
    finally:
        ops.gemm_isa(before)
