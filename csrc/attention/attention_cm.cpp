// Channel-major float32 SHSA attention (see attention_cm.h).
#include "attention/attention_cm.h"

#include <algorithm>

#include "attention/attention_core.h"
#include "common.h"
#include "gemm/gemm.h"

namespace shvit_cpu {

using shvit_gemm::kPanel;

namespace {
// Token panels of channel rows: out[(p * panel_rows + row0 + c) * 16 + j] = f(x[c * ldx + 16p + j])
// for c < rows and 16p + j < N, zero for the tokens past N. f(s, d, n) maps n floats of s to d.
template <typename F>
inline void pack_tokens(const float* x, int64_t ldx, int64_t rows, int64_t N, float* out, int64_t panel_rows,
                        int64_t row0, const F& f) {
  // row by row (each source row read once, front to back), its panels scattered
  const int64_t full = N / kPanel, nv = N - full * kPanel;
  const int64_t ps = panel_rows * kPanel;
  for (int64_t c = 0; c < rows; ++c) {
    const float* src = x + c * ldx;
    float* dst = out + (row0 + c) * kPanel;
    for (int64_t p = 0; p < full; ++p) {
      const float* s = src + p * kPanel;
      float* d = dst + p * ps;
      f(s, d, kPanel);
    }
    if (nv > 0) {
      const float* s = src + full * kPanel;
      float* d = dst + full * ps;
      f(s, d, nv);
      for (int64_t j = nv; j < kPanel; ++j) d[j] = 0.f;
    }
  }
}
}  // namespace

void pack_tokens_normalized(const float* x, int64_t ldx, int64_t rows, int64_t N, float mu, float r, float* out) {
  pack_tokens(x, ldx, rows, N, out, rows, 0, [mu, r](const float* s, float* d, int64_t n) {
    for (int64_t j = 0; j < n; ++j) d[j] = (s[j] - mu) * r;
  });
}

void pack_tokens_copy(const float* x, int64_t ldx, int64_t rows, int64_t N, float* out) {
  pack_tokens(x, ldx, rows, N, out, rows, 0, [](const float* s, float* d, int64_t n) { std::copy_n(s, n, d); });
}

void pack_tokens_relu(const float* x, int64_t ldx, int64_t rows, int64_t N, float* out, int64_t rows_total,
                      int64_t row0) {
  pack_tokens(x, ldx, rows, N, out, rows_total, row0, relu_copy);
}

namespace {
// K^T (N, QK): the A operand of the score GEMM (rows = keys).
void transpose_keys(const float* k, int64_t ld, int64_t N, int64_t QK, std::vector<float>& kT) {
  kT.resize(static_cast<size_t>(N * QK));
  shvit_gemm::transpose(k, ld, kT.data(), QK, QK, N);
}

// The probabilities of queries [n0, n0 + nq) into sp, a row-major N keys x w tile (w = nq
// rounded up to 16): S^T = K^T (q_scale q_chunk) in one GEMM, softmax over the keys, 16
// columns at a time. Query columns past N are zero in the packed q, so they get uniform
// (finite) weights.
void chunk_probs(const float* q, int64_t ld, int64_t N, int64_t QK, int64_t n0, int64_t nq, float q_scale,
                 const float* kT, std::vector<float>& qp, float* sp, float* lse = nullptr) {
  const int64_t panels = (nq + kPanel - 1) / kPanel, w = panels * kPanel;
  qp.resize(static_cast<size_t>(panels * QK * kPanel));
  shvit_gemm::pack_weight_t(q + n0, nq, QK, ld, qp.data());
  if (q_scale != 1.f) {
    for (float& e : qp) e *= q_scale;
  }
  // the score GEMM leaves each query's maximum score for the softmax
  float mx[kCmChunk];
  std::fill(mx, mx + w, -INFINITY);
  shvit_gemm::Epilogue se;
  se.col_max = mx;
  shvit_gemm::gemm_packed(N, w, QK, kT, QK, qp.data(), sp, w, se);
  for (int64_t p = 0; p < panels; ++p) {
    float l[kPanel];
    shvit_gemm::softmax_panel_columns(sp + p * kPanel, N, lse != nullptr ? l : nullptr, w, mx + p * kPanel);
    if (lse != nullptr) std::copy(l, l + std::min(kPanel, nq - p * kPanel), lse + n0 + p * kPanel);
  }
}

// The key panels of a chunk of nq queries from a keys x queries tile: entry (key m, query n)
// of src at src + (n / 16) * ps + m * ls + n % 16 (query panels of N x 16: ps = 16 N, ls = 16;
// a row-major N x w tile: ps = 16, ls = w). dst gets ceil(N / 16) panels of nq queries x 16
// keys, dst[(kp * nq + n) * 16 + j] = entry (16 kp + j, n), zero for keys past N (the packed B
// operand of a GEMM over the chunk's queries with the keys as columns).
void query_to_key_panels(const float* src, int64_t ps, int64_t ls, int64_t N, int64_t nq, float* dst) {
  for (int64_t kp = 0; kp * kPanel < N; ++kp) {
    const int64_t keys = std::min(kPanel, N - kp * kPanel);
    for (int64_t p = 0; p * kPanel < nq; ++p) {
      const int64_t qn = std::min(kPanel, nq - p * kPanel);
      float* d = dst + (kp * nq + p * kPanel) * kPanel;
      shvit_gemm::transpose(src + p * ps + kp * kPanel * ls, ls, d, kPanel, keys, qn);
      if (keys < kPanel) {
        for (int64_t n = 0; n < qn; ++n) std::fill(d + n * kPanel + keys, d + (n + 1) * kPanel, 0.f);
      }
    }
  }
}
#ifdef SHVIT_X86
// xrow = (orow > 0 ? grow : 0) + arow (arow may be null) over N values, in zmm registers with
// masked edges (GCC's own vectorisation of the scalar loop moved a register through the stack
// every 16 values).
SHVIT_TARGET_AVX512 void relu_grad_row_avx512(const float* orow, const float* grow, const float* arow, float* xrow,
                                              int64_t N) {
  for (int64_t n = 0; n < N; n += 16) {
    const __mmask16 live = N - n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (N - n)) - 1u);
    const __mmask16 pass =
        _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, orow + n), _mm512_setzero_ps(), _CMP_GT_OQ);
    __m512 v = _mm512_maskz_loadu_ps(pass, grow + n);
    if (arow != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, arow + n));
    _mm512_mask_storeu_ps(xrow + n, live, v);
  }
}
#endif
}  // namespace

void attention_cm_image(const float* q, const float* k, const float* v, int64_t ld, int64_t N, int64_t QK,
                        int64_t PD, const float* v_bias, float* out, int64_t ldo, bool panel_out, int64_t ldp,
                        CmWorkspace& ws, float q_scale, float* probs, float* lse) {
  if (probs == nullptr) ws.sp.resize(static_cast<size_t>(N * kCmChunk));
  transpose_keys(k, ld, N, QK, ws.kT);
  shvit_gemm::Epilogue oe;
  oe.row_bias = v_bias;
  oe.relu = true;
  for (int64_t n0 = 0; n0 < N; n0 += kCmChunk) {
    const int64_t nq = std::min(kCmChunk, N - n0);
    const int64_t panels = (nq + kPanel - 1) / kPanel, w = panels * kPanel;
    float* sp = probs != nullptr ? probs + n0 * N : ws.sp.data();
    chunk_probs(q, ld, N, QK, n0, nq, q_scale, ws.kT.data(), ws.qp, sp, lse);
    // O = V P^T with the probability tile read in place as the B operand
    if (panel_out) {
      for (int64_t p = 0; p < panels; ++p) {
        shvit_gemm::gemm_rows(PD, kPanel, N, v, ld, sp + p * kPanel, w, out + (n0 / kPanel + p) * ldp, kPanel, oe);
      }
    } else {
      shvit_gemm::gemm_rows(PD, nq, N, v, ld, sp, w, out + n0, ldo, oe);
    }
  }
}

// With S = s q^T k (s = q_scale), P = softmax over keys, O = V P^T and dO masked by the ReLU:
//   delta_n = sum_c dO[c, n] O[c, n],  dP^T = V^T dO,  dS^T = P^T * (dP^T - delta),
//   dq = s k dS^T,  dk = s q dS,  dv = dO P.
// Queries go in chunks of kCmChunk: dP^T and dS^T of a chunk are one row-major N x w tile
// (w: the chunk's queries rounded up to 16), from one GEMM over the chunk's dO panels, and
// the B operand of dq's GEMM in place. With one chunk, dS and P in key panels
// (query_to_key_panels) are the B operands of dk's and dv's GEMMs. With more, dk^T = dS^T
// (s q_chunk)^T and dv^T = P^T dO_chunk^T accumulate token-major over the chunks, the tiles
// read in place as A operands against the chunk's q and dO packed as weights (88 x chunk values
// packed per chunk instead of two N x chunk transposes), and are transposed once at the end;
// the same products summed in the same order, so the same results. Every result is written
// channel-major.
void attention_cm_backward_image(const float* q, const float* k, const float* v, int64_t ld, int64_t N, int64_t QK,
                                 int64_t PD, float q_scale, const float* o, int64_t ldo, const float* g, int64_t ldg,
                                 const float* probs, float* dq, float* dk, float* dv, int64_t ldd,
                                 CmBackwardWorkspace& ws) {
  // dO masked by the ReLU (the output is positive exactly where the ReLU passed) and delta
  ws.dom.resize(static_cast<size_t>(PD * N));
  ws.delta.assign(static_cast<size_t>((N + kPanel - 1) / kPanel * kPanel), 0.f);
  float* __restrict__ dl = ws.delta.data();
  for (int64_t c = 0; c < PD; ++c) {
    const float* __restrict__ orow = o + c * ldo;
    const float* __restrict__ grow = g + c * ldg;
    float* __restrict__ drow = ws.dom.data() + c * N;
    for (int64_t n = 0; n < N; ++n) {
      const float ov = orow[n], gv = ov > 0.f ? grow[n] : 0.f;
      drow[n] = gv;
      dl[n] += gv * ov;
    }
  }
  ws.vT.resize(static_cast<size_t>(N * PD));
  shvit_gemm::transpose(v, ld, ws.vT.data(), PD, PD, N);
  if (probs == nullptr) {
    transpose_keys(k, ld, N, QK, ws.fwd.kT);
    ws.fwd.sp.resize(static_cast<size_t>(N * kCmChunk));
  }
  ws.ds.resize(static_cast<size_t>(N * kCmChunk));
  const bool chunked = N > kCmChunk;
  if (chunked) {
    ws.dkT.resize(static_cast<size_t>(N * QK));
    ws.dvT.resize(static_cast<size_t>(N * PD));
    ws.qw.resize(static_cast<size_t>(shvit_gemm::packed_size(QK, kCmChunk)));
    ws.gw.resize(static_cast<size_t>(shvit_gemm::packed_size(PD, kCmChunk)));
  } else {
    ws.dsk.resize(static_cast<size_t>((N + kPanel - 1) / kPanel * kCmChunk * kPanel));
    ws.pk.resize(ws.dsk.size());
  }
  for (int64_t n0 = 0; n0 < N; n0 += kCmChunk) {
    const int64_t nq = std::min(kCmChunk, N - n0);
    const int64_t panels = (nq + kPanel - 1) / kPanel;
    const float* sp = probs;
    if (probs != nullptr) {
      sp = probs + n0 * N;
    } else {
      chunk_probs(q, ld, N, QK, n0, nq, q_scale, ws.fwd.kT.data(), ws.fwd.qp, ws.fwd.sp.data());
      sp = ws.fwd.sp.data();
    }
    // dP^T (N x w) = V^T dO_chunk, then dS^T = s P^T (dP^T - delta) in place (zero past N)
    const int64_t w = panels * kPanel;
    ws.gp.resize(static_cast<size_t>(panels * PD * kPanel));
    pack_tokens_copy(ws.dom.data() + n0, N, PD, nq, ws.gp.data());
    float* __restrict__ d = ws.ds.data();
    // the kept probabilities of the chunk (written by the forward, long out of cache) stream
    // in under the dP GEMM, for the dS pass after it
    if (probs != nullptr) shvit_gemm::prefetch_during_gemm(sp, N * w * static_cast<int64_t>(sizeof(float)), true);
    shvit_gemm::gemm_packed(N, w, PD, ws.vT.data(), PD, ws.gp.data(), d, w, shvit_gemm::Epilogue{});
    for (int64_t p = 0; p < panels; ++p) {
      const float* __restrict__ pp = sp + p * kPanel;
      const float* __restrict__ dlp = dl + n0 + p * kPanel;
      float sd[kPanel], sc[kPanel];
      for (int64_t j = 0; j < kPanel; ++j) {
        const bool live = n0 + p * kPanel + j < N;
        sd[j] = live ? dlp[j] : 0.f;
        sc[j] = live ? q_scale : 0.f;
      }
      float* __restrict__ dp = d + p * kPanel;
      for (int64_t m = 0; m < N; ++m) {
#pragma GCC unroll 16
        for (int64_t j = 0; j < kPanel; ++j) {
          dp[m * w + j] = sc[j] * pp[m * w + j] * (dp[m * w + j] - sd[j]);
        }
      }
    }
    // dq[:, chunk] = k @ dS^T, the tile read in place (rows of w >= nq floats)
    shvit_gemm::gemm_rows(QK, nq, N, k, ld, d, w, dq + n0, ldd, shvit_gemm::Epilogue{});
    if (chunked) {
      // dk^T += dS^T_chunk q_chunk^T, dv^T += P^T_chunk dO_chunk^T (token-major; from the
      // second chunk on, each GEMM starts from the sums so far)
      shvit_gemm::pack_weight(q + n0, QK, nq, ld, ws.qw.data());
      shvit_gemm::pack_weight(ws.dom.data() + n0, PD, nq, N, ws.gw.data());
      shvit_gemm::Epilogue ek, ev;
      if (n0 > 0) {
        ek.residual = ws.dkT.data();
        ek.ldr = QK;
        ev.residual = ws.dvT.data();
        ev.ldr = PD;
      }
      shvit_gemm::gemm_packed(N, QK, nq, d, w, ws.qw.data(), ws.dkT.data(), QK, ek);
      shvit_gemm::gemm_packed(N, PD, nq, sp, w, ws.gw.data(), ws.dvT.data(), PD, ev);
      continue;
    }
    // the only chunk: dk = s q dS, dv = dO P
    query_to_key_panels(d, kPanel, w, N, nq, ws.dsk.data());
    shvit_gemm::gemm_packed(QK, N, nq, q + n0, ld, ws.dsk.data(), dk, ldd, shvit_gemm::Epilogue{});
    query_to_key_panels(sp, kPanel, w, N, nq, ws.pk.data());
    shvit_gemm::gemm_packed(PD, N, nq, ws.dom.data() + n0, N, ws.pk.data(), dv, ldd, shvit_gemm::Epilogue{});
  }
  if (chunked) {
    shvit_gemm::transpose(ws.dkT.data(), QK, dk, ldd, N, QK);
    shvit_gemm::transpose(ws.dvT.data(), PD, dv, ldd, N, PD);
  }
}

void attention_forward_cm(const Tensor& qkv, const Tensor& x2, int64_t qk_dim, double scale, Tensor& out,
                          Tensor* p_keep, Tensor* lse) {
  const int64_t B = qkv.size(0), CQ = qkv.size(1), N = qkv.size(2), C2 = x2.size(1);
  const int64_t PD = CQ - 2 * qk_dim, CO = out.size(1), ps = cm_prob_size(N);
  const int64_t sfb = qkv.stride(0), ld = qkv.stride(1), sxb = x2.stride(0), sxc = x2.stride(1);
  float* pp = nullptr;
  if (p_keep != nullptr && query_chunk(B, N, sizeof(float)) == N) {
    *p_keep = at::empty({B, ps}, qkv.options());
    pp = p_keep->data_ptr<float>();
  }
  const float* pq = qkv.const_data_ptr<float>();
  const float* px = x2.const_data_ptr<float>();
  float* po = out.data_ptr<float>();
  float* pl = lse != nullptr ? lse->data_ptr<float>() : nullptr;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    CmWorkspace ws;
    for (int64_t b = b0; b < b1; ++b) {
      const float* fb = pq + b * sfb;
      float* ob = po + b * CO * N;
      // x2's rows stream into L2 under the GEMMs, for the ReLU pass
      shvit_gemm::PrefetchScope prefetch;
      prefetch_rows_during_gemm(px + b * sxb, sxc, C2, N);
      attention_cm_image(fb, fb + qk_dim * ld, fb + 2 * qk_dim * ld, ld, N, qk_dim, PD, nullptr, ob, N, false, 0,
                         ws, static_cast<float>(scale), pp != nullptr ? pp + b * ps : nullptr,
                         pl != nullptr ? pl + b * N : nullptr);
      for (int64_t c = 0; c < C2; ++c) {
        const float* xr = px + b * sxb + c * sxc;
        float* orow = ob + (PD + c) * N;
        relu_copy(xr, orow, N);
      }
    }
  });
}

void attention_backward_cm(const Tensor& dout, const Tensor& qkv, const Tensor& out, int64_t qk_dim, double scale,
                           const Tensor& probs, Tensor& dx2, Tensor& dqkv, const Tensor& dx2_add) {
  const int64_t B = qkv.size(0), CQ = qkv.size(1), N = qkv.size(2), PD = CQ - 2 * qk_dim, C2 = dx2.size(1);
  const int64_t sfb = qkv.stride(0), ld = qkv.stride(1), ps = cm_prob_size(N);
  const int64_t sgb = dout.stride(0), sgc = dout.stride(1), sob = out.stride(0), soc = out.stride(1);
  const int64_t sxb = dx2.stride(0), sxc = dx2.stride(1);
  const float* pg = dout.const_data_ptr<float>();
  const float* pq = qkv.const_data_ptr<float>();
  const float* po = out.const_data_ptr<float>();
  const float* pp = probs.defined() ? probs.const_data_ptr<float>() : nullptr;
  float* pd = dqkv.data_ptr<float>();
  float* px = dx2.data_ptr<float>();
  const float* pa = dx2_add.defined() ? dx2_add.const_data_ptr<float>() : nullptr;
  const int64_t sab = pa ? dx2_add.stride(0) : 0, sac = pa ? dx2_add.stride(1) : 0;
  const bool avx512 = shvit_isa::active() == shvit_isa::Isa::kAvx512;
  (void)avx512;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    CmBackwardWorkspace ws;
    for (int64_t b = b0; b < b1; ++b) {
      const float* fb = pq + b * sfb;
      const float* ob = po + b * sob;
      const float* gb = pg + b * sgb;
      float* db = pd + b * CQ * N;
      // the x2 gradient pass's operands and destination stream into L2 under the GEMMs
      shvit_gemm::PrefetchScope prefetch;
      prefetch_rows_during_gemm(ob + PD * soc, soc, C2, N);
      prefetch_rows_during_gemm(gb + PD * sgc, sgc, C2, N);
      if (pa != nullptr) prefetch_rows_during_gemm(pa + b * sab, sac, C2, N);
      prefetch_rows_during_gemm(px + b * sxb, sxc, C2, N);
      attention_cm_backward_image(fb, fb + qk_dim * ld, fb + 2 * qk_dim * ld, ld, N, qk_dim, PD,
                                  static_cast<float>(scale), ob, soc, gb, sgc, pp != nullptr ? pp + b * ps : nullptr,
                                  db, db + qk_dim * N, db + 2 * qk_dim * N, N, ws);
      for (int64_t c = 0; c < C2; ++c) {
        const float* orow = ob + (PD + c) * soc;
        const float* grow = gb + (PD + c) * sgc;
        float* xrow = px + b * sxb + c * sxc;
#ifdef SHVIT_X86
        if (avx512) {
          relu_grad_row_avx512(orow, grow, pa != nullptr ? pa + b * sab + c * sac : nullptr, xrow, N);
          continue;
        }
#endif
        if (pa != nullptr) {
          const float* arow = pa + b * sab + c * sac;
          for (int64_t n = 0; n < N; ++n) xrow[n] = (orow[n] > 0.f ? grow[n] : 0.f) + arow[n];
        } else {
          for (int64_t n = 0; n < N; ++n) xrow[n] = orow[n] > 0.f ? grow[n] : 0.f;
        }
      }
    }
  });
}

}  // namespace shvit_cpu
