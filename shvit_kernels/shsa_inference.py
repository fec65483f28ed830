"""The whole SHSA mixer up to its projection, for inference (``shvit::shsa_infer``).

``out = ReLU(concat(attention(W' @ normalize(x1) + b'), x2))`` where ``normalize`` is the
one-group GroupNorm *without* its affine: the GroupNorm affine, the folded qkv BatchNorm
and the attention scale are all folded into ``W'`` (2*qk_dim + pdim, pdim) and ``b'`` by
``fold_shsa_weights``. The output is (B, dim, H, W), ready for the projection conv.

For N = H*W <= ``ONE_PASS_MAX_N`` one program per image does everything in registers
(one launch, x read once, out written once). Larger images take three launches with
memory linear in N: GroupNorm statistics, normalise + project into a qkv buffer, and the
tiled flash attention of ``shsa_attention`` (no N x N tensor).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backend, onednn, pointwise
from ._triton import (
    copy_blocks, copy_tiles, dot_dtype, is_token_major, forward_tiles, load_tile, new_output,
    precision, relu_copy_tile,
)
from ._utils import as_bcn, bcn_strides, check_4d, check_same_device, next_pow2
from .group_norm import gn_partial_fwd_triton
from .plan import Step, call
from .shsa_attention import shsa_attn_fwd_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Without the packed GEMM (dtypes other than float32, CPUs without AVX2), the C++ block op on
# NCHW x (token-major ATen GEMMs, transposed concat and residual add) beat the composition at
# 16 and 64 tokens on the 2-core benchmark machine and lost at 196 (its transposes cost more
# than the GEMM layout saves there), so larger NCHW images take the composition there.
CPP_BLOCK_MAX_N = 64

# The one-pass kernel keeps an N x N score tile in registers; 64 covers SHViT at 224 and
# 256 px (N = 49, 64 in stage 2, 16 in stage 3). Chosen for register pressure, not yet
# tuned on hardware.
ONE_PASS_MAX_N = 64

if triton is not None:

    @triton.jit
    def _shsa_infer_kernel(
        p_x, p_w, p_b, p_out,
        N, PD, QK, C2, s_xb, s_xc, s_xn, s_ob, s_oc, s_on, inv_cnt, eps,
        PRECISION: tl.constexpr, DOT: tl.constexpr, BLOCK_QK: tl.constexpr, BLOCK_PD: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        COPY_C: tl.constexpr, COPY_T: tl.constexpr,
    ):
        """Program (query tile, pdim chunk) of one image with N <= BLOCK_N tokens: GroupNorm
        statistics, q of its queries, k and its chunk of v for every token, softmax, output.
        The programs past the attention tiles copy ReLU(x2)."""
        pid = tl.program_id(0)
        i_b = tl.program_id(1).to(tl.int64)
        n_pc = tl.cdiv(PD, BLOCK_PD)
        n_att = tl.cdiv(N, BLOCK_M) * n_pc
        p_xb = p_x + i_b * s_xb
        p_ob = p_out + i_b * s_ob
        if pid >= n_att:
            relu_copy_tile(pid - n_att, p_xb + PD * s_xc, p_xb + PD * s_xc, p_ob + PD * s_oc, C2, N,
                           s_xc, s_xn, s_xc, s_xn, s_oc, s_on, SAME=True, BLOCK_C=COPY_C, BLOCK_T=COPY_T)
        else:
            i_m = pid // n_pc
            i_c = pid % n_pc
            o_n = tl.arange(0, BLOCK_N)
            m_n = o_n < N
            o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
            o_qk = tl.arange(0, BLOCK_QK)
            m_qk = o_qk < QK
            o_pd = i_c * BLOCK_PD + tl.arange(0, BLOCK_PD)
            m_pd = o_pd < PD
            # GroupNorm statistics over (pdim, N), two passes (no cancellation)
            b_sum = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, PD, BLOCK_K):
                b_sum += load_tile(p_xb, k0 + tl.arange(0, BLOCK_K), o_n, PD, N, s_xc, s_xn).to(tl.float32)
            mean = tl.sum(b_sum) * inv_cnt
            b_sum = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, PD, BLOCK_K):
                o_k = k0 + tl.arange(0, BLOCK_K)
                b_x = load_tile(p_xb, o_k, o_n, PD, N, s_xc, s_xn).to(tl.float32)
                b_d = tl.where((o_k < PD)[:, None] & m_n[None, :], b_x - mean, 0.0)
                b_sum += b_d * b_d
            rstd = 1.0 / tl.sqrt(tl.sum(b_sum) * inv_cnt + eps)
            # q (this tile's queries), k and v (chunk i_c) of every token: W' @ xhat + b'
            # (GroupNorm affine, qkv BatchNorm and the attention scale folded into W', b')
            b_q = tl.zeros([BLOCK_M, BLOCK_QK], dtype=tl.float32)
            b_kt = tl.zeros([BLOCK_QK, BLOCK_N], dtype=tl.float32)
            b_v = tl.zeros([BLOCK_N, BLOCK_PD], dtype=tl.float32)
            for k0 in range(0, PD, BLOCK_K):
                o_k = k0 + tl.arange(0, BLOCK_K)
                m_k = o_k < PD
                b_x = load_tile(p_xb, o_k, o_n, PD, N, s_xc, s_xn).to(tl.float32)
                b_xh = tl.where(m_k[:, None] & m_n[None, :], (b_x - mean) * rstd, 0.0).to(DOT)  # [BLOCK_K, BLOCK_N]
                b_xm = load_tile(p_xb, o_m, o_k, N, PD, s_xn, s_xc).to(tl.float32)
                b_xhm = tl.where((o_m < N)[:, None] & m_k[None, :], (b_xm - mean) * rstd, 0.0).to(DOT)
                b_wqt = load_tile(p_w, o_k, o_qk, PD, QK, 1, PD).to(DOT)  # [BLOCK_K, BLOCK_QK]
                b_wk = load_tile(p_w + QK * PD, o_qk, o_k, QK, PD, PD, 1).to(DOT)  # [BLOCK_QK, BLOCK_K]
                b_wvt = load_tile(p_w + 2 * QK * PD, o_k, o_pd, PD, PD, 1, PD).to(DOT)  # [BLOCK_K, BLOCK_PD]
                b_q = tl.dot(b_xhm, b_wqt, b_q, input_precision=PRECISION)
                b_kt = tl.dot(b_wk, b_xh, b_kt, input_precision=PRECISION)
                b_v = tl.dot(tl.trans(b_xh), b_wvt, b_v, input_precision=PRECISION)
            b_q += tl.load(p_b + o_qk, mask=m_qk, other=0.0).to(tl.float32)[None, :]
            b_kt += tl.load(p_b + QK + o_qk, mask=m_qk, other=0.0).to(tl.float32)[:, None]
            b_v += tl.load(p_b + 2 * QK + o_pd, mask=m_pd, other=0.0).to(tl.float32)[None, :]
            # softmax attention over the image's keys
            b_s = tl.dot(b_q.to(DOT), b_kt.to(DOT), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            b_s = tl.where(m_n[None, :], b_s, float("-inf"))
            b_p = tl.exp(b_s - tl.max(b_s, axis=1)[:, None])
            b_p = b_p / tl.sum(b_p, axis=1)[:, None]
            b_o = tl.dot(b_p.to(DOT), b_v.to(DOT), input_precision=PRECISION)  # [BLOCK_M, BLOCK_PD]
            m_o = (o_m < N)[:, None] & m_pd[None, :]
            tl.store(p_ob + o_m[:, None] * s_on + o_pd[None, :] * s_oc,
                     tl.maximum(b_o, 0.0).to(p_out.dtype.element_ty), mask=m_o)

    @triton.jit
    def _shsa_norm_proj_kernel(
        p_x, p_mean, p_rstd, p_w, p_b, p_qkv,
        N, PD, CQ, s_xb, s_xc, s_xn, s_qb, s_qc, s_qn,
        PRECISION: tl.constexpr, DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """qkv[rows, tokens] = W' @ ((x1 - mean) * rstd) + b' for one (row tile, token tile)."""
        pid = tl.program_id(0)
        i_b = tl.program_id(1).to(tl.int64)
        n_r = tl.cdiv(CQ, BLOCK_R)
        o_r = (pid % n_r) * BLOCK_R + tl.arange(0, BLOCK_R)
        o_n = (pid // n_r) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        mean = tl.load(p_mean + i_b)
        rstd = tl.load(p_rstd + i_b)
        p_xb = p_x + i_b * s_xb
        b_y = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, PD, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            b_x = load_tile(p_xb, o_k, o_n, PD, N, s_xc, s_xn).to(tl.float32)
            b_xh = tl.where((o_k < PD)[:, None] & m_n[None, :], (b_x - mean) * rstd, 0.0).to(DOT)
            b_w = load_tile(p_w, o_r, o_k, CQ, PD, PD, 1).to(DOT)  # [BLOCK_R, BLOCK_K]
            b_y = tl.dot(b_w, b_xh, b_y, input_precision=PRECISION)
        b_y += tl.load(p_b + o_r, mask=o_r < CQ, other=0.0).to(tl.float32)[:, None]
        m = (o_r < CQ)[:, None] & m_n[None, :]
        tl.store(p_qkv + i_b * s_qb + o_r[:, None] * s_qc + o_n[None, :] * s_qn,
                 b_y.to(p_qkv.dtype.element_ty), mask=m)


def shsa_infer_triton(x: Tensor, weight: Tensor, bias: Tensor, pdim: int, qk_dim: int, eps: float) -> Tensor:
    B, C, H, W = x.shape
    N, C2 = H * W, C - pdim
    x, (sb, sc, sn) = as_bcn(x)
    weight, bias = weight.contiguous(), bias.contiguous()
    if B == 0 or N == 0:
        return new_output(x, (B, C, H, W))
    dot = dot_dtype(x.dtype)
    if N <= ONE_PASS_MAX_N:
        out = new_output(x, (B, C, H, W))
        block_m, bpd = forward_tiles(B, N, pdim, dot)
        if dot == tl.float32:  # float32 (FMA dots): 16 x 16 tiles on 8 warps (larger ones spill)
            block_m, bpd = 16, 16
        n_pc = triton.cdiv(pdim, bpd)
        copy_c, copy_t = copy_blocks(is_token_major(x))
        grid = (triton.cdiv(N, block_m) * n_pc + copy_tiles(C2, N, is_token_major(x)), B)
        _shsa_infer_kernel[grid](
            x, weight, bias, out,
            N, pdim, qk_dim, C2, sb, sc, sn, *bcn_strides(out), 1.0 / (pdim * N), eps,
            PRECISION=precision(), DOT=dot, BLOCK_QK=next_pow2(qk_dim), BLOCK_PD=bpd, BLOCK_K=16,
            BLOCK_M=block_m, BLOCK_N=next_pow2(N), COPY_C=copy_c, COPY_T=copy_t,
            num_warps=8 if dot == tl.float32 else 4, num_stages=1,
        )
        return out
    _, mean, rstd = gn_partial_fwd_triton(x[:, :pdim], None, None, eps, write_y=False)
    CQ = 2 * qk_dim + pdim
    qkv = new_output(x, (B, CQ, H, W))
    block_r, block_n = 32, 64
    _shsa_norm_proj_kernel[(triton.cdiv(CQ, block_r) * triton.cdiv(N, block_n), B)](
        x, mean, rstd, weight, bias, qkv,
        N, pdim, CQ, sb, sc, sn, *bcn_strides(qkv),
        PRECISION=precision(), DOT=dot, BLOCK_R=block_r, BLOCK_K=16, BLOCK_N=block_n, num_warps=4,
    )
    # the scale is already folded into W'
    out, _ = shsa_attn_fwd_triton(qkv, x[:, pdim:], qk_dim, 1.0, store_lse=False)
    return out


def shsa_infer_torch(x: Tensor, weight: Tensor, bias: Tensor, pdim: int, qk_dim: int, eps: float) -> Tensor:
    B, C, H, W = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x1 = x[:, :pdim].to(acc)
    xh = torch.nn.functional.group_norm(x1, 1, None, None, eps).flatten(2)
    qkv = torch.einsum("oc,bcn->bon", weight.to(acc), xh) + bias.to(acc)[:, None]
    q, k, v = qkv.split([qk_dim, qk_dim, pdim], dim=1)
    attn = (q.transpose(-2, -1) @ k).softmax(dim=-1)
    o = (v @ attn.transpose(-2, -1)).reshape(B, pdim, H, W)
    return torch.cat([o.to(x.dtype), x[:, pdim:]], dim=1).relu()


@torch.library.custom_op("shvit::shsa_infer", mutates_args=())
def shsa_infer(x: Tensor, weight: Tensor, bias: Tensor, pdim: int, qk_dim: int, eps: float) -> Tensor:
    return backend.pick(x, shsa_infer_triton, shsa_infer_torch, "shsa_infer")(x, weight, bias, pdim, qk_dim, eps)


@shsa_infer.register_fake
def _(x, weight, bias, pdim, qk_dim, eps):
    return x.new_empty(x.shape)


def shsa_infer_backward_torch(
    grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, pdim: int, qk_dim: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``shsa_infer`` w.r.t. x, weight, bias, written out in torch ops (the
    forward is recomputed: the inference op keeps no state). It makes the op differentiable
    where a graph needs it, e.g. a compiled or exported model after ``fuse()``."""
    B, C, H, W = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x1 = x[:, :pdim].to(acc).flatten(2)
    mean = x1.mean(dim=(1, 2), keepdim=True)
    rstd = torch.rsqrt(x1.var(dim=(1, 2), unbiased=False, keepdim=True) + eps)
    xh = (x1 - mean) * rstd  # (B, P, N)
    w, b = weight.to(acc), bias.to(acc)
    qkv = torch.einsum("oc,bcn->bon", w, xh) + b[:, None]
    q, k, v = qkv.split([qk_dim, qk_dim, pdim], dim=1)
    a = (q.transpose(-2, -1) @ k).softmax(dim=-1)  # (B, N, N)
    o = v @ a.transpose(-2, -1)  # (B, P, N)
    g = grad.to(acc).flatten(2)
    g_o = g[:, :pdim] * (o > 0)
    g_x2 = g[:, pdim:] * (x[:, pdim:].flatten(2) > 0)
    g_v = g_o @ a
    g_a = g_o.transpose(-2, -1) @ v
    g_s = a * (g_a - (g_a * a).sum(dim=-1, keepdim=True))
    g_q = k @ g_s.transpose(-2, -1)
    g_k = q @ g_s
    g_qkv = torch.cat([g_q, g_k, g_v], dim=1)  # (B, CQ, N)
    g_w = torch.einsum("bon,bcn->oc", g_qkv, xh)
    g_b = g_qkv.sum(dim=(0, 2))
    g_xh = torch.einsum("oc,bon->bcn", w, g_qkv)
    g_x1 = rstd * (g_xh - g_xh.mean(dim=(1, 2), keepdim=True) - xh * (g_xh * xh).mean(dim=(1, 2), keepdim=True))
    g_x = torch.cat([g_x1, g_x2.to(acc)], dim=1).reshape(B, C, H, W)
    return g_x.to(x.dtype), g_w.to(weight.dtype), g_b.to(bias.dtype)


def _infer_setup_context(ctx, inputs, output):
    x, weight, bias, pdim, qk_dim, eps = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (pdim, qk_dim, eps)


def _infer_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    gx, gw, gb = shsa_infer_backward_torch(grad, x, weight, bias, *ctx.args)
    return gx, gw, gb, None, None, None


shsa_infer.register_autograd(_infer_backward, setup_context=_infer_setup_context)


@torch.no_grad()
def fold_shsa_weights(gn_weight: Tensor, gn_bias: Tensor, qkv_weight: Tensor, qkv_bias: Tensor, qk_dim: int, scale: float):
    """Fold the GroupNorm affine and the attention scale into a (BN-folded) qkv projection.

    ``qkv(gn(x)) = W (gamma * xhat + beta) + b = (W diag(gamma)) xhat + (W beta + b)``, and
    the q rows are multiplied by ``scale``. Returns ``(W', b')`` of shapes (CQ, pdim), (CQ,).
    """
    w = qkv_weight.reshape(qkv_weight.shape[0], -1)
    w2 = w * gn_weight[None, :]
    b2 = qkv_bias + w @ gn_bias
    w2[:qk_dim] *= scale
    b2[:qk_dim] *= scale
    return w2.contiguous(), b2.contiguous()


def shsa_inference(x: Tensor, weight: Tensor, bias: Tensor, pdim: int, qk_dim: int, eps: float = 1e-5) -> Tensor:
    """ReLU(concat(attention, x2)) of a BN-folded SHSA, from x in one pass.

    In eager mode with a gradient to compute, the composition runs instead (the op's
    registered backward recomputes the forward; compiled and exported graphs keep the op).
    """
    check_4d("x", x)
    cq = 2 * qk_dim + pdim
    if not 0 < pdim < x.shape[1]:
        raise ValueError(f"pdim must be in 1..{x.shape[1] - 1}, got {pdim}")
    if weight.shape != (cq, pdim) or bias.shape != (cq,):
        raise ValueError(
            f"weight must be ({cq}, {pdim}) and bias ({cq},), got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    check_same_device(x=x, weight=weight, bias=bias)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    which = backend.select(x)
    compiling = torch.compiler.is_compiling()
    if which == "torch" or (needs_grad and not compiling):
        # eager with a gradient to compute: autograd through the composition (the op's own
        # backward recomputes it; graphs being compiled or exported keep the op instead)
        return shsa_infer_torch(x, weight, bias, pdim, qk_dim, eps)
    if which == "cpp" and not compiling:
        return torch.ops.shvit_cpp.shsa_infer(x, weight, bias, pdim, qk_dim, float(eps))
    return torch.ops.shvit.shsa_infer(x, weight, bias, pdim, qk_dim, float(eps))


def shsa_block_inference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    proj_weight: Tensor,
    proj_bias: Tensor,
    pdim: int,
    qk_dim: int,
    eps: float = 1e-5,
) -> Tensor:
    """The residual SHSA block of a BN-folded model: ``x + proj(shsa_inference(x))``.

    ``proj_weight`` is the folded projection, (dim, dim) or (dim, dim, 1, 1). On the cpp
    backend one C++ op runs the block for float32 on AVX2 CPUs (the packed GEMM of
    ``shvit_kernels.pointwise``: token-major for channels_last x, channel-major image by
    image for NCHW x, the projection writing bias + residual in its epilogue either way), and
    for other dtypes with channels_last x or up to ``CPP_BLOCK_MAX_N`` tokens (ATen's GEMMs,
    token-major); otherwise it is ``shsa_inference`` followed by the 1x1 convolution and the add.
    """
    check_4d("x", x)
    dim = x.shape[1]
    proj_param = proj_weight
    proj_weight = proj_weight.reshape(proj_weight.shape[0], -1)
    if proj_weight.shape != (dim, dim) or proj_bias.shape != (dim,):
        raise ValueError(
            f"proj_weight must be ({dim}, {dim}) and proj_bias ({dim},), "
            f"got {tuple(proj_weight.shape)} and {tuple(proj_bias.shape)}"
        )
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, weight, bias, proj_weight, proj_bias)
    )
    if onednn.applies(x, weight, bias, proj_weight, proj_bias):
        return onednn.shsa_block(x, weight, bias, proj_param, proj_bias, pdim, qk_dim, eps)
    token_major = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    small = x.shape[2] * x.shape[3] <= CPP_BLOCK_MAX_N
    if (
        not needs_grad
        and not torch.compiler.is_compiling()
        and backend.select(x) == "cpp"
        and (small or token_major or (x.dtype == torch.float32 and pointwise.gemm_available()))
    ):
        check_same_device(x=x, weight=weight, proj_weight=proj_weight)
        if pointwise.fast_path_applies(x, weight, bias, proj_param, proj_bias) and pointwise.gemm_available():
            return call(block_step(weight, bias, proj_param, proj_bias, pdim, qk_dim, eps), x)
        return torch.ops.shvit_cpp.shsa_block_infer(x, weight, bias, proj_weight, proj_bias, pdim, qk_dim, float(eps))
    z = shsa_inference(x, weight, bias, pdim, qk_dim, eps)
    return x + torch.nn.functional.conv2d(z, proj_weight[:, :, None, None], proj_bias)


def block_step(weight: Tensor, bias: Tensor, proj_weight: Tensor, proj_bias: Tensor, pdim: int, qk_dim: int,
               eps: float = 1e-5) -> Step:
    """``shsa_block_inference`` on the CPU fast path as one C++ op (a ``plan.Step``), its
    weights packed now (for float32 CPU parameters, on a CPU where ``pointwise.gemm_available()``)."""
    dim = proj_weight.shape[0]
    return "shsa_block_infer", (weight, bias, proj_weight.reshape(dim, dim), proj_bias, pdim, qk_dim, float(eps),
                                pointwise.packed_weight(weight), pointwise.packed_weight(proj_weight))
