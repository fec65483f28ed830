// Channel-major float32 SHSA attention (see attention_cm.h).
#include "attention_cm.h"

#include <algorithm>

#include "gemm.h"

namespace shvit_cpu {

using shvit_gemm::kPanel;

namespace {
// Token panels of channel rows: out[(p * panel_rows + row0 + c) * 16 + j] = f(x[c * ldx + 16p + j])
// for c < rows and 16p + j < N, zero for the tokens past N.
template <typename F>
inline void pack_tokens(const float* x, int64_t ldx, int64_t rows, int64_t N, float* out, int64_t panel_rows,
                        int64_t row0, const F& f) {
  const int64_t np = (N + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < np; ++p) {
    const int64_t t0 = p * kPanel, nv = std::min(kPanel, N - t0);
    float* dst = out + (p * panel_rows + row0) * kPanel;
    for (int64_t c = 0; c < rows; ++c) {
      const float* src = x + c * ldx + t0;
      float* d = dst + c * kPanel;
      if (nv == kPanel) {
#pragma GCC unroll 16
        for (int64_t j = 0; j < kPanel; ++j) d[j] = f(src[j]);
      } else {
        for (int64_t j = 0; j < nv; ++j) d[j] = f(src[j]);
        for (int64_t j = nv; j < kPanel; ++j) d[j] = 0.f;
      }
    }
  }
}
}  // namespace

void pack_tokens_normalized(const float* x, int64_t ldx, int64_t rows, int64_t N, float mu, float r, float* out) {
  pack_tokens(x, ldx, rows, N, out, rows, 0, [mu, r](float v) { return (v - mu) * r; });
}

void pack_tokens_copy(const float* x, int64_t ldx, int64_t rows, int64_t N, float* out) {
  pack_tokens(x, ldx, rows, N, out, rows, 0, [](float v) { return v; });
}

void pack_tokens_relu(const float* x, int64_t ldx, int64_t rows, int64_t N, float* out, int64_t rows_total,
                      int64_t row0) {
  // max(v, 0) written as v < 0 ? 0 : v keeps NaN, as torch.relu does
  pack_tokens(x, ldx, rows, N, out, rows_total, row0, [](float v) { return v < 0.f ? 0.f : v; });
}

void attention_cm_image(const float* q, const float* k, const float* v, int64_t ld, int64_t N, int64_t QK,
                        int64_t PD, const float* v_bias, float* out, int64_t ldo, bool panel_out, int64_t ldp,
                        CmWorkspace& ws) {
  const int64_t chunk_panels = kCmChunk / kPanel;
  ws.kT.resize(static_cast<size_t>(N * QK));
  ws.qp.resize(static_cast<size_t>(chunk_panels * QK * kPanel));
  ws.sp.resize(static_cast<size_t>(chunk_panels * N * kPanel));
  // K^T (N, QK): the A operand of the score GEMM (rows = keys)
  float* kT = ws.kT.data();
  for (int64_t c = 0; c < QK; ++c) {
    const float* kr = k + c * ld;
    for (int64_t m = 0; m < N; ++m) kT[m * QK + c] = kr[m];
  }
  shvit_gemm::Epilogue none;
  shvit_gemm::Epilogue oe;
  oe.row_bias = v_bias;
  oe.relu = true;
  for (int64_t n0 = 0; n0 < N; n0 += kCmChunk) {
    const int64_t nq = std::min(kCmChunk, N - n0);
    const int64_t panels = (nq + kPanel - 1) / kPanel;
    // query panels (zero past N: those columns get uniform weights and are never stored)
    shvit_gemm::pack_weight_t(q + n0, nq, QK, ld, ws.qp.data());
    for (int64_t p = 0; p < panels; ++p) {
      float* s = ws.sp.data() + p * N * kPanel;
      shvit_gemm::gemm_packed(N, kPanel, QK, kT, QK, ws.qp.data() + p * QK * kPanel, s, kPanel, none);
      shvit_gemm::softmax_panel_columns(s, N);
    }
    if (panel_out) {
      for (int64_t p = 0; p < panels; ++p) {
        shvit_gemm::gemm_packed(PD, kPanel, N, v, ld, ws.sp.data() + p * N * kPanel,
                                out + (n0 / kPanel + p) * ldp, kPanel, oe);
      }
    } else {
      // the score panels of the chunk are consecutive: one packed operand of nq columns
      shvit_gemm::gemm_packed(PD, nq, N, v, ld, ws.sp.data(), out + n0, ldo, oe);
    }
  }
}

}  // namespace shvit_cpu
