"""Loads the compiled CPU kernels (``shvit_kernels._C``) when they were built, and sets the
instruction-set level they run at.

The extension is compiled for the baseline ISA of its architecture; its AVX2 and AVX-512
kernels run where the CPU has them. The level is chosen at load: this CPU's best, or a lower
one named by ``SHVIT_KERNELS_ISA`` (``baseline`` | ``avx2`` | ``avx512``); ``isa()`` reports
or changes it. An extension built against another torch release than the one installed is an
ImportError naming both (loading it would fail with undefined symbols, or crash).
"""
from __future__ import annotations

import torch

_available: bool | None = None
_gemm: bool | None = None
LEVELS = ("baseline", "avx2", "avx512")


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a torch version string ("2.13.0+cpu" -> (2, 13, 0))."""
    parts = []
    for p in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_torch_version() -> None:
    """Raises ImportError when the extension was built against another torch release."""
    try:
        from ._build_info import TORCH_VERSION as built
    except ImportError:  # not built (or built by an older setup.py): nothing to compare
        return
    if _release(built) != _release(torch.__version__):
        raise ImportError(
            f"shvit_kernels._C was built against torch {built}, but torch {torch.__version__} is installed. "
            "Rebuild it for this torch (pip install --no-build-isolation --force-reinstall --no-deps shvit-kernels, "
            "or the same command on the source tree), or install the torch it was built for."
        )


def available() -> bool:
    """Whether the extension imports (importing it registers the ``shvit_cpp`` ops). A bad
    ``SHVIT_KERNELS_ISA`` is a RuntimeError here, at the first use."""
    global _available
    if _available is None:
        check_torch_version()
        try:
            from . import _C  # noqa: F401
        except ImportError:
            _available = False
        else:
            _available = True
            torch.ops.shvit_cpp.isa("")  # reads SHVIT_KERNELS_ISA: a bad value fails now
    return _available


def isa(level: str | None = None) -> str:
    """The instruction-set level of the C++ kernels: ``"baseline"``, ``"avx2"`` or
    ``"avx512"``. With ``level`` (one of those, or ``"auto"``: the start-up level, this CPU's
    best unless ``SHVIT_KERNELS_ISA`` named a lower one) it switches to that level first; a
    level this CPU does not run is a RuntimeError. Not to be called while kernels run on
    other threads."""
    global _gemm
    if not available():
        raise RuntimeError("shvit_kernels: the C++ extension is not built")
    if level:
        _gemm = None
    return str(torch.ops.shvit_cpp.isa(level or ""))


def levels() -> list[str]:
    """The levels up to the start-up level, lowest first: every level this CPU runs unless
    ``SHVIT_KERNELS_ISA`` capped them (empty without the extension)."""
    if not available():
        return []
    before = isa()
    try:
        return LEVELS[: LEVELS.index(isa("auto")) + 1]
    finally:
        isa(before)


def gemm_available() -> bool:
    """Whether the packed GEMM (and the other AVX2 kernels) run: the level is avx2 or higher."""
    global _gemm
    if _gemm is None:
        _gemm = available() and bool(torch.ops.shvit_cpp.gemm_available())
    return _gemm
