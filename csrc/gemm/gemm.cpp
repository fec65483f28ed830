// Packed-weight float32 GEMM with fused epilogues (see gemm.h).
//
// Blocking: the k dimension in blocks of at most kKcMax (a 16-column weight panel of one block,
// <= 24 KiB, stays in L1 while it is reused by every 6-row tile of a row block); rows in blocks
// of at most kMcMax (a row block of A, <= 216 KiB, stays in L2 while it meets every panel),
// fewer for wide outputs (row_block). The first
// k-block starts from bias + residual, the last one applies the ReLU, so C may alias the
// residual. The micro-kernel keeps a 6 x 16 tile of C in twelve AVX registers and does
// twelve FMAs per k step; a panel with at most 8 valid columns (the last one of a width that
// is not a multiple of 16, such as 196 or 49 tokens) runs a 6 x 8 kernel, half the FMAs.
// On CPUs with AVX-512F the same loops run 6 x 64 tiles (four panels, 24 zmm accumulators;
// 6 x 32 and 12 x 16 for the last panels; gemm_avx512 below), about 1.5x the AVX2 kernel's rate;
// SHVIT_KERNELS_ISA=avx2 keeps AVX2 (cpu_isa.h). Both accumulate every output in the same k
// order, so their results are identical.
#include "gemm/gemm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_isa.h"

namespace shvit_gemm {

namespace {
constexpr int64_t kKcMax = 384;
constexpr int64_t kMcMax = 144, kMcMin = 48;  // multiples of the 6-row tile
constexpr int64_t kCBlockFloats = 48 * 896;   // 168 KiB

// Rows per block for n output columns: kMcMax, or as many as keep the block's C rows within
// kCBlockFloats. With 144 rows, S4's first PatchMerging conv (224 -> 896 channels, 4096 rows)
// ran at 145-148 GFLOP/s against 158-160 for 48 rows: its 516 KiB of C per block and the
// 800 KiB weight crowded the 2 MiB L2. Same-process alternation, model level: S1 and S4 at
// batch 16 0.6% and 0.4% faster; convolutions up to 448 outputs keep 96-144 rows.
int64_t row_block(int64_t n) {
  return std::clamp<int64_t>(kCBlockFloats / std::max<int64_t>(n, 1) / 6 * 6, kMcMin, kMcMax);
}
}  // namespace

bool available() { return shvit_isa::at_least(shvit_isa::Isa::kAvx2); }

#ifdef SHVIT_X86
namespace {
bool use_avx512() { return shvit_isa::active() == shvit_isa::Isa::kAvx512; }
}  // namespace
#endif

namespace {
void pack_weight_cols_portable(const float* w, int64_t n, int64_t k, int64_t ldw, float* out, int64_t panel_stride,
                               int64_t k0) {
  const int64_t np = (n + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < np; ++p) {
    float* dst = out + p * panel_stride;
    for (int64_t j = 0; j < kPanel; ++j) {
      const int64_t row = p * kPanel + j;
      if (row < n) {
        const float* src = w + row * ldw;
        for (int64_t kk = k0; kk < k; ++kk) dst[kk * kPanel + j] = src[kk];
      } else {
        for (int64_t kk = k0; kk < k; ++kk) dst[kk * kPanel + j] = 0.f;
      }
    }
  }
}
}  // namespace

void pack_weight(const float* w, int64_t n, int64_t k, int64_t ldw, float* out) {
  pack_weight_cols(w, n, k, ldw, out, k * kPanel);
}

#ifdef SHVIT_X86
namespace {

#define SHVIT_AVX2 SHVIT_TARGET_AVX2

#define SHVIT_ROWS6(X) X(0) X(1) X(2) X(3) X(4) X(5)

// acc (6 x 16, the tile's running sum) += A[rows, k-block] @ panel[k-block, 0:16], with the
// six rows of A at a[r] (already offset to the block) and the panel's k-block at b, its row kk
// (16 floats) at b + kk * ldb (ldb = 16 in a packed weight; the row stride of a row-major B
// read in place, see gemm_rows).
SHVIT_AVX2 inline void micro6(int64_t kc, const float* const* a, const float* b, int64_t ldb, float* acc) {
  __m256 c00 = _mm256_load_ps(acc + 0), c01 = _mm256_load_ps(acc + 8);
  __m256 c10 = _mm256_load_ps(acc + 16), c11 = _mm256_load_ps(acc + 24);
  __m256 c20 = _mm256_load_ps(acc + 32), c21 = _mm256_load_ps(acc + 40);
  __m256 c30 = _mm256_load_ps(acc + 48), c31 = _mm256_load_ps(acc + 56);
  __m256 c40 = _mm256_load_ps(acc + 64), c41 = _mm256_load_ps(acc + 72);
  __m256 c50 = _mm256_load_ps(acc + 80), c51 = _mm256_load_ps(acc + 88);
#define SHVIT_ROW_PTR(r) const float* a##r = a[r];
  SHVIT_ROWS6(SHVIT_ROW_PTR)
#undef SHVIT_ROW_PTR
#pragma GCC unroll 4
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(b + kk * ldb);
    const __m256 b1 = _mm256_loadu_ps(b + kk * ldb + 8);
#define SHVIT_FMA_ROW(r)                              \
  {                                                   \
    const __m256 av = _mm256_broadcast_ss(a##r + kk); \
    c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);       \
    c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);       \
  }
    SHVIT_ROWS6(SHVIT_FMA_ROW)
#undef SHVIT_FMA_ROW
  }
#define SHVIT_STORE_ACC(r)                          \
  _mm256_store_ps(acc + r * 2 * 8, c##r##0);        \
  _mm256_store_ps(acc + r * 2 * 8 + 8, c##r##1);
  SHVIT_ROWS6(SHVIT_STORE_ACC)
#undef SHVIT_STORE_ACC
}

// The same for the first 8 columns of the panel only (a tile of at most 8 valid columns: the
// last panel of an operand whose width is not a multiple of 16): half the FMAs of micro6.
SHVIT_AVX2 inline void micro6_8(int64_t kc, const float* const* a, const float* b, int64_t ldb, float* acc) {
  __m256 c00 = _mm256_load_ps(acc + 0), c10 = _mm256_load_ps(acc + 16), c20 = _mm256_load_ps(acc + 32);
  __m256 c30 = _mm256_load_ps(acc + 48), c40 = _mm256_load_ps(acc + 64), c50 = _mm256_load_ps(acc + 80);
#define SHVIT_ROW_PTR(r) const float* a##r = a[r];
  SHVIT_ROWS6(SHVIT_ROW_PTR)
#undef SHVIT_ROW_PTR
#pragma GCC unroll 4
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(b + kk * ldb);
#define SHVIT_FMA_ROW(r) c##r##0 = _mm256_fmadd_ps(_mm256_broadcast_ss(a##r + kk), b0, c##r##0);
    SHVIT_ROWS6(SHVIT_FMA_ROW)
#undef SHVIT_FMA_ROW
  }
#define SHVIT_STORE_ACC(r) _mm256_store_ps(acc + r * 2 * 8, c##r##0);
  SHVIT_ROWS6(SHVIT_STORE_ACC)
#undef SHVIT_STORE_ACC
}

// A tile of C: rows (<= 6) x nv (<= 16) entries of C at c (row stride ldc) over the k-block
// [k0, k0 + kc); a points at the tile's first row of A (row stride lda), b at the k-block of
// its panel. The first k-block starts from bias + residual, the last applies the ReLU. Short
// tiles repeat their last row of A (the extra results are not stored).
SHVIT_AVX2 void tile(int64_t rows, int64_t nv, int64_t kc, const float* a, int64_t lda,
                     const float* b, int64_t ldb, float* c, int64_t ldc, bool first, bool last, const float* bias,
                     const float* rbias, const float* res, int64_t ldr, bool relu, float* cmax) {
  alignas(32) float acc[6 * kPanel];
  const float* ar[6];
  for (int64_t r = 0; r < 6; ++r) ar[r] = a + std::min(r, rows - 1) * lda;
  if (rows == 6 && nv == kPanel) {
    __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps();
    for (int64_t r = 0; r < 6; ++r) {
      if (first) {
        v0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
        v1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
        if (rbias) {
          const __m256 rb = _mm256_set1_ps(rbias[r]);
          v0 = _mm256_add_ps(v0, rb);
          v1 = _mm256_add_ps(v1, rb);
        }
        if (res) {
          v0 = _mm256_add_ps(v0, _mm256_loadu_ps(res + r * ldr));
          v1 = _mm256_add_ps(v1, _mm256_loadu_ps(res + r * ldr + 8));
        }
      } else {
        v0 = _mm256_loadu_ps(c + r * ldc);
        v1 = _mm256_loadu_ps(c + r * ldc + 8);
      }
      _mm256_store_ps(acc + r * kPanel, v0);
      _mm256_store_ps(acc + r * kPanel + 8, v1);
    }
    micro6(kc, ar, b, ldb, acc);
    const __m256 z = _mm256_setzero_ps();
    __m256 m0 = _mm256_setzero_ps(), m1 = m0;
    if (last && cmax) {
      m0 = _mm256_loadu_ps(cmax);
      m1 = _mm256_loadu_ps(cmax + 8);
    }
    for (int64_t r = 0; r < 6; ++r) {
      v0 = _mm256_load_ps(acc + r * kPanel);
      v1 = _mm256_load_ps(acc + r * kPanel + 8);
      if (last && relu) {  // max(0, v): NaN stays NaN, as in torch.relu
        v0 = _mm256_max_ps(z, v0);
        v1 = _mm256_max_ps(z, v1);
      }
      _mm256_storeu_ps(c + r * ldc, v0);
      _mm256_storeu_ps(c + r * ldc + 8, v1);
      m0 = _mm256_max_ps(v0, m0);  // (v, m): a NaN v leaves m
      m1 = _mm256_max_ps(v1, m1);
    }
    if (last && cmax) {
      _mm256_storeu_ps(cmax, m0);
      _mm256_storeu_ps(cmax + 8, m1);
    }
    return;
  }
  for (int64_t r = 0; r < 6; ++r) {
    float* t = acc + r * kPanel;
    for (int64_t j = 0; j < kPanel; ++j) {
      float v = 0.f;
      if (r < rows && j < nv) {
        v = first ? (bias ? bias[j] : 0.f) + (rbias ? rbias[r] : 0.f) + (res ? res[r * ldr + j] : 0.f)
                  : c[r * ldc + j];
      }
      t[j] = v;
    }
  }
  if (nv <= 8) {
    micro6_8(kc, ar, b, ldb, acc);
  } else {
    micro6(kc, ar, b, ldb, acc);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* t = acc + r * kPanel;
    float* cr = c + r * ldc;
    for (int64_t j = 0; j < nv; ++j) cr[j] = (last && relu && t[j] < 0.f) ? 0.f : t[j];
    if (last && cmax) {
      for (int64_t j = 0; j < nv; ++j) cmax[j] = cr[j] > cmax[j] ? cr[j] : cmax[j];
    }
  }
}

// The blocks of a GEMM: f(ic, mc, kc, k0, first, last) for row block [ic, ic + mc) (row_block(n) rows)
// and the k-block [k0, k0 + kc), first / last whether it starts / ends the sum: the whole k
// when it is at most kc_max, else balanced parts (multiples of 8).
template <typename F>
inline void for_each_block(int64_t m, int64_t n, int64_t k, int64_t kc_max, const F& f) {
  const int64_t mc_max = row_block(n);
  const int64_t nk = std::max<int64_t>(1, (k + kc_max - 1) / kc_max);
  const int64_t kcs = nk == 1 ? k : ((k + nk - 1) / nk + 7) / 8 * 8;
  for (int64_t ic = 0; ic < m; ic += mc_max) {
    const int64_t mc = std::min(mc_max, m - ic);
    for (int64_t k0 = 0; k0 < k; k0 += kcs) {
      const int64_t kc = std::min(kcs, k - k0);
      f(ic, mc, kc, k0, k0 == 0, k0 + kc >= k);
    }
  }
}

// C rows [0, m) = epi(A @ W^T), in the blocks of for_each_block (k-blocks of at most kKcMax);
// panel p of W at wp + p * bps, its rows ldb apart.
SHVIT_AVX2 void gemm_avx2(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* wp, int64_t ldb,
                          int64_t bps, float* c, int64_t ldc, const Epilogue& epi) {
  const int64_t np = (n + kPanel - 1) / kPanel;
  const auto block = [&](int64_t ic, int64_t mc, int64_t kc, int64_t k0, bool first, bool last) {
    const float* as = a + k0;
    for (int64_t jp = 0; jp < np; ++jp) {
      const int64_t col = jp * kPanel;
      const int64_t nv = std::min(kPanel, n - col);
      const float* b = wp + jp * bps + k0 * ldb;
      const float* bias = epi.bias ? epi.bias + col : nullptr;
      float* cmax = epi.col_max ? epi.col_max + col : nullptr;
      for (int64_t ir = 0; ir < mc; ir += 6) {
        const int64_t row = ic + ir;
        const float* res = epi.residual ? epi.residual + row * epi.ldr + col : nullptr;
        const float* rbias = epi.row_bias ? epi.row_bias + row : nullptr;
        tile(std::min<int64_t>(6, mc - ir), nv, kc, as + row * lda, lda, b, ldb, c + row * ldc + col,
             ldc, first, last, bias, rbias, res, epi.ldr, epi.relu, cmax);
      }
    }
  };
  for_each_block(m, n, k, kKcMax, block);
}

// AVX-512 variant (x86-64 CPUs with AVX-512F): a zmm register holds a whole 16-column panel row,
// so the micro-kernel covers 6 rows x 4 panels (64 columns, 24 accumulators) while four panels
// are left, then 6 rows x 2 panels (12 accumulators), and a lone last panel 12 rows x 16 (12
// accumulators; 6 x 16 for its last rows). Where the rows of a block are not a multiple of 6,
// some tiles take 5 (20 accumulators): at batch 1 SHViT's stage-3 GEMMs have 16 rows, which
// 6-row tiles covered as 6 + 6 + 4, computing 18 (49 rows at stage 2: 54); as 6 + 5 + 5 they
// compute none in vain. One thread, batch 1, interleaved call by call on the Zen 4 VM:
// S1 2.7% faster, S2 2.9%, S3 2.3%, S4 0.7%; batch 16 unchanged; results identical (each
// entry's sum runs over k in the same order). Edges use masked loads and stores. The k-block is at
// most kKcMax512: the whole k of SHViT's widths up to 512 channels, so each C tile is loaded and
// stored once. (Blocks of 128, whose four panels stay in L1, ran the 1x1 convolutions of
// SHViT-S4 2-5% slower on the 2 MiB-L2 benchmark machine, interleaved runs: the B panels
// stream from L2 at the tile's pace, the C tile's extra round trips did not pay.)
#define SHVIT_AVX512 SHVIT_TARGET_AVX512

constexpr int64_t kKcMax512 = 512;
// Weight prefetching for small m, where the GEMMs stream their packed weights from L3 (at
// batch 1 SHViT's 1x1 convolutions have 16-256 rows; its 25-70 MB of weights do not fit L2).
// The first row tile of each panel group reads its panels cold and prefetches them kPbDist k
// steps (1 KiB per panel) ahead into L1; the second and third row tiles of a quad prefetch the
// next group's panels while they compute from cache. With the hardware prefetchers alone the
// stage-3 FFNs read their weights at 6-8 GB/s, a third of what one core reads from L3 here
// (25 GB/s). One thread, interleaved call by call, 2-core AVX-512 VM: the first-tile
// prefetch made SHViT-S4 at batch 1 4.5% faster and S1 3%, the next-group prefetch another 3%
// and 2.7%; batch 16 unchanged (0.99x, 0.995x). Prefetching into L2 instead, or 32-128 steps
// ahead, was no faster.
constexpr int64_t kPbDist = 16;

// prefetch_during_gemm's ranges of this thread, taken in order
struct PrefetchRanges {
  static constexpr int kMax = 6;
  const char* p[kMax];
  const char* end[kMax];
  int n = 0;
  int cur = 0;
};
thread_local PrefetchRanges tl_prefetch;

// The store masks of P panels holding nv (<= 16 P) valid columns.
template <int P>
SHVIT_AVX512 __attribute__((always_inline)) inline void panel_masks(int64_t nv, __mmask16 mk[P]) {
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
    const int64_t v = std::min<int64_t>(kPanel, nv - p * kPanel);
    mk[p] = v <= 0 ? 0 : static_cast<__mmask16>((1u << v) - 1u);
  }
}

// One k step of an R x 16P tile: the P panel rows at b + p * bps times A[r][kk] broadcast.
template <int R, int P>
SHVIT_AVX512 __attribute__((always_inline)) inline void fma_step(__m512 acc[R * P], const float* const ar[R],
                                                                 int64_t kk, const float* b, int64_t bps) {
  __m512 bv[P];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) bv[p] = _mm512_loadu_ps(b + p * bps);
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    const __m512 av = _mm512_set1_ps(ar[r][kk]);
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) acc[r * P + p] = _mm512_fmadd_ps(av, bv[p], acc[r * P + p]);
  }
}

// Prefetches line i of an R x 16P tile of C (row i / P, panel i % P) for writing. A tile's
// first k steps issue one each, in a loop of their own (in the main loop the test took
// registers from it), so that its stores at the end find the lines in L1: C rows are up to
// 5 KiB apart in SHViT's wide layers, a stride the hardware prefetchers do not follow, and a
// convolution's output of several MiB goes past L2, so each store missed to L3 (a read for
// ownership) at the end of its tile. One thread, batch 16, interleaved call by call on the
// 2-core AVX-512 VM: SHViT-S1 4.1% and S4 5.4% faster (batch 1: 0.2% and 1.4%); all lines
// prefetched before the loop instead: 2.4% and 3.2%.
template <int P>
SHVIT_AVX512 __attribute__((always_inline)) inline void prefetch_c_line(const float* c, int64_t ldc, int64_t i) {
  asm volatile("prefetchw %0" : : "m"(*(c + (i / P) * ldc + (i % P) * kPanel)));
}

// Stores the first `rows` rows of an R x 16P tile (masked columns), max(0, v) first with relu.
template <int R, int P>
SHVIT_AVX512 __attribute__((always_inline)) inline void store_tile(const __m512 acc[R * P], int64_t rows, float* c,
                                                                   int64_t ldc, const __mmask16 mk[P], bool relu) {
  const __m512 z = _mm512_setzero_ps();
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      __m512 v = acc[r * P + p];
      if (relu) v = _mm512_max_ps(z, v);  // max(0, v): NaN stays NaN, as in torch.relu
      _mm512_mask_storeu_ps(c + r * ldc + p * kPanel, mk[p], v);
    }
  }
}

// A tile of C: rows (<= R) x nv (<= 16 P) entries at c over one k-block, as tile() does, with
// the R * P accumulators in zmm registers from the first load to the last store (no round trip
// through memory: the tiles of the k = 16 score GEMM spent about a third of their time there).
// Panel p at b + p * bps, rows ldb apart. Short tiles repeat their last row of A (the extra
// results are not stored).
template <int R, int P, bool PF = false, bool PB = false, bool NX = false>
SHVIT_AVX512 void tile_z(int64_t rows, int64_t nv, int64_t kc, const float* a, int64_t lda, const float* b,
                         int64_t bps, int64_t ldb, float* c, int64_t ldc, bool first, bool last, const float* bias, const float* rbias, const float* res, int64_t ldr,
                         bool relu, float* cmax, const float* nx = nullptr, int64_t nx_stride = 0) {
  const float* ar[R];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) ar[r] = a + std::min<int64_t>(r, rows - 1) * lda;
  __mmask16 mk[P];
  panel_masks<P>(nv, mk);
  __m512 acc[R * P];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      __m512 v = _mm512_setzero_ps();
      if (r < rows) {
        if (first) {
          if (bias) v = _mm512_maskz_loadu_ps(mk[p], bias + p * kPanel);
          if (rbias) v = _mm512_add_ps(v, _mm512_set1_ps(rbias[r]));
          if (res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk[p], res + r * ldr + p * kPanel));
        } else {
          v = _mm512_maskz_loadu_ps(mk[p], c + r * ldc + p * kPanel);
        }
      }
      acc[r * P + p] = v;
    }
  }
  // PF: the variant that prefetches (a separate instantiation, so the plain loop carries no
  // test); the callers take it for the 6 x 64 and 6 x 32 tiles while ranges are left (the
  // 12 x 16 tiles issue a load per FMA already)
  PrefetchRanges& pr = tl_prefetch;
  const char* pf = nullptr;
  const char* pend = nullptr;
  if (PF) {
    while (pr.cur < pr.n && pr.p[pr.cur] >= pr.end[pr.cur]) ++pr.cur;
    if (pr.cur < pr.n) {
      pf = pr.p[pr.cur];
      pend = pr.end[pr.cur];
    }
  }
  // one k step, with this variant's prefetches (PF, PB, NX)
  const auto step = [&](int64_t kk) SHVIT_AVX512 __attribute__((always_inline)) {
    if (PF && pf < pend) {
      _mm_prefetch(pf, _MM_HINT_T1);
      pf += 64;
    }
    if (PB) {
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        _mm_prefetch(reinterpret_cast<const char*>(b + (kk + kPbDist) * ldb + p * bps), _MM_HINT_T0);
      }
    }
    if (NX) {
      _mm_prefetch(reinterpret_cast<const char*>(nx + kk * ldb), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(nx + nx_stride + kk * ldb), _MM_HINT_T0);
    }
    fma_step<R, P>(acc, ar, kk, b + kk * ldb, bps);
  };
  int64_t kk = 0;  // on the first k-block, the first steps prefetch C (prefetch_c_line)
  if (first) {
    for (const int64_t n = std::min<int64_t>(kc, std::min<int64_t>(rows, R) * P); kk < n; ++kk) {
      prefetch_c_line<P>(c, ldc, kk);
      step(kk);
    }
  }
#pragma GCC unroll 2
  for (; kk < kc; ++kk) step(kk);
  if (PF && pf != nullptr) pr.p[pr.cur] = pf;
  store_tile<R, P>(acc, rows, c, ldc, mk, last && relu);
  const __m512 z = _mm512_setzero_ps();
  if (last && cmax) {
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      __m512 m = _mm512_maskz_loadu_ps(mk[p], cmax + p * kPanel);
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) {
        if (r >= rows) break;
        const __m512 v = relu ? _mm512_max_ps(z, acc[r * P + p]) : acc[r * P + p];
        m = _mm512_max_ps(v, m);  // (v, m): a NaN v leaves m
      }
      _mm512_mask_storeu_ps(cmax + p * kPanel, mk[p], m);
    }
  }
}

// One row tile of gemm_avx512's panel groups (four or two panels), R rows (6, or 5 where
// that splits the rows left evenly); the prefetching variant as the comment there says.
template <int R>
SHVIT_AVX512 inline void group_tile(bool quad, bool pf, bool cold, const float* next_b, int64_t next_stride,
                                    int64_t rows, int64_t nv, int64_t kc, const float* a, int64_t lda,
                                    const float* b, int64_t bps, int64_t ldb, float* c, int64_t ldc, bool first,
                                    bool last, const float* bias, const float* rbias, const float* res, int64_t ldr,
                                    bool relu, float* cmax) {
  if (quad && next_b != nullptr) {
    tile_z<R, 4, false, false, true>(rows, nv, kc, a, lda, b, bps, ldb, c, ldc, first, last, bias, rbias, res, ldr,
                                     relu, cmax, next_b, next_stride);
  } else if (quad) {
    (pf ? tile_z<R, 4, true> : cold ? tile_z<R, 4, false, true> : tile_z<R, 4>)(
        rows, nv, kc, a, lda, b, bps, ldb, c, ldc, first, last, bias, rbias, res, ldr, relu, cmax, nullptr, 0);
  } else {
    (pf ? tile_z<R, 2, true> : cold ? tile_z<R, 2, false, true> : tile_z<R, 2>)(
        rows, nv, kc, a, lda, b, bps, ldb, c, ldc, first, last, bias, rbias, res, ldr, relu, cmax, nullptr, 0);
  }
}

// gemm_avx2's loops with the AVX-512 tiles: panels in fours, then pairs.
SHVIT_AVX512 void gemm_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* wp,
                              int64_t ldb, int64_t bps, float* c, int64_t ldc, const Epilogue& epi) {
  const int64_t np = (n + kPanel - 1) / kPanel;
  const auto block = [&](int64_t ic, int64_t mc, int64_t kc, int64_t k0, bool first, bool last) {
    const float* as = a + k0;
    for (int64_t jp = 0; jp < np; jp += (jp + 3 < np ? 4 : 2)) {
      const int64_t col = jp * kPanel;
      const int64_t nv = std::min(2 * kPanel, n - col);
      const float* b = wp + jp * bps + k0 * ldb;
      const float* bias = epi.bias ? epi.bias + col : nullptr;
      float* cmax = epi.col_max ? epi.col_max + col : nullptr;
      // four panels: 6 x 64 tiles; a pair: 6 x 32; a lone last panel: 12 x 16 tiles (6 x 16
      // for its last rows when at most six are left)
      const bool pair = jp + 1 < np, quad = jp + 3 < np;
      const int64_t nvq = std::min(4 * kPanel, n - col);
      for (int64_t ir = 0, ti = 0; ir < mc; ++ti) {
        const int64_t row = ic + ir, left = mc - ir;
        const float* res = epi.residual ? epi.residual + row * epi.ldr + col : nullptr;
        const float* rbias = epi.row_bias ? epi.row_bias + row : nullptr;
        if (pair) {
          // tiles of 6 rows, and of 5 where the rows left are not a multiple of 6 (16 rows: 6 +
          // 5 + 5, not 6 + 6 + 4 computing 18); a last tile of fewer rows repeats its last row
          const int64_t t = (left + 5) / 6, d = 6 * t - left;
          const bool five = d > 0 && d <= t;
          const int64_t rows = five ? 5 : std::min<int64_t>(6, left);
          const bool pf = tl_prefetch.cur < tl_prefetch.n;
          // The first row tile of a panel group reads its panels cold and prefetches them ahead
          // (kPbDist); the second and third tiles of a quad, computing from cache, prefetch two
          // panels each of the next group, which then finds them there.
          const int64_t next = jp + (quad ? 4 : 2) + (ti == 2 ? 2 : 0);
          const float* next_b = quad && !pf && (ti == 1 || ti == 2) && next < np ? wp + next * bps + k0 * ldb : nullptr;
          (five ? group_tile<5> : group_tile<6>)(quad, pf, ti == 0, next_b, next + 1 < np ? bps : 0, rows,
                                                 quad ? nvq : nv, kc, as + row * lda, lda, b, bps, ldb,
                                                 c + row * ldc + col, ldc, first, last, bias, rbias, res, epi.ldr,
                                                 epi.relu, cmax);
          ir += five ? 5 : 6;
        } else if (left > 6) {
          tile_z<12, 1>(std::min<int64_t>(12, left), nv, kc, as + row * lda, lda, b, 0, ldb, c + row * ldc + col,
                        ldc, first, last, bias, rbias, res, epi.ldr, epi.relu, cmax);
          ir += 12;
        } else {
          tile_z<6, 1>(left, nv, kc, as + row * lda, lda, b, 0, ldb, c + row * ldc + col, ldc, first,
                       last, bias, rbias, res, epi.ldr, epi.relu, cmax);
          ir += 6;
        }
      }
    }
  };
  for_each_block(m, n, k, kKcMax512, block);
}

// A tile of C as tile_z computes it, over a k that runs in `taps` segments of kt: segment t
// reads row r of A at rp[t * ldt + r] (a table of row pointers: an im2col that is never
// written), W's k index being t * kt + kk. The accumulators stay in registers across all the
// taps; bias and ReLU only (the 3x3 convolutions' epilogue).
template <int R, int P>
SHVIT_AVX512 void tile_taps_z(int64_t rows, int64_t nv, int64_t kt, int64_t taps, const float* const* rp, int64_t ldt,
                              const float* b, int64_t bps, float* c, int64_t ldc, const float* bias, bool relu) {
  __mmask16 mk[P];
  panel_masks<P>(nv, mk);
  __m512 acc[R * P];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
    const __m512 v = bias ? _mm512_maskz_loadu_ps(mk[p], bias + p * kPanel) : _mm512_setzero_ps();
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) acc[r * P + p] = v;
  }
  for (int64_t t = 0; t < taps; ++t) {
    const float* ar[R];
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) ar[r] = rp[t * ldt + std::min<int64_t>(r, rows - 1)];  // short tiles repeat a row
    const float* bt = b + t * kt * kPanel;
    int64_t kk = 0;
    if (t == 0) {  // the first tap's first k steps prefetch the C tile's lines (as in tile_z)
      for (const int64_t n = std::min<int64_t>(kt, std::min<int64_t>(rows, R) * P); kk < n; ++kk) {
        prefetch_c_line<P>(c, ldc, kk);
        fma_step<R, P>(acc, ar, kk, bt + kk * kPanel, bps);
      }
    }
#pragma GCC unroll 2
    for (; kk < kt; ++kk) fma_step<R, P>(acc, ar, kk, bt + kk * kPanel, bps);
  }
  store_tile<R, P>(acc, rows, c, ldc, mk, relu);
}

// gemm_taps on AVX-512: panels in fours (6 x 64 tiles), then pairs (6 x 32: 12 x 32 tiles ran
// S1's second stem conv 2-7% slower), then a lone panel (12 x 16, 6 x 16).
SHVIT_AVX512 void gemm_taps_avx512(int64_t m, int64_t n, int64_t kt, int64_t taps, const float* const* rows,
                                   const float* wp, float* c, int64_t ldc, const float* bias, bool relu) {
  const int64_t np = (n + kPanel - 1) / kPanel, bps = taps * kt * kPanel;
  for (int64_t jp = 0; jp < np;) {
    const int64_t col = jp * kPanel, left_p = np - jp;
    const int64_t P = left_p >= 4 ? 4 : left_p >= 2 ? 2 : 1;
    const int64_t nv = std::min(P * kPanel, n - col);
    const float* b = wp + jp * bps;
    const float* bi = bias ? bias + col : nullptr;
    for (int64_t i = 0; i < m;) {
      const int64_t left = m - i, step = (P >= 2 || left <= 6) ? 6 : 12, r = std::min(step, left);
      const float* const* rp = rows + i;
      float* ci = c + i * ldc + col;
      if (P == 4) {
        tile_taps_z<6, 4>(r, nv, kt, taps, rp, m, b, bps, ci, ldc, bi, relu);
      } else if (P == 2) {
        tile_taps_z<6, 2>(r, nv, kt, taps, rp, m, b, bps, ci, ldc, bi, relu);
      } else {
        (step == 12 ? tile_taps_z<12, 1> : tile_taps_z<6, 1>)(r, nv, kt, taps, rp, m, b, bps, ci, ldc, bi, relu);
      }
      i += step;
    }
    jp += P;
  }
}

// 8 x 8 transpose of eight rows in registers.
SHVIT_AVX2 inline void transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5,
                                  __m256& r6, __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(u0, u4, 0x20);
  r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
  r2 = _mm256_permute2f128_ps(u2, u6, 0x20);
  r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
  r4 = _mm256_permute2f128_ps(u0, u4, 0x31);
  r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
  r6 = _mm256_permute2f128_ps(u2, u6, 0x31);
  r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Eight rows of 8 floats to d, d + ld, ..., d + 7 * ld.
SHVIT_AVX2 inline void store_rows8(float* d, int64_t ld, __m256 r0, __m256 r1, __m256 r2, __m256 r3, __m256 r4,
                                   __m256 r5, __m256 r6, __m256 r7) {
  _mm256_storeu_ps(d, r0);
  _mm256_storeu_ps(d + ld, r1);
  _mm256_storeu_ps(d + 2 * ld, r2);
  _mm256_storeu_ps(d + 3 * ld, r3);
  _mm256_storeu_ps(d + 4 * ld, r4);
  _mm256_storeu_ps(d + 5 * ld, r5);
  _mm256_storeu_ps(d + 6 * ld, r6);
  _mm256_storeu_ps(d + 7 * ld, r7);
}

// The full panels (n / 16 of them), 8 columns of k at a time: two 8 x 8 register transposes
// per 16 x 8 block. Returns the first column of k left for the portable loop.
SHVIT_AVX2 int64_t pack_weight_cols_avx2(const float* w, int64_t n, int64_t k, int64_t ldw, float* out,
                                         int64_t panel_stride) {
  const int64_t k8 = k / 8 * 8;
  for (int64_t p = 0; p < n / kPanel; ++p) {
    const float* src = w + p * kPanel * ldw;
    float* dst = out + p * panel_stride;
    for (int64_t kk = 0; kk < k8; kk += 8) {
      for (int64_t h = 0; h < 2; ++h) {
        const float* s = src + h * 8 * ldw + kk;
        __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ldw), r2 = _mm256_loadu_ps(s + 2 * ldw),
               r3 = _mm256_loadu_ps(s + 3 * ldw), r4 = _mm256_loadu_ps(s + 4 * ldw),
               r5 = _mm256_loadu_ps(s + 5 * ldw), r6 = _mm256_loadu_ps(s + 6 * ldw),
               r7 = _mm256_loadu_ps(s + 7 * ldw);
        transpose8(r0, r1, r2, r3, r4, r5, r6, r7);
        store_rows8(dst + kk * kPanel + h * 8, kPanel, r0, r1, r2, r3, r4, r5, r6, r7);
      }
    }
  }
  return k8;
}

SHVIT_AVX2 void transpose_avx2(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; i += 8) {
    for (int64_t j = 0; j < cols; j += 8) {
      const float* s = src + i * lds + j;
      __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + lds), r2 = _mm256_loadu_ps(s + 2 * lds),
             r3 = _mm256_loadu_ps(s + 3 * lds), r4 = _mm256_loadu_ps(s + 4 * lds), r5 = _mm256_loadu_ps(s + 5 * lds),
             r6 = _mm256_loadu_ps(s + 6 * lds), r7 = _mm256_loadu_ps(s + 7 * lds);
      transpose8(r0, r1, r2, r3, r4, r5, r6, r7);
      store_rows8(dst + j * ldd + i, ldd, r0, r1, r2, r3, r4, r5, r6, r7);
    }
  }
}

}  // namespace
#endif

void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  bool block = false;  // whether the block [0, r8) x [0, c8) is written
#ifdef SHVIT_X86
  if (available() && r8 > 0 && c8 > 0) {
    transpose_avx2(src, lds, dst, ldd, r8, c8);
    block = true;
  }
#endif
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = src + i * lds;
    const int64_t j0 = (block && i < r8) ? c8 : 0;  // the rest of the row
    for (int64_t j = j0; j < cols; ++j) dst[j * ldd + i] = s[j];
  }
}

void gemm_packed(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* wp, float* c,
                 int64_t ldc, const Epilogue& epi) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // an empty sum: the epilogue alone
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        float v = (epi.bias ? epi.bias[j] : 0.f) + (epi.row_bias ? epi.row_bias[i] : 0.f) +
                  (epi.residual ? epi.residual[i * epi.ldr + j] : 0.f);
        c[i * ldc + j] = epi.relu && v < 0.f ? 0.f : v;
        if (epi.col_max && c[i * ldc + j] > epi.col_max[j]) epi.col_max[j] = c[i * ldc + j];
      }
    }
    return;
  }
#ifdef SHVIT_X86
  if (available()) {
    if (use_avx512()) {
      gemm_avx512(m, n, k, a, lda, wp, kPanel, k * kPanel, c, ldc, epi);
    } else {
      gemm_avx2(m, n, k, a, lda, wp, kPanel, k * kPanel, c, ldc, epi);
    }
    return;
  }
#endif
  // Portable loop (the ops route to ATen before reaching it; kept so the function is total).
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const float* panel = wp + (j / kPanel) * k * kPanel + j % kPanel;
      float s = (epi.bias ? epi.bias[j] : 0.f) + (epi.row_bias ? epi.row_bias[i] : 0.f) +
                (epi.residual ? epi.residual[i * epi.ldr + j] : 0.f);
      for (int64_t kk = 0; kk < k; ++kk) s += a[i * lda + kk] * panel[kk * kPanel];
      c[i * ldc + j] = epi.relu && s < 0.f ? 0.f : s;
      if (epi.col_max && c[i * ldc + j] > epi.col_max[j]) epi.col_max[j] = c[i * ldc + j];
    }
  }
}

void gemm_rows(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
               int64_t ldc, const Epilogue& epi) {
  if (m <= 0 || n <= 0) return;
#ifdef SHVIT_X86
  if (available() && k > 0) {  // panel p at b + 16 p, its rows ldb apart
    if (use_avx512()) {
      gemm_avx512(m, n, k, a, lda, b, ldb, kPanel, c, ldc, epi);
    } else {
      gemm_avx2(m, n, k, a, lda, b, ldb, kPanel, c, ldc, epi);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float s = (epi.bias ? epi.bias[j] : 0.f) + (epi.row_bias ? epi.row_bias[i] : 0.f) +
                (epi.residual ? epi.residual[i * epi.ldr + j] : 0.f);
      for (int64_t kk = 0; kk < k; ++kk) s += a[i * lda + kk] * b[kk * ldb + j];
      c[i * ldc + j] = epi.relu && s < 0.f ? 0.f : s;
    }
  }
}

void gemm_taps(int64_t m, int64_t n, int64_t kt, int64_t taps, const float* const* rows, const float* wp, float* c,
               int64_t ldc, const float* bias, bool relu) {
  if (m <= 0 || n <= 0) return;
#ifdef SHVIT_X86
  if (available() && use_avx512() && kt > 0) {
    gemm_taps_avx512(m, n, kt, taps, rows, wp, c, ldc, bias, relu);
    return;
  }
#endif
  // elsewhere: the rows gathered into a contiguous A, then gemm_packed (the same sums)
  const int64_t k = taps * kt;
  thread_local std::vector<float> a;
  a.resize(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t t = 0; t < taps; ++t) std::copy_n(rows[t * m + i], kt, a.data() + i * k + t * kt);
  }
  Epilogue e;
  e.bias = bias;
  e.relu = relu;
  gemm_packed(m, n, k, a.data(), k, wp, c, ldc, e);
}

void gemm_token_panels(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* a_packed,
                       const float* bp, float* c, int64_t ldc, const Epilogue& epi) {
  const int64_t full = n / kPanel * kPanel, t = n - full;
  if (!transposes_tail(n) || a_packed == nullptr || epi.residual != nullptr || epi.bias != nullptr || k <= 0) {
    gemm_packed(m, n, k, a, lda, bp, c, ldc, epi);
    return;
  }
  gemm_packed(m, full, k, a, lda, bp, c, ldc, epi);
  // the last t columns as t rows: C[:, full:]^T (t, m) = B_tail^T (t, k) @ A^T
  thread_local std::vector<float> bt, ct;
  bt.resize(static_cast<size_t>(t * k));
  ct.resize(static_cast<size_t>(t * m));
  transpose(bp + full * k, kPanel, bt.data(), k, k, t);
  Epilogue e;
  e.bias = epi.row_bias;
  e.relu = epi.relu;
  gemm_packed(t, m, k, bt.data(), k, a_packed, ct.data(), m, e);
  transpose(ct.data(), m, c + full, ldc, t, m);
}

void pack_weight_cols(const float* w, int64_t n, int64_t k, int64_t ldw, float* out, int64_t panel_stride) {
  const int64_t full = n / kPanel * kPanel;
  int64_t k0 = 0;
#ifdef SHVIT_X86
  if (available() && full > 0) k0 = pack_weight_cols_avx2(w, full, k, ldw, out, panel_stride);
#endif
  if (full > 0 && k0 < k) pack_weight_cols_portable(w, full, k, ldw, out, panel_stride, k0);
  if (full < n) pack_weight_cols_portable(w + full * ldw, n - full, k, ldw, out + full / kPanel * panel_stride,
                                          panel_stride, 0);
}

void pack_weight_t(const float* v, int64_t n, int64_t k, int64_t ldv, float* out) {
  const int64_t np = (n + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < np; ++p) {
    const int64_t c0 = p * kPanel, nv = std::min(kPanel, n - c0);
    float* dst = out + p * k * kPanel;
    for (int64_t kk = 0; kk < k; ++kk) {
      const float* src = v + kk * ldv + c0;
      float* d = dst + kk * kPanel;
      for (int64_t j = 0; j < nv; ++j) d[j] = src[j];
      for (int64_t j = nv; j < kPanel; ++j) d[j] = 0.f;
    }
  }
}

#ifdef SHVIT_X86
namespace {
// exp for float32 lanes of the softmax's shifted scores x - max <= 0 (Cephes expf: Cody-Waite
// reduction by ln 2, degree-5 polynomial; about 1 ulp on [-87, 0]). NaN stays NaN; below -87.3
// the result flushes towards 0. (No upper clamp: the argument is never positive.)
SHVIT_AVX2 inline __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3365478515625f), x);  // operand order keeps NaN
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

SHVIT_AVX2 inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

SHVIT_AVX2 inline float hsum(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

SHVIT_AVX2 void softmax_rows_avx2(float* s, int64_t m, int64_t n, int64_t ld) {
  const int64_t n8 = n / 8 * 8;
  const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - n8)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int64_t i = 0; i < m; ++i) {
    float* r = s + i * ld;
    __m256 mx = _mm256_set1_ps(-INFINITY), unord = _mm256_setzero_ps();
    for (int64_t j = 0; j < n8; j += 8) {
      const __m256 v = _mm256_loadu_ps(r + j);
      mx = _mm256_max_ps(mx, v);
      unord = _mm256_or_ps(unord, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float rmax = hmax(mx);
    bool nan = _mm256_movemask_ps(unord) != 0;
    for (int64_t j = n8; j < n; ++j) {
      rmax = r[j] > rmax ? r[j] : rmax;
      nan |= r[j] != r[j];
    }
    if (nan) rmax = NAN;  // the row's output is NaN, as in torch.softmax
    const __m256 vm = _mm256_set1_ps(rmax);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < n8; j += 8) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(r + j), vm));
      _mm256_storeu_ps(r + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    if (n8 < n) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_maskload_ps(r + n8, tail), vm));
      _mm256_maskstore_ps(r + n8, tail, e);
      acc = _mm256_add_ps(acc, _mm256_and_ps(e, _mm256_castsi256_ps(tail)));
    }
    const __m256 inv = _mm256_set1_ps(1.f / hsum(acc));
    for (int64_t j = 0; j < n8; j += 8) _mm256_storeu_ps(r + j, _mm256_mul_ps(_mm256_loadu_ps(r + j), inv));
    if (n8 < n) _mm256_maskstore_ps(r + n8, tail, _mm256_mul_ps(_mm256_maskload_ps(r + n8, tail), inv));
  }
}
SHVIT_AVX2 void softmax_panel_columns_avx2(float* p, int64_t m, float* lse, int64_t ld, const float* col_max) {
  __m256 mx0, mx1;
  if (col_max != nullptr) {
    mx0 = _mm256_loadu_ps(col_max);
    mx1 = _mm256_loadu_ps(col_max + 8);
  } else {
    mx0 = _mm256_set1_ps(-INFINITY), mx1 = mx0;
    __m256 un0 = _mm256_setzero_ps(), un1 = un0;
    for (int64_t i = 0; i < m; ++i) {
      const __m256 a = _mm256_loadu_ps(p + i * ld), b = _mm256_loadu_ps(p + i * ld + 8);
      mx0 = _mm256_max_ps(mx0, a);
      mx1 = _mm256_max_ps(mx1, b);
      un0 = _mm256_or_ps(un0, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
      un1 = _mm256_or_ps(un1, _mm256_cmp_ps(b, b, _CMP_UNORD_Q));
    }
    // a column holding NaN gets a NaN shift: its output is NaN, as in torch.softmax
    const __m256 nan = _mm256_set1_ps(NAN);
    mx0 = _mm256_blendv_ps(mx0, nan, un0);
    mx1 = _mm256_blendv_ps(mx1, nan, un1);
  }
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  for (int64_t i = 0; i < m; ++i) {
    const __m256 a = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(p + i * ld), mx0));
    const __m256 b = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(p + i * ld + 8), mx1));
    _mm256_storeu_ps(p + i * ld, a);
    _mm256_storeu_ps(p + i * ld + 8, b);
    s0 = _mm256_add_ps(s0, a);
    s1 = _mm256_add_ps(s1, b);
  }
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 i0 = _mm256_div_ps(one, s0), i1 = _mm256_div_ps(one, s1);
  for (int64_t i = 0; i < m; ++i) {
    _mm256_storeu_ps(p + i * ld, _mm256_mul_ps(_mm256_loadu_ps(p + i * ld), i0));
    _mm256_storeu_ps(p + i * ld + 8, _mm256_mul_ps(_mm256_loadu_ps(p + i * ld + 8), i1));
  }
  if (lse != nullptr) {
    alignas(32) float mx[kPanel], sm[kPanel];
    _mm256_store_ps(mx, mx0);
    _mm256_store_ps(mx + 8, mx1);
    _mm256_store_ps(sm, s0);
    _mm256_store_ps(sm + 8, s1);
    for (int64_t j = 0; j < kPanel; ++j) lse[j] = mx[j] + std::log(sm[j]);
  }
}

// exp_ps in zmm registers: the same Cephes expf steps, so the same results lane for lane; the
// power of two applied by vscalefps (one instruction for exp_ps's convert, add, shift and
// multiply: y * 2^n exactly, as the integer exponent is).
SHVIT_AVX512 inline __m512 exp_ps512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.3365478515625f), x);  // operand order keeps NaN
  __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, fx);
}

// softmax_panel_columns_avx2 with one zmm register per panel row.
SHVIT_AVX512 void softmax_panel_columns_avx512(float* p, int64_t m, float* lse, int64_t ld, const float* col_max) {
  __m512 mx;
  if (col_max != nullptr) {
    mx = _mm512_loadu_ps(col_max);
  } else {
    mx = _mm512_set1_ps(-INFINITY);
    __mmask16 unord = 0;
    for (int64_t i = 0; i < m; ++i) {
      const __m512 a = _mm512_loadu_ps(p + i * ld);
      mx = _mm512_max_ps(mx, a);
      unord |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    }
    // a column holding NaN gets a NaN shift: its output is NaN, as in torch.softmax
    mx = _mm512_mask_mov_ps(mx, unord, _mm512_set1_ps(NAN));
  }
  __m512 sm = _mm512_setzero_ps();
  for (int64_t i = 0; i < m; ++i) {
    const __m512 a = exp_ps512(_mm512_sub_ps(_mm512_loadu_ps(p + i * ld), mx));
    _mm512_storeu_ps(p + i * ld, a);
    sm = _mm512_add_ps(sm, a);
  }
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), sm);
  for (int64_t i = 0; i < m; ++i) _mm512_storeu_ps(p + i * ld, _mm512_mul_ps(_mm512_loadu_ps(p + i * ld), inv));
  if (lse != nullptr) {
    alignas(64) float mxs[kPanel], sms[kPanel];
    _mm512_store_ps(mxs, mx);
    _mm512_store_ps(sms, sm);
    for (int64_t j = 0; j < kPanel; ++j) lse[j] = mxs[j] + std::log(sms[j]);
  }
}
}  // namespace
#endif

void prefetch_during_gemm(const void* p, int64_t bytes, bool first) {
#ifdef SHVIT_X86
  PrefetchRanges& pr = tl_prefetch;
  if (p == nullptr || bytes <= 0) return;
  if (pr.cur > 0) {  // drop the ranges taken
    for (int i = pr.cur; i < pr.n; ++i) {
      pr.p[i - pr.cur] = pr.p[i];
      pr.end[i - pr.cur] = pr.end[i];
    }
    pr.n -= pr.cur;
    pr.cur = 0;
  }
  if (pr.n == PrefetchRanges::kMax) return;
  // first: at the current position, ahead of the ranges not yet taken
  const int at = first ? pr.cur : pr.n;
  for (int i = pr.n; i > at; --i) {
    pr.p[i] = pr.p[i - 1];
    pr.end[i] = pr.end[i - 1];
  }
  pr.p[at] = static_cast<const char*>(p);
  pr.end[at] = pr.p[at] + bytes;
  ++pr.n;
#else
  (void)p;
  (void)bytes;
  (void)first;
#endif
}

void clear_gemm_prefetch() {
#ifdef SHVIT_X86
  tl_prefetch.n = tl_prefetch.cur = 0;
#endif
}

void softmax_panel_columns(float* p, int64_t m, float* lse, int64_t ld, const float* col_max) {
  if (m <= 0) return;
#ifdef SHVIT_X86
  if (available()) {
    if (use_avx512()) {
      softmax_panel_columns_avx512(p, m, lse, ld, col_max);
    } else {
      softmax_panel_columns_avx2(p, m, lse, ld, col_max);
    }
    return;
  }
#endif
  for (int64_t j = 0; j < kPanel; ++j) {
    float mx = p[j];
    bool nan = false;
    for (int64_t i = 0; i < m; ++i) {
      const float v = p[i * ld + j];
      mx = v > mx ? v : mx;
      nan |= v != v;
    }
    if (nan) mx = NAN;
    if (col_max != nullptr) mx = col_max[j];
    float sum = 0.f;
    for (int64_t i = 0; i < m; ++i) sum += (p[i * ld + j] = std::exp(p[i * ld + j] - mx));
    for (int64_t i = 0; i < m; ++i) p[i * ld + j] /= sum;
    if (lse != nullptr) lse[j] = mx + std::log(sum);
  }
}

void softmax_rows(float* s, int64_t m, int64_t n, int64_t ld) {
  if (n <= 0) return;
#ifdef SHVIT_X86
  if (available()) {
    softmax_rows_avx2(s, m, n, ld);
    return;
  }
#endif
  for (int64_t i = 0; i < m; ++i) {
    float* r = s + i * ld;
    float mx = r[0];
    bool nan = false;
    for (int64_t j = 0; j < n; ++j) {
      mx = r[j] > mx ? r[j] : mx;
      nan |= r[j] != r[j];
    }
    if (nan) mx = NAN;
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) sum += (r[j] = std::exp(r[j] - mx));
    for (int64_t j = 0; j < n; ++j) r[j] /= sum;
  }
}

}  // namespace shvit_gemm
