// bfloat16 GEMM on AVX512-BF16 (see gemm_bf16.h).
//
// The loops are those of the float32 AVX-512 GEMM (gemm.cpp) with k taken in pairs: rows in
// blocks of kRowBlock (a block of A stays in L2 while it meets every panel), panels in groups of
// four (then two, then one), each group swept by 6-row tiles (5 where that splits the rows
// left evenly) whose 6 x 16P sums stay in zmm registers over the whole k. A k step loads P panel rows (64 bytes: 16 columns x 2 k) and
// broadcasts one pair of each of the 6 rows of A: 6P vdpbf16ps, each 32 multiply-adds.
#include "gemm/gemm_bf16.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "cpu_isa.h"

namespace shvit_gemm {

namespace {

constexpr int64_t kRowBlock = 96;

#ifdef SHVIT_X86
bool cpu_has_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
}

inline int32_t load_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// A tile of C: rows (<= R) x nv (<= 16 P) entries at c, column col0 of C (for the bias),
// panel p of the weight at b + p * bps. k runs in `taps` segments of kt: segment t reads row r
// of A at rp[t * ldt + r] (a plain GEMM: one segment; a convolution: its taps, read in place),
// W's k index being t * kt + kk; kt is even where taps > 1, so pairs stay within a segment.
// Short tiles repeat their last row of A.
template <int R, int P>
SHVIT_TARGET_AVX512_BF16 void tile_bf16(int64_t rows, int64_t nv, int64_t kt, int64_t taps, const uint16_t* const* rp,
                                        int64_t ldt, const uint16_t* b, int64_t bps, uint16_t* c, int64_t ldc,
                                        int64_t col0, const EpilogueBf16& e) {
  __m512 acc[R * P];
  for (int i = 0; i < R * P; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t kp = kt / 2;
  for (int64_t t = 0; t < taps; ++t) {
    const uint16_t* ar[R];
    for (int r = 0; r < R; ++r) ar[r] = rp[t * ldt + std::min<int64_t>(r, rows - 1)];
    const uint16_t* bt = b + t * kt * 16;
    for (int64_t q = 0; q < kp; ++q) {
      __m512bh bv[P];
      for (int p = 0; p < P; ++p) bv[p] = (__m512bh)_mm512_loadu_si512(bt + p * bps + q * 32);
      for (int r = 0; r < R; ++r) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(load_pair(ar[r] + 2 * q));
        for (int p = 0; p < P; ++p) acc[r * P + p] = _mm512_dpbf16_ps(acc[r * P + p], av, bv[p]);
      }
    }
    if (kt & 1) {  // the last k alone: its 16 weights widened to pairs (w, 0), A's to (a, 0)
      __m512bh bv[P];
      for (int p = 0; p < P; ++p) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bt + p * bps + (kt - 1) * 16));
        bv[p] = (__m512bh)_mm512_cvtepu16_epi32(w);
      }
      for (int r = 0; r < R; ++r) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(ar[r][kt - 1]);
        for (int p = 0; p < P; ++p) acc[r * P + p] = _mm512_dpbf16_ps(acc[r * P + p], av, bv[p]);
      }
    }
  }
  __mmask16 mk[P];
  for (int p = 0; p < P; ++p) {
    const int64_t v = std::min<int64_t>(16, nv - p * 16);
    mk[p] = v <= 0 ? 0 : static_cast<__mmask16>((1u << v) - 1u);
  }
  __m512 bias[P];
  for (int p = 0; p < P; ++p) {
    bias[p] = e.bias ? _mm512_maskz_loadu_ps(mk[p], e.bias + col0 + p * 16) : _mm512_setzero_ps();
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
    for (int p = 0; p < P; ++p) {
      __m512 v = _mm512_add_ps(acc[r * P + p], bias[p]);
      if (e.residual) {
        const __m256i h = _mm256_maskz_loadu_epi16(mk[p], e.residual + r * e.ldr + col0 + p * 16);
        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      }
      if (e.relu) v = _mm512_max_ps(zero, v);  // max(0, v): NaN stays NaN
      _mm256_mask_storeu_epi16(c + r * ldc + p * 16, mk[p], (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// C rows [0, m) over `taps` segments of kt (see tile_bf16); a plain GEMM passes taps = 1 and its
// rows as rp = nullptr, a, lda.
SHVIT_TARGET_AVX512_BF16 void gemm_bf16_avx512(int64_t m, int64_t n, int64_t kt, int64_t taps,
                                               const uint16_t* const* rp, const uint16_t* a, int64_t lda,
                                               const uint16_t* wp, uint16_t* c, int64_t ldc, const EpilogueBf16& epi) {
  const int64_t np = (n + 15) / 16, bps = bf16_panel_size(kt * taps);
  for (int64_t i0 = 0; i0 < m; i0 += kRowBlock) {
    const int64_t mc = std::min(kRowBlock, m - i0);
    for (int64_t jp = 0; jp < np;) {
      const int P = np - jp >= 4 ? 4 : np - jp >= 2 ? 2 : 1;
      const int64_t col0 = jp * 16, nv = std::min<int64_t>(16 * P, n - col0);
      const uint16_t* b = wp + jp * bps;
      for (int64_t ir = 0; ir < mc;) {
        // tiles of 6 rows, and of 5 where the rows left are not a multiple of 6 (16 rows: 6 +
        // 5 + 5, not 6 + 6 + 4 computing 18, as in gemm.cpp); a last short tile repeats its last row
        const int64_t left = mc - ir, t = (left + 5) / 6, d = 6 * t - left;
        const bool five = d > 0 && d <= t;
        const int64_t i = i0 + ir, rows = five ? 5 : std::min<int64_t>(6, left);
        ir += five ? 5 : 6;
        EpilogueBf16 e = epi;
        if (e.residual) e.residual += i * e.ldr;
        uint16_t* ci = c + i * ldc + col0;
        const uint16_t* own[6];
        const uint16_t* const* ri = rp ? rp + i : own;
        const int64_t ldt = rp ? m : 0;
        if (!rp) {
          for (int64_t r = 0; r < 6; ++r) own[r] = a + (i + std::min<int64_t>(r, rows - 1)) * lda;
        }
        if (P == 4) {
          (five ? tile_bf16<5, 4> : tile_bf16<6, 4>)(rows, nv, kt, taps, ri, ldt, b, bps, ci, ldc, col0, e);
        } else if (P == 2) {
          (five ? tile_bf16<5, 2> : tile_bf16<6, 2>)(rows, nv, kt, taps, ri, ldt, b, bps, ci, ldc, col0, e);
        } else {
          (five ? tile_bf16<5, 1> : tile_bf16<6, 1>)(rows, nv, kt, taps, ri, ldt, b, bps, ci, ldc, col0, e);
        }
      }
      jp += P;
    }
  }
}
#endif

}  // namespace

bool bf16_available() {
#ifdef SHVIT_X86
  static const bool cpu = cpu_has_bf16();
  return cpu && shvit_isa::active() == shvit_isa::Isa::kAvx512;
#else
  return false;
#endif
}

void pack_weight_bf16(const uint16_t* w, int64_t n, int64_t k, int64_t ldw, uint16_t* out) {
  const int64_t np = (n + 15) / 16;
  for (int64_t p = 0; p < np; ++p) {
    uint16_t* panel = out + p * bf16_panel_size(k);
    for (int64_t j = 0; j < 16; ++j) {
      const int64_t row = p * 16 + j;
      for (int64_t q = 0; q < k / 2; ++q) {
        for (int64_t e = 0; e < 2; ++e) panel[q * 32 + 2 * j + e] = row < n ? w[row * ldw + 2 * q + e] : 0;
      }
      if (k & 1) panel[(k - 1) * 16 + j] = row < n ? w[row * ldw + k - 1] : 0;
    }
  }
}

void gemm_bf16(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint16_t* wp, uint16_t* c,
               int64_t ldc, const EpilogueBf16& epi) {
  if (m <= 0 || n <= 0) return;
#ifdef SHVIT_X86
  if (bf16_available()) {
    gemm_bf16_avx512(m, n, k, 1, nullptr, a, lda, wp, c, ldc, epi);
    return;
  }
#endif
  (void)k, (void)a, (void)lda, (void)wp, (void)c, (void)ldc, (void)epi;
  throw std::runtime_error("gemm_bf16 needs a CPU with AVX512-BF16 at the avx512 level");
}

void gemm_taps_bf16(int64_t m, int64_t n, int64_t kt, int64_t taps, const uint16_t* const* rows, const uint16_t* wp,
                    uint16_t* c, int64_t ldc, const float* bias, bool relu) {
  if (m <= 0 || n <= 0) return;
  if (taps > 1 && kt % 2 != 0) throw std::runtime_error("gemm_taps_bf16: kt must be even where taps > 1");
  EpilogueBf16 epi;
  epi.bias = bias;
  epi.relu = relu;
#ifdef SHVIT_X86
  if (bf16_available()) {
    gemm_bf16_avx512(m, n, kt, taps, rows, nullptr, 0, wp, c, ldc, epi);
    return;
  }
#endif
  (void)rows, (void)wp, (void)c, (void)ldc;
  throw std::runtime_error("gemm_taps_bf16 needs a CPU with AVX512-BF16 at the avx512 level");
}

}  // namespace shvit_gemm
