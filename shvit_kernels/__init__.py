"""Fused kernels for SHViT's single-head attention mixer.

Ops (``torch.library``, namespace ``shvit``): ``gn_partial_fwd`` / ``gn_partial_bwd``,
``shsa_attn_fwd`` / ``shsa_attn_bwd`` and ``shsa_infer``. CUDA tensors run Triton kernels;
CPU tensors run the C++ kernels when built, else the eager composition; see
``shvit_kernels.backend`` for ``SHVIT_KERNELS_BACKEND``. For the rest of a BN-folded network
on CPU: ``conv1x1`` / ``ffn_block`` / ``conv_act`` (convolutions with fused epilogues, see
``shvit_kernels.pointwise``); in bfloat16 on CPUs with AMX or AVX512-BF16 they run on oneDNN
(``shvit_kernels.onednn``). ``cpu_isa()`` reports or sets the instruction-set level of the C++
kernels (``SHVIT_KERNELS_ISA`` at start-up).
"""
from . import _cpp, backend
from ._cpp import isa as cpu_isa
from .group_norm import group_norm_partial
from .pointwise import conv1x1, conv_act, ffn_block
from .shsa_attention import shsa_attention
from .shsa_inference import ONE_PASS_MAX_N, fold_shsa_weights, shsa_block_inference, shsa_inference
from . import export  # noqa: E402,F401  (registers the ops' decompositions for exporters)

_cpp.check_torch_version()

__all__ = [
    "backend",
    "cpu_isa",
    "group_norm_partial",
    "shsa_attention",
    "shsa_inference",
    "shsa_block_inference",
    "fold_shsa_weights",
    "ONE_PASS_MAX_N",
    "conv1x1",
    "conv_act",
    "ffn_block",
]
