"""bfloat16 CPU inference of a BN-folded fused model on oneDNN, with fused epilogues.

On a CPU with bfloat16 hardware (AMX-BF16 or AVX512-BF16) every convolution and GEMM of a
folded fused model runs in bfloat16 with float32 accumulation through oneDNN, the library
PyTorch ships and inductor uses for the same purpose (``torch.ops.mkldnn``): weights are
reordered once into oneDNN's blocked layout and cached; ReLUs and residual adds run in the
convolution's or GEMM's epilogue; activations stay channels_last (token-major) bfloat16.
oneDNN picks AMX tiles where the CPU has them and AVX512-BF16 otherwise.

It applies to bfloat16 inputs and parameters, and to float32 ones under
``torch.autocast("cpu", torch.bfloat16)`` (inputs and weights cast as autocast would), in
inference (no gradient to compute), on the ``cpp`` backend at the avx2 level or above (the
SHSA block's attention runs on the packed GEMM), outside compiled graphs.
On CPUs without bfloat16 hardware a bfloat16 model runs its float32 path instead
(``shvit.SHViT.forward``), since emulated bfloat16 is slower than float32 there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cpp, backend
from ._utils import weight_cache

__all__ = ["bf16_hardware", "applies", "conv1x1", "conv", "ffn_block", "shsa_block"]

_hardware: bool | None = None


def bf16_hardware() -> bool:
    """Whether this CPU computes bfloat16 dot products in hardware (AMX-BF16 or AVX512-BF16)
    and oneDNN is there to use them."""
    global _hardware
    if _hardware is None:
        cpu = getattr(torch, "cpu", None)
        has = any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
        _hardware = bool(has and torch.backends.mkldnn.is_available()
                         and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))
    return _hardware


def applies(x: Tensor, *params: Tensor | None) -> bool:
    """Whether ``x`` and these parameters take the bfloat16 oneDNN path described above."""
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
    dtypes = (torch.bfloat16, torch.float32) if autocast else (torch.bfloat16,)
    if x.dtype not in dtypes or not x.is_cpu or x.numel() == 0:
        return False
    if not bf16_hardware() or torch.compiler.is_compiling() or not _cpp.gemm_available():
        return False
    grad = torch.is_grad_enabled() and x.requires_grad
    for p in params:
        if p is not None:
            if not p.is_cpu or p.dtype not in dtypes:
                return False
            grad = grad or (p.requires_grad and torch.is_grad_enabled())
    return not grad and backend.select(x) == "cpp"


def _bf16(t: Tensor) -> Tensor:
    return t if t.dtype == torch.bfloat16 else weight_cache(t, "bf16", lambda w: w.to(torch.bfloat16))


def _conv_weight(weight: Tensor, padding, stride, dilation, groups: int) -> Tensor:
    return weight_cache(weight, ("onednn-conv", *padding, *stride, *dilation, groups),
                        lambda w: torch.ops.mkldnn._reorder_convolution_weight(
                            w.to(torch.bfloat16), padding, stride, dilation, groups))


def _linear_weight(weight: Tensor) -> Tensor:
    return weight_cache(weight, "onednn-linear", lambda w: torch.ops.mkldnn._reorder_linear_weight(
        w.reshape(w.shape[0], -1).to(torch.bfloat16)))


def _cl(x: Tensor) -> Tensor:
    return x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def _rows(x: Tensor) -> Tensor:
    """A channels_last (B, C, H, W) tensor as its (B*H*W, C) token rows (a view)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _unrows(y: Tensor, like: Tensor) -> Tensor:
    b, _, h, w = like.shape
    return y.view(b, h, w, y.shape[1]).permute(0, 3, 1, 2)


def conv1x1(x: Tensor, weight: Tensor, bias: Tensor, relu: bool = False, residual: Tensor | None = None) -> Tensor:
    """``relu?(conv2d(x, weight, bias) + residual)`` for a 1x1 weight, in bfloat16: a GEMM on
    the channels_last token rows (oneDNN's linear), bias and ReLU or the residual add as its
    post-op. channels_last out."""
    x = _cl(x)
    w, b = _linear_weight(weight), _bf16(bias)
    if residual is None:
        return _unrows(torch.ops.mkldnn._linear_pointwise(_rows(x), w, b, "relu" if relu else "none", [], ""), x)
    y = torch.ops.mkldnn._linear_pointwise.binary(_rows(x), _rows(_cl(residual)), w, b, "add")
    return _unrows(F.relu(y, inplace=True) if relu else y, x)


def conv(x: Tensor, weight: Tensor, bias: Tensor, padding, stride, dilation, groups: int, relu: bool = False) -> Tensor:
    """``relu?(conv2d(x))`` in bfloat16 on oneDNN's convolution, the ReLU fused; channels_last out."""
    padding, stride, dilation = list(padding), list(stride), list(dilation)
    w = _conv_weight(weight, padding, stride, dilation, groups)
    return torch.ops.mkldnn._convolution_pointwise(
        _cl(x), w, _bf16(bias), padding, stride, dilation, groups, "relu" if relu else "none", [], "")


def ffn_block(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """``x + pw2(relu(pw1(x)))``: two GEMMs, the ReLU and the residual add in their epilogues."""
    x = _cl(x)
    rows = _rows(x)
    h = torch.ops.mkldnn._linear_pointwise(rows, _linear_weight(w1), _bf16(b1), "relu", [], "")
    return _unrows(torch.ops.mkldnn._linear_pointwise.binary(h, rows, _linear_weight(w2), _bf16(b2), "add"), x)


def shsa_block(x: Tensor, w_qkv: Tensor, b_qkv: Tensor, w_proj: Tensor, b_proj: Tensor, pdim: int, qk_dim: int,
               eps: float) -> Tensor:
    """The residual SHSA block ``x + proj(relu(concat(attention(qkv(gn(x1))), x2)))``
    (GroupNorm affine, qkv BatchNorm and attention scale folded into ``w_qkv``): the qkv and
    projection GEMMs on oneDNN in bfloat16 (float32 accumulation, the residual add in the
    projection's epilogue); between them two C++ ops of ours, GroupNorm (float32 statistics,
    two passes) and attention + concat + ReLU (float32, on the packed GEMM), each rounding
    its output to bfloat16 once."""
    x = _cl(x)
    rows = _rows(x)
    xh = torch.ops.shvit_cpp.gn_rows(x, pdim, eps)
    qkv = torch.ops.mkldnn._linear_pointwise(xh, _linear_weight(w_qkv), _bf16(b_qkv), "none", [], "")
    z = torch.ops.shvit_cpp.attend_concat_relu(qkv, x, pdim, qk_dim)
    y = torch.ops.mkldnn._linear_pointwise.binary(z, rows, _linear_weight(w_proj), _bf16(b_proj), "add")
    return _unrows(y, x)
