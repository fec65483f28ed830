// Packed-weight float32 GEMM with fused epilogues (see gemm.h).
//
// Blocking: the k dimension in blocks of at most kKcMax (a 16-column weight panel of one block,
// <= 24 KiB, stays in L1 while it is reused by every 6-row tile of a row block); rows in blocks
// of kMc (a row block of A, <= 216 KiB, stays in L2 while it meets every panel). The first
// k-block starts from bias + residual, the last one applies the ReLU, so C may alias the
// residual. The micro-kernel keeps a 6 x 16 tile of C in twelve AVX registers and does
// twelve FMAs per k step.
#include "gemm.h"

#include <algorithm>

#if defined(__x86_64__) || defined(_M_X64)
#define SHVIT_GEMM_X86 1
#include <immintrin.h>
#endif

namespace shvit_gemm {

namespace {
constexpr int64_t kKcMax = 384;
constexpr int64_t kMc = 144;  // a multiple of the 6-row tile
}  // namespace

bool available() {
#ifdef SHVIT_GEMM_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

void pack_weight(const float* w, int64_t n, int64_t k, int64_t ldw, float* out) {
  const int64_t np = (n + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < np; ++p) {
    float* dst = out + p * k * kPanel;
    for (int64_t j = 0; j < kPanel; ++j) {
      const int64_t row = p * kPanel + j;
      if (row < n) {
        const float* src = w + row * ldw;
        for (int64_t kk = 0; kk < k; ++kk) dst[kk * kPanel + j] = src[kk];
      } else {
        for (int64_t kk = 0; kk < k; ++kk) dst[kk * kPanel + j] = 0.f;
      }
    }
  }
}

#ifdef SHVIT_GEMM_X86
namespace {

#define SHVIT_AVX2 __attribute__((target("avx2,fma")))

// acc (6 x 16, row-major) += A[0:6, 0:kc] @ panel[0:kc, 0:16]; rows of A at a[r] (r < 6).
// Named accumulators (not an array) so that all twelve stay in registers.
SHVIT_AVX2 inline void micro6(int64_t kc, const float* const* a, const float* b, float* acc) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
  __m256 c00 = _mm256_load_ps(acc + 0), c01 = _mm256_load_ps(acc + 8);
  __m256 c10 = _mm256_load_ps(acc + 16), c11 = _mm256_load_ps(acc + 24);
  __m256 c20 = _mm256_load_ps(acc + 32), c21 = _mm256_load_ps(acc + 40);
  __m256 c30 = _mm256_load_ps(acc + 48), c31 = _mm256_load_ps(acc + 56);
  __m256 c40 = _mm256_load_ps(acc + 64), c41 = _mm256_load_ps(acc + 72);
  __m256 c50 = _mm256_load_ps(acc + 80), c51 = _mm256_load_ps(acc + 88);
#pragma GCC unroll 4
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(b + kk * kPanel);
    const __m256 b1 = _mm256_loadu_ps(b + kk * kPanel + 8);
    __m256 av = _mm256_broadcast_ss(a0 + kk);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(a1 + kk);
    c10 = _mm256_fmadd_ps(av, b0, c10);
    c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(a2 + kk);
    c20 = _mm256_fmadd_ps(av, b0, c20);
    c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(a3 + kk);
    c30 = _mm256_fmadd_ps(av, b0, c30);
    c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(a4 + kk);
    c40 = _mm256_fmadd_ps(av, b0, c40);
    c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(a5 + kk);
    c50 = _mm256_fmadd_ps(av, b0, c50);
    c51 = _mm256_fmadd_ps(av, b1, c51);
  }
  _mm256_store_ps(acc + 0, c00), _mm256_store_ps(acc + 8, c01);
  _mm256_store_ps(acc + 16, c10), _mm256_store_ps(acc + 24, c11);
  _mm256_store_ps(acc + 32, c20), _mm256_store_ps(acc + 40, c21);
  _mm256_store_ps(acc + 48, c30), _mm256_store_ps(acc + 56, c31);
  _mm256_store_ps(acc + 64, c40), _mm256_store_ps(acc + 72, c41);
  _mm256_store_ps(acc + 80, c50), _mm256_store_ps(acc + 88, c51);
}

// A full 6 x 16 tile with its epilogue in registers (the common case).
SHVIT_AVX2 inline void tile_full(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                                 bool first, bool last, const float* bias, const float* res, int64_t ldr, bool relu) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (first) {
    const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
    c00 = c10 = c20 = c30 = c40 = c50 = b0;
    c01 = c11 = c21 = c31 = c41 = c51 = b1;
    if (res) {
#define SHVIT_ADD_ROW(r)                                                 \
  c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(res + r * ldr));     \
  c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(res + r * ldr + 8));
      SHVIT_ADD_ROW(0) SHVIT_ADD_ROW(1) SHVIT_ADD_ROW(2) SHVIT_ADD_ROW(3) SHVIT_ADD_ROW(4) SHVIT_ADD_ROW(5)
#undef SHVIT_ADD_ROW
    }
  } else {
#define SHVIT_LOAD_ROW(r)                          \
  c##r##0 = _mm256_loadu_ps(c + r * ldc);          \
  c##r##1 = _mm256_loadu_ps(c + r * ldc + 8);
    SHVIT_LOAD_ROW(0) SHVIT_LOAD_ROW(1) SHVIT_LOAD_ROW(2) SHVIT_LOAD_ROW(3) SHVIT_LOAD_ROW(4) SHVIT_LOAD_ROW(5)
#undef SHVIT_LOAD_ROW
  }
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
#pragma GCC unroll 4
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(b + kk * kPanel);
    const __m256 b1 = _mm256_loadu_ps(b + kk * kPanel + 8);
#define SHVIT_FMA_ROW(r)                             \
  {                                                  \
    const __m256 av = _mm256_broadcast_ss(a##r + kk); \
    c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);      \
    c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);      \
  }
    SHVIT_FMA_ROW(0) SHVIT_FMA_ROW(1) SHVIT_FMA_ROW(2) SHVIT_FMA_ROW(3) SHVIT_FMA_ROW(4) SHVIT_FMA_ROW(5)
#undef SHVIT_FMA_ROW
  }
  if (last && relu) {
    const __m256 z = _mm256_setzero_ps();  // max(0, v): NaN stays NaN, as in torch.relu
#define SHVIT_RELU_ROW(r)                 \
  c##r##0 = _mm256_max_ps(z, c##r##0);    \
  c##r##1 = _mm256_max_ps(z, c##r##1);
    SHVIT_RELU_ROW(0) SHVIT_RELU_ROW(1) SHVIT_RELU_ROW(2) SHVIT_RELU_ROW(3) SHVIT_RELU_ROW(4) SHVIT_RELU_ROW(5)
#undef SHVIT_RELU_ROW
  }
#define SHVIT_STORE_ROW(r)                       \
  _mm256_storeu_ps(c + r * ldc, c##r##0);        \
  _mm256_storeu_ps(c + r * ldc + 8, c##r##1);
  SHVIT_STORE_ROW(0) SHVIT_STORE_ROW(1) SHVIT_STORE_ROW(2) SHVIT_STORE_ROW(3) SHVIT_STORE_ROW(4) SHVIT_STORE_ROW(5)
#undef SHVIT_STORE_ROW
}

// Any other tile of C: rows (<= 6) x nv (<= 16) entries over one k-block. Short tiles repeat their
// last row of A (the extra results are not stored).
SHVIT_AVX2 void tile(int64_t rows, int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                     int64_t nv, bool first, bool last, const float* bias, const float* res, int64_t ldr, bool relu) {
  alignas(32) float acc[6 * kPanel];
  const float* ar[6];
  for (int64_t r = 0; r < 6; ++r) ar[r] = a + std::min(r, rows - 1) * lda;
  const bool full = nv == kPanel;
  for (int64_t r = 0; r < 6; ++r) {
    float* t = acc + r * kPanel;
    if (r >= rows) {
      for (int64_t j = 0; j < kPanel; ++j) t[j] = 0.f;
    } else if (first) {
      for (int64_t j = 0; j < kPanel; ++j) {
        t[j] = (full || j < nv) ? (bias ? bias[j] : 0.f) + (res ? res[r * ldr + j] : 0.f) : 0.f;
      }
    } else {
      for (int64_t j = 0; j < kPanel; ++j) t[j] = (full || j < nv) ? c[r * ldc + j] : 0.f;
    }
  }
  micro6(kc, ar, b, acc);
  for (int64_t r = 0; r < rows; ++r) {
    const float* t = acc + r * kPanel;
    float* cr = c + r * ldc;
    if (last && relu) {
      for (int64_t j = 0; j < nv; ++j) cr[j] = t[j] < 0.f ? 0.f : t[j];  // NaN stays NaN, as in torch.relu
    } else {
      for (int64_t j = 0; j < nv; ++j) cr[j] = t[j];
    }
  }
}

SHVIT_AVX2 void gemm_avx2(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* wp, float* c,
                          int64_t ldc, const Epilogue& epi) {
  const int64_t np = (n + kPanel - 1) / kPanel;
  const int64_t nk = (k + kKcMax - 1) / kKcMax;
  const int64_t kcs = ((k + nk - 1) / nk + 7) / 8 * 8;
  for (int64_t pc = 0; pc < k; pc += kcs) {
    const int64_t kc = std::min(kcs, k - pc);
    const bool first = pc == 0, last = pc + kc >= k;
    for (int64_t ic = 0; ic < m; ic += kMc) {
      const int64_t mc = std::min(kMc, m - ic);
      for (int64_t jp = 0; jp < np; ++jp) {
        const int64_t col = jp * kPanel;
        const int64_t nv = std::min(kPanel, n - col);
        const float* panel = wp + (jp * k + pc) * kPanel;
        const float* bias = epi.bias ? epi.bias + col : nullptr;
        for (int64_t ir = 0; ir < mc; ir += 6) {
          const int64_t row = ic + ir;
          const int64_t rows = std::min<int64_t>(6, mc - ir);
          const float* res = epi.residual ? epi.residual + row * epi.ldr + col : nullptr;
          if (rows == 6 && nv == kPanel) {
            tile_full(kc, a + row * lda + pc, lda, panel, c + row * ldc + col, ldc, first, last, bias, res, epi.ldr,
                      epi.relu);
            continue;
          }
          tile(rows, kc, a + row * lda + pc, lda, panel, c + row * ldc + col, ldc, nv, first, last, bias, res,
               epi.ldr, epi.relu);
        }
      }
    }
  }
}

}  // namespace
#endif

void gemm_packed(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* wp, float* c,
                 int64_t ldc, const Epilogue& epi) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // an empty sum: the epilogue alone
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        float v = (epi.bias ? epi.bias[j] : 0.f) + (epi.residual ? epi.residual[i * epi.ldr + j] : 0.f);
        c[i * ldc + j] = epi.relu && v < 0.f ? 0.f : v;
      }
    }
    return;
  }
#ifdef SHVIT_GEMM_X86
  if (available()) {
    gemm_avx2(m, n, k, a, lda, wp, c, ldc, epi);
    return;
  }
#endif
  // Portable loop (the ops route to ATen before reaching it; kept so the function is total).
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const float* panel = wp + (j / kPanel) * k * kPanel + j % kPanel;
      float s = (epi.bias ? epi.bias[j] : 0.f) + (epi.residual ? epi.residual[i * epi.ldr + j] : 0.f);
      for (int64_t kk = 0; kk < k; ++kk) s += a[i * lda + kk] * panel[kk * kPanel];
      c[i * ldc + j] = epi.relu && s < 0.f ? 0.f : s;
    }
  }
}

}  // namespace shvit_gemm
