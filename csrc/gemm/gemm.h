// A float32 GEMM for token-major (channels_last) activations times a pre-packed weight, with
// the epilogues of SHViT's 1x1 convolutions fused: bias, ReLU, residual add.
//
//   C[m, n] = relu?( sum_k A[m, k] * W[n, k] + bias[n] + row_bias[m] + residual[m, n] )
//
// W (N, K) -- a 1x1 conv weight -- is packed once into panels of 16 output channels,
// K x 16 contiguous floats each (zero past N), so the inner kernel streams one panel from L1
// while six rows of A are broadcast. Single-threaded; callers split the rows across threads.
// Runs at the AVX2 and AVX-512 levels of cpu_isa.h (see available()).
#pragma once

#include <cstdint>

namespace shvit_gemm {

constexpr int64_t kPanel = 16;

struct Epilogue {
  const float* bias = nullptr;      // (N,) or null
  const float* row_bias = nullptr;  // (M,) or null: one value per row of C (channel-major outputs)
  const float* residual = nullptr;  // (M, N) with row stride ldr, or null
  bool relu = false;                // applied last, to the whole sum
  int64_t ldr = 0;
  // (N,) or null: col_max[j] = max(col_max[j], C[i, j]) over the rows of C written, NaN
  // ignored (the caller starts it at -inf). gemm_packed only, and not with a row split across
  // threads.
  float* col_max = nullptr;
};

// Whether the kernels run: the active instruction-set level (cpu_isa.h) is AVX2 or higher.
// AVX2 runs 6 x 16 tiles in ymm registers, AVX-512 6 x 64 tiles in zmm registers. Where this is
// false the callers use ATen's GEMMs.
bool available();

// Floats in the packed form of an (n, k) weight.
inline int64_t packed_size(int64_t n, int64_t k) { return (n + kPanel - 1) / kPanel * kPanel * k; }

// out[(p * k + kk) * 16 + j] = w[(p * 16 + j) * ldw + kk], zero for p * 16 + j >= n.
void pack_weight(const float* w, int64_t n, int64_t k, int64_t ldw, float* out);

// out + p * panel_stride + kk * 16 + j = w[(p * 16 + j) * ldw + kk] (zero for p * 16 + j >= n): the
// columns [k0, k0 + k) of a packed (n, K) weight when out points at its column k0 and
// panel_stride = K * 16.
void pack_weight_cols(const float* w, int64_t n, int64_t k, int64_t ldw, float* out, int64_t panel_stride);

// C (m, n; row stride ldc) = epi(A (m, k; row stride lda) @ W^T), W packed by pack_weight.
// C may alias the residual (same pointer and stride: an in-place residual add) but not A.
void gemm_packed(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* wp, float* c,
                 int64_t ldc, const Epilogue& epi);

// The same product with B (k, n; row stride ldb) read in place, row-major: C = epi(A @ B), so
// B is the packed form's transpose, B[kk, j] = W[j, kk]. The kernels stream B's rows as
// 16-column panels (a channel-major activation needs no packing; rows of whole cache lines run
// best), so each row must be readable up to the next multiple of 16 columns (what lies past n
// is read but never used). Every output is summed in the same k order as gemm_packed, so the
// two give identical results. C must not alias A or B.
void gemm_rows(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
               int64_t ldc, const Epilogue& epi);

// C (m, n; row stride ldc) = relu?(A @ W^T + bias) where A (m, taps * kt) is given as a table
// of row pointers: A[i, t * kt + kk] = rows[t * m + i][kk] (an im2col that is never written:
// a convolution's taps read straight from its input, a zero row for taps outside the image).
// W packed by pack_weight for k = taps * kt. bias (n,) or null. Every output is summed in the
// same k order as gemm_packed over the gathered A, so the two give identical results (on
// CPUs without AVX-512 this gathers A and calls gemm_packed).
void gemm_taps(int64_t m, int64_t n, int64_t kt, int64_t taps, const float* const* rows, const float* wp, float* c,
               int64_t ldc, const float* bias, bool relu);

// C (m, n) = epi(A (m, k) @ B) for B (k, n) in token panels (the packed form of B^T: a
// channel-major product such as W @ x_b), as gemm_packed. A last partial panel of at most 8
// columns runs transposed, as t rows against a_packed (pack_weight of A): its tiles then have
// t of 6 rows busy instead of t of 16 columns. No residual or column bias in epi (they are
// not transposed); a_packed may be null (then gemm_packed throughout). The same results as
// gemm_packed (each output summed in the same k order).
void gemm_token_panels(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* a_packed,
                       const float* bp, float* c, int64_t ldc, const Epilogue& epi);

// Whether gemm_token_panels runs the tail of n columns transposed (so a_packed is worth making).
inline bool transposes_tail(int64_t n) { return n > kPanel && n % kPanel != 0 && n % kPanel <= 8; }

// pack_weight of the transpose: out[(p * k + kk) * 16 + j] = v[kk * ldv + p * 16 + j] (v is
// (k, n) with row stride ldv; zero for p * 16 + j >= n).
void pack_weight_t(const float* v, int64_t n, int64_t k, int64_t ldv, float* out);

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols (8 x 8 register transposes).
void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols);

// Adds a byte range (up to six) for this thread's AVX-512 GEMM tiles to prefetch into L2 while
// they compute: one cache line per k step of their 6 x 64 and 6 x 32 tiles (bound by their FMAs;
// the loads ride along), the ranges in order (first: ahead of those not yet taken), each from
// its front. For the operands of a memory-bound pass that follows the GEMMs, and its
// destination (a line read by one core alone arrives exclusive, so the later stores need no
// second request).
void prefetch_during_gemm(const void* p, int64_t bytes, bool first = false);
// Drops this thread's ranges.
void clear_gemm_prefetch();
// Clears this thread's ranges when made and when it goes (so none outlive the buffers they name,
// an exception included).
struct PrefetchScope {
  PrefetchScope() { clear_gemm_prefetch(); }
  ~PrefetchScope() { clear_gemm_prefetch(); }
  PrefetchScope(const PrefetchScope&) = delete;
  PrefetchScope& operator=(const PrefetchScope&) = delete;
};

// Row-wise softmax in place: rows (m, n) with row stride ld; exact-max shift, NaN propagates.
void softmax_rows(float* s, int64_t m, int64_t n, int64_t ld);

// Column-wise softmax in place of kPanel columns: p (m, 16) with row stride ld, each of the 16
// columns normalised over its m entries; exact-max shift, NaN propagates per column. (16
// queries of a score tile S^T, keys as rows.) With lse, lse[j] = log(sum_i exp(p[i, j])) of
// the input column j (NaN for a column holding NaN). With col_max (16 floats: the maxima of the
// columns, NaN ignored, as Epilogue::col_max leaves them) the pass that finds them is skipped;
// a column holding NaN still comes out NaN (its sum is NaN).
void softmax_panel_columns(float* p, int64_t m, float* lse = nullptr, int64_t ld = kPanel,
                           const float* col_max = nullptr);

}  // namespace shvit_gemm
