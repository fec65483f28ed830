"""The convolutions around the mixer of a BN-folded model, with their activations fused.

``conv1x1`` (bias, ReLU, residual add in the GEMM's epilogue), ``ffn_block`` (the whole
residual FFN ``x + pw2(relu(pw1(x)))``, tile by tile so the hidden activation stays in
cache) and ``conv_act`` (any conv with an optional fused ReLU; depthwise 3x3 convs by a
kernel of our own).

On CPU, for float32 inputs without a gradient to compute, on the ``cpp`` backend and outside
``torch.compile``/``torch.export``, the 1x1 convolutions run as token-major GEMMs of
``shvit_kernels._C`` on channels_last tensors (x86-64 with AVX2 and FMA), the depthwise
3x3 convolutions (stride 1 or 2) as a token-major kernel of ``_C``, the first stem conv by a
kernel that reads the NCHW image directly (no layout conversion) and writes channels_last,
and the other (dense 3x3) stem convolutions as their 3x3 taps, read in place, times a packed
weight on the same GEMM. bfloat16 inference on CPUs with bfloat16 hardware runs on oneDNN
(``shvit_kernels.onednn``). Everything else -- CUDA, other dtypes, autograd, compiled graphs,
other CPUs, ``SHVIT_KERNELS_BACKEND=torch`` -- runs the eager composition (``F.conv2d``,
``F.relu``, ``+``), which is the reference. Outputs of the fast paths are channels_last.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cpp, backend, onednn
from ._utils import is_conv3x3, is_dw3x3, is_stem3x3, weight_cache
from .plan import Step, call

__all__ = ["conv1x1", "ffn_block", "conv_act", "conv_step", "ffn_step", "se_step", "pool_linear_step",
           "packed_weight", "fast_path_applies", "gemm_available"]

def gemm_available() -> bool:
    """Whether the packed GEMM runs (the C++ kernels' ISA level is avx2 or higher)."""
    return _cpp.gemm_available()


def fast_path_applies(x: Tensor, *params: Tensor | None) -> bool:
    """Whether ``x`` (with these parameters) takes the CPU fast path described above."""
    if not x.is_cpu or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return False
    if any(p is not None and (not p.is_cpu or p.dtype != torch.float32) for p in params):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)):
        return False
    return backend.select(x) == "cpp"


def packed_weight(weight: Tensor) -> Tensor:
    """The GEMM's packed form of a (out, in, 1, 1) weight, cached until the weight changes."""
    return weight_cache(weight, "packed", torch.ops.shvit_cpp.pack_weight)


def _check_1x1(x: Tensor, weight: Tensor, bias: Tensor) -> None:
    if weight.dim() != 4 or weight.shape[2:] != (1, 1) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be ({bias.shape[0]}, {x.shape[1]}, 1, 1), got {tuple(weight.shape)}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")


def conv1x1(x: Tensor, weight: Tensor, bias: Tensor, relu: bool = False, residual: Tensor | None = None) -> Tensor:
    """``relu?(conv2d(x, weight, bias) + residual)`` for a (out, in, 1, 1) weight."""
    _check_1x1(x, weight, bias)
    if residual is not None and residual.shape != (x.shape[0], weight.shape[0], *x.shape[2:]):
        raise ValueError(
            f"residual must be {(x.shape[0], weight.shape[0], *x.shape[2:])}, got {tuple(residual.shape)}"
        )
    if onednn.applies(x, weight, bias, residual):
        return onednn.conv1x1(x, weight, bias, relu, residual)
    if fast_path_applies(x, weight, bias, residual) and gemm_available():
        return torch.ops.shvit_cpp.pw_conv(x, packed_weight(weight), bias.contiguous(), relu, residual)
    y = F.conv2d(x, weight, bias)
    if residual is not None:
        y = residual + y
    return F.relu(y) if relu else y


def ffn_block(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """The residual FFN of a BN-folded model: ``x + conv2d(relu(conv2d(x, w1, b1)), w2, b2)``."""
    _check_1x1(x, w1, b1)
    if w2.dim() != 4 or tuple(w2.shape) != (x.shape[1], w1.shape[0], 1, 1):
        raise ValueError(f"w2 must be ({x.shape[1]}, {w1.shape[0]}, 1, 1), got {tuple(w2.shape)}")
    if b2.shape != (x.shape[1],):
        raise ValueError(f"b2 must be ({x.shape[1]},), got {tuple(b2.shape)}")
    if onednn.applies(x, w1, b1, w2, b2):
        return onednn.ffn_block(x, w1, b1, w2, b2)
    if fast_path_applies(x, w1, b1, w2, b2) and gemm_available():
        return call(ffn_step(w1, b1, w2, b2), x)
    return x + F.conv2d(F.relu(F.conv2d(x, w1, b1)), w2, b2)


def ffn_step(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Step:
    """``ffn_block`` on the CPU fast path as one C++ op (a ``plan.Step``), its weights packed
    now (for float32 CPU parameters, on a CPU where ``gemm_available()``)."""
    return "ffn_block", (packed_weight(w1), b1.contiguous(), packed_weight(w2), b2.contiguous())


def se_step(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Step:
    """``x * sigmoid(conv1x1(relu(conv1x1(mean(x), w1, b1)), w2, b2))`` (a BN-folded
    SqueezeExcite) as one C++ op, as ``ffn_step``."""
    return "se_gate", (packed_weight(w1), b1.contiguous(), packed_weight(w2), b2.contiguous())


def pool_linear_step(weight: Tensor, bias: Tensor) -> Step:
    """``linear(x.mean((2, 3)), weight, bias)`` (global pooling and a classifier) as one C++
    op, as ``ffn_step``."""
    return "pool_linear", (packed_weight(weight), bias.contiguous())


def conv_act(x: Tensor, conv: torch.nn.Conv2d, relu: bool = False) -> Tensor:
    """``relu?(conv(x))`` for a Conv2d with bias (1x1 convs take ``conv1x1``)."""
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"x must be (B, {conv.in_channels}, H, W), got {tuple(x.shape)}")
    if conv.bias is None or x.numel() == 0 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        y = conv(x)
        return F.relu(y) if relu else y
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 and conv.padding == (0, 0):
        return conv1x1(x, conv.weight, conv.bias, relu=relu)
    if onednn.applies(x, conv.weight, conv.bias):
        step = onednn.conv_step(conv, relu, nchw_input=x.is_contiguous())
        return call(step, x.to(torch.bfloat16))  # float32 under autocast
    if fast_path_applies(x, conv.weight, conv.bias):
        step = conv_step(conv, relu, nchw_input=x.is_contiguous())
        if step is not None:
            return call(step, x)
    y = conv(x)
    return F.relu(y) if relu else y


def conv_step(conv: torch.nn.Conv2d, relu: bool = False, nchw_input: bool = False) -> Step | None:
    """``relu?(conv(x))`` on the CPU fast path as one C++ op (a ``plan.Step``), its weights
    packed now (for a float32 CPU conv with bias): 1x1 convs on the packed GEMM, depthwise 3x3
    convs by their token-major kernel, the first stem conv (few input channels) straight from
    an NCHW image when ``nchw_input``, other dense 3x3 convs as their taps (read in place)
    times the packed (Cout, 3, 3, Cin) weight. ``None`` for any other conv, and for GEMM convs
    where ``gemm_available()`` is false."""
    w, b, stride = conv.weight, conv.bias, conv.stride[0]
    if b is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    if is_dw3x3(conv):
        return "dw_conv3x3", (w, b, stride, relu)
    if not gemm_available():
        return None
    b = b.contiguous()
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 and conv.padding == (0, 0):
        return "pw_conv", (packed_weight(w), b, relu, None)
    if is_stem3x3(conv) and nchw_input:
        return "stem_conv3x3", (w, b, stride, relu)
    if is_conv3x3(conv):
        pack = torch.ops.shvit_cpp.pack_weight
        wp = weight_cache(w, "packed3x3", lambda w: pack(w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)))
        return "conv3x3", (wp, b, stride, relu)
    return None
