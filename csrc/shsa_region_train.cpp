// The SHSA mixer region in training, forward and backward in one CPU op:
//   GroupNorm(x1) -> 1x1 conv (qkv) -> BatchNorm with batch statistics -> attention + concat + ReLU
// (shvit_cpp::shsa_region_train, used by shvit.SHSA(fused=True) in training on the cpp backend).
//
// PyTorch runs the qkv Conv2d_BN of the training path as oneDNN's NCHW 1x1 convolution and
// BatchNorm kernels, which at SHViT's sizes cost more than the attention itself. Here, in
// float32 on the packed GEMM (gemm.h), channel-major: the conv is one GEMM per image whose
// packing normalises x1 (GroupNorm's affine folded into the weight and a row bias), so the
// GroupNorm output is never stored; BatchNorm statistics are taken over its output rows, and
// the attention (attention_cm.h) reads q, k, v from the normalised buffer in place, one image
// per task, keeping its probability panels for the backward. The backward's attention GEMMs
// work on those panels the same way; it writes dz as channel rows across the batch: the
// weight gradient is one GEMM over k = B*N, and dY per image feeds the GroupNorm backward
// while it is in cache. float64 (and CPUs without AVX2) run the same steps token-major on
// ATen's GEMMs.
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "attention_cm.h"
#include "attention_core.h"
#include "common.h"
#include "gemm.h"
#include "region_train.h"

namespace shvit_cpu {

namespace {

// Offsets into RegionForward::stats: one small tensor instead of five.
struct Stats {
  int64_t B, CQ;
  int64_t gn_mu() const { return 0; }
  int64_t gn_r() const { return B; }
  int64_t bn_inv() const { return 2 * B; }
  int64_t mean() const { return 2 * B + CQ; }
  int64_t var() const { return 2 * B + 2 * CQ; }
  int64_t size() const { return 2 * B + 3 * CQ; }
};

template <typename scalar_t>
void gn_token_major(const Tensor& xv, int64_t P, double eps, const Tensor& gw, const Tensor& gb, Tensor& yT,
                    scalar_t* pmu, scalar_t* pr) {
  const int64_t B = xv.size(0), N = xv.size(2), sb = xv.stride(0), sc = xv.stride(1);
  const scalar_t* px = xv.const_data_ptr<scalar_t>();
  const scalar_t* pw = gw.const_data_ptr<scalar_t>();
  const scalar_t* pb = gb.const_data_ptr<scalar_t>();
  scalar_t* py = yT.data_ptr<scalar_t>();
  parallel_rows(B, 1, [&](int64_t b) {
    const scalar_t* xb = px + b * sb;
    const auto mom = rows_moments<scalar_t, scalar_t>(xb, P, sc, N);
    const scalar_t mu = mom.first;
    const double var = mom.second;
    const scalar_t r = static_cast<scalar_t>(1.0 / std::sqrt(var + eps));
    pmu[b] = mu;
    pr[b] = r;
    scalar_t* yb = py + b * N * P;
    for (int64_t c = 0; c < P; ++c) {
      const scalar_t a = r * pw[c], o = pb[c] - mu * a;
      const scalar_t* row = xb + c * sc;
      for (int64_t n = 0; n < N; ++n) yb[n * P + c] = row[n] * a + o;
    }
  });
}

// BatchNorm with batch statistics on the conv output, channel-major in zhat (B, CQ, N):
// per-channel mean and biased variance (batch_channel_moments: rows in order, independent of
// the thread count), then zhat normalised in place and the affine output qkv.
// zhat (B, CQ, N) holds the conv output on entry.
template <typename scalar_t>
void bn_train_forward(const Tensor& bw, const Tensor& bb, double eps, Tensor& zhat, Tensor& qkv, scalar_t* pmean,
                      scalar_t* pvar, scalar_t* pinv) {
  const int64_t B = zhat.size(0), CQ = zhat.size(1), N = zhat.size(2);
  scalar_t* ph = zhat.data_ptr<scalar_t>();
  scalar_t* pq = qkv.data_ptr<scalar_t>();
  const scalar_t* pbw = bw.const_data_ptr<scalar_t>();
  const scalar_t* pbb = bb.const_data_ptr<scalar_t>();
  at::parallel_for(0, CQ, 8, [&](int64_t c0, int64_t c1) {
    std::vector<scalar_t> mus(static_cast<size_t>(c1 - c0));
    std::vector<double> vars(static_cast<size_t>(c1 - c0));
    batch_channel_moments<scalar_t>(ph, B, N, CQ * N, N, c0, c1, mus.data(), vars.data());
    for (int64_t c = c0; c < c1; ++c) {
      pmean[c] = mus[c - c0];
      pvar[c] = static_cast<scalar_t>(vars[c - c0]);
      pinv[c] = static_cast<scalar_t>(1.0 / std::sqrt(vars[c - c0] + eps));
    }
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = c0; c < c1; ++c) {
        const scalar_t mu = pmean[c], inv = pinv[c], w = pbw[c], o = pbb[c];
        scalar_t* h = ph + (b * CQ + c) * N;
        scalar_t* q = pq + (b * CQ + c) * N;
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t v = (h[n] - mu) * inv;
          h[n] = v;
          q[n] = v * w + o;
        }
      }
    }
  });
}

// GroupNorm backward of one image, in place: g (P rows of N) holds dY on entry and dx on exit;
// channel c of x at xb + c * sc (unit token stride); dgw, dgb get the image's partial weight
// and bias gradients. With add, row c of the result also gets add + c * sa added (a residual
// branch's gradient).
template <typename T>
void gn_backward_image(T* g, int64_t N, const T* xb, int64_t sc, int64_t P, const T* gw, T mu, T r, T* dgw,
                       T* dgb, const T* add = nullptr, int64_t sa = 0) {
  double c1 = 0, c2 = 0;
  for (int64_t c = 0; c < P; ++c) {
    const auto ds = row_dot_sum<T, T>(g + c * N, xb + c * sc, N, mu);
    const T sdyx = ds.first * r;
    dgw[c] = sdyx;
    dgb[c] = ds.second;
    c1 += static_cast<double>(gw[c]) * ds.second;
    c2 += static_cast<double>(gw[c]) * sdyx;
  }
  const double inv_cnt = 1.0 / static_cast<double>(P * N);
  const T m1 = static_cast<T>(c1 * inv_cnt), m2 = static_cast<T>(c2 * inv_cnt);
  for (int64_t c = 0; c < P; ++c) {
    const T* xr = xb + c * sc;
    T* gr = g + c * N;
    const T wc = gw[c];
    for (int64_t n = 0; n < N; ++n) {
      const T xh = (xr[n] - mu) * r;
      gr[n] = r * (gr[n] * wc - m1 - xh * m2);
    }
    if (add != nullptr) {  // a second loop over the row (in L1): the sum rounds as a separate add would
      const T* ar = add + c * sa;
      for (int64_t n = 0; n < N; ++n) gr[n] += ar[n];
    }
  }
}

// The float32 path on the packed GEMM (gemm.h), channel-major throughout: no activation is
// transposed and the GroupNorm output is never stored (the GEMMs' packing normalises x1).
bool region_cm(const Tensor& x) { return x.scalar_type() == at::kFloat && shvit_gemm::available(); }

// z_b (CQ, N) = W @ GroupNorm(x1_b) = (W diag(gamma)) @ xhat_b + W @ beta, one packed GEMM per
// image with xhat_b = (x1_b - mu_b) * r_b written into the token panels.
void conv_forward_cm(const Tensor& xv, int64_t P, double eps, const float* gw, const float* gb, const float* w,
                     float* pmu, float* pr, Tensor& z) {
  const int64_t B = xv.size(0), N = xv.size(2), sb = xv.stride(0), sc = xv.stride(1), CQ = z.size(1);
  // W diag(gamma) (CQ, P) and the row bias W beta (CQ)
  std::vector<float> wg(static_cast<size_t>(CQ * P)), wb(static_cast<size_t>(CQ));
  for (int64_t o = 0; o < CQ; ++o) {
    double acc = 0;
    for (int64_t c = 0; c < P; ++c) {
      wg[o * P + c] = w[o * P + c] * gw[c];
      acc += static_cast<double>(w[o * P + c]) * gb[c];
    }
    wb[o] = static_cast<float>(acc);
  }
  const float* px = xv.const_data_ptr<float>();
  const float* pa = wg.data();
  float* pz = z.data_ptr<float>();
  shvit_gemm::Epilogue epi;
  epi.row_bias = wb.data();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    const Scratch panels(kScratchPanels, static_cast<size_t>(shvit_gemm::packed_size(N, P)));
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = px + b * sb;
      const auto mom = rows_moments<float, float>(xb, P, sc, N);
      const float r = static_cast<float>(1.0 / std::sqrt(mom.second + eps));
      pmu[b] = mom.first;
      pr[b] = r;
      pack_tokens_normalized(xb, sc, P, N, mom.first, r, panels.data());
      shvit_gemm::gemm_packed(CQ, N, P, pa, P, panels.data(), pz + b * CQ * N, N, epi);
    }
  });
}

// The conv's gradients from dz (CQ, B*N) (channel rows across the batch), with add (B, >= P, N;
// unit token stride; or undefined) summed into dx3's channels:
//   dW = dz @ Y^T, one GEMM over k = B*N with Y = GroupNorm(x1) packed as a (P, B*N) weight;
//   per image, dY_b = W^T @ dz_b, then the GroupNorm backward into dx3 channels [0, P).
void conv_gn_backward_cm(const Tensor& dz, const Tensor& xv, int64_t P, const float* w, const float* pgw,
                         const float* pgb, const float* pmu, const float* pr, Tensor& dw, Tensor& dx3, float* pdgw,
                         float* pdgb, const Tensor& add) {
  constexpr int64_t kP = shvit_gemm::kPanel;
  const int64_t B = xv.size(0), N = xv.size(2), sb = xv.stride(0), sc = xv.stride(1), CQ = dz.size(0);
  const int64_t K = B * N, CO = dx3.size(1);
  const float* px = xv.const_data_ptr<float>();
  const float* pdz = dz.const_data_ptr<float>();
  const int64_t np = (P + kP - 1) / kP;
  const Scratch yp(kScratchA, static_cast<size_t>(np * K * kP));
  parallel_rows(B, 1, [&](int64_t b) {  // image b's k-range of every panel of Y
    // Y_b's rows (the GroupNorm output), then packed by 8 x 8 register transposes
    thread_local std::vector<float> y;
    y.resize(static_cast<size_t>(P * N));
    const float mu = pmu[b], r = pr[b];
    for (int64_t c = 0; c < P; ++c) {
      const float* src = px + b * sb + c * sc;
      float* yr = y.data() + c * N;
      const float a = r * pgw[c], o = pgb[c] - mu * a;
      for (int64_t n = 0; n < N; ++n) yr[n] = src[n] * a + o;
    }
    shvit_gemm::pack_weight_cols(y.data(), P, N, N, yp.data() + b * N * kP, K * kP);
  });
  float* pw = dw.data_ptr<float>();
  at::parallel_for(0, CQ, 6, [&](int64_t r0, int64_t r1) {
    shvit_gemm::gemm_packed(r1 - r0, P, K, pdz + r0 * K, K, yp.data(), pw + r0 * P, P, shvit_gemm::Epilogue{});
  });
  std::vector<float> wt(static_cast<size_t>(P * CQ));  // W^T (P, CQ)
  shvit_gemm::transpose(w, P, wt.data(), CQ, CQ, P);
  const float* pwt = wt.data();
  float* pdx = dx3.data_ptr<float>();
  const float* pa = add.defined() ? add.const_data_ptr<float>() : nullptr;
  const int64_t sab = pa ? add.stride(0) : 0, sac = pa ? add.stride(1) : 0;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    const Scratch panels(kScratchPanels, static_cast<size_t>(shvit_gemm::packed_size(N, CQ)));
    for (int64_t b = b0; b < b1; ++b) {
      float* g = pdx + b * CO * N;  // dY_b, then the GroupNorm gradient, in place
      pack_tokens_copy(pdz + b * N, K, CQ, N, panels.data());
      shvit_gemm::gemm_packed(P, N, CQ, pwt, CQ, panels.data(), g, N, shvit_gemm::Epilogue{});
      gn_backward_image<float>(g, N, px + b * sb, sc, P, pgw, pmu[b], pr[b], pdgw + b * P, pdgb + b * P,
                               pa != nullptr ? pa + b * sab : nullptr, sac);
    }
  });
}

// BatchNorm backward with batch statistics, channel-major: d (B, CQ, N), given as the three
// channel groups dq, dk, dv (each (B, width, N) with unit token stride and channel stride N,
// any image stride), holds dL/d(output). dz goes to dzT: token-major (B*N, CQ), with d
// overwritten by dz too, for ATen's GEMMs; or, with channel_rows, as (CQ, B*N) for the packed
// GEMMs.
template <typename scalar_t>
void bn_train_backward(std::array<Tensor, 3>& parts, const Tensor& zhat, const scalar_t* pi, const Tensor& bw,
                       Tensor& dzT, Tensor& dbw, Tensor& dbb, bool channel_rows) {
  const int64_t B = zhat.size(0), CQ = zhat.size(1), N = zhat.size(2), M = B * N;
  // row pointer of channel c of image b
  std::array<scalar_t*, 3> base;
  std::array<int64_t, 3> width, stride;
  for (int i = 0; i < 3; ++i) {
    base[i] = parts[i].data_ptr<scalar_t>();
    width[i] = parts[i].size(1);
    stride[i] = parts[i].stride(0);
  }
  auto row = [&](int64_t b, int64_t c) {
    int i = 0;
    while (c >= width[i]) c -= width[i++];
    return base[i] + b * stride[i] + c * N;
  };
  const scalar_t* ph = zhat.const_data_ptr<scalar_t>();
  const scalar_t* pw = bw.const_data_ptr<scalar_t>();
  std::vector<double> s1(CQ, 0.0), s2(CQ, 0.0);
  for (int64_t b = 0; b < B; ++b) {  // in order: independent of the thread count
    for (int64_t c = 0; c < CQ; ++c) {
      const scalar_t* dr = row(b, c);
      const scalar_t* hr = ph + (b * CQ + c) * N;
      // in double: dz below is a small difference of these terms (BatchNorm removes the
      // mean and the zhat-component of the incoming gradient)
      const auto ds = row_dot_sum<scalar_t, double>(dr, hr, N, 0.0);  // (sum(d * zhat), sum(d)), one pass
      s1[c] += ds.second;
      s2[c] += ds.first;
    }
  }
  scalar_t* pdbw = dbw.data_ptr<scalar_t>();
  scalar_t* pdbb = dbb.data_ptr<scalar_t>();
  std::vector<double> a(CQ), m1(CQ), m2(CQ);
  for (int64_t c = 0; c < CQ; ++c) {
    pdbb[c] = static_cast<scalar_t>(s1[c]);
    pdbw[c] = static_cast<scalar_t>(s2[c]);
    // dz = w * inv * (d - mean(d) - zhat * mean(d * zhat)), the difference taken in double
    a[c] = static_cast<double>(pw[c]) * static_cast<double>(pi[c]);
    m1[c] = s1[c] / M;
    m2[c] = s2[c] / M;
  }
  scalar_t* pz = dzT.data_ptr<scalar_t>();
  parallel_rows(B, 1, [&](int64_t b) {
    const scalar_t* hb = ph + b * CQ * N;
    for (int64_t c = 0; c < CQ; ++c) {
      scalar_t* dr = row(b, c);
      // channel_rows: dz goes to dzT as (CQ, B*N), channel rows across the batch
      scalar_t* dst = channel_rows ? pz + c * M + b * N : dr;
      const double ac = a[c], u = m1[c], w = m2[c];
      for (int64_t n = 0; n < N; ++n) {
        dst[n] = static_cast<scalar_t>(ac * (static_cast<double>(dr[n]) - u - static_cast<double>(hb[c * N + n]) * w));
      }
    }
    if (channel_rows) return;
    // token-major copy, 8 channels x 8 tokens at a time
    scalar_t* zb = pz + b * N * CQ;
    for (int64_t c0 = 0; c0 < CQ; c0 += 8) {
      const int64_t tc = std::min<int64_t>(8, CQ - c0);
      const scalar_t* rows[8];
      for (int64_t j = 0; j < tc; ++j) rows[j] = row(b, c0 + j);
      for (int64_t n = 0; n < N; ++n) {
        scalar_t* dst = zb + n * CQ + c0;
        for (int64_t j = 0; j < tc; ++j) dst[j] = rows[j][n];
      }
    }
  });
}

template <typename scalar_t>
void gn_backward_token_major(const Tensor& dyT, const Tensor& xv, int64_t P, const Tensor& gw, const scalar_t* pmu,
                             const scalar_t* pr, Tensor& dx3, scalar_t* pdw, scalar_t* pdb) {
  // dyT (B*N, P) token-major; xv (B, C, N) with unit token stride; dx3 (B, C, N) channels [0, P)
  const int64_t B = xv.size(0), N = xv.size(2), sb = xv.stride(0), sc = xv.stride(1), CO = dx3.size(1);
  const scalar_t* pdy = dyT.const_data_ptr<scalar_t>();
  const scalar_t* px = xv.const_data_ptr<scalar_t>();
  const scalar_t* pw = gw.const_data_ptr<scalar_t>();
  scalar_t* pdx = dx3.data_ptr<scalar_t>();
  parallel_rows(B, 1, [&](int64_t b) {
    // dx channel-major first holds dy (transposed), then the gradient
    scalar_t* dxb = pdx + b * CO * N;
    transpose_map(pdy + b * N * P, P, dxb, N, N, P, [](scalar_t v, int64_t, int64_t) { return v; });
    gn_backward_image<scalar_t>(dxb, N, px + b * sb, sc, P, pw, pmu[b], pr[b], pdw + b * P, pdb + b * P);
  });
}

}  // namespace

void check_region_args(const Tensor& x, const Tensor& gw, const Tensor& gb, const Tensor& cw, const Tensor& bw,
                       const Tensor& bb, const Tensor& rm, const Tensor& rv, int64_t pdim, int64_t qk_dim) {
  check_input(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "shsa_region_train supports float32 and float64, got ", x.scalar_type());
  const int64_t C = x.size(1), CQ = 2 * qk_dim + pdim;
  TORCH_CHECK(pdim > 0 && pdim < C, "pdim must be in 1..", C - 1, ", got ", pdim);
  TORCH_CHECK(qk_dim > 0, "qk_dim must be positive, got ", qk_dim);
  TORCH_CHECK(cw.numel() == CQ * pdim && cw.size(0) == CQ, "conv_weight must be (", CQ, ", ", pdim,
              ", 1, 1), got ", cw.sizes());
  auto check_vec = [](const Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK(t.numel() == n, name, " must have ", n, " elements, got ", t.numel());
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  };
  check_vec(gw, pdim, "gn_weight");
  check_vec(gb, pdim, "gn_bias");
  check_vec(bw, CQ, "bn_weight");
  check_vec(bb, CQ, "bn_bias");
  check_vec(rm, CQ, "running_mean");
  check_vec(rv, CQ, "running_var");
  TORCH_CHECK(cw.device().is_cpu(), "conv_weight must be a CPU tensor, got ", cw.device());
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 1,
              "Expected more than 1 value per channel when training, got input size ", x.sizes());
}

RegionForward region_forward(const Tensor& x, const Tensor& gw, const Tensor& gb, const Tensor& cw,
                             const Tensor& bw, const Tensor& bb, Tensor& rm, Tensor& rv, double momentum,
                             double gn_eps, double bn_eps, int64_t pdim, int64_t qk_dim, double scale,
                             bool keep_p) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), N = H * W, M = B * N;
  const int64_t P = pdim, QK = qk_dim, CQ = 2 * QK + P;
  const auto opt = x.options();
  const auto dt = x.scalar_type();
  const Stats st{B, CQ};
  RegionForward f;
  Tensor xv = as_bcn(x);
  Tensor gwc = contiguous_as(gw, dt), gbc = contiguous_as(gb, dt);
  Tensor bwc = contiguous_as(bw, dt), bbc = contiguous_as(bb, dt);
  Tensor cwc = contiguous_as(cw, dt);  // (CQ, P, 1, 1): rows of P
  f.stats = at::empty({st.size()}, opt);
  f.zhat = at::empty({B, CQ, N}, opt);
  f.qkv = at::empty({B, CQ, N}, opt);
  if (region_cm(x)) {
    float* ps = f.stats.data_ptr<float>();
    conv_forward_cm(xv, P, gn_eps, gwc.const_data_ptr<float>(), gbc.const_data_ptr<float>(),
                    cwc.const_data_ptr<float>(), ps + st.gn_mu(), ps + st.gn_r(), f.zhat);
  } else {
    f.yT = at::empty({M, P}, opt);
    AT_DISPATCH_FLOATING_TYPES(dt, "shsa_region_gn", [&] {
      scalar_t* ps = f.stats.data_ptr<scalar_t>();
      gn_token_major<scalar_t>(xv, P, gn_eps, gwc, gbc, f.yT, ps + st.gn_mu(), ps + st.gn_r());
    });
    Tensor zT = at::mm(f.yT, cwc.view({CQ, P}).t());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shsa_region_tr", [&] {
      parallel_rows(B, 1, [&](int64_t b) {
        transpose_map(zT.const_data_ptr<scalar_t>() + b * N * CQ, CQ, f.zhat.data_ptr<scalar_t>() + b * CQ * N, N,
                      N, CQ, [](scalar_t v, int64_t, int64_t) { return v; });
      });
    });
  }
  AT_DISPATCH_FLOATING_TYPES(dt, "shsa_region_bn", [&] {
    scalar_t* ps = f.stats.data_ptr<scalar_t>();
    bn_train_forward<scalar_t>(bwc, bbc, bn_eps, f.zhat, f.qkv, ps + st.mean(), ps + st.var(), ps + st.bn_inv());
    // running statistics as nn.BatchNorm2d updates them (unbiased variance)
    update_running_stat<scalar_t>(rm, ps + st.mean(), CQ, momentum, 1.0);
    update_running_stat<scalar_t>(rv, ps + st.var(), CQ, momentum, static_cast<double>(M) / (M - 1));
  });
  f.out = at::empty({B, C, H, W}, opt.memory_format(at::MemoryFormat::Contiguous));
  Tensor out3 = f.out.view({B, C, N});
  if (region_cm(x)) {
    attention_forward_cm(f.qkv, xv.narrow(1, P, C - P), QK, scale, out3, keep_p ? &f.p : nullptr, nullptr);
    return f;
  }
  Tensor qsT = f.qkv.narrow(1, 0, QK).transpose(1, 2).mul(scale);  // (B, N, QK)
  Tensor k = f.qkv.narrow(1, QK, QK);
  Tensor v = f.qkv.narrow(1, 2 * QK, P);
  attention_forward_core(qsT, k, v, xv.narrow(1, P, C - P), out3, nullptr, keep_p ? &f.p : nullptr);
  return f;
}

// The backward of region_forward (f its result, kept with keep_p): the gradients of x, gn_weight,
// gn_bias, conv_weight, bn_weight and bn_bias, in that order, from dout (the gradient of f.out).
// With dx_add (B, C, N; unit token stride) defined, dx is that tensor plus the region's
// gradient, summed where dx is written (a residual branch's gradient: no extra pass).
std::array<Tensor, 6> region_backward(const Tensor& x, const Tensor& gw, const Tensor& gb, const Tensor& cw,
                                      const Tensor& bw, const RegionForward& f, int64_t pdim, int64_t qk_dim,
                                      double scale, const Tensor& dout_in, const Tensor& dx_add) {
  const Tensor add = dx_add.defined() ? as_bcn(cast_to(dx_add, x.scalar_type())) : Tensor();
  const Tensor &out = f.out, &yT = f.yT, &zhat = f.zhat, &qkv = f.qkv, &p = f.p, &stats = f.stats;
  const int64_t P = pdim, QK = qk_dim;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), N = H * W, M = B * N;
  const int64_t CQ = 2 * QK + P;
  const Stats st{B, CQ};
  const auto dt = x.scalar_type();
  const Tensor dout = cast_to(dout_in, dt);
  Tensor dx = at::empty({B, C, H, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dx3 = dx.view({B, C, N});
  // attention + concat + ReLU: d(qkv) channel-major; the gradient of x2 straight into dx
  const bool cm = region_cm(x);
  std::array<Tensor, 3> parts;
  Tensor dx2 = dx3.narrow(1, P, C - P);
  if (cm) {
    Tensor dqkv = at::empty({B, CQ, N}, x.options());
    attention_backward_cm(as_bcn(dout), qkv, as_bcn(out), QK, scale, p, dx2, dqkv,
                          add.defined() ? add.narrow(1, P, C - P) : Tensor());
    parts = {dqkv.narrow(1, 0, QK), dqkv.narrow(1, QK, QK), dqkv.narrow(1, 2 * QK, P)};
  } else {
    auto [dq, dk, dv] = attention_backward_core(dout, qkv, out, QK, scale, p, dx2);
    parts = {dq, dk, dv};
  }
  // BatchNorm (batch statistics), then the conv's two GEMMs
  Tensor dT = at::empty(cm ? at::IntArrayRef{CQ, M} : at::IntArrayRef{M, CQ}, x.options());
  Tensor dbw = at::empty({CQ}, x.options()), dbb = at::empty({CQ}, x.options());
  Tensor bwc = contiguous_as(bw, dt);
  AT_DISPATCH_FLOATING_TYPES(dt, "shsa_region_bn_bwd", [&] {
    bn_train_backward<scalar_t>(parts, zhat, stats.const_data_ptr<scalar_t>() + st.bn_inv(), bwc, dT, dbw, dbb,
                                cm);
  });
  Tensor cwc = contiguous_as(cw, dt);  // (CQ, P, 1, 1)
  // GroupNorm, written into the first P channels of dx; its parameter gradients per image first
  std::vector<char> part_mem(static_cast<size_t>(2 * B * P) * x.element_size());
  Tensor gwc = contiguous_as(gw, dt);
  Tensor xv = as_bcn(x);
  Tensor dcw = at::empty(cw.sizes(), x.options());
  if (cm) {
    float* part = reinterpret_cast<float*>(part_mem.data());
    const float* ps = stats.const_data_ptr<float>();
    conv_gn_backward_cm(dT, xv, P, cwc.const_data_ptr<float>(), gwc.const_data_ptr<float>(),
                        contiguous_as(gb, dt).const_data_ptr<float>(), ps + st.gn_mu(), ps + st.gn_r(), dcw, dx3,
                        part, part + B * P, add);
  } else {
    Tensor dcw2 = dcw.view({CQ, P});
    at::mm_out(dcw2, dT.t(), yT);
    Tensor dyT = at::mm(dT, cwc.view({CQ, P}));  // (M, P)
    AT_DISPATCH_FLOATING_TYPES(dt, "shsa_region_gn_bwd", [&] {
      scalar_t* part = reinterpret_cast<scalar_t*>(part_mem.data());
      const scalar_t* ps = stats.const_data_ptr<scalar_t>();
      gn_backward_token_major<scalar_t>(dyT, xv, P, gwc, ps + st.gn_mu(), ps + st.gn_r(), dx3, part, part + B * P);
    });
  }
  if (!cm && add.defined()) dx3.add_(add);
  Tensor dgw = at::empty({P}, x.options()), dgb = at::empty({P}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "shsa_region_gn_params", [&] {
    const scalar_t* part = reinterpret_cast<const scalar_t*>(part_mem.data());
    scalar_t* pw = dgw.data_ptr<scalar_t>();
    scalar_t* pb = dgb.data_ptr<scalar_t>();
    for (int64_t c = 0; c < P; ++c) {  // over the images in order: independent of the thread count
      double sw = 0, sb = 0;
      for (int64_t b = 0; b < B; ++b) {
        sw += part[b * P + c];
        sb += part[(B + b) * P + c];
      }
      pw[c] = static_cast<scalar_t>(sw);
      pb[c] = static_cast<scalar_t>(sb);
    }
  });
  return {dx, cast_to(dgw, gw.scalar_type()), cast_to(dgb, gw.scalar_type()), cast_to(dcw, cw.scalar_type()),
          cast_to(dbw, bw.scalar_type()), cast_to(dbb, bw.scalar_type())};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct ShsaRegionTrain : public torch::autograd::Function<ShsaRegionTrain> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& gw, const Tensor& gb,
                        const Tensor& cw, const Tensor& bw, const Tensor& bb, Tensor rm, Tensor rv,
                        double momentum, double gn_eps, double bn_eps, int64_t pdim, int64_t qk_dim,
                        double scale) {
    RegionForward f =
        region_forward(x, gw, gb, cw, bw, bb, rm, rv, momentum, gn_eps, bn_eps, pdim, qk_dim, scale, true);
    save_region(ctx, x, gw, gb, cw, bw, f, {}, pdim, qk_dim, scale);
    return f.out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    NoAutocast no_autocast;
    const auto s = ctx->get_saved_variables();
    const auto g = region_backward(s[0], s[1], s[2], s[3], s[4], region_saved(s, 5), ctx->saved_data["pdim"].toInt(),
                                   ctx->saved_data["qk_dim"].toInt(), ctx->saved_data["scale"].toDouble(), grads[0],
                                   Tensor());
    variable_list out(g.begin(), g.end());
    out.resize(14);
    return out;
  }
};

Tensor shsa_region_train(const Tensor& x, const Tensor& gn_weight, const Tensor& gn_bias, const Tensor& conv_weight,
                         const Tensor& bn_weight, const Tensor& bn_bias, Tensor& running_mean, Tensor& running_var,
                         double momentum, double gn_eps, double bn_eps, int64_t pdim, int64_t qk_dim, double scale,
                         const std::optional<Tensor>& num_batches_tracked) {
  NoAutocast no_autocast;
  check_region_args(x, gn_weight, gn_bias, conv_weight, bn_weight, bn_bias, running_mean, running_var, pdim, qk_dim);
  count_batch(num_batches_tracked);
  bool grad = false;
  if (at::GradMode::is_enabled()) {
    for (const auto* t : {&x, &gn_weight, &gn_bias, &conv_weight, &bn_weight, &bn_bias}) grad |= t->requires_grad();
  }
  if (!grad) {
    return region_forward(x, gn_weight, gn_bias, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                          momentum, gn_eps, bn_eps, pdim, qk_dim, scale, false)
        .out;
  }
  return ShsaRegionTrain::apply(x, gn_weight, gn_bias, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                                momentum, gn_eps, bn_eps, pdim, qk_dim, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shvit_cpp, m) {
  m.def(
      "shsa_region_train(Tensor x, Tensor gn_weight, Tensor gn_bias, Tensor conv_weight, Tensor bn_weight, "
      "Tensor bn_bias, Tensor(a!) running_mean, Tensor(b!) running_var, float momentum, float gn_eps, "
      "float bn_eps, int pdim, int qk_dim, float scale, Tensor(c!)? num_batches_tracked=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(shvit_cpp, CompositeImplicitAutograd, m) {
  m.impl("shsa_region_train", &shsa_region_train);
}

}  // namespace shvit_cpu
