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
from ._triton import (
    copy_blocks, copy_tiles, dot_dtype, is_token_major, forward_tiles, load_tile, new_output, pd_block,
    precision, relu_copy_tile,
)
from ._utils import as_bcn, bcn_strides, check_4d, check_same_device, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# --------------------------------------------------------------------------- kernels
# Tiles are read through (channel, token) strides, so NCHW and channels_last inputs (and
# channel slices of either) take the same kernels; ints equal to 1 are specialised by
# Triton, so a unit stride gives contiguous vector accesses in either layout. Outputs take
# the input's layout (``_triton.new_output``). Grid: (programs of one image, B); the
# programs past the attention tiles copy ReLU(x2) (forward) or its gradient (backward).
if triton is not None:

    @triton.jit
    def _shsa_attn_fwd_kernel(
        p_qkv, p_x2, p_out, p_lse,
        N, QK, PD, C2, scale,
        s_qb, s_qc, s_qn, s_xb, s_xc, s_xn, s_ob, s_oc, s_on,
        STORE_LSE: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
        BLOCK_QK: tl.constexpr, BLOCK_PD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        COPY_C: tl.constexpr, COPY_T: tl.constexpr,
    ):
        """Program (query tile, pdim chunk) of one image: online softmax over key tiles."""
        pid = tl.program_id(0)
        i_b = tl.program_id(1).to(tl.int64)
        n_pc = tl.cdiv(PD, BLOCK_PD)
        n_att = tl.cdiv(N, BLOCK_M) * n_pc
        p_ob = p_out + i_b * s_ob
        if pid >= n_att:
            p_xb = p_x2 + i_b * s_xb
            relu_copy_tile(pid - n_att, p_xb, p_xb, p_ob + PD * s_oc, C2, N, s_xc, s_xn, s_xc, s_xn, s_oc, s_on,
                           SAME=True, BLOCK_C=COPY_C, BLOCK_T=COPY_T)
        else:
            i_m = pid // n_pc
            i_c = pid % n_pc
            p_qb = p_qkv + i_b * s_qb
            o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
            o_qk = tl.arange(0, BLOCK_QK)
            o_pd = i_c * BLOCK_PD + tl.arange(0, BLOCK_PD)
            b_q = load_tile(p_qb, o_m, o_qk, N, QK, s_qn, s_qc).to(DOT)  # [BLOCK_M, BLOCK_QK]
            b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
            b_acc = tl.zeros([BLOCK_M, BLOCK_PD], dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                b_k = load_tile(p_qb + QK * s_qc, o_qk, o_n, QK, N, s_qc, s_qn).to(DOT)  # [BLOCK_QK, BLOCK_N]
                b_v = load_tile(p_qb + 2 * QK * s_qc, o_n, o_pd, N, PD, s_qn, s_qc).to(DOT)  # [BLOCK_N, BLOCK_PD]
                b_s = tl.dot(b_q, b_k, input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
                b_s = tl.where((o_n < N)[None, :], b_s, float("-inf"))
                b_mn = tl.maximum(b_m, tl.max(b_s, axis=1))
                b_p = tl.exp(b_s - b_mn[:, None])
                b_alpha = tl.exp(b_m - b_mn)
                b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
                b_acc = tl.dot(b_p.to(DOT), b_v, b_acc * b_alpha[:, None], input_precision=PRECISION)
                b_m = b_mn
            b_o = tl.maximum(b_acc / b_l[:, None], 0.0)
            m_o = (o_m < N)[:, None] & (o_pd < PD)[None, :]
            tl.store(p_ob + o_m[:, None] * s_on + o_pd[None, :] * s_oc, b_o.to(p_out.dtype.element_ty), mask=m_o)
            if STORE_LSE and i_c == 0:
                tl.store(p_lse + i_b * N + o_m, b_m + tl.log(b_l), mask=o_m < N)

    @triton.jit
    def _shsa_attn_bwd_pre_kernel(
        p_dout, p_out, p_dom, p_dx2, p_delta,
        N, PD, C2, s_db, s_dc, s_dn, s_ob, s_oc, s_on, s_xb, s_xc, s_xn,
        BLOCK_PD: tl.constexpr, BLOCK_M: tl.constexpr, COPY_C: tl.constexpr, COPY_T: tl.constexpr,
    ):
        """dOm = dout * (out > 0) on the attention channels, token-major (B, N, PD), with
        delta[i] = sum_c dOm[i, c] * out[c, i]; the other programs write dx2 = dout * (out > 0)."""
        pid = tl.program_id(0)
        i_b = tl.program_id(1).to(tl.int64)
        n_m = tl.cdiv(N, BLOCK_M)
        p_db = p_dout + i_b * s_db
        p_ob = p_out + i_b * s_ob
        if pid >= n_m:
            relu_copy_tile(pid - n_m, p_db + PD * s_dc, p_ob + PD * s_oc, p_dx2 + i_b * s_xb, C2, N,
                           s_dc, s_dn, s_oc, s_on, s_xc, s_xn, SAME=False, BLOCK_C=COPY_C, BLOCK_T=COPY_T)
        else:
            o_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            b_delta = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c0 in range(0, PD, BLOCK_PD):
                o_c = c0 + tl.arange(0, BLOCK_PD)
                b_do = load_tile(p_db, o_m, o_c, N, PD, s_dn, s_dc).to(tl.float32)  # [BLOCK_M, BLOCK_PD]
                b_o = load_tile(p_ob, o_m, o_c, N, PD, s_on, s_oc).to(tl.float32)
                b_do = tl.where(b_o > 0, b_do, 0.0)  # out = ReLU(O): where O > 0, out == O
                b_delta += tl.sum(b_do * b_o, axis=1)
                m = (o_m < N)[:, None] & (o_c < PD)[None, :]
                tl.store(p_dom + i_b * N * PD + o_m[:, None] * PD + o_c[None, :],
                         b_do.to(p_dom.dtype.element_ty), mask=m)
            tl.store(p_delta + i_b * N + o_m, b_delta, mask=o_m < N)

    @triton.jit
    def _probs_t(p_qb, p_lse_b, b_k, o_qk, o_m, m_n, QK, N, s_qc, s_qn, scale,
                 PRECISION: tl.constexpr, DOT: tl.constexpr):
        """q^T of the queries o_m, [BLOCK_QK, BLOCK_M], and the probabilities P^T of the key
        tile b_k, [BLOCK_N, BLOCK_M], recomputed from the saved log-sum-exp (zero outside N)."""
        m_m = o_m < N
        b_qt = load_tile(p_qb, o_qk, o_m, QK, N, s_qc, s_qn).to(DOT)
        b_lse = tl.load(p_lse_b + o_m, mask=m_m, other=0.0)
        b_pt = tl.exp(tl.dot(b_k, b_qt, input_precision=PRECISION) * scale - b_lse[None, :])
        return b_qt, tl.where(m_n[:, None] & m_m[None, :], b_pt, 0.0)

    @triton.jit
    def _shsa_attn_bwd_dkdv_kernel(
        p_qkv, p_dom, p_lse, p_delta, p_dqkv,
        N, QK, PD, scale,
        s_qb, s_qc, s_qn, s_gb, s_gc, s_gn,
        PRECISION: tl.constexpr, DOT: tl.constexpr,
        BLOCK_QK: tl.constexpr, BLOCK_PD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Program (key tile, j) of one image: dv of pdim chunk j, or dk for j = #chunks.
        Probabilities are recomputed from the saved log-sum-exp, transposed (keys x queries)."""
        i_n = tl.program_id(0)
        i_j = tl.program_id(1)
        i_b = tl.program_id(2).to(tl.int64)
        n_pc = tl.cdiv(PD, BLOCK_PD)
        p_qb = p_qkv + i_b * s_qb
        p_dob = p_dom + i_b * N * PD
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        o_qk = tl.arange(0, BLOCK_QK)
        b_k = load_tile(p_qb + QK * s_qc, o_n, o_qk, N, QK, s_qn, s_qc).to(DOT)  # [BLOCK_N, BLOCK_QK]
        p_gb = p_dqkv + i_b * s_gb
        if i_j < n_pc:
            o_pd = i_j * BLOCK_PD + tl.arange(0, BLOCK_PD)
            b_dv = tl.zeros([BLOCK_N, BLOCK_PD], dtype=tl.float32)
            for m0 in range(0, N, BLOCK_M):
                o_m = m0 + tl.arange(0, BLOCK_M)
                b_qt, b_pt = _probs_t(p_qb, p_lse + i_b * N, b_k, o_qk, o_m, m_n, QK, N, s_qc, s_qn, scale,
                                      PRECISION, DOT)
                b_do = load_tile(p_dob, o_m, o_pd, N, PD, PD, 1).to(DOT)  # [BLOCK_M, BLOCK_PD]
                b_dv = tl.dot(b_pt.to(DOT), b_do, b_dv, input_precision=PRECISION)
            m_v = m_n[:, None] & (o_pd < PD)[None, :]
            tl.store(p_gb + o_n[:, None] * s_gn + (2 * QK + o_pd[None, :]) * s_gc,
                     b_dv.to(p_dqkv.dtype.element_ty), mask=m_v)
        else:
            b_dk = tl.zeros([BLOCK_N, BLOCK_QK], dtype=tl.float32)
            for m0 in range(0, N, BLOCK_M):
                o_m = m0 + tl.arange(0, BLOCK_M)
                b_qt, b_pt = _probs_t(p_qb, p_lse + i_b * N, b_k, o_qk, o_m, m_n, QK, N, s_qc, s_qn, scale,
                                      PRECISION, DOT)
                b_delta = tl.load(p_delta + i_b * N + o_m, mask=o_m < N, other=0.0)
                b_dpt = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for c0 in range(0, PD, BLOCK_PD):
                    o_c = c0 + tl.arange(0, BLOCK_PD)
                    b_v = load_tile(p_qb + 2 * QK * s_qc, o_n, o_c, N, PD, s_qn, s_qc).to(DOT)  # [BLOCK_N, BLOCK_PD]
                    b_dot = load_tile(p_dob, o_c, o_m, PD, N, 1, PD).to(DOT)  # [BLOCK_PD, BLOCK_M]
                    b_dpt = tl.dot(b_v, b_dot, b_dpt, input_precision=PRECISION)
                b_dst = b_pt * (b_dpt - b_delta[None, :])
                b_dk = tl.dot(b_dst.to(DOT), tl.trans(b_qt), b_dk, input_precision=PRECISION)
            m_k = m_n[:, None] & (o_qk < QK)[None, :]
            tl.store(p_gb + o_n[:, None] * s_gn + (QK + o_qk[None, :]) * s_gc,
                     (b_dk * scale).to(p_dqkv.dtype.element_ty), mask=m_k)

    @triton.jit
    def _shsa_attn_bwd_dq_kernel(
        p_qkv, p_dom, p_lse, p_delta, p_dqkv,
        N, QK, PD, scale,
        s_qb, s_qc, s_qn, s_gb, s_gc, s_gn,
        PRECISION: tl.constexpr, DOT: tl.constexpr,
        BLOCK_QK: tl.constexpr, BLOCK_PD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Program (query tile) of one image: dq over all key tiles."""
        i_m = tl.program_id(0)
        i_b = tl.program_id(1).to(tl.int64)
        p_qb = p_qkv + i_b * s_qb
        p_dob = p_dom + i_b * N * PD
        o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < N
        o_qk = tl.arange(0, BLOCK_QK)
        b_q = load_tile(p_qb, o_m, o_qk, N, QK, s_qn, s_qc).to(DOT)  # [BLOCK_M, BLOCK_QK]
        b_lse = tl.load(p_lse + i_b * N + o_m, mask=m_m, other=0.0)
        b_delta = tl.load(p_delta + i_b * N + o_m, mask=m_m, other=0.0)
        b_dq = tl.zeros([BLOCK_M, BLOCK_QK], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < N
            b_kt = load_tile(p_qb + QK * s_qc, o_qk, o_n, QK, N, s_qc, s_qn).to(DOT)  # [BLOCK_QK, BLOCK_N]
            b_p = tl.exp(tl.dot(b_q, b_kt, input_precision=PRECISION) * scale - b_lse[:, None])
            b_p = tl.where(m_m[:, None] & m_n[None, :], b_p, 0.0)  # [BLOCK_M, BLOCK_N]
            b_dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for c0 in range(0, PD, BLOCK_PD):
                o_c = c0 + tl.arange(0, BLOCK_PD)
                b_do = load_tile(p_dob, o_m, o_c, N, PD, PD, 1).to(DOT)  # [BLOCK_M, BLOCK_PD]
                b_vt = load_tile(p_qb + 2 * QK * s_qc, o_c, o_n, PD, N, s_qc, s_qn).to(DOT)  # [BLOCK_PD, BLOCK_N]
                b_dp = tl.dot(b_do, b_vt, b_dp, input_precision=PRECISION)
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dq = tl.dot(b_ds.to(DOT), tl.trans(b_kt), b_dq, input_precision=PRECISION)
        m_q = m_m[:, None] & (o_qk < QK)[None, :]
        tl.store(p_dqkv + i_b * s_gb + o_m[:, None] * s_gn + o_qk[None, :] * s_gc,
                 (b_dq * scale).to(p_dqkv.dtype.element_ty), mask=m_q)


# ------------------------------------------------------------------------- launchers
# key tile of the forward: float32 dots hold twice the registers of half ones
KEY_BLOCK = {tl.float32: 32, tl.float16: 64, tl.bfloat16: 64} if triton is not None else {}


def shsa_attn_fwd_triton(qkv: Tensor, x2: Tensor, qk_dim: int, scale: float, store_lse: bool = True):
    B, CQ, H, W = qkv.shape
    N, PD, C2 = H * W, CQ - 2 * qk_dim, x2.shape[1]
    qkv, (sqb, sqc, sqn) = as_bcn(qkv)
    x2, (sxb, sxc, sxn) = as_bcn(x2)
    out = new_output(qkv, (B, PD + C2, H, W), torch.promote_types(qkv.dtype, x2.dtype))
    lse = torch.empty((B, N), device=qkv.device, dtype=torch.float32)
    if B > 0 and N > 0:
        sob, soc, son = bcn_strides(out)
        dot = dot_dtype(qkv.dtype)
        block_m, bpd = forward_tiles(B, N, PD, dot)
        n_pc = triton.cdiv(PD, bpd)
        copy_c, copy_t = copy_blocks(is_token_major(x2))
        grid = (triton.cdiv(N, block_m) * n_pc + copy_tiles(C2, N, is_token_major(x2)), B)
        _shsa_attn_fwd_kernel[grid](
            qkv, x2, out, lse,
            N, qk_dim, PD, C2, scale,
            sqb, sqc, sqn, sxb, sxc, sxn, sob, soc, son,
            STORE_LSE=store_lse, PRECISION=precision(), DOT=dot,
            BLOCK_QK=next_pow2(qk_dim), BLOCK_PD=bpd, BLOCK_M=block_m, BLOCK_N=min(next_pow2(N), KEY_BLOCK[dot]),
            COPY_C=copy_c, COPY_T=copy_t, num_warps=4, num_stages=1,
        )
    return out, lse


def shsa_attn_bwd_triton(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, qk_dim: int, scale: float):
    B, CQ, H, W = qkv.shape
    N, PD = H * W, CQ - 2 * qk_dim
    C2 = out.shape[1] - PD
    qkv, (sqb, sqc, sqn) = as_bcn(qkv)
    dout, (sdb, sdc, sdn) = as_bcn(dout)
    out, (sob, soc, son) = as_bcn(out)
    dqkv = new_output(qkv, (B, CQ, H, W))
    dx2 = new_output(out, (B, C2, H, W))
    if B == 0 or N == 0:
        return dqkv, dx2
    sgb, sgc, sgn = bcn_strides(dqkv)
    sxb, sxc, sxn = bcn_strides(dx2)
    dom = torch.empty((B, N, PD), device=qkv.device, dtype=qkv.dtype)
    delta = torch.empty((B, N), device=qkv.device, dtype=torch.float32)
    dot = dot_dtype(qkv.dtype)
    bpd = pd_block(PD, 16 if dot == tl.float32 else 32)  # float32 (FMA dots): wider chunks spill
    n_pc = triton.cdiv(PD, bpd)
    block_m = min(next_pow2(N), 32)
    copy_c, copy_t = copy_blocks(is_token_major(out))
    _shsa_attn_bwd_pre_kernel[(triton.cdiv(N, block_m) + copy_tiles(C2, N, is_token_major(out)), B)](
        dout, out, dom, dx2, delta, N, PD, C2, sdb, sdc, sdn, sob, soc, son, sxb, sxc, sxn,
        BLOCK_PD=bpd, BLOCK_M=block_m, COPY_C=copy_c, COPY_T=copy_t, num_warps=4,
    )
    args = (qkv, dom, lse, delta, dqkv, N, qk_dim, PD, scale, sqb, sqc, sqn, sgb, sgc, sgn)
    tiles = min(next_pow2(N), 16 if dot == tl.float32 else 32)
    meta = dict(PRECISION=precision(), DOT=dot, BLOCK_QK=next_pow2(qk_dim), BLOCK_PD=bpd,
                BLOCK_M=tiles, BLOCK_N=tiles, num_warps=4, num_stages=1)
    _shsa_attn_bwd_dkdv_kernel[(triton.cdiv(N, tiles), n_pc + 1, B)](*args, **meta)
    _shsa_attn_bwd_dq_kernel[(triton.cdiv(N, tiles), B)](*args, **meta)
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
    out = torch.cat([o.to(out_dtype), x2.to(out_dtype)], dim=1).relu()  # out of place: the composition is also the ops' decomposition
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
