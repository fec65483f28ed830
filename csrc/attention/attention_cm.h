// Channel-major float32 SHSA attention on the packed GEMM (gemm.h), for NCHW tensors: every
// operand stays in the layout NCHW gives it, so no transposes of activations.
//
// For one image with q, k (QK rows) and v (PD rows) stored channel-major (row c holds the
// channel's N tokens), queries are taken 16 at a time (one GEMM panel):
//   S^T (N keys x 16 queries) = K^T Q_panel      -- written in the packed-weight layout
//   softmax over the keys, column-wise           -- vectorised along the 16 queries
//   O (PD x 16) = V S^T + v_bias, ReLU            -- S^T is already the packed operand
// so the score tile per thread is linear in N (a few panels of N x 16), never N x N. The
// backward (attention_cm_backward_image) works on the same panels: dS^T in query panels for
// dq, dS and P transposed to key panels for dk and dv, every gradient written channel-major.
#pragma once

#include <cstdint>
#include <vector>

#include "gemm/gemm.h"

namespace shvit_cpu {

struct CmWorkspace {
  std::vector<float> kT;  // (N, QK)
  std::vector<float> qp;  // query panels of one chunk, packed
  std::vector<float> sp;  // scores, then probabilities, of one query chunk: N keys x w, row-major
};

// Queries per chunk (a multiple of 16).
constexpr int64_t kCmChunk = 64;

// Floats of one image's kept probabilities: P^T in query chunks, each an N keys x w tile (w: the
// chunk's queries rounded up to 16).
inline int64_t cm_prob_size(int64_t N) { return (N + 15) / 16 * 16 * N; }

// out[c, n] = ReLU(sum_m v[c, m] softmax_m(q[:, n] . k[:, m]) + v_bias[c]) for c < PD, n < N.
// q, k, v: channel-major rows with row stride ld (>= N); q carries the attention scale. With
// panel_out false, row c of the result goes to out + c * ldo; with panel_out true, query
// panel p (tokens 16p..16p+15) goes to out + p * ldp as PD rows of 16 floats (the packed
// layout of the next GEMM), all 16 columns written. v_bias may be null. q_scale multiplies q
// (1 when q carries the scale already). With probs (cm_prob_size(N) floats), the probabilities
// are kept there for the backward: the chunk of queries [n0, n0 + kCmChunk) as a row-major
// N x w tile at probs + n0 * N, P[n, m] at probs[n0 * N + m * w + n - n0] (w: the chunk's
// queries rounded up to 16; queries past N hold finite filler). With lse (N floats), the
// log-sum-exp of each query's scores.
void attention_cm_image(const float* q, const float* k, const float* v, int64_t ld, int64_t N, int64_t QK,
                        int64_t PD, const float* v_bias, float* out, int64_t ldo, bool panel_out, int64_t ldp,
                        CmWorkspace& ws, float q_scale = 1.f, float* probs = nullptr, float* lse = nullptr);

struct CmBackwardWorkspace {
  CmWorkspace fwd;         // probabilities recomputed when the forward did not keep them
  std::vector<float> vT;   // (N, PD)
  std::vector<float> dom;  // (PD, N): dO masked by the ReLU
  std::vector<float> delta;
  std::vector<float> gp;   // dO panels of one query chunk (B operand of dP^T = V^T dO)
  std::vector<float> ds;   // dP^T, then dS^T, of one query chunk: N keys x w queries, row-major
  std::vector<float> dsk;  // dS of the chunk in key panels (B operand of dk = s q dS)
  std::vector<float> pk;   // P of the chunk in key panels (B operand of dv = dO P)
  // more than one chunk of queries: dk^T, dv^T token-major (N x QK, N x PD), summed over the
  // chunks from the tiles in place (A operands) and the chunk's q and dO packed as weights
  std::vector<float> dkT, dvT, qw, gw;
};

// Backward of attention_cm_image (no v_bias) for one image (it adds prefetch ranges for the
// GEMMs, shvit_gemm::prefetch_during_gemm: the caller holds a shvit_gemm::PrefetchScope):
// o (PD rows, stride ldo) is its output after the ReLU, g (PD rows, stride ldg) the gradient of that output. Writes the
// gradients of q, k (QK rows each) and v (PD rows) to dq, dk, dv with row stride ldd. q, k, v
// as in the forward (q unscaled, q_scale = the attention scale); probs is the forward's kept
// panels or null (recomputed here, one chunk of queries at a time, with the forward's steps).
void attention_cm_backward_image(const float* q, const float* k, const float* v, int64_t ld, int64_t N, int64_t QK,
                                 int64_t PD, float q_scale, const float* o, int64_t ldo, const float* g, int64_t ldg,
                                 const float* probs, float* dq, float* dk, float* dv, int64_t ldd,
                                 CmBackwardWorkspace& ws);

// The rows [0, rows) of x (row stride ld, n floats each) for this thread's GEMMs to prefetch
// (shvit_gemm::prefetch_during_gemm) when they are one contiguous block of at most 256 KiB
// (264 channels of 14 x 14 tokens: 202 KiB; beyond, what the GEMMs work on would leave L2).
inline void prefetch_rows_during_gemm(const float* x, int64_t ld, int64_t rows, int64_t n) {
  const int64_t bytes = rows * n * static_cast<int64_t>(sizeof(float));
  if (ld == n && bytes <= 256 * 1024) shvit_gemm::prefetch_during_gemm(x, bytes);
}

// Normalised token panels of one image: out[(p * rows + c) * 16 + j] = (x[c * ldx + 16p + j] - mu) * r
// for c < rows, zero for tokens 16p + j >= N (the packed operand of W @ x).
void pack_tokens_normalized(const float* x, int64_t ldx, int64_t rows, int64_t N, float mu, float r, float* out);

// out[(p * rows + c) * 16 + j] = x[c * ldx + 16p + j], zero past N.
void pack_tokens_copy(const float* x, int64_t ldx, int64_t rows, int64_t N, float* out);

// out[(p * rows_total + row0 + c) * 16 + j] = max(x[c * ldx + 16p + j], 0) (NaN kept), zero past N.
void pack_tokens_relu(const float* x, int64_t ldx, int64_t rows, int64_t N, float* out, int64_t rows_total,
                      int64_t row0);

}  // namespace shvit_cpu
