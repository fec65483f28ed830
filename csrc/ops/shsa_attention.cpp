// Single-head attention + concat + ReLU of the SHSA mixer: CPU kernels of
// shvit_cpp::shsa_attn_fwd / shsa_attn_bwd (see shvit_kernels/shsa_attention.py).
//
// float32 on an AVX2 CPU runs the channel-major kernels on the packed GEMM, one image per
// task (attention_cm.h; the backward recomputes the probabilities a chunk of queries at a
// time). Other dtypes: GEMMs go through ATen's batched BLAS (bmm/baddbmm over the whole batch); softmax through
// ATen's vectorised kernel; everything elementwise (masking, ReLU, concat, dS) is fused
// into single passes here. Queries are processed in chunks so that the score buffer stays
// under kScoreBudget bytes: memory is linear in N, never an N x N buffer per image for
// large N.
#include <torch/library.h>

#include "attention/attention_core.h"
#include "common.h"
#include "gemm/gemm.h"

namespace shvit_cpu {

namespace {
constexpr int64_t kScoreBudget = int64_t(16) << 20;

template <typename out_t, typename acc_t>
void relu_rows_into(const Tensor& src, Tensor& out, int64_t c0, int64_t n0) {
  // out[b, c0 + c, n0 + i] = max(src[b, c, i], 0) for src (B, R, T) with unit last stride
  const int64_t B = src.size(0), R = src.size(1), T = src.size(2);
  const int64_t CO = out.size(1), N = out.size(2);
  const int64_t sb = src.stride(0), sr = src.stride(1);
  const acc_t* ps = src.const_data_ptr<acc_t>();
  out_t* po = out.data_ptr<out_t>();
  parallel_rows(B * R, 16, [&](int64_t row) {
    const int64_t b = row / R, c = row % R;
    const acc_t* s = ps + b * sb + c * sr;
    out_t* o = po + (b * CO + c0 + c) * N + n0;
    relu_convert(s, o, T);
  });
}
}  // namespace

int64_t query_chunk(int64_t B, int64_t N, int64_t elem_size) {
  const int64_t per_row = std::max<int64_t>(1, B * N * elem_size);
  return std::max<int64_t>(1, std::min<int64_t>(N, kScoreBudget / per_row));
}

void attention_forward_core(const Tensor& qT, const Tensor& k, const Tensor& v, const Tensor& x2, Tensor& out,
                            Tensor* lse, Tensor* p_keep) {
  // qT (B, N, QK) already scaled, k (B, QK, N), v (B, PD, N): acc dtype, bmm-compatible strides.
  // x2 (B, C2, N) with unit token stride; out (B, PD + C2, N) contiguous.
  const int64_t B = qT.size(0), N = qT.size(1), PD = v.size(1);
  const int64_t tm = query_chunk(B, N, qT.element_size());
  for (int64_t m0 = 0; m0 < N; m0 += tm) {
    const int64_t t = std::min(tm, N - m0);
    Tensor s = at::bmm(qT.narrow(1, m0, t), k);  // (B, t, N)
    Tensor p = at::_softmax(s, -1, false);
    if (lse != nullptr) {
      // log-sum-exp of each row from its largest score and probability (p_max >= 1/N)
      lse->narrow(1, m0, t).copy_(s.amax(-1) - p.amax(-1).log());
    }
    if (p_keep != nullptr && t == N) *p_keep = p;  // one chunk: the backward can reuse it
    Tensor o = at::bmm(v, p.transpose(1, 2));  // (B, PD, t)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "shsa_attn_out", [&] {
      if (o.scalar_type() == at::kDouble) {
        relu_rows_into<scalar_t, double>(o, out, 0, m0);
      } else {
        relu_rows_into<scalar_t, float>(o, out, 0, m0);
      }
    });
  }
  // the untouched channels
  const int64_t C2 = x2.size(1), CO = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2.scalar_type(), "shsa_attn_x2", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "shsa_attn_x2_out", [&] {
      const in_t* px = x2.const_data_ptr<in_t>();
      scalar_t* po = out.data_ptr<scalar_t>();
      const int64_t sb = x2.stride(0), sc = x2.stride(1);
      parallel_rows(B * C2, 16, [&](int64_t row) {
        const int64_t b = row / C2, c = row % C2;
        const in_t* s = px + b * sb + c * sc;
        scalar_t* o = po + (b * CO + PD + c) * N;
        for (int64_t i = 0; i < N; ++i) o[i] = static_cast<scalar_t>(s[i] < in_t(0) ? in_t(0) : s[i]);
      });
    });
  });
}

namespace {
// float32 on an AVX2 CPU: the channel-major kernels on the packed GEMM (attention_cm.h)
bool attention_cm(const Tensor& qkv, const Tensor& x2) {
  return qkv.scalar_type() == at::kFloat && x2.scalar_type() == at::kFloat && shvit_gemm::available();
}

std::tuple<Tensor, Tensor> attn_fwd(const Tensor& qkv, const Tensor& x2, int64_t qk_dim, double scale,
                                    bool want_lse) {
  check_input(qkv, "qkv");
  check_input(x2, "x2");
  const int64_t B = qkv.size(0), CQ = qkv.size(1), H = qkv.size(2), W = qkv.size(3), N = H * W;
  const int64_t PD = CQ - 2 * qk_dim, C2 = x2.size(1);
  TORCH_CHECK(PD > 0, "qkv must have more than 2*qk_dim = ", 2 * qk_dim, " channels, got ", CQ);
  TORCH_CHECK(x2.size(0) == B && x2.size(2) == H && x2.size(3) == W, "x2 ", x2.sizes(),
              " must match qkv ", qkv.sizes(), " in batch and spatial size");
  const auto acc = acc_type(qkv.scalar_type());
  const auto out_dtype = at::promote_types(qkv.scalar_type(), x2.scalar_type());
  Tensor out = at::empty({B, PD + C2, H, W}, qkv.options().dtype(out_dtype));
  Tensor lse = at::empty({B, N}, qkv.options().dtype(acc));
  if (B == 0 || N == 0) return {out, lse};
  Tensor out3 = out.view({B, PD + C2, N});
  if (attention_cm(qkv, x2)) {
    attention_forward_cm(as_bcn(qkv), as_bcn(x2), qk_dim, scale, out3, nullptr, want_lse ? &lse : nullptr);
    return {out, lse};
  }
  Tensor f = as_bcn(qkv.scalar_type() == acc ? qkv : qkv.to(acc));
  Tensor qT = f.narrow(1, 0, qk_dim).transpose(1, 2).mul(scale);
  attention_forward_core(qT, f.narrow(1, qk_dim, qk_dim), f.narrow(1, 2 * qk_dim, PD), as_bcn(x2), out3,
                         want_lse ? &lse : nullptr);
  return {out, lse};
}
}  // namespace

std::tuple<Tensor, Tensor> shsa_attn_fwd(const Tensor& qkv, const Tensor& x2, int64_t qk_dim, double scale) {
  NoAutocast no_autocast;
  return attn_fwd(qkv, x2, qk_dim, scale, true);
}

// Inference-only forward: the log-sum-exp is not computed.
Tensor shsa_attn_fwd_nolse(const Tensor& qkv, const Tensor& x2, int64_t qk_dim, double scale) {
  NoAutocast no_autocast;
  return std::get<0>(attn_fwd(qkv, x2, qk_dim, scale, false));
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_core(const Tensor& dout, const Tensor& f, const Tensor& out,
                                                           int64_t qk_dim, double scale, const Tensor& p_saved,
                                                           Tensor& dx2) {
  // dout, out (B, CO, H, W); f = qkv as (B, CQ, N) in the acc dtype with unit token stride;
  // dx2 (B, C2, N) with unit token stride receives the gradient of x2.
  const int64_t B = f.size(0), CQ = f.size(1), N = f.size(2);
  const int64_t PD = CQ - 2 * qk_dim, CO = out.size(1), C2 = CO - PD;
  const auto acc = f.scalar_type();
  Tensor o = as_bcn(out);
  Tensor g = as_bcn(dout.scalar_type() == out.scalar_type() ? dout : dout.to(out.scalar_type()));
  // dO masked by the ReLU (in acc dtype), delta = rowsum(dO * O), dx2 = dout * (out > 0): one pass
  Tensor dom = at::empty({B, PD, N}, f.options());
  Tensor delta = at::empty({B, N}, f.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "shsa_attn_bwd_pre", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(acc, "shsa_attn_bwd_pre_acc", [&] {
      using acc_t = scalar_t;
      const out_t* po = o.const_data_ptr<out_t>();
      const out_t* pg = g.const_data_ptr<out_t>();
      const int64_t sob = o.stride(0), soc = o.stride(1), sgb = g.stride(0), sgc = g.stride(1);
      const int64_t sxb = dx2.stride(0), sxc = dx2.stride(1);
      acc_t* pdom = dom.data_ptr<acc_t>();
      acc_t* pdelta = delta.data_ptr<acc_t>();
      out_t* pdx2 = dx2.data_ptr<out_t>();
      parallel_rows(B, 1, [&](int64_t b) {
        acc_t* __restrict__ dl = pdelta + b * N;
        for (int64_t i = 0; i < N; ++i) dl[i] = 0;
        for (int64_t c = 0; c < PD; ++c) {
          const out_t* __restrict__ orow = po + b * sob + c * soc;
          const out_t* __restrict__ grow = pg + b * sgb + c * sgc;
          acc_t* __restrict__ drow = pdom + (b * PD + c) * N;
          for (int64_t i = 0; i < N; ++i) {
            // both operands loaded unconditionally: a branch-free select the compiler vectorises
            const acc_t ov = static_cast<acc_t>(orow[i]);
            const acc_t g0 = static_cast<acc_t>(grow[i]);
            const acc_t gv = ov > acc_t(0) ? g0 : acc_t(0);
            drow[i] = gv;
            dl[i] += gv * ov;
          }
        }
      });
      parallel_rows(B * C2, 16, [&](int64_t row) {
        const int64_t b = row / C2, c = row % C2;
        const out_t* __restrict__ orow = po + b * sob + (PD + c) * soc;
        const out_t* __restrict__ grow = pg + b * sgb + (PD + c) * sgc;
        out_t* __restrict__ xrow = pdx2 + b * sxb + c * sxc;
        for (int64_t i = 0; i < N; ++i) {
          const out_t gv = grow[i];
          xrow[i] = orow[i] > out_t(0) ? gv : out_t(0);
        }
      });
    });
  });
  Tensor q = f.narrow(1, 0, qk_dim), k = f.narrow(1, qk_dim, qk_dim), v = f.narrow(1, 2 * qk_dim, PD);
  Tensor qsT = q.transpose(1, 2).mul(scale);  // (B, N, QK)
  // separate contiguous buffers: GEMMs into channel slices of one buffer fall back to
  // per-image calls in ATen
  Tensor dq = at::empty({B, qk_dim, N}, f.options()), dk = at::empty({B, qk_dim, N}, f.options());
  Tensor dv = at::empty({B, PD, N}, f.options());
  const int64_t tm = p_saved.defined() ? N : query_chunk(B, N, f.element_size());
  for (int64_t m0 = 0; m0 < N; m0 += tm) {
    const int64_t t = std::min(tm, N - m0);
    // (B, t, N) probabilities: the forward's own (one chunk), or recomputed with its kernel
    Tensor p = p_saved.defined() ? p_saved : at::_softmax(at::bmm(qsT.narrow(1, m0, t), k), -1, false);
    Tensor dom_c = dom.narrow(2, m0, t);  // (B, PD, t)
    if (m0 == 0) {
      at::bmm_out(dv, dom_c, p);
    } else {
      dv.baddbmm_(dom_c, p);
    }
    Tensor ds = at::bmm(dom_c.transpose(1, 2), v);  // dP (B, t, N), becomes dS in place
    AT_DISPATCH_FLOATING_TYPES(acc, "shsa_attn_bwd_ds", [&] {
      scalar_t* pds = ds.data_ptr<scalar_t>();
      const scalar_t* pp = p.const_data_ptr<scalar_t>();
      const scalar_t* pdl = delta.const_data_ptr<scalar_t>();
      parallel_rows(B * t, 16, [&](int64_t row) {
        const int64_t b = row / t, i = row % t;
        const scalar_t d = pdl[b * N + m0 + i];
        scalar_t* r = pds + row * N;
        const scalar_t* pr = pp + row * N;
        for (int64_t j = 0; j < N; ++j) r[j] = pr[j] * (r[j] - d);
      });
    });
    // dq = scale * k @ dS^T, dk = scale * q @ dS (the scale applied by the GEMMs' alpha)
    if (t == N) {
      at::bmm_out(dq, k, ds.transpose(1, 2));
    } else {
      dq.narrow(2, m0, t).copy_(at::bmm(k, ds.transpose(1, 2)));  // (B, QK, t)
    }
    Tensor qc = q.narrow(2, m0, t);
    if (m0 == 0) {
      at::bmm_out(dk, qc, ds);
    } else {
      dk.baddbmm_(qc, ds);
    }
  }
  dq.mul_(scale);
  dk.mul_(scale);
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor> shsa_attn_bwd(const Tensor& dout, const Tensor& qkv, const Tensor& out,
                                         const Tensor& lse, int64_t qk_dim, double scale) {
  NoAutocast no_autocast;
  check_input(qkv, "qkv");
  check_input(out, "out");
  check_input(dout, "dout");
  TORCH_CHECK(dout.sizes() == out.sizes(), "dout must have the shape of out ", out.sizes(), ", got ",
              dout.sizes());
  const int64_t B = qkv.size(0), CQ = qkv.size(1), H = qkv.size(2), W = qkv.size(3), N = H * W;
  const int64_t PD = CQ - 2 * qk_dim, CO = out.size(1), C2 = CO - PD;
  const auto acc = acc_type(qkv.scalar_type());
  (void)lse;  // probabilities are recomputed with the forward's own softmax kernel
  Tensor dx2 = at::empty({B, C2, H, W}, out.options());
  if (B == 0 || N == 0) return {at::zeros_like(qkv, at::MemoryFormat::Contiguous), dx2};
  if (attention_cm(qkv, out) && dout.scalar_type() == at::kFloat) {
    Tensor dqkv = at::empty({B, CQ, H, W}, qkv.options().memory_format(at::MemoryFormat::Contiguous));
    Tensor dqkv3 = dqkv.view({B, CQ, N}), dx2v = dx2.view({B, C2, N});
    attention_backward_cm(as_bcn(dout), as_bcn(qkv), as_bcn(out), qk_dim, scale, Tensor(), dx2v, dqkv3);
    return {dqkv, dx2};
  }
  Tensor f = as_bcn(qkv.scalar_type() == acc ? qkv : qkv.to(acc));
  Tensor dx2v = dx2.view({B, C2, N});
  auto [dq, dk, dv] = attention_backward_core(dout, f, out, qk_dim, scale, Tensor(), dx2v);
  Tensor dqkv = at::cat({dq, dk, dv}, 1).view({B, CQ, H, W});
  return {dqkv.scalar_type() == qkv.scalar_type() ? dqkv : dqkv.to(qkv.scalar_type()), dx2};
}

TORCH_LIBRARY_IMPL(shvit_cpp, CPU, m) {
  m.impl("shsa_attn_fwd", &shsa_attn_fwd);
  m.impl("shsa_attn_bwd", &shsa_attn_bwd);
}

}  // namespace shvit_cpu
