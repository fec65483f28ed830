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


def _interpreter_rounds_bfloat16_to_nearest() -> None:
    """Triton's interpreter converts float32 to bfloat16 by truncation, one unit in the last
    place below what compiled kernels give (``arith.truncf`` rounds to nearest even on every
    GPU target). Tests hold half-precision results to twice the eager error, so the
    interpreter is made to round as compiled code does; the conversion itself is torch's."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "cast_impl"):
        return
    truncating_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return truncating_cast(self, src, dst_type)

    builder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_rounds_bfloat16_to_nearest()
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


def assert_close_to_exact(actual: torch.Tensor, exact: torch.Tensor, eager: torch.Tensor, what: str = "",
                          dtype: torch.dtype | None = None) -> None:
    """A fused result against the float64 ``exact`` one. ``dtype`` is the precision it was
    computed in (``actual.dtype`` unless given: under autocast a float32 gradient comes from
    half-precision math). float32/float64: within the dtype's KERNEL_TOL by relative norm.
    Half precision: within twice the error that ``eager`` (the reference computed the same
    way) shows, by relative norm and element-wise (``torch.testing.assert_close`` with atol =
    twice eager's largest deviation). Where eager is exact (a gradient that is 0 in exact
    arithmetic), the floors are float32's bound by norm and one rounding unit of the dtype at
    the tensor's scale element-wise."""
    dtype = dtype or actual.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        assert_rel_close(actual, exact, KERNEL_TOL[dtype], what)
        return
    a, e, x = (t.detach().double().cpu() for t in (actual, eager, exact))
    assert_rel_close(a, x, max(2 * rel_err(e, x), KERNEL_TOL[torch.float32]), what)
    unit = torch.finfo(dtype).eps * x.abs().max().item()
    torch.testing.assert_close(a, x, rtol=0, atol=max(2 * (e - x).abs().max().item(), unit),
                               msg=lambda m: f"{what}: element-wise, twice the eager error: {m}")


# every (backend, device) pair a fused op can run on (cuda cases are skipped, with the
# reason, on a machine without a GPU)
BACKEND_DEVICES = [("triton", "cpu"), ("cpp", "cpu"), ("torch", "cpu"), ("triton", "cuda"), ("torch", "cuda")]
NO_CUDA = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")


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


def with_threads(fn, counts=(1, 2)) -> list:
    """``fn()`` once with each number of intra-op threads, restoring the number in use."""
    before = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(before)


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


def isa_levels() -> list[str]:
    """The instruction-set levels of the C++ kernels this CPU runs, lowest first: "baseline",
    then "avx2" and "avx512" where the CPU has them (empty without the C++ extension)."""
    from shvit_kernels import _cpp

    return _cpp.levels()


@pytest.fixture(params=isa_levels() or ["no-cpp"])
def each_isa(request):
    """Runs a test once per instruction-set level this CPU runs (once, unchanged, without the
    C++ extension), restoring the level in use afterwards."""
    if request.param == "no-cpp":
        yield None
        return
    from shvit_kernels import _cpp

    before = _cpp.isa()
    _cpp.isa(request.param)
    try:
        yield request.param
    finally:
        _cpp.isa(before)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_gemm: tests the packed GEMM's kernels directly (from the avx2 level up)")
    config.addinivalue_line("markers", "isa_independent: runs the same code at every instruction-set level of the C++ kernels")


def _reads_isa(item) -> bool:
    """Whether a test can reach the ISA-specific C++ kernels: the cpp (or default) backend on a
    CPU tensor in float32, and not marked ``isa_independent``."""
    if item.get_closest_marker("isa_independent"):
        return False
    params = item.callspec.params if hasattr(item, "callspec") else {}
    return (
        params.get("backend", "cpp") in ("cpp", "auto")
        and params.get("device", "cpu") == "cpu"
        and params.get("dtype", torch.float32) == torch.float32
    )


def pytest_collection_modifyitems(config, items):
    """Cases with ``device == "cuda"`` are skipped without a GPU; ``each_isa`` repeats a test
    at every level but the default only where the test can reach the ISA-specific kernels
    (``_reads_isa``)."""
    if not torch.cuda.is_available():
        for item in items:
            if hasattr(item, "callspec") and item.callspec.params.get("device") == "cuda":
                item.add_marker(NO_CUDA)
    isas = isa_levels()
    no_gemm = pytest.mark.skip(reason="the packed GEMM needs the C++ extension on a CPU with AVX2+FMA; "
                                      "elsewhere the composition runs (tested with the baseline level)")
    for item in items:
        if item.get_closest_marker("needs_gemm") and len(isas) < 2:
            item.add_marker(no_gemm)
    if len(isas) < 2:
        return
    keep, drop = [], []
    for item in items:
        p = item.callspec.params if hasattr(item, "callspec") else {}
        isa = p.get("each_isa")
        repeat = isa is not None and isa != isas[-1]
        # a needs_gemm test at the baseline level would test the ATen fallback its checks
        # do not reach; the repeats of the others only where the level matters
        useless = repeat and (not _reads_isa(item) or (isa == "baseline" and item.get_closest_marker("needs_gemm")))
        (drop if useless else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
