"""Loads the compiled CPU kernels (``shvit_kernels._C``) when they were built."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def available() -> bool:
    try:
        from . import _C  # noqa: F401  (registers the CPU kernels with torch.library)
    except ImportError:
        return False
    return True
