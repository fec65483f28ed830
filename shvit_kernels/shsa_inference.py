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

from . import backend, pointwise
from ._utils import as_bcn, check_4d, check_same_device, next_pow2
from .group_norm import gn_partial_fwd_triton
from .shsa_attention import _precision, shsa_attn_fwd_triton

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
        N, PD, QK, C2, s_xb, s_xc, s_xn, inv_cnt, eps,
        PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_QK: tl.constexpr, BLOCK_PD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C2: tl.constexpr,
    ):
        i_b = tl.program_id(0).to(tl.int64)
        p_xb = p_x + i_b * s_xb
        o_n = tl.arange(0, BLOCK_N)
        m_n = o_n < N
        o_pd = tl.arange(0, BLOCK_PD)
        o_qk = tl.arange(0, BLOCK_QK)
        m_pd = o_pd < PD
        m_x = m_pd[:, None] & m_n[None, :]
        b_x = tl.load(p_xb + o_pd[:, None] * s_xc + o_n[None, :] * s_xn, mask=m_x, other=0.0).to(tl.float32)
        mean = tl.sum(b_x) * inv_cnt
        b_xc = tl.where(m_x, b_x - mean, 0.0)  # [BLOCK_PD, BLOCK_N]
        rstd = 1.0 / tl.sqrt(tl.sum(b_xc * b_xc) * inv_cnt + eps)
        b_xh = b_xc * rstd
        # q and k (GroupNorm affine, BatchNorm and scale folded into W', b')
        m_wq = (o_qk < QK)[:, None] & m_pd[None, :]
        b_wq = tl.load(p_w + o_qk[:, None] * PD + o_pd[None, :], mask=m_wq, other=0.0).to(tl.float32)
        b_wk = tl.load(p_w + (QK + o_qk[:, None]) * PD + o_pd[None, :], mask=m_wq, other=0.0).to(tl.float32)
        b_bq = tl.load(p_b + o_qk, mask=o_qk < QK, other=0.0).to(tl.float32)
        b_bk = tl.load(p_b + QK + o_qk, mask=o_qk < QK, other=0.0).to(tl.float32)
        b_q = tl.dot(b_wq, b_xh, input_precision=PRECISION) + b_bq[:, None]  # [BLOCK_QK, BLOCK_N]
        b_k = tl.dot(b_wk, b_xh, input_precision=PRECISION) + b_bk[:, None]  # [BLOCK_QK, BLOCK_N]
        # softmax attention over the keys of this image
        b_s = tl.dot(tl.trans(b_q), b_k, input_precision=PRECISION)  # [BLOCK_N, BLOCK_N]
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        b_p = tl.exp(b_s - tl.max(b_s, axis=1)[:, None])
        b_pt = tl.trans(b_p / tl.sum(b_p, axis=1)[:, None])  # [BLOCK_N (keys), BLOCK_N (queries)]
        # v and the output, BLOCK_R channels at a time (keeps W'_v out of registers)
        CO = PD + C2
        p_ob = p_out + i_b * CO * N
        for r0 in range(0, PD, BLOCK_R):
            o_r = r0 + tl.arange(0, BLOCK_R)
            m_r = o_r < PD
            b_wv = tl.load(p_w + (2 * QK + o_r[:, None]) * PD + o_pd[None, :], mask=m_r[:, None] & m_pd[None, :], other=0.0)
            b_bv = tl.load(p_b + 2 * QK + o_r, mask=m_r, other=0.0).to(tl.float32)
            b_v = tl.dot(b_wv.to(tl.float32), b_xh, input_precision=PRECISION) + b_bv[:, None]  # [BLOCK_R, BLOCK_N]
            b_o = tl.dot(b_v, b_pt, input_precision=PRECISION)  # [BLOCK_R, BLOCK_N]
            m_o = m_r[:, None] & m_n[None, :]
            tl.store(p_ob + o_r[:, None] * N + o_n[None, :], tl.maximum(b_o, 0.0).to(p_out.dtype.element_ty), mask=m_o)
        for c0 in range(0, C2, BLOCK_C2):
            o_c = c0 + tl.arange(0, BLOCK_C2)
            m_c = (o_c < C2)[:, None] & m_n[None, :]
            b_x2 = tl.load(p_xb + (PD + o_c[:, None]) * s_xc + o_n[None, :] * s_xn, mask=m_c, other=0.0).to(tl.float32)
            tl.store(p_ob + (PD + o_c[:, None]) * N + o_n[None, :], tl.maximum(b_x2, 0.0).to(p_out.dtype.element_ty), mask=m_c)

    @triton.jit
    def _shsa_norm_proj_kernel(
        p_x, p_mean, p_rstd, p_w, p_b, p_qkv,
        N, PD, CQ, s_xb, s_xc, s_xn,
        PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_PD: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """qkv[:, :, tile] = W' @ ((x1 - mean) * rstd) + b' for one token tile."""
        i_b = tl.program_id(0).to(tl.int64)
        i_n = tl.program_id(1)
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        o_pd = tl.arange(0, BLOCK_PD)
        m_pd = o_pd < PD
        m_x = m_pd[:, None] & m_n[None, :]
        mean = tl.load(p_mean + i_b)
        rstd = tl.load(p_rstd + i_b)
        b_x = tl.load(p_x + i_b * s_xb + o_pd[:, None] * s_xc + o_n[None, :] * s_xn, mask=m_x, other=0.0)
        b_xh = tl.where(m_x, (b_x.to(tl.float32) - mean) * rstd, 0.0)  # [BLOCK_PD, BLOCK_N]
        p_qb = p_qkv + i_b * CQ * N
        for r0 in range(0, CQ, BLOCK_R):
            o_r = r0 + tl.arange(0, BLOCK_R)
            m_r = o_r < CQ
            b_w = tl.load(p_w + o_r[:, None] * PD + o_pd[None, :], mask=m_r[:, None] & m_pd[None, :], other=0.0)
            b_bias = tl.load(p_b + o_r, mask=m_r, other=0.0).to(tl.float32)
            b_y = tl.dot(b_w.to(tl.float32), b_xh, input_precision=PRECISION) + b_bias[:, None]  # [BLOCK_R, BLOCK_N]
            tl.store(p_qb + o_r[:, None] * N + o_n[None, :], b_y.to(p_qkv.dtype.element_ty), mask=m_r[:, None] & m_n[None, :])


def shsa_infer_triton(x: Tensor, weight: Tensor, bias: Tensor, pdim: int, qk_dim: int, eps: float) -> Tensor:
    B, C, H, W = x.shape
    N, C2 = H * W, C - pdim
    x, (sb, sc, sn) = as_bcn(x)
    weight, bias = weight.contiguous(), bias.contiguous()
    if B == 0 or N == 0:
        return torch.empty((B, C, H, W), device=x.device, dtype=x.dtype)
    prec = _precision(x.dtype)
    if N <= ONE_PASS_MAX_N:
        out = torch.empty((B, C, H, W), device=x.device, dtype=x.dtype)
        _shsa_infer_kernel[(B,)](
            x, weight, bias, out,
            N, pdim, qk_dim, C2, sb, sc, sn, 1.0 / (pdim * N), eps,
            PRECISION=prec, BLOCK_R=32, BLOCK_QK=next_pow2(qk_dim), BLOCK_PD=next_pow2(pdim),
            BLOCK_N=next_pow2(N), BLOCK_C2=min(next_pow2(C2, 1), 32), num_warps=4,
        )
        return out
    _, mean, rstd = gn_partial_fwd_triton(x[:, :pdim], None, None, eps, write_y=False)
    CQ = 2 * qk_dim + pdim
    qkv = torch.empty((B, CQ, H, W), device=x.device, dtype=x.dtype)
    block_n = 64
    _shsa_norm_proj_kernel[(B, triton.cdiv(N, block_n))](
        x, mean, rstd, weight, bias, qkv,
        N, pdim, CQ, sb, sc, sn,
        PRECISION=prec, BLOCK_R=32, BLOCK_PD=next_pow2(pdim), BLOCK_N=block_n, num_warps=4,
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


@shsa_infer.register_kernel("cuda")
def _(x, weight, bias, pdim, qk_dim, eps):
    return shsa_infer_triton(x, weight, bias, pdim, qk_dim, eps)


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
    token_major = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    small = x.shape[2] * x.shape[3] <= CPP_BLOCK_MAX_N
    if (
        not needs_grad
        and not torch.compiler.is_compiling()
        and backend.select(x) == "cpp"
        and (small or token_major or (x.dtype == torch.float32 and pointwise.gemm_available()))
    ):
        check_same_device(x=x, weight=weight, proj_weight=proj_weight)
        packed = (None, None)
        if pointwise.fast_path_applies(x, weight, bias, proj_param, proj_bias) and pointwise.gemm_available():
            packed = (pointwise.packed_weight(weight), pointwise.packed_weight(proj_param))
        return torch.ops.shvit_cpp.shsa_block_infer(
            x, weight, bias, proj_weight, proj_bias, pdim, qk_dim, float(eps), *packed
        )
    z = shsa_inference(x, weight, bias, pdim, qk_dim, eps)
    return x + torch.nn.functional.conv2d(z, proj_weight[:, :, None, None], proj_bias)
