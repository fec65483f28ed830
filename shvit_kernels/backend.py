"""Which implementation runs the fused ops for a given tensor.

``SHVIT_KERNELS_BACKEND`` = ``auto`` (default) | ``triton`` | ``cpp`` | ``torch``, read at every
call. ``auto`` picks Triton for CUDA tensors and the C++ kernels for CPU tensors; an
unavailable choice falls back to ``torch`` (the eager composition of the reference ops)
with one warning that says why. ``triton`` on CPU tensors runs the Triton kernels in
Triton's interpreter and requires ``TRITON_INTERPRET=1`` (that is how CPU-only CI tests them).
While a model is exported to ONNX every op runs its torch composition.
"""
from __future__ import annotations

import os
import warnings

import torch

CHOICES = ("auto", "triton", "cpp", "torch")
ENV = "SHVIT_KERNELS_BACKEND"


def requested() -> str:
    choice = os.environ.get(ENV)
    if choice is None or choice in CHOICES:  # the common cases, without normalising
        return choice or "auto"
    choice = choice.strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not one of {', '.join(CHOICES)}")
    return choice


_triton: bool | None = None


def triton_available() -> bool:
    global _triton
    if _triton is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception:
            _triton = False
        else:
            _triton = True
    return _triton


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_cpp_ok = False


def cpp_available() -> bool:
    global _cpp_ok
    if _cpp_ok:
        return True
    from . import _cpp

    _cpp_ok = _cpp.available()
    return _cpp_ok


_warned: set[str] = set()


def _fallback(reason: str) -> str:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"shvit_kernels: {reason}; using the eager torch composition", RuntimeWarning, stacklevel=3)
    return "torch"


def select(t: torch.Tensor) -> str:
    """The backend (``triton`` | ``cpp`` | ``torch``) that runs an op whose input is ``t``.
    While a model is exported to ONNX the ops run their torch composition, which the ONNX
    exporters translate into standard operators."""
    choice = requested()
    if choice == "torch" or torch.onnx.is_in_onnx_export():
        return "torch"
    if t.is_cuda:  # is_cuda / is_cpu: t.device.type builds a torch.device, 6x their time per call
        if choice == "cpp":
            return _fallback("the cpp backend runs CPU tensors only, got a CUDA tensor")
        if not triton_available():
            return _fallback("Triton is not installed, so CUDA tensors cannot use the fused kernels")
        return "triton"
    if t.is_cpu:
        if choice == "triton":
            if not triton_available():
                return _fallback("SHVIT_KERNELS_BACKEND=triton but Triton is not installed")
            if not triton_interpreting():
                return _fallback("Triton runs CPU tensors only in its interpreter (set TRITON_INTERPRET=1)")
            return "triton"
        if cpp_available():
            return "cpp"
        return _fallback("the C++ extension shvit_kernels._C is not built (pip install --no-build-isolation -e .)")
    return _fallback(f"no fused kernels for {t.device.type} tensors")


def pick(t: torch.Tensor, triton_fn, torch_fn, cpp_name: str):
    """The function that runs a ``shvit::`` op on ``t`` (the op's CPU/default kernel):
    the Triton launcher, the C++ op ``shvit_cpp::<cpp_name>`` or the eager composition.
    Triton computes in float32, so float64 takes the composition there."""
    which = select(t)
    if which == "triton" and t.dtype != torch.float64:
        return triton_fn
    if which == "cpp":
        return getattr(torch.ops.shvit_cpp, cpp_name)
    return torch_fn
