"""Single-head attention + concat + ReLU of the SHSA mixer (training path).

Layers: Triton kernels -> launchers -> ``torch.library`` ops (``shvit::shsa_attn_fwd``,
``shvit::shsa_attn_bwd``) with fake and autograd registrations -> ``shsa_attention()``.

Given ``qkv`` = (B, 2*qk_dim + pdim, H, W) (q, k, v along channels) and ``x2`` = the
untouched channels (B, C2, H, W), the forward returns ``out`` = (B, pdim + C2, H, W) with

    out[:, :pdim] = ReLU(v @ softmax(scale * q^T k)^T)      (attention over N = H*W tokens)
    out[:, pdim:] = ReLU(x2)

and the float32 log-sum-exp of each query row. Attention is tiled flash-style (online
softmax over key tiles): memory is linear in N, no N x N tensor is ever written. The
backward recomputes the probabilities from the saved log-sum-exp; dq and dk/dv come from
two kernels, each writing its own tiles (deterministic, no atomics).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backend
from ._utils import as_bcn, check_4d, check_same_device, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# --------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _load_tile(p, o_c, o_n, C, N, s_c, s_n):
        """[len(o_c), len(o_n)] tile in the tensor's dtype, zero outside (C, N)."""
        m = (o_c < C)[:, None] & (o_n < N)[None, :]
        return tl.load(p + o_c[:, None] * s_c + o_n[None, :] * s_n, mask=m, other=0.0)

    @triton.jit
    def _shsa_attn_fwd_kernel(
        p_qkv, p_x2, p_out, p_lse,
        N, QK, PD, C2, scale,
        s_qb, s_qc, s_qn, s_xb, s_xc, s_xn,
        STORE_LSE: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
        BLOCK_QK: tl.constexpr, BLOCK_PD: tl.constexpr, BLOCK_C2: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        i_b = tl.program_id(0).to(tl.int64)
        i_m = tl.program_id(1)
        p_qb = p_qkv + i_b * s_qb
        o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        o_qk = tl.arange(0, BLOCK_QK)
        o_pd = tl.arange(0, BLOCK_PD)
        b_q = _load_tile(p_qb, o_qk, o_m, QK, N, s_qc, s_qn).to(DOT)  # [BLOCK_QK, BLOCK_M]
        b_qt = tl.trans(b_q)  # [BLOCK_M, BLOCK_QK]
        b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
        b_acc = tl.zeros([BLOCK_PD, BLOCK_M], dtype=tl.float32)  # [BLOCK_PD, BLOCK_M]
        for n0 in range(0, N, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            b_k = _load_tile(p_qb + QK * s_qc, o_qk, o_n, QK, N, s_qc, s_qn).to(DOT)  # [BLOCK_QK, BLOCK_N]
            b_v = _load_tile(p_qb + 2 * QK * s_qc, o_pd, o_n, PD, N, s_qc, s_qn).to(DOT)  # [BLOCK_PD, BLOCK_N]
            b_s = tl.dot(b_qt, b_k, input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
            b_s = tl.where((o_n < N)[None, :], b_s, float("-inf"))
            b_mn = tl.maximum(b_m, tl.max(b_s, axis=1))
            b_p = tl.exp(b_s - b_mn[:, None])  # [BLOCK_M, BLOCK_N]
            b_alpha = tl.exp(b_m - b_mn)
            b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
            b_acc = b_acc * b_alpha[None, :] + tl.dot(
                b_v, tl.trans(b_p.to(DOT)), input_precision=PRECISION
            )  # [BLOCK_PD, BLOCK_M]
            b_m = b_mn
        b_o = b_acc / b_l[None, :]
        m_n = o_m < N
        CO = PD + C2
        p_ob = p_out + i_b * CO * N
        m_o = (o_pd < PD)[:, None] & m_n[None, :]
        tl.store(p_ob + o_pd[:, None] * N + o_m[None, :], tl.maximum(b_o, 0.0).to(p_out.dtype.element_ty), mask=m_o)
        if STORE_LSE:
            tl.store(p_lse + i_b * N + o_m, b_m + tl.log(b_l), mask=m_n)
        # the untouched channels: out[:, PD:] = ReLU(x2) for this program's tokens
        p_xb = p_x2 + i_b * s_xb
        for c0 in range(0, C2, BLOCK_C2):
            o_c = c0 + tl.arange(0, BLOCK_C2)
            m_x = (o_c < C2)[:, None] & m_n[None, :]
            b_x = tl.load(p_xb + o_c[:, None] * s_xc + o_m[None, :] * s_xn, mask=m_x, other=0.0).to(tl.float32)
            b_x = tl.maximum(b_x, 0.0).to(p_out.dtype.element_ty)
            tl.store(p_ob + (PD + o_c[:, None]) * N + o_m[None, :], b_x, mask=m_x)

    @triton.jit
    def _shsa_attn_bwd_pre_kernel(
        p_dout, p_out, p_dx2, p_delta,
        N, PD, C2, s_db, s_dc, s_dn,
        BLOCK_PD: tl.constexpr, BLOCK_C2: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """delta[i] = sum_c dO[c, i] * O[c, i] (dO masked by the ReLU) and dx2 = dout * (out > 0)."""
        i_b = tl.program_id(0).to(tl.int64)
        i_m = tl.program_id(1)
        o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_n = o_m < N
        CO = PD + C2
        p_db = p_dout + i_b * s_db
        p_ob = p_out + i_b * CO * N
        o_pd = tl.arange(0, BLOCK_PD)
        m_o = (o_pd < PD)[:, None] & m_n[None, :]
        b_do = tl.load(p_db + o_pd[:, None] * s_dc + o_m[None, :] * s_dn, mask=m_o, other=0.0).to(tl.float32)
        b_o = tl.load(p_ob + o_pd[:, None] * N + o_m[None, :], mask=m_o, other=0.0).to(tl.float32)
        # out = ReLU(O): where O <= 0 the masked dO is 0, elsewhere O == out
        b_delta = tl.sum(tl.where(b_o > 0, b_do * b_o, 0.0), axis=0)  # [BLOCK_M]
        tl.store(p_delta + i_b * N + o_m, b_delta, mask=m_n)
        p_xb = p_dx2 + i_b * C2 * N
        for c0 in range(0, C2, BLOCK_C2):
            o_c = c0 + tl.arange(0, BLOCK_C2)
            m_x = (o_c < C2)[:, None] & m_n[None, :]
            b_d = tl.load(p_db + (PD + o_c[:, None]) * s_dc + o_m[None, :] * s_dn, mask=m_x, other=0.0).to(tl.float32)
            b_y = tl.load(p_ob + (PD + o_c[:, None]) * N + o_m[None, :], mask=m_x, other=0.0).to(tl.float32)
            b_dx = tl.where(b_y > 0, b_d, 0.0).to(p_dx2.dtype.element_ty)
            tl.store(p_xb + o_c[:, None] * N + o_m[None, :], b_dx, mask=m_x)

    @triton.jit
    def _shsa_attn_bwd_dkdv_kernel(
        p_qkv, p_dout, p_out, p_lse, p_delta, p_dqkv,
        N, QK, PD, C2, scale,
        s_qb, s_qc, s_qn, s_db, s_dc, s_dn,
        PRECISION: tl.constexpr, DOT: tl.constexpr,
        BLOCK_QK: tl.constexpr, BLOCK_PD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        i_b = tl.program_id(0).to(tl.int64)
        i_n = tl.program_id(1)
        p_qb = p_qkv + i_b * s_qb
        p_db = p_dout + i_b * s_db
        p_ob = p_out + i_b * (PD + C2) * N
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # keys of this program
        o_qk = tl.arange(0, BLOCK_QK)
        o_pd = tl.arange(0, BLOCK_PD)
        b_k = _load_tile(p_qb + QK * s_qc, o_qk, o_n, QK, N, s_qc, s_qn).to(DOT)  # [BLOCK_QK, BLOCK_N]
        b_v = _load_tile(p_qb + 2 * QK * s_qc, o_pd, o_n, PD, N, s_qc, s_qn).to(DOT)  # [BLOCK_PD, BLOCK_N]
        b_dk = tl.zeros([BLOCK_QK, BLOCK_N], dtype=tl.float32)
        b_dv = tl.zeros([BLOCK_PD, BLOCK_N], dtype=tl.float32)
        for m0 in range(0, N, BLOCK_M):
            o_m = m0 + tl.arange(0, BLOCK_M)
            m_m = o_m < N
            b_q = _load_tile(p_qb, o_qk, o_m, QK, N, s_qc, s_qn).to(DOT)  # [BLOCK_QK, BLOCK_M]
            m_o = (o_pd < PD)[:, None] & m_m[None, :]
            b_do = tl.load(p_db + o_pd[:, None] * s_dc + o_m[None, :] * s_dn, mask=m_o, other=0.0).to(tl.float32)
            b_o = tl.load(p_ob + o_pd[:, None] * N + o_m[None, :], mask=m_o, other=0.0).to(tl.float32)
            b_do = tl.where(b_o > 0, b_do, 0.0).to(DOT)  # [BLOCK_PD, BLOCK_M]
            b_lse = tl.load(p_lse + i_b * N + o_m, mask=m_m, other=0.0)
            b_delta = tl.load(p_delta + i_b * N + o_m, mask=m_m, other=0.0)
            b_s = tl.dot(tl.trans(b_q), b_k, input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
            b_p = tl.exp(b_s - b_lse[:, None])
            b_p = tl.where(m_m[:, None] & (o_n < N)[None, :], b_p, 0.0)
            b_dv += tl.dot(b_do, b_p.to(DOT), input_precision=PRECISION)  # [BLOCK_PD, BLOCK_N]
            b_dp = tl.dot(tl.trans(b_do), b_v, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dk += tl.dot(b_q, b_ds.to(DOT), input_precision=PRECISION)  # [BLOCK_QK, BLOCK_N]
        p_gb = p_dqkv + i_b * (2 * QK + PD) * N
        m_k = (o_qk < QK)[:, None] & (o_n < N)[None, :]
        tl.store(p_gb + (QK + o_qk[:, None]) * N + o_n[None, :], (b_dk * scale).to(p_dqkv.dtype.element_ty), mask=m_k)
        m_v = (o_pd < PD)[:, None] & (o_n < N)[None, :]
        tl.store(p_gb + (2 * QK + o_pd[:, None]) * N + o_n[None, :], b_dv.to(p_dqkv.dtype.element_ty), mask=m_v)

    @triton.jit
    def _shsa_attn_bwd_dq_kernel(
        p_qkv, p_dout, p_out, p_lse, p_delta, p_dqkv,
        N, QK, PD, C2, scale,
        s_qb, s_qc, s_qn, s_db, s_dc, s_dn,
        PRECISION: tl.constexpr, DOT: tl.constexpr,
        BLOCK_QK: tl.constexpr, BLOCK_PD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        i_b = tl.program_id(0).to(tl.int64)
        i_m = tl.program_id(1)
        p_qb = p_qkv + i_b * s_qb
        p_db = p_dout + i_b * s_db
        p_ob = p_out + i_b * (PD + C2) * N
        o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # queries of this program
        m_m = o_m < N
        o_qk = tl.arange(0, BLOCK_QK)
        o_pd = tl.arange(0, BLOCK_PD)
        b_q = _load_tile(p_qb, o_qk, o_m, QK, N, s_qc, s_qn).to(DOT)  # [BLOCK_QK, BLOCK_M]
        b_qt = tl.trans(b_q)  # [BLOCK_M, BLOCK_QK]
        m_o = (o_pd < PD)[:, None] & m_m[None, :]
        b_do = tl.load(p_db + o_pd[:, None] * s_dc + o_m[None, :] * s_dn, mask=m_o, other=0.0).to(tl.float32)
        b_o = tl.load(p_ob + o_pd[:, None] * N + o_m[None, :], mask=m_o, other=0.0).to(tl.float32)
        b_dot = tl.trans(tl.where(b_o > 0, b_do, 0.0).to(DOT))  # [BLOCK_M, BLOCK_PD]
        b_lse = tl.load(p_lse + i_b * N + o_m, mask=m_m, other=0.0)
        b_delta = tl.load(p_delta + i_b * N + o_m, mask=m_m, other=0.0)
        b_dq = tl.zeros([BLOCK_M, BLOCK_QK], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            b_k = _load_tile(p_qb + QK * s_qc, o_qk, o_n, QK, N, s_qc, s_qn).to(DOT)  # [BLOCK_QK, BLOCK_N]
            b_v = _load_tile(p_qb + 2 * QK * s_qc, o_pd, o_n, PD, N, s_qc, s_qn).to(DOT)  # [BLOCK_PD, BLOCK_N]
            b_s = tl.dot(b_qt, b_k, input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
            b_p = tl.exp(b_s - b_lse[:, None])
            b_p = tl.where(m_m[:, None] & (o_n < N)[None, :], b_p, 0.0)
            b_dp = tl.dot(b_dot, b_v, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dq += tl.dot(b_ds.to(DOT), tl.trans(b_k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_QK]
        p_gb = p_dqkv + i_b * (2 * QK + PD) * N
        m_q = (o_qk < QK)[None, :] & m_m[:, None]
        tl.store(p_gb + o_qk[None, :] * N + o_m[:, None], (b_dq * scale).to(p_dqkv.dtype.element_ty), mask=m_q)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 products (as eager matmul does by default); half inputs use tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_dtype(dtype: torch.dtype):
    """tl.dot operand type: fp16 stays fp16; bf16 is widened to fp32 (TF32 products on the GPU,
    at least bf16's precision; Triton's interpreter also mis-evaluates bf16 dots)."""
    return tl.float16 if dtype == torch.float16 else tl.float32


# Elementwise work is done in float32 after each load (Triton's interpreter cannot do
# arithmetic on bfloat16 values, and the GPU does it in float32 anyway).


def _tiles(N: int, PD: int) -> tuple[int, int]:
    """Query and key tile sizes (powers of two, at least 16 for tl.dot)."""
    block_m = min(next_pow2(N), 64)
    block_n = min(next_pow2(N), 64 if PD <= 64 else 32)
    return block_m, block_n


# ------------------------------------------------------------------------- launchers
def shsa_attn_fwd_triton(qkv: Tensor, x2: Tensor, qk_dim: int, scale: float, store_lse: bool = True):
    B, CQ, H, W = qkv.shape
    N, PD, C2 = H * W, CQ - 2 * qk_dim, x2.shape[1]
    qkv, (sqb, sqc, sqn) = as_bcn(qkv)
    x2, (sxb, sxc, sxn) = as_bcn(x2)
    out_dtype = torch.promote_types(qkv.dtype, x2.dtype)
    out = torch.empty((B, PD + C2, H, W), device=qkv.device, dtype=out_dtype)
    lse = torch.empty((B, N), device=qkv.device, dtype=torch.float32)
    if B > 0 and N > 0:
        block_m, block_n = _tiles(N, PD)
        grid = (B, triton.cdiv(N, block_m))
        _shsa_attn_fwd_kernel[grid](
            qkv, x2, out, lse,
            N, qk_dim, PD, C2, scale,
            sqb, sqc, sqn, sxb, sxc, sxn,
            STORE_LSE=store_lse, PRECISION=_precision(qkv.dtype), DOT=_dot_dtype(qkv.dtype),
            BLOCK_QK=next_pow2(qk_dim), BLOCK_PD=next_pow2(PD), BLOCK_C2=min(next_pow2(C2, 1), 32),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )
    return out, lse


def shsa_attn_bwd_triton(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, qk_dim: int, scale: float):
    B, CQ, H, W = qkv.shape
    N, PD = H * W, CQ - 2 * qk_dim
    C2 = out.shape[1] - PD
    qkv, (sqb, sqc, sqn) = as_bcn(qkv)
    dout, (sdb, sdc, sdn) = as_bcn(dout)
    out = out.contiguous()
    dqkv = torch.empty((B, CQ, H, W), device=qkv.device, dtype=qkv.dtype)
    dx2 = torch.empty((B, C2, H, W), device=qkv.device, dtype=out.dtype)
    if B == 0 or N == 0:
        return dqkv, dx2
    delta = torch.empty((B, N), device=qkv.device, dtype=torch.float32)
    block_m, block_n = _tiles(N, PD)
    bqk, bpd = next_pow2(qk_dim), next_pow2(PD)
    _shsa_attn_bwd_pre_kernel[(B, triton.cdiv(N, block_m))](
        dout, out, dx2, delta, N, PD, C2, sdb, sdc, sdn,
        BLOCK_PD=bpd, BLOCK_C2=min(next_pow2(C2, 1), 32), BLOCK_M=block_m, num_warps=4,
    )
    args = (qkv, dout, out, lse, delta, dqkv, N, qk_dim, PD, C2, scale, sqb, sqc, sqn, sdb, sdc, sdn)
    meta = dict(PRECISION=_precision(qkv.dtype), DOT=_dot_dtype(qkv.dtype), BLOCK_QK=bqk, BLOCK_PD=bpd, BLOCK_M=block_m, BLOCK_N=block_n)
    _shsa_attn_bwd_dkdv_kernel[(B, triton.cdiv(N, block_n))](*args, **meta, num_warps=4)
    _shsa_attn_bwd_dq_kernel[(B, triton.cdiv(N, block_m))](*args, **meta, num_warps=4)
    return dqkv, dx2


# ---------------------------------------------------------- eager composition (torch)
def shsa_attn_fwd_torch(qkv: Tensor, x2: Tensor, qk_dim: int, scale: float):
    B, CQ, H, W = qkv.shape
    PD = CQ - 2 * qk_dim
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    q, k, v = qkv.to(acc).flatten(2).split([qk_dim, qk_dim, PD], dim=1)
    s = (q.transpose(-2, -1) @ k) * scale  # (B, N, N)
    lse = torch.logsumexp(s, dim=-1)
    o = (v @ torch.exp(s - lse[..., None]).transpose(-2, -1)).reshape(B, PD, H, W)
    out_dtype = torch.promote_types(qkv.dtype, x2.dtype)
    out = torch.cat([o.to(out_dtype), x2.to(out_dtype)], dim=1).relu_()
    return out, lse.to(torch.float64 if acc == torch.float64 else torch.float32)


def shsa_attn_bwd_torch(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, qk_dim: int, scale: float):
    B, CQ, H, W = qkv.shape
    PD = CQ - 2 * qk_dim
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    q, k, v = qkv.to(acc).flatten(2).split([qk_dim, qk_dim, PD], dim=1)
    dmask = dout * (out > 0)
    do = dmask[:, :PD].to(acc).flatten(2)  # (B, PD, N)
    p = torch.exp((q.transpose(-2, -1) @ k) * scale - lse.to(acc)[..., None])  # (B, N, N)
    delta = (do * out[:, :PD].to(acc).flatten(2)).sum(1)  # (B, N)
    dv = do @ p
    dp = do.transpose(-2, -1) @ v
    ds = p * (dp - delta[..., None])
    dq = (k @ ds.transpose(-2, -1)) * scale
    dk = (q @ ds) * scale
    dqkv = torch.cat([dq, dk, dv], dim=1).reshape(B, CQ, H, W).to(qkv.dtype)
    return dqkv, dmask[:, PD:].to(out.dtype).contiguous()


# ----------------------------------------------------------------------------- ops
@torch.library.custom_op("shvit::shsa_attn_fwd", mutates_args=())
def shsa_attn_fwd(qkv: Tensor, x2: Tensor, qk_dim: int, scale: float) -> tuple[Tensor, Tensor]:
    return backend.pick(qkv, shsa_attn_fwd_triton, shsa_attn_fwd_torch, "shsa_attn_fwd")(qkv, x2, qk_dim, scale)


@shsa_attn_fwd.register_kernel("cuda")
def _(qkv, x2, qk_dim, scale):
    return shsa_attn_fwd_triton(qkv, x2, qk_dim, scale)


@shsa_attn_fwd.register_fake
def _(qkv, x2, qk_dim, scale):
    B, CQ, H, W = qkv.shape
    out = qkv.new_empty((B, CQ - 2 * qk_dim + x2.shape[1], H, W), dtype=torch.promote_types(qkv.dtype, x2.dtype))
    stat = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    return out, qkv.new_empty((B, H * W), dtype=stat)


@torch.library.custom_op("shvit::shsa_attn_bwd", mutates_args=())
def shsa_attn_bwd(
    dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, qk_dim: int, scale: float
) -> tuple[Tensor, Tensor]:
    fn = backend.pick(qkv, shsa_attn_bwd_triton, shsa_attn_bwd_torch, "shsa_attn_bwd")
    return fn(dout, qkv, out, lse, qk_dim, scale)


@shsa_attn_bwd.register_kernel("cuda")
def _(dout, qkv, out, lse, qk_dim, scale):
    return shsa_attn_bwd_triton(dout, qkv, out, lse, qk_dim, scale)


@shsa_attn_bwd.register_fake
def _(dout, qkv, out, lse, qk_dim, scale):
    B, CQ, H, W = qkv.shape
    PD = CQ - 2 * qk_dim
    return (
        qkv.new_empty(qkv.shape),
        out.new_empty((B, out.shape[1] - PD, H, W)),
    )


def _setup_context(ctx, inputs, output):
    qkv, x2, qk_dim, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.qk_dim, ctx.scale = qk_dim, scale
    ctx.x2_dtype = x2.dtype


def _backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    dqkv, dx2 = torch.ops.shvit.shsa_attn_bwd(dout, qkv, out, lse, ctx.qk_dim, ctx.scale)
    need_qkv, need_x2, _, _ = ctx.needs_input_grad
    return (dqkv if need_qkv else None, dx2.to(ctx.x2_dtype) if need_x2 else None, None, None)


shsa_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------ functional
def shsa_attention_torch(qkv: Tensor, x2: Tensor, qk_dim: int, scale: float) -> Tensor:
    """The reference composition (the authors' SHSA steps 3-5 up to the projection)."""
    B, CQ, H, W = qkv.shape
    PD = CQ - 2 * qk_dim
    q, k, v = qkv.split([qk_dim, qk_dim, PD], dim=1)
    q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
    attn = ((q.transpose(-2, -1) @ k) * scale).softmax(dim=-1)
    x1 = (v @ attn.transpose(-2, -1)).reshape(B, PD, H, W)
    return torch.relu(torch.cat([x1, x2], dim=1))


def shsa_attention(qkv: Tensor, x2: Tensor, qk_dim: int, scale: float | None = None) -> Tensor:
    """ReLU(concat(attention(q, k, v), x2)) for ``qkv`` = (B, 2*qk_dim + pdim, H, W)."""
    check_4d("qkv", qkv)
    check_4d("x2", x2)
    check_same_device(qkv=qkv, x2=x2)
    if qkv.shape[1] <= 2 * qk_dim:
        raise ValueError(f"qkv must have more than 2*qk_dim = {2 * qk_dim} channels, got {qkv.shape[1]}")
    if x2.shape[0] != qkv.shape[0] or x2.shape[2:] != qkv.shape[2:]:
        raise ValueError(f"x2 {tuple(x2.shape)} must match qkv {tuple(qkv.shape)} in batch and spatial size")
    scale = qk_dim ** -0.5 if scale is None else float(scale)
    which = backend.select(qkv)
    if which == "torch":
        return shsa_attention_torch(qkv, x2, qk_dim, scale)
    if which == "cpp" and not torch.compiler.is_compiling():
        # forward and backward in C++ (no Python per op); compile/export see the shvit op
        return torch.ops.shvit_cpp.shsa_attention(qkv, x2, qk_dim, scale)
    return torch.ops.shvit.shsa_attn_fwd(qkv, x2, qk_dim, scale)[0]
