// Channel-major float32 SHSA attention on the packed GEMM (gemm.h), for NCHW tensors: every
// operand stays in the layout NCHW gives it, so no transposes of activations.
//
// For one image with q, k (QK rows) and v (PD rows) stored channel-major (row c holds the
// channel's N tokens), queries are taken 16 at a time (one GEMM panel):
//   S^T (N keys x 16 queries) = K^T Q_panel      -- written in the packed-weight layout
//   softmax over the keys, column-wise           -- vectorised along the 16 queries
//   O (PD x 16) = V S^T + v_bias, ReLU            -- S^T is already the packed operand
// so the score tile per thread is linear in N (a few panels of N x 16), never N x N.
#pragma once

#include <cstdint>
#include <vector>

namespace shvit_cpu {

struct CmWorkspace {
  std::vector<float> kT;  // (N, QK)
  std::vector<float> qp;  // query panels of one chunk, packed
  std::vector<float> sp;  // score panels of one chunk (N x 16 each)
};

// Queries per chunk (a multiple of 16).
constexpr int64_t kCmChunk = 64;

// out[c, n] = ReLU(sum_m v[c, m] softmax_m(q[:, n] . k[:, m]) + v_bias[c]) for c < PD, n < N.
// q, k, v: channel-major rows with row stride ld (>= N); q carries the attention scale. With
// panel_out false, row c of the result goes to out + c * ldo; with panel_out true, query
// panel p (tokens 16p..16p+15) goes to out + p * ldp as PD rows of 16 floats (the packed
// layout of the next GEMM), all 16 columns written. v_bias may be null.
void attention_cm_image(const float* q, const float* k, const float* v, int64_t ld, int64_t N, int64_t QK,
                        int64_t PD, const float* v_bias, float* out, int64_t ldo, bool panel_out, int64_t ldp,
                        CmWorkspace& ws);

// Normalised token panels of one image: out[(p * rows + c) * 16 + j] = (x[c * ldx + 16p + j] - mu) * r
// for c < rows, zero for tokens 16p + j >= N (the packed operand of W @ x).
void pack_tokens_normalized(const float* x, int64_t ldx, int64_t rows, int64_t N, float mu, float r, float* out);

// out[(p * rows + c) * 16 + j] = x[c * ldx + 16p + j], zero past N.
void pack_tokens_copy(const float* x, int64_t ldx, int64_t rows, int64_t N, float* out);

// out[(p * rows_total + row0 + c) * 16 + j] = max(x[c * ldx + 16p + j], 0) (NaN kept), zero past N.
void pack_tokens_relu(const float* x, int64_t ldx, int64_t rows, int64_t N, float* out, int64_t rows_total,
                      int64_t row0);

}  // namespace shvit_cpu
