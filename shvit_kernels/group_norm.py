"""GroupNorm (one group) on the first ``pdim`` channels of x, read in place.

Layers: Triton kernels -> launchers -> ``torch.library`` ops (``shvit::gn_partial_fwd``,
``shvit::gn_partial_bwd``) with fake and autograd registrations -> ``group_norm_partial()``.

``y = (x1 - mean) * rstd * weight + bias`` with one float32 mean / rstd per image over
(pdim, H, W). ``x1`` may be a channel slice of a larger NCHW or channels_last tensor: the
kernels read it through its strides, no copy. ``y`` is a new tensor in x1's dtype (on
Triton in x1's layout, NCHW or channels_last); the weight and bias gradients are reduced from per-image partial sums
(deterministic, no atomics).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backend
from ._triton import new_output
from ._utils import as_bcn, bcn_strides, check_4d, check_same_device, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # the package imports without Triton; the backend falls back
    triton = None

# --------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _gn_partial_fwd_kernel(
        p_x, p_w, p_b, p_y, p_mean, p_rstd,
        C, N, s_xb, s_xc, s_xn, s_yb, s_yc, s_yn, inv_cnt, eps,
        WRITE_Y: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        i_b = tl.program_id(0).to(tl.int64)
        p_xb = p_x + i_b * s_xb
        # pass 1: mean
        b_acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)  # [BLOCK_C, BLOCK_N]
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            for n0 in range(0, N, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                m_x = (o_c < C)[:, None] & (o_n < N)[None, :]
                b_acc += tl.load(p_xb + o_c[:, None] * s_xc + o_n[None, :] * s_xn, mask=m_x, other=0.0).to(tl.float32)
        mean = tl.sum(b_acc) * inv_cnt
        # pass 2: variance around the mean (two-pass: no cancellation)
        b_acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            for n0 in range(0, N, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                m_x = (o_c < C)[:, None] & (o_n < N)[None, :]
                b_x = tl.load(p_xb + o_c[:, None] * s_xc + o_n[None, :] * s_xn, mask=m_x, other=0.0).to(tl.float32)
                b_d = tl.where(m_x, b_x - mean, 0.0)
                b_acc += b_d * b_d
        rstd = 1.0 / tl.sqrt(tl.sum(b_acc) * inv_cnt + eps)
        tl.store(p_mean + i_b, mean)
        tl.store(p_rstd + i_b, rstd)
        if WRITE_Y:
            p_yb = p_y + i_b * s_yb
            for c0 in range(0, C, BLOCK_C):
                o_c = c0 + tl.arange(0, BLOCK_C)
                m_c = o_c < C
                b_w = tl.load(p_w + o_c, mask=m_c, other=0.0).to(tl.float32)  # [BLOCK_C]
                b_b = tl.load(p_b + o_c, mask=m_c, other=0.0).to(tl.float32)  # [BLOCK_C]
                for n0 in range(0, N, BLOCK_N):
                    o_n = n0 + tl.arange(0, BLOCK_N)
                    m_x = m_c[:, None] & (o_n < N)[None, :]
                    b_x = tl.load(p_xb + o_c[:, None] * s_xc + o_n[None, :] * s_xn, mask=m_x, other=0.0).to(tl.float32)
                    b_y = (b_x - mean) * rstd * b_w[:, None] + b_b[:, None]
                    tl.store(p_yb + o_c[:, None] * s_yc + o_n[None, :] * s_yn, b_y.to(p_y.dtype.element_ty), mask=m_x)

    @triton.jit
    def _gn_partial_bwd_kernel(
        p_dy, p_x, p_w, p_mean, p_rstd, p_dx, p_dw_part, p_db_part,
        C, N, s_xb, s_xc, s_xn, s_dyb, s_dyc, s_dyn, s_db, s_dc, s_dn, inv_cnt,
        BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        i_b = tl.program_id(0).to(tl.int64)
        p_xb = p_x + i_b * s_xb
        p_dyb = p_dy + i_b * s_dyb
        mean = tl.load(p_mean + i_b)
        rstd = tl.load(p_rstd + i_b)
        # pass 1: sum(g), sum(g * xhat) with g = dy * w; per-channel weight/bias partials
        b_sg = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)  # [BLOCK_C, BLOCK_N]
        b_sgx = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)  # [BLOCK_C, BLOCK_N]
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            m_c = o_c < C
            b_w = tl.load(p_w + o_c, mask=m_c, other=0.0).to(tl.float32)  # [BLOCK_C]
            b_dw = tl.zeros([BLOCK_C], dtype=tl.float32)
            b_db = tl.zeros([BLOCK_C], dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                m_x = m_c[:, None] & (o_n < N)[None, :]
                b_x = tl.load(p_xb + o_c[:, None] * s_xc + o_n[None, :] * s_xn, mask=m_x, other=0.0).to(tl.float32)
                b_dy = tl.load(p_dyb + o_c[:, None] * s_dyc + o_n[None, :] * s_dyn, mask=m_x, other=0.0).to(tl.float32)
                b_xh = tl.where(m_x, (b_x - mean) * rstd, 0.0)
                b_g = b_dy * b_w[:, None]
                b_sg += b_g
                b_sgx += b_g * b_xh
                b_dw += tl.sum(b_dy * b_xh, axis=1)
                b_db += tl.sum(b_dy, axis=1)
            tl.store(p_dw_part + i_b * C + o_c, b_dw, mask=m_c)
            tl.store(p_db_part + i_b * C + o_c, b_db, mask=m_c)
        c1 = tl.sum(b_sg) * inv_cnt
        c2 = tl.sum(b_sgx) * inv_cnt
        # pass 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
        p_dxb = p_dx + i_b * s_db
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            m_c = o_c < C
            b_w = tl.load(p_w + o_c, mask=m_c, other=0.0).to(tl.float32)
            for n0 in range(0, N, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                m_x = m_c[:, None] & (o_n < N)[None, :]
                b_x = tl.load(p_xb + o_c[:, None] * s_xc + o_n[None, :] * s_xn, mask=m_x, other=0.0).to(tl.float32)
                b_dy = tl.load(p_dyb + o_c[:, None] * s_dyc + o_n[None, :] * s_dyn, mask=m_x, other=0.0).to(tl.float32)
                b_xh = (b_x - mean) * rstd
                b_dx = rstd * (b_dy * b_w[:, None] - c1 - b_xh * c2)
                tl.store(p_dxb + o_c[:, None] * s_dc + o_n[None, :] * s_dn, b_dx.to(p_dx.dtype.element_ty), mask=m_x)


def _blocks(C: int, N: int, size: int) -> tuple[int, int]:
    """(channels, tokens) of a tile of at most ``size`` values."""
    block_n = min(next_pow2(N, 16), 128)
    block_c = min(next_pow2(C, 1), max(1, size // block_n))
    return block_c, block_n


# ------------------------------------------------------------------------- launchers
def gn_partial_fwd_triton(x1: Tensor, weight: Tensor, bias: Tensor, eps: float, write_y: bool = True):
    B, C, H, W = x1.shape
    N = H * W
    x1, (sb, sc, sn) = as_bcn(x1)
    y = new_output(x1, (B, C, H, W)) if write_y else None
    mean = torch.empty(B, device=x1.device, dtype=torch.float32)
    rstd = torch.empty(B, device=x1.device, dtype=torch.float32)
    if B > 0 and N > 0:
        block_c, block_n = _blocks(C, N, 1024)  # 8 values per thread
        _gn_partial_fwd_kernel[(B,)](  # without write_y, x1 stands in for the unused pointers
            x1, weight if write_y else x1, bias if write_y else x1, y if write_y else x1, mean, rstd,
            C, N, sb, sc, sn, *(bcn_strides(y) if write_y else (0, 0, 0)), 1.0 / (C * N), eps,
            WRITE_Y=write_y, BLOCK_C=block_c, BLOCK_N=block_n, num_warps=4,
        )
    return y, mean, rstd


def gn_partial_bwd_triton(dy: Tensor, x1: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor):
    B, C, H, W = x1.shape
    N = H * W
    x1, (sxb, sxc, sxn) = as_bcn(x1)
    dy, (sdb, sdc, sdn) = as_bcn(dy)
    dx = new_output(x1, (B, C, H, W))
    dw_part = torch.empty((B, C), device=x1.device, dtype=torch.float32)
    db_part = torch.empty((B, C), device=x1.device, dtype=torch.float32)
    if B > 0 and N > 0:
        block_c, block_n = _blocks(C, N, 1024)  # two accumulator tiles and four loaded ones
        _gn_partial_bwd_kernel[(B,)](
            dy, x1, weight, mean, rstd, dx, dw_part, db_part,
            C, N, sxb, sxc, sxn, sdb, sdc, sdn, *bcn_strides(dx), 1.0 / (C * N),
            BLOCK_C=block_c, BLOCK_N=block_n, num_warps=4,
        )
    else:
        dw_part.zero_()
        db_part.zero_()
    return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


# ---------------------------------------------------------- eager composition (torch)
def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gn_partial_fwd_torch(x1: Tensor, weight: Tensor, bias: Tensor, eps: float):
    acc = _acc_dtype(x1)
    xf = x1.to(acc)
    mean = xf.mean(dim=(1, 2, 3))
    var = (xf - mean[:, None, None, None]).square().mean(dim=(1, 2, 3))
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean[:, None, None, None]) * rstd[:, None, None, None] * weight.to(acc)[:, None, None] + bias.to(acc)[
        :, None, None
    ]
    stat = torch.float64 if acc == torch.float64 else torch.float32
    return y.to(x1.dtype).contiguous(), mean.to(stat), rstd.to(stat)


def gn_partial_bwd_torch(dy: Tensor, x1: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor):
    acc = _acc_dtype(x1)
    m, r = mean.to(acc)[:, None, None, None], rstd.to(acc)[:, None, None, None]
    xh = (x1.to(acc) - m) * r
    dyf = dy.to(acc)
    g = dyf * weight.to(acc)[:, None, None]
    c1 = g.mean(dim=(1, 2, 3), keepdim=True)
    c2 = (g * xh).mean(dim=(1, 2, 3), keepdim=True)
    dx = r * (g - c1 - xh * c2)
    dw = (dyf * xh).sum(dim=(0, 2, 3))
    db = dyf.sum(dim=(0, 2, 3))
    return dx.to(x1.dtype).contiguous(), dw.to(weight.dtype), db.to(weight.dtype)


# ----------------------------------------------------------------------------- ops
@torch.library.custom_op("shvit::gn_partial_fwd", mutates_args=())
def gn_partial_fwd(x1: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return backend.pick(x1, gn_partial_fwd_triton, gn_partial_fwd_torch, "gn_partial_fwd")(x1, weight, bias, eps)


@gn_partial_fwd.register_fake
def _(x1, weight, bias, eps):
    B = x1.shape[0]
    stat = torch.float64 if x1.dtype == torch.float64 else torch.float32
    return (
        x1.new_empty(x1.shape),
        x1.new_empty((B,), dtype=stat),
        x1.new_empty((B,), dtype=stat),
    )


@torch.library.custom_op("shvit::gn_partial_bwd", mutates_args=())
def gn_partial_bwd(dy: Tensor, x1: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return backend.pick(x1, gn_partial_bwd_triton, gn_partial_bwd_torch, "gn_partial_bwd")(dy, x1, weight, mean, rstd)


@gn_partial_bwd.register_fake
def _(dy, x1, weight, mean, rstd):
    return x1.new_empty(x1.shape), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x1, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x1, weight, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x1, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.shvit.gn_partial_bwd(dy, x1, weight, mean, rstd)
    need_x, need_w, need_b, _ = ctx.needs_input_grad
    return (dx if need_x else None, dw if need_w else None, db if need_b else None, None)


gn_partial_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------ functional
def group_norm_partial(x1: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """GroupNorm(1, C) of ``x1`` (B, C, H, W), typically the channel slice ``x[:, :pdim]``
    of a larger tensor: the kernels read it through its strides, without a copy.
    Returns a new (B, C, H, W) tensor."""
    check_4d("x1", x1)
    C = x1.shape[1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"weight and bias must have shape ({C},), got {tuple(weight.shape)}, {tuple(bias.shape)}")
    check_same_device(x1=x1, weight=weight, bias=bias)
    which = backend.select(x1)
    if which == "torch":
        return torch.nn.functional.group_norm(x1, 1, weight, bias, eps)
    if which == "cpp" and not torch.compiler.is_compiling():
        # forward and backward in C++ (no Python per op); compile/export see the shvit op
        return torch.ops.shvit_cpp.group_norm_partial(x1, weight, bias, float(eps))
    return torch.ops.shvit.gn_partial_fwd(x1, weight, bias, float(eps))[0]
