// The SHSA mixer up to its projection for inference: CPU kernel of shvit_cpp::shsa_infer
// (see shvit_kernels/shsa_inference.py). One pass normalises x1 into a token-major buffer,
// one GEMM over all B*N tokens projects it to q, k, v (GroupNorm affine, BatchNorm and
// scale folded into the weight), then the shared attention core writes the output.
#include <torch/library.h>

#include <vector>

#include "attention/attention_cm.h"
#include "attention/attention_core.h"
#include "common.h"
#include "gemm/gemm.h"
#include "gemm/gemm_threads.h"

namespace shvit_cpu {

namespace {
template <typename scalar_t, typename acc_t>
void normalize_token_major(const Tensor& x, int64_t pdim, double eps, Tensor& xhT) {
  // xhT[b * N + n, c] = (x[b, c, n] - mean_b) * rstd_b over the first pdim channels
  const int64_t B = x.size(0), N = x.size(2);
  const int64_t sb = x.stride(0), sc = x.stride(1);
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  acc_t* py = xhT.data_ptr<acc_t>();
  parallel_rows(B, 1, [&](int64_t b) {
    const scalar_t* xb = px + b * sb;
    const auto mom = rows_moments<scalar_t, acc_t>(xb, pdim, sc, N);
    const acc_t mu = mom.first;
    const double var = mom.second;
    const acc_t r = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
    acc_t* yb = py + b * N * pdim;
    // channel-major (pdim, N) rows of x -> token-major (N, pdim)
    transpose_map(xb, sc, yb, pdim, pdim, N,
                  [&](scalar_t v, int64_t, int64_t) { return (static_cast<acc_t>(v) - mu) * r; });
  });
}
}  // namespace

namespace {
// xhT[r, c] = (x[r, c] - mean_b) * rstd_b for the first pdim entries of each token row of a
// token-major (channels_last) x viewed as (B*N, C) with row stride C.
template <typename scalar_t, typename acc_t>
void normalize_rows(const scalar_t* px, int64_t B, int64_t N, int64_t C, int64_t pdim, double eps, acc_t* py) {
  parallel_rows(B, 1, [&](int64_t b) {
    const scalar_t* xb = px + b * N * C;
    const auto mom = rows_moments<scalar_t, acc_t>(xb, N, C, pdim);
    const acc_t mu = mom.first;
    const double var = mom.second;
    const acc_t r = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
    acc_t* yb = py + b * N * pdim;
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* xr = xb + n * C;
      acc_t* yr = yb + n * pdim;
      for (int64_t c = 0; c < pdim; ++c) yr[c] = (static_cast<acc_t>(xr[c]) - mu) * r;
    }
  });
}

// Whether a float32 GEMM can take the packed kernel with this pre-packed weight (from
// shvit_cpp::pack_weight of an (n, k) weight).
bool packed_usable(const std::optional<Tensor>& wp, const Tensor& a, int64_t n, int64_t k) {
  return wp.has_value() && a.scalar_type() == at::kFloat && shvit_gemm::available() && wp->device().is_cpu() &&
         wp->scalar_type() == at::kFloat && wp->is_contiguous() && wp->dim() == 3 &&
         wp->size(0) == (n + shvit_gemm::kPanel - 1) / shvit_gemm::kPanel && wp->size(1) == k &&
         wp->size(2) == shvit_gemm::kPanel;
}

// c (m, n) = a (m, k) @ W^T + bias (+ residual, same layout as c), rows split across threads.
void packed_gemm_rows(const float* a, int64_t m, int64_t k, const Tensor& wp, const float* bias, const float* res,
                      float* c, int64_t n) {
  shvit_gemm::Epilogue e;
  e.bias = bias;
  e.residual = res;
  e.ldr = n;
  gemm_packed_threads(m, n, k, a, wp.const_data_ptr<float>(), c, e);
}

// z[b * N + i, 0:PD] = ReLU(softmax(q_i K_b^T) V_b) for a token-major float32 qkv (B * N, CQ)
// whose q carries the scale: per (image, query chunk), two packed GEMMs around a row softmax;
// memory per thread linear in N (a chunk x N score tile, never N x N per image).
void attention_tokens_f32(const float* qkv, int64_t B, int64_t N, int64_t QK, int64_t PD, float* z, int64_t ldz) {
  const int64_t CQ = 2 * QK + PD;
  const int64_t tq = std::min<int64_t>(N, 96);
  const int64_t chunks = (N + tq - 1) / tq;
  parallel_tiles(B * chunks, [&](const auto& take) {  // (image, query chunk)
    std::vector<float> kp(static_cast<size_t>(shvit_gemm::packed_size(N, QK)));
    std::vector<float> vp(static_cast<size_t>(shvit_gemm::packed_size(PD, N)));
    std::vector<float> s(static_cast<size_t>(tq * N));
    int64_t packed_b = -1;
    shvit_gemm::Epilogue relu;
    relu.relu = true;
    for (int64_t w; (w = take()) >= 0;) {
      const int64_t b = w / chunks, i0 = (w % chunks) * tq, rows = std::min(tq, N - i0);
      const float* qb = qkv + b * N * CQ;
      if (b != packed_b) {
        shvit_gemm::pack_weight(qb + QK, N, QK, CQ, kp.data());        // K as an (N, QK) weight
        shvit_gemm::pack_weight_t(qb + 2 * QK, PD, N, CQ, vp.data());  // V^T as a (PD, N) weight
        packed_b = b;
      }
      shvit_gemm::gemm_packed(rows, N, QK, qb + i0 * CQ, CQ, kp.data(), s.data(), N, shvit_gemm::Epilogue{});
      shvit_gemm::softmax_rows(s.data(), rows, N, N);
      shvit_gemm::gemm_packed(rows, PD, N, s.data(), N, vp.data(), z + (b * N + i0) * ldz, ldz, relu);
    }
  });
}

// Per-thread buffers of the channel-major float32 path.
struct CmImage {
  CmWorkspace att;
  std::vector<float> xp;   // normalised x1 token panels
  std::vector<float> qkv;  // (CQ, N): q (scaled), k, v of the image
  std::vector<float> zp;   // the block op's projection input, token panels
  std::vector<float> zt;   // the same token-major, and the projection's token-major output
  std::vector<float> yt;   // (images of at most one panel of tokens)
};

// f(xb, sc, ob, ws) for every image of x (float32, any strides; xb its rows with stride sc and
// unit token stride) and of the contiguous NCHW out (ob), images split across threads, each
// thread with its own CmImage.
template <typename F>
void for_each_image_cm(const Tensor& x, Tensor& out, const F& f) {
  const Tensor xv = as_bcn(x);
  const int64_t B = xv.size(0), CN = out.size(1) * xv.size(2);
  const float* px = xv.const_data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t sb = xv.stride(0), sc = xv.stride(1);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    CmImage ws;
    for (int64_t b = b0; b < b1; ++b) f(px + b * sb, sc, po + b * CN, ws);
  });
}

// One image of the channel-major float32 path, x's rows at xb (row stride sc, unit token
// stride): GroupNorm statistics of the first pdim rows, their normalised token panels,
// q, k, v = W @ x1_hat + b (one packed GEMM, W (CQ, pdim) with the affine, BatchNorm and scale
// folded in), then ReLU(attention) into out (see attention_cm_image for out, ldo, panel_out, ldp).
void cm_project_attend(const float* xb, int64_t sc, int64_t N, int64_t pdim, int64_t QK, double eps,
                       const float* w, const float* bias, float* out, int64_t ldo, bool panel_out, int64_t ldp,
                       CmImage& ws) {
  const int64_t CQ = 2 * QK + pdim;
  const auto mom = rows_moments<float, float>(xb, pdim, sc, N);
  const float r = static_cast<float>(1.0 / std::sqrt(mom.second + eps));
  ws.xp.resize(static_cast<size_t>(shvit_gemm::packed_size(N, pdim)));
  ws.qkv.resize(static_cast<size_t>(CQ * N));
  pack_tokens_normalized(xb, sc, pdim, N, mom.first, r, ws.xp.data());
  shvit_gemm::Epilogue e;
  e.row_bias = bias;
  shvit_gemm::gemm_packed(CQ, N, pdim, w, pdim, ws.xp.data(), ws.qkv.data(), N, e);
  const float* f = ws.qkv.data();
  attention_cm_image(f, f + QK * N, f + 2 * QK * N, N, N, QK, pdim, nullptr, out, ldo, panel_out, ldp, ws.att);
}

// qkvT = xhT @ weight^T + bias over all B*N tokens (one GEMM), as (B, N, CQ).
Tensor qkv_gemm(const Tensor& xhT, const Tensor& weight, const Tensor& bias, int64_t B, int64_t N,
                const std::optional<Tensor>& w_packed = std::nullopt) {
  const auto acc = xhT.scalar_type();
  const int64_t cq = weight.size(0), pdim = weight.size(1);
  std::optional<Tensor> wp = w_packed;
  if (!wp.has_value() && acc == at::kFloat && shvit_gemm::available()) {
    // pack here (cq x pdim floats: far less than the GEMM reads)
    wp = at::empty({(cq + shvit_gemm::kPanel - 1) / shvit_gemm::kPanel, pdim, shvit_gemm::kPanel}, xhT.options());
    const Tensor w32 = contiguous_as(weight, at::kFloat);
    shvit_gemm::pack_weight(w32.const_data_ptr<float>(), cq, pdim, pdim, wp->data_ptr<float>());
  }
  if (packed_usable(wp, xhT, cq, pdim)) {
    Tensor qkvT = at::empty({B * N, cq}, xhT.options());
    const Tensor b = contiguous_as(bias, at::kFloat);
    packed_gemm_rows(xhT.const_data_ptr<float>(), B * N, pdim, *wp, b.const_data_ptr<float>(), nullptr,
                     qkvT.data_ptr<float>(), cq);
    return qkvT.view({B, N, cq});
  }
  Tensor qkvT = at::mm(xhT, weight.to(acc).t());
  Tensor b = contiguous_as(bias, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "shsa_infer_bias", [&] {
    add_row_bias(qkvT.data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), qkvT.size(0), qkvT.size(1));
  });
  return qkvT.view({B, N, qkvT.size(1)});
}

void check_qkv_weights(const Tensor& weight, const Tensor& bias, int64_t C, int64_t pdim, int64_t qk_dim) {
  const int64_t CQ = 2 * qk_dim + pdim;
  TORCH_CHECK(pdim > 0 && pdim < C, "pdim must be in 1..", C - 1, ", got ", pdim);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == CQ && weight.size(1) == pdim, "weight must be (", CQ, ", ",
              pdim, "), got ", weight.sizes());
  TORCH_CHECK(bias.numel() == CQ, "bias must have ", CQ, " elements, got ", bias.numel());
}

// Checks x and the folded qkv projection; returns q, k, v of every token as one
// token-major (B, N, 2*qk_dim + pdim) GEMM result in the accumulation dtype, and x's
// (B, C, N) view. The GroupNorm affine, BatchNorm and attention scale are in the weight.
std::pair<Tensor, Tensor> project_qkv(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t pdim,
                                      int64_t qk_dim, double eps) {
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3);
  check_qkv_weights(weight, bias, C, pdim, qk_dim);
  const auto acc = acc_type(x.scalar_type());
  Tensor xv = as_bcn(x);
  Tensor xhT = at::empty({B * N, pdim}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "shsa_infer_norm", [&] {
    normalize_token_major<scalar_t, at::opmath_type<scalar_t>>(xv, pdim, eps, xhT);
  });
  // one GEMM for every token of the batch: (B*N, pdim) @ (pdim, CQ) + bias
  return {qkv_gemm(xhT, weight, bias, B, N), xv};
}
}  // namespace

Tensor shsa_infer(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t pdim, int64_t qk_dim,
                  double eps) {
  NoAutocast no_autocast;
  check_input(x, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), N = H * W;
  Tensor out = at::empty({B, C, H, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || N == 0) return out;
  if (x.scalar_type() == at::kFloat && shvit_gemm::available()) {
    // channel-major, image by image: no transposes, the output written in place
    check_qkv_weights(weight, bias, C, pdim, qk_dim);
    const Tensor w = contiguous_as(weight, at::kFloat), bq = contiguous_as(bias, at::kFloat);
    for_each_image_cm(x, out, [&](const float* xb, int64_t sc, float* ob, CmImage& ws) {
      // x2's rows and their destination stream into L2 under the GEMMs, for the ReLU pass after them
      shvit_gemm::PrefetchScope prefetch;
      prefetch_rows_during_gemm(xb + pdim * sc, sc, C - pdim, N);
      prefetch_rows_during_gemm(ob + pdim * N, N, C - pdim, N);
      cm_project_attend(xb, sc, N, pdim, qk_dim, eps, w.const_data_ptr<float>(), bq.const_data_ptr<float>(), ob, N,
                        false, 0, ws);
      for (int64_t c = pdim; c < C; ++c) {
        const float* src = xb + c * sc;
        float* dst = ob + c * N;
        relu_copy(src, dst, N);
      }
    });
    return out;
  }
  auto [qkvT, xv] = project_qkv(x, weight, bias, pdim, qk_dim, eps);
  Tensor qT = qkvT.narrow(2, 0, qk_dim);                        // (B, N, QK), scale folded in
  Tensor k = qkvT.narrow(2, qk_dim, qk_dim).transpose(1, 2);    // (B, QK, N)
  Tensor v = qkvT.narrow(2, 2 * qk_dim, pdim).transpose(1, 2);  // (B, PD, N)
  Tensor out3 = out.view({B, C, N});
  attention_forward_core(qT, k, v, xv.narrow(1, pdim, C - pdim), out3, nullptr);
  return out;
}

namespace {
// dst[b, n, c0 + c] = max(src[b, c, n], 0) for c < R: a blocked transpose of a (B, R, N)
// channel-major block into a (B, N, ldd) token-major buffer.
template <typename in_t, typename acc_t>
void relu_transpose_into(const Tensor& src, acc_t* dst, int64_t ldd, int64_t c0) {
  const int64_t B = src.size(0), R = src.size(1), N = src.size(2);
  const int64_t sb = src.stride(0), sc = src.stride(1);
  const in_t* ps = src.const_data_ptr<in_t>();
  parallel_rows(B, 1, [&](int64_t b) {
    transpose_map(ps + b * sb, sc, dst + b * N * ldd + c0, ldd, R, N, [](in_t v, int64_t, int64_t) {
      const acc_t a = static_cast<acc_t>(v);
      return a < acc_t(0) ? acc_t(0) : a;
    });
  });
}

// out[b, c, n] = x[b, c, n] + yT[b * N + n, c] + bias[c]: bias and residual add, transposing yT back.
template <typename scalar_t, typename acc_t>
void residual_add_transposed(const Tensor& x, const Tensor& yT, const Tensor& bias, Tensor& out) {
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  const int64_t sb = x.stride(0), sc = x.stride(1);
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  const acc_t* py = yT.const_data_ptr<acc_t>();
  const acc_t* pb = bias.const_data_ptr<acc_t>();
  scalar_t* po = out.data_ptr<scalar_t>();
  parallel_rows(B, 1, [&](int64_t b) {
    const scalar_t* xb = px + b * sb;
    transpose_map(py + b * N * C, C, po + b * C * N, N, N, C, [&](acc_t v, int64_t n, int64_t c) {
      return static_cast<scalar_t>(static_cast<acc_t>(xb[c * sc + n]) + v + pb[c]);
    });
  });
}
}  // namespace

// The whole residual SHSA block for inference: x + proj(ReLU(concat(attention, x2))).
// float32 NCHW on AVX2 CPUs: channel-major image by image on the packed GEMM (below).
// Otherwise both 1x1 projections run as one GEMM over all B*N tokens in token-major layout
// (oneDNN's NCHW 1x1 convolution is markedly slower on CPU for these shapes); for NCHW x the
// concat is written token-major once and the residual add transposes back in cache-sized tiles.
Tensor shsa_block_infer(const Tensor& x, const Tensor& w_qkv, const Tensor& b_qkv, const Tensor& w_proj,
                        const Tensor& b_proj, int64_t pdim, int64_t qk_dim, double eps,
                        const std::optional<Tensor>& w_qkv_packed, const std::optional<Tensor>& w_proj_packed) {
  NoAutocast no_autocast;
  check_input(x, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), N = H * W;
  TORCH_CHECK(w_proj.dim() == 2 && w_proj.size(0) == C && w_proj.size(1) == C, "w_proj must be (", C, ", ", C,
              "), got ", w_proj.sizes());
  TORCH_CHECK(b_proj.numel() == C, "b_proj must have ", C, " elements, got ", b_proj.numel());
  // channels_last input is token-major already: no transposes, and the output keeps its layout
  const bool token_major = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  Tensor out = at::empty({B, C, H, W}, x.options().memory_format(token_major ? at::MemoryFormat::ChannelsLast
                                                                             : at::MemoryFormat::Contiguous));
  if (B == 0 || N == 0) return out;
  if (!token_major && x.scalar_type() == at::kFloat && shvit_gemm::available()) {
    // NCHW float32: channel-major, image by image, no transposes. The attention writes its
    // ReLU'd output and the ReLU of x2 into token panels (the packed operand of the
    // projection), W_proj @ panels + bias is one packed GEMM, then the residual is added.
    check_qkv_weights(w_qkv, b_qkv, C, pdim, qk_dim);
    const Tensor wq = contiguous_as(w_qkv, at::kFloat), bq = contiguous_as(b_qkv, at::kFloat);
    const Tensor wp = contiguous_as(w_proj, at::kFloat), bp = contiguous_as(b_proj, at::kFloat);
    // at most one panel of tokens (4x4 grids and smaller): with the packed weight, the
    // projection runs token-major (rows = tokens, columns = all C output channels: the GEMM's
    // wide tiles) instead of as C rows against a single 16-column token panel
    const bool token_proj = N <= shvit_gemm::kPanel && packed_usable(w_proj_packed, x, C, C);
    // a last partial token panel of at most 8 columns: the projection's tail runs transposed
    // against the packed weight (gemm_token_panels)
    const float* wpk = nullptr;
    std::vector<float> wpk_local;
    if (!token_proj && shvit_gemm::transposes_tail(N)) {
      if (packed_usable(w_proj_packed, x, C, C)) {
        wpk = w_proj_packed->const_data_ptr<float>();
      } else {
        wpk_local.resize(static_cast<size_t>(shvit_gemm::packed_size(C, C)));
        shvit_gemm::pack_weight(wp.const_data_ptr<float>(), C, C, C, wpk_local.data());
        wpk = wpk_local.data();
      }
    }
    for_each_image_cm(x, out, [&](const float* xb, int64_t sc, float* ob, CmImage& ws) {
      ws.zp.resize(static_cast<size_t>(shvit_gemm::packed_size(N, C)));
      shvit_gemm::PrefetchScope prefetch;
      prefetch_rows_during_gemm(xb + pdim * sc, sc, C - pdim, N);  // for the ReLU packing of x2
      cm_project_attend(xb, sc, N, pdim, qk_dim, eps, wq.const_data_ptr<float>(), bq.const_data_ptr<float>(),
                        ws.zp.data(), 0, true, C * shvit_gemm::kPanel, ws);
      pack_tokens_relu(xb + pdim * sc, sc, C - pdim, N, ws.zp.data(), C, pdim);
      if (token_proj) {
        // z^T (N, C) from the single panel (C rows of 16), y^T = z^T W^T + bias, then
        // out[c, n] = x[c, n] + y^T[n, c]
        ws.zt.resize(static_cast<size_t>(N * C));
        ws.yt.resize(static_cast<size_t>(N * C));
        shvit_gemm::transpose(ws.zp.data(), shvit_gemm::kPanel, ws.zt.data(), C, C, N);
        shvit_gemm::Epilogue e;
        e.bias = bp.const_data_ptr<float>();
        shvit_gemm::gemm_packed(N, C, C, ws.zt.data(), C, w_proj_packed->const_data_ptr<float>(), ws.yt.data(), C,
                                e);
        // y^T back to channel rows with register transposes, then the residual row by row
        shvit_gemm::transpose(ws.yt.data(), C, ob, N, N, C);
        for (int64_t c = 0; c < C; ++c) {
          const float* xr = xb + c * sc;
          float* orow = ob + c * N;
          for (int64_t n = 0; n < N; ++n) orow[n] = xr[n] + orow[n];
        }
        return;
      }
      shvit_gemm::Epilogue e;
      e.row_bias = bp.const_data_ptr<float>();
      shvit_gemm::gemm_token_panels(C, N, C, wp.const_data_ptr<float>(), C, wpk, ws.zp.data(), ob, N, e);
      // the residual in a separate sequential pass while the image's output is in cache
      // (read in the GEMM's tile order, x's rows cost a cache miss per tile)
      for (int64_t c = 0; c < C; ++c) {
        const float* xr = xb + c * sc;
        float* orow = ob + c * N;
        for (int64_t n = 0; n < N; ++n) orow[n] += xr[n];
      }
    });
    return out;
  }
  const auto acc = acc_type(x.scalar_type());
  Tensor qkvT, xv;
  if (token_major) {
    check_qkv_weights(w_qkv, b_qkv, C, pdim, qk_dim);
    Tensor xhT = at::empty({B * N, pdim}, x.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "shsa_block_norm_tm", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      normalize_rows<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), B, N, C, pdim, eps, xhT.data_ptr<acc_t>());
    });
    qkvT = qkv_gemm(xhT, w_qkv, b_qkv, B, N, w_qkv_packed);
  } else {
    std::tie(qkvT, xv) = project_qkv(x, w_qkv, b_qkv, pdim, qk_dim, eps);
  }
  Tensor qT = qkvT.narrow(2, 0, qk_dim);
  Tensor k = qkvT.narrow(2, qk_dim, qk_dim).transpose(1, 2);  // (B, QK, N)
  Tensor vT = qkvT.narrow(2, 2 * qk_dim, pdim);               // (B, N, PD)
  Tensor zT = at::empty({B, N, C}, x.options().dtype(acc));   // ReLU(concat), token-major
  const int64_t tm = query_chunk(B, N, zT.element_size());
  // float32 on AVX2 CPUs: the token-major attention writes the first pdim columns of zT;
  // otherwise ATen's bmm + softmax per query chunk
  const bool fast_attention = token_major && acc == at::kFloat && shvit_gemm::available();
  if (fast_attention) {
    attention_tokens_f32(qkvT.const_data_ptr<float>(), B, N, qk_dim, pdim, zT.data_ptr<float>(), C);
  }
  const int64_t aten_tokens = fast_attention ? 0 : N;
  AT_DISPATCH_FLOATING_TYPES(acc, "shsa_block_attn", [&] {
    scalar_t* pz = zT.data_ptr<scalar_t>();
    for (int64_t m0 = 0; m0 < aten_tokens; m0 += tm) {
      const int64_t t = std::min(tm, N - m0);
      Tensor p = at::_softmax(at::bmm(qT.narrow(1, m0, t), k), -1, false);  // (B, t, N)
      Tensor oT = at::bmm(p, vT);                                           // (B, t, PD)
      const scalar_t* po = oT.const_data_ptr<scalar_t>();
      parallel_rows(B * t, 16, [&](int64_t row) {
        const int64_t b = row / t, i = row % t;
        const scalar_t* src = po + row * pdim;
        scalar_t* dst = pz + (b * N + m0 + i) * C;
        relu_convert(src, dst, pdim);
      });
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "shsa_block_x2", [&] {
      using in_t = scalar_t;
      using acc_t = at::opmath_type<in_t>;
      if (token_major) {
        const in_t* px = x.const_data_ptr<in_t>();
        acc_t* pzz = zT.data_ptr<acc_t>();
        parallel_rows(B * N, 64, [&](int64_t r) {
          const in_t* xr = px + r * C;
          acc_t* zr = pzz + r * C;
          relu_convert(xr + pdim, zr + pdim, C - pdim);
        });
      } else {
        relu_transpose_into<in_t, acc_t>(xv.narrow(1, pdim, C - pdim), zT.data_ptr<acc_t>(), C, pdim);
      }
    });
  });
  Tensor bp = contiguous_as(b_proj, acc);
  if (token_major && x.scalar_type() == at::kFloat && packed_usable(w_proj_packed, zT, C, C)) {
    // projection, bias and residual add in one packed GEMM, written straight into out
    packed_gemm_rows(zT.const_data_ptr<float>(), B * N, C, *w_proj_packed, bp.const_data_ptr<float>(),
                     x.const_data_ptr<float>(), out.data_ptr<float>(), C);
    return out;
  }
  Tensor yT;  // (B*N, C), bias added below
  if (packed_usable(w_proj_packed, zT, C, C)) {
    yT = at::empty({B * N, C}, zT.options());
    packed_gemm_rows(zT.const_data_ptr<float>(), B * N, C, *w_proj_packed, nullptr, nullptr, yT.data_ptr<float>(), C);
  } else {
    yT = at::mm(zT.view({B * N, C}), w_proj.to(acc).t());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "shsa_block_residual", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (token_major) {  // out[r, c] = x[r, c] + yT[r, c] + bias[c], all rows contiguous
      const scalar_t* px = x.const_data_ptr<scalar_t>();
      const acc_t* py = yT.const_data_ptr<acc_t>();
      const acc_t* pb = bp.const_data_ptr<acc_t>();
      scalar_t* po = out.data_ptr<scalar_t>();
      parallel_rows(B * N, 64, [&](int64_t r) {
        for (int64_t c = 0; c < C; ++c) {
          po[r * C + c] = static_cast<scalar_t>(static_cast<acc_t>(px[r * C + c]) + py[r * C + c] + pb[c]);
        }
      });
    } else {
      Tensor out3 = out.view({B, C, N});
      residual_add_transposed<scalar_t, acc_t>(xv, yT, bp, out3);
    }
  });
  return out;
}

// The two memory-bound steps of the bfloat16 SHSA block around its oneDNN GEMMs
// (shvit_kernels/onednn.py), each one op instead of a dozen small ATen calls.

// (B*N, pdim) in x's dtype: the first pdim channels of each token of a channels_last x,
// normalised with its image's GroupNorm statistics (float32, two passes; no affine).
Tensor gn_rows(const Tensor& x, int64_t pdim, double eps) {
  NoAutocast no_autocast;
  check_input(x, "x");
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3);
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "gn_rows: x must be channels_last");
  TORCH_CHECK(pdim > 0 && pdim < C, "pdim must be in 1..", C - 1, ", got ", pdim);
  const auto acc = acc_type(x.scalar_type());
  Tensor xh = at::empty({B * N, pdim}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gn_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    normalize_rows<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), B, N, C, pdim, eps, xh.data_ptr<acc_t>());
  });
  return xh.to(x.scalar_type());
}

// (B*N, C) in x's dtype: ReLU(concat(softmax(q k^T) v, x2)) per image, for q, k, v the token
// rows of qkv (B*N, 2*qk_dim + pdim; q scaled) and x2 the channels past pdim of a
// channels_last x: float32 attention on the packed GEMM, rounded once at the end.
Tensor attend_concat_relu(const Tensor& qkv, const Tensor& x, int64_t pdim, int64_t qk_dim) {
  NoAutocast no_autocast;
  check_input(x, "x");
  TORCH_CHECK(shvit_gemm::available(), "attend_concat_relu needs the packed GEMM (an x86-64 CPU with AVX2 and FMA)");
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3), CQ = 2 * qk_dim + pdim;
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "attend_concat_relu: x must be channels_last");
  TORCH_CHECK(pdim > 0 && pdim < C, "pdim must be in 1..", C - 1, ", got ", pdim);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == B * N && qkv.size(1) == CQ, "qkv must be (", B * N, ", ", CQ,
              "), got ", qkv.sizes());
  const Tensor q32 = contiguous_as(qkv, at::kFloat);
  Tensor z = at::empty({B * N, C}, x.options().dtype(at::kFloat));
  if (B * N == 0) return z.to(x.scalar_type());
  attention_tokens_f32(q32.const_data_ptr<float>(), B, N, qk_dim, pdim, z.data_ptr<float>(), C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "attend_concat_relu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    float* pz = z.data_ptr<float>();
    parallel_rows(B * N, 64, [&](int64_t r) { relu_convert(px + r * C + pdim, pz + r * C + pdim, C - pdim); });
  });
  return z.to(x.scalar_type());
}

TORCH_LIBRARY_IMPL(shvit_cpp, CPU, m) {
  m.impl("shsa_infer", &shsa_infer);
  m.impl("gn_rows", &gn_rows);
  m.impl("attend_concat_relu", &attend_concat_relu);
  m.impl("shsa_block_infer", &shsa_block_infer);
}

}  // namespace shvit_cpu
