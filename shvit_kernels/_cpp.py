"""Loads the compiled CPU kernels (``shvit_kernels._C``) when they were built."""
from __future__ import annotations

_available: bool | None = None


def available() -> bool:
    """Whether the extension imports (importing it registers the ``shvit_cpp`` ops)."""
    global _available
    if _available is None:
        try:
            from . import _C  # noqa: F401
        except ImportError:
            _available = False
        else:
            _available = True
    return _available
