"""bfloat16 CPU inference of a BN-folded fused model, with fused epilogues.

On a CPU with bfloat16 hardware (AMX-BF16 or AVX512-BF16) every GEMM and dense convolution
of a folded fused model runs in bfloat16 with float32 accumulation; activations stay
channels_last (token-major) bfloat16, and ReLUs and residual adds run in the GEMM's or
convolution's epilogue. Depthwise 3x3 convolutions run on our kernel (``dw_conv3x3``). At the
avx512 level the GEMM blocks (1x1 convolutions, FFNs, the SHSA block's projections, SE, head)
run on a bfloat16 GEMM of ours (``own_gemm``: AMX tiles where the CPU has them, AVX512-BF16
otherwise; no set-up per call) and the image's conv on our float32-sum stem kernel. oneDNN, the
library PyTorch ships and inductor uses for the same purpose (``torch.ops.mkldnn``), runs the
stem's other dense convolutions on AMX CPUs, and every GEMM and convolution where our GEMM does
not run; its weights are reordered into its blocked layout once and cached (a convolution's
per input shape). Each block is one C++ op (``csrc/inference/onednn_blocks.cpp``); the
``*_step`` functions make them as ``plan.Step`` s, which a folded bfloat16 model runs as one
``Plan`` (``shvit.SHViT._cpu_plan``), free of per-layer Python calls.

It applies to bfloat16 inputs and parameters, and to float32 ones under
``torch.autocast("cpu", torch.bfloat16)`` (inputs and weights cast as autocast would), in
inference (no gradient to compute), on the ``cpp`` backend at the avx2 level or above (the
SHSA block's attention runs on the packed GEMM), outside compiled graphs.
On CPUs without bfloat16 hardware a bfloat16 model runs its float32 path instead
(``shvit.SHViT.forward``), since emulated bfloat16 is slower than float32 there.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _cpp, backend
from ._utils import is_conv3x3, is_dw3x3, is_stem3x3, weight_cache
from .plan import Step, call

__all__ = ["bf16_hardware", "own_gemm", "applies", "conv1x1", "conv_step", "ffn_step", "ffn_block", "shsa_step", "shsa_block",
           "se_step", "pool_linear_step"]

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


_own: bool | None = None


def own_gemm() -> bool:
    """Whether the GEMM blocks (1x1 convolutions, FFN, SHSA, SqueezeExcite, classifier) run
    on our bfloat16 GEMM (``csrc/gemm/gemm_bf16.cpp``, ``csrc/inference/conv_bf16.cpp``)
    instead of oneDNN: at the avx512 level on CPUs with AVX512-BF16, on AMX tiles where the
    CPU has them. It has no set-up per call, where oneDNN's linear op spent more of a small
    GEMM's time on that than on the products (S1's stage-3 FFN at batch 1 on Zen 4: 111 us
    against 78 us; on an AMX Xeon S1 at batch 1 1.8x faster, batch 16 level)."""
    global _own
    if _own is None:
        _own = _cpp.available()
    return _own and torch.ops.shvit_cpp.bf16_gemm_available()


def _amx() -> bool:
    """Whether our GEMM runs on AMX tiles (``bf16_gemm_kernel``)."""
    return torch.ops.shvit_cpp.bf16_gemm_kernel() == "amx"


def _packed(weight: Tensor) -> Tensor:
    return weight_cache(weight, "bf16-packed", lambda w: torch.ops.shvit_cpp.pack_weight_bf16(w))


def _bias32(bias: Tensor) -> Tensor:
    """The bias rounded to bfloat16 (as the oneDNN path and autocast use it), in float32."""
    return weight_cache(bias, "bf16-bias32", lambda b: b.to(torch.bfloat16).float())


def _bf16(t: Tensor) -> Tensor:
    return t if t.dtype == torch.bfloat16 else weight_cache(t, "bf16", lambda w: w.to(torch.bfloat16))


def _float32(t: Tensor) -> Tensor:
    """A bfloat16 weight of the depthwise kernel in float32 (its sums are float32); under
    autocast the weight rounded to bfloat16 first, as autocast would."""
    return weight_cache(t, "bf16-float32", lambda w: w.to(torch.bfloat16).float())


def _conv_weight(weight: Tensor, padding, stride, dilation, groups: int):
    """The weight as a ``shvit_cpp.OneDnnConvWeight``: reordered for oneDNN per input shape."""
    return weight_cache(weight, ("onednn-conv", *padding, *stride, *dilation, groups),
                        lambda w: torch.classes.shvit_cpp.OneDnnConvWeight(w, padding, stride, dilation, groups))


def _linear_weight(weight: Tensor) -> Tensor:
    return weight_cache(weight, "onednn-linear", lambda w: torch.ops.mkldnn._reorder_linear_weight(
        w.reshape(w.shape[0], -1).to(torch.bfloat16)))


def conv1x1(x: Tensor, weight: Tensor, bias: Tensor, relu: bool = False, residual: Tensor | None = None) -> Tensor:
    """``relu?(conv2d(x, weight, bias) + residual)`` for a 1x1 weight, in bfloat16: a GEMM on
    the channels_last token rows (oneDNN's linear), bias and ReLU or the residual add as its
    post-op. channels_last out."""
    if own_gemm():
        return torch.ops.shvit_cpp.bf16_pw(x, _packed(weight), _bias32(bias), relu, residual)
    return torch.ops.shvit_cpp.onednn_pw(x, _linear_weight(weight), _bf16(bias), relu, residual)


def conv_step(conv: torch.nn.Conv2d, relu: bool = False, nchw_input: bool = False) -> Step | None:
    """``relu?(conv(x))`` for bfloat16 x as one C++ op (a ``plan.Step``, weights reordered
    or packed now): 1x1 convs as a GEMM on the token rows (``conv1x1``), depthwise 3x3 convs
    on our kernel (``dw_conv3x3``: float32 sums, one rounding); at the avx512 level the
    image's conv (``nchw_input``, few channels) on our stem kernel (float32 sums, read straight
    from the NCHW image); where ``own_gemm()`` holds on AVX512-BF16 (not AMX, where oneDNN's
    convolution was 2-3x faster than the taps copied for our tiles), other dense 3x3 convs with
    an even channel count on our GEMM over their taps; the rest on oneDNN's convolution. The
    ReLU fused; channels_last bfloat16 out. ``None`` for a conv without bias or with another
    padding mode."""
    w, b = conv.weight, conv.bias
    if b is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 and conv.padding == (0, 0):
        if own_gemm():
            return "bf16_pw", (_packed(w), _bias32(b), relu, None)
        return "onednn_pw", (_linear_weight(w), _bf16(b), relu, None)
    if is_dw3x3(conv):  # our kernel: oneDNN's fixed cost per call is most of a small image's time
        return "dw_conv3x3", (_float32(w), _float32(b), conv.stride[0], relu)
    if nchw_input and is_stem3x3(conv) and _cpp.isa() == "avx512":  # the image: our float32-sum kernel
        return "stem_conv3x3_bf16", (_float32(w), _float32(b), conv.stride[0], relu)
    if own_gemm() and not _amx() and is_conv3x3(conv) and conv.in_channels % 2 == 0:  # k pairs within a tap
        wp = weight_cache(w, "bf16-packed3x3", lambda w: torch.ops.shvit_cpp.pack_weight_bf16(
            w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)))
        return "bf16_conv3x3", (wp, _bias32(b), conv.stride[0], relu)
    padding, stride, dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
    return "onednn_conv", (_conv_weight(w, padding, stride, dilation, conv.groups), _bf16(b), relu)


def ffn_step(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Step:
    """``x + pw2(relu(pw1(x)))`` as one C++ op: two GEMMs, the ReLU and the residual add in
    their epilogues."""
    if own_gemm():
        return "bf16_ffn", (_packed(w1), _bias32(b1), _packed(w2), _bias32(b2))
    return "onednn_ffn", (_linear_weight(w1), _bf16(b1), _linear_weight(w2), _bf16(b2))


def ffn_block(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    return call(ffn_step(w1, b1, w2, b2), x)


def shsa_step(w_qkv: Tensor, b_qkv: Tensor, w_proj: Tensor, b_proj: Tensor, pdim: int, qk_dim: int,
              eps: float) -> Step:
    """The residual SHSA block ``x + proj(relu(concat(attention(qkv(gn(x1))), x2)))``
    (GroupNorm affine, qkv BatchNorm and attention scale folded into ``w_qkv``) as one C++ op:
    the qkv and projection GEMMs on oneDNN in bfloat16 (float32 accumulation, the residual
    add in the projection's epilogue); between them GroupNorm (float32 statistics, two
    passes) and attention + concat + ReLU (float32, on the packed GEMM), each rounding its
    output to bfloat16 once."""
    if own_gemm():
        return "bf16_shsa", (_packed(w_qkv), _bias32(b_qkv), _packed(w_proj), _bias32(b_proj), pdim, qk_dim,
                             float(eps))
    return "onednn_shsa", (_linear_weight(w_qkv), _bf16(b_qkv), _linear_weight(w_proj), _bf16(b_proj), pdim,
                           qk_dim, float(eps))


def shsa_block(x: Tensor, w_qkv: Tensor, b_qkv: Tensor, w_proj: Tensor, b_proj: Tensor, pdim: int, qk_dim: int,
               eps: float) -> Tensor:
    return call(shsa_step(w_qkv, b_qkv, w_proj, b_proj, pdim, qk_dim, eps), x)


def se_step(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Step:
    """``x * sigmoid(conv1x1(relu(conv1x1(mean(x), w1, b1)), w2, b2))`` (a BN-folded
    SqueezeExcite) as one C++ op, the two 1x1 convs on the pooled rows."""
    if own_gemm():
        return "bf16_se", (_packed(w1), _bias32(b1), _packed(w2), _bias32(b2))
    return "onednn_se", (_linear_weight(w1), _bf16(b1), _linear_weight(w2), _bf16(b2))


def pool_linear_step(weight: Tensor, bias: Tensor) -> Step:
    """``linear(x.mean((2, 3)), weight, bias)`` (global pooling and a classifier) as one C++ op."""
    if own_gemm():
        return "bf16_pool_linear", (_packed(weight), _bias32(bias))
    return "onednn_pool_linear", (_linear_weight(weight), _bf16(bias))
