"""What the Triton kernels share: operand types of ``tl.dot``, tile choices, output layout,
and the ReLU pass-through of the untouched channels (a jit helper the kernels call).

Tile rules, checked by ``python -m benchmarks.gpu_compile`` (no spills, at least 2 CTAs per
SM on sm_80 and sm_90a at SHViT's shapes):

- pdim is cut into channel chunks of ``pd_block(pdim)``: the fewest chunks (of one power of
  two, at least 16 for ``tl.dot``) that pad pdim by at most ``MAX_PAD``, e.g. 72 -> 3 x 32,
  66 -> 5 x 16, 48 -> 1 x 64; forward programs take one chunk each (the scores are recomputed
  per chunk: qk_dim = 16 deep, cheaper than idle SMs), the backward loops over chunks of at
  most 32 (wider ones spill with Triton 3.6).
- forward programs take 32 queries (64 spill in float32) and at most 64 channels (32 in
  float32), or 16 queries and 16 channels
  where the grid would otherwise have fewer than ``FEW_PROGRAMS`` programs, so that batch 1
  still spreads over the GPU (``forward_tiles``).
"""
from __future__ import annotations

import math

import torch

from ._utils import next_pow2
from .backend import triton_interpreting

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_PAD = 1.34  # the most pdim may be padded by its channel tiling
FEW_PROGRAMS = 264  # two programs per SM of an H100 (132 SMs)


def pd_block(pdim: int, largest: int = 128) -> int:
    """Channel tile for pdim: the fewest chunks of one power of two (16 ... ``largest``)
    within MAX_PAD."""
    bp = min(next_pow2(pdim), largest)
    while bp > 16 and math.ceil(pdim / bp) * bp > MAX_PAD * pdim:
        bp //= 2
    return bp


def forward_tiles(B: int, N: int, pdim: int, dot) -> tuple[int, int]:
    """(query tile, pdim chunk) of the forward kernels: 32 queries (at most the padded N) and
    ``pd_block`` chunks of at most 64 channels (32 for float32 FMA dots; wider ones spill), or
    16 and 16 where that grid would leave the GPU idle."""
    block_m, block_pd = min(32, next_pow2(N)), pd_block(pdim, 32 if dot == tl.float32 else 64)
    if B * triton.cdiv(N, block_m) * triton.cdiv(pdim, block_pd) >= FEW_PROGRAMS:
        return block_m, block_pd
    return 16, 16


def copy_blocks(token_major: bool) -> tuple[int, int]:
    """(channels, tokens) of a pass-through tile: rows of 128 contiguous elements, 1024 in all
    (8 per thread of 4 warps: larger tiles spill their pointer tensors in float32)."""
    return (128, 8) if token_major else (8, 128)


def is_token_major(t: torch.Tensor) -> bool:
    """Channels are the fastest-moving dimension (channels_last, or a channel slice of it)."""
    return t.dim() == 4 and t.stride(1) == 1 and t.shape[2] * t.shape[3] > 1 and t.shape[1] > 1


def new_output(like: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """An output in ``like``'s layout: channels_last for token-major input, else NCHW."""
    fmt = torch.channels_last if is_token_major(like) else torch.contiguous_format
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype, memory_format=fmt)


def dot_dtype(dtype: torch.dtype):
    """``tl.dot`` operand type: half types natively; float32 stays float32. Triton's
    interpreter mis-evaluates bfloat16 dots, so there bfloat16 is widened to float32."""
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not triton_interpreting():
        return tl.bfloat16
    return tl.float32


def precision() -> str:
    """float32 dots: TF32 where PyTorch allows it for matmuls (as eager matmul does)."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


if triton is not None:

    @triton.jit
    def load_tile(p, o_r, o_c, R, C, s_r, s_c):
        """[len(o_r), len(o_c)] tile in the tensor's dtype, zero outside (R, C)."""
        m = (o_r < R)[:, None] & (o_c < C)[None, :]
        return tl.load(p + o_r[:, None] * s_r + o_c[None, :] * s_c, mask=m, other=0.0)

    @triton.jit
    def relu_copy_tile(
        t, p_src, p_ref, p_dst, C, N, s_sc, s_sn, s_rc, s_rn, s_dc, s_dn,
        SAME: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Tile ``t`` of (C, N): dst = src where ref > 0, else 0 (ref is src when SAME: ReLU)."""
        n_t = tl.cdiv(N, BLOCK_T)
        o_c = (t // n_t) * BLOCK_C + tl.arange(0, BLOCK_C)
        o_n = (t % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)
        m = (o_c < C)[:, None] & (o_n < N)[None, :]
        src = tl.load(p_src + o_c[:, None] * s_sc + o_n[None, :] * s_sn, mask=m, other=0.0)
        ref = src
        if not SAME:
            ref = tl.load(p_ref + o_c[:, None] * s_rc + o_n[None, :] * s_rn, mask=m, other=0.0)
        if SAME:  # ReLU, NaN kept as torch.relu keeps it
            out = tl.where(src.to(tl.float32) < 0, 0.0, src.to(tl.float32))
        else:  # the ReLU's gradient
            out = tl.where(ref.to(tl.float32) > 0, src.to(tl.float32), 0.0)
        tl.store(p_dst + o_c[:, None] * s_dc + o_n[None, :] * s_dn, out.to(p_dst.dtype.element_ty), mask=m)

else:  # the package imports without Triton; the backend then never picks these kernels
    load_tile = relu_copy_tile = None


def copy_tiles(C: int, N: int, token_major: bool) -> int:
    bc, bt = copy_blocks(token_major)
    return triton.cdiv(C, bc) * triton.cdiv(N, bt)
