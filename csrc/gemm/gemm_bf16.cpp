// bfloat16 GEMM on AVX512-BF16, or on AMX tiles where the CPU has them (see gemm_bf16.h).
//
// AVX512-BF16: the loops are those of the float32 AVX-512 GEMM (gemm.cpp) with k taken in
// pairs: rows in blocks of kRowBlock (a block of A stays in L2 while it meets every panel),
// panels in groups of four (then two, then one), each group swept by 6-row tiles (5 where that
// splits the rows left evenly) whose 6 x 16P sums stay in zmm registers over the whole k. A k
// step loads P panel rows (64 bytes: 16 columns x 2 k) and broadcasts one pair of each of the
// 6 rows of A: 6P vdpbf16ps, each 32 multiply-adds.
//
// AMX: a packed panel's 16 pair rows of 64 bytes are the layout of an AMX B tile (16 k pairs
// x 16 columns), so the same packed weight feeds both. The rows run in blocks of 32 (two A
// tiles of 16 rows x 32 k, read in place from the rows of A), each against every pair of
// panels: four C tiles of 16 x 16 float32 sums, each 32-k step two A and two B tile loads
// and four tdpbf16ps. The C tiles go to a buffer, from which the AVX-512 epilogue adds bias,
// residual and ReLU and rounds once. The packed panels hold whole tiles (k padded with zeros
// to a multiple of 32); where k is not a multiple of 32, or past the last full 16 rows, A's
// rows are copied into a zero-padded buffer first, so no tile reads past A or multiplies what
// lies beyond a row. gemm_taps_bf16 runs on AVX512-BF16 only (on AMX CPUs oneDNN's
// convolutions were faster than our tiles over taps copied into place).
#include "gemm/gemm_bf16.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu_isa.h"

#ifdef SHVIT_X86
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

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
    if (kt & 1) {  // the last k alone: its pair row (w, 0) against A's (a, 0)
      __m512bh bv[P];
      for (int p = 0; p < P; ++p) bv[p] = (__m512bh)_mm512_loadu_si512(bt + p * bps + (kt - 1) * 16);
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

// Whether the CPU has AMX-BF16 and Linux grants this process the tile data state (which a
// process must ask for before its first tile instruction: arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA). Asked once.
bool amx_usable() {
#if defined(__linux__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;  // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 22)) || !(edx & (1u << 24)) ||
      !cpu_has_bf16()) {
    return false;
  }
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

std::atomic<bool>& amx_wanted() {
  static std::atomic<bool> wanted{true};
  return wanted;
}

// Whether the GEMMs run on AMX: the CPU has it and bf16_kernel has not switched it off.
bool amx_on() { return amx_wanted().load(std::memory_order_relaxed) && amx_available(); }

// The tile configuration (palette 1): tiles 0-3 the C tiles (16 rows x 16 float32), 4-5 the
// A tiles (16 rows x 32 bfloat16), 6-7 the B tiles (16 k pairs x 16 columns), all 16 x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Sums of a block of up to 32 rows x 16 NB columns over k [0, 32 ks): rows 0-15 of A at a0,
// rows 16-31 at a1 (MA == 2), row strides la0, la1 (elements); the panels at b, b + bps.
// The sums go to cb, 32 x 32 float32 (row stride 32).
template <int MA, int NB>
SHVIT_TARGET_AMX void amx_block(int64_t ks, const uint16_t* a0, int64_t la0, const uint16_t* a1, int64_t la1,
                                const uint16_t* b, int64_t bps, float* cb) {
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (MA == 2) _tile_zero(2);
  if constexpr (MA == 2 && NB == 2) _tile_zero(3);
  for (int64_t s = 0; s < ks; ++s) {
    _tile_loadd(6, b + s * 512, 64);  // 16 pair rows of 32 elements
    _tile_loadd(4, a0 + s * 32, la0 * 2);
    if constexpr (NB == 2) _tile_loadd(7, b + bps + s * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MA == 2) {
      _tile_loadd(5, a1 + s * 32, la1 * 2);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NB == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, cb, 128);
  if constexpr (NB == 2) _tile_stored(1, cb + 16, 128);
  if constexpr (MA == 2) _tile_stored(2, cb + 512, 128);
  if constexpr (MA == 2 && NB == 2) _tile_stored(3, cb + 528, 128);
}

// C rows [0, rows) x columns [col0, col0 + nv) of a block from its tile sums cb: bias,
// residual, ReLU and one rounding (as tile_bf16's epilogue).
template <int NB>
SHVIT_TARGET_AMX void amx_epilogue(int64_t rows, int64_t nv, const float* cb, uint16_t* c, int64_t ldc, int64_t col0,
                                   const EpilogueBf16& e) {
  __mmask16 mk[NB];
  __m512 bias[NB];
  for (int p = 0; p < NB; ++p) {
    const int64_t v = std::min<int64_t>(16, nv - p * 16);
    mk[p] = v <= 0 ? 0 : static_cast<__mmask16>((1u << v) - 1u);
    bias[p] = e.bias ? _mm512_maskz_loadu_ps(mk[p], e.bias + col0 + p * 16) : _mm512_setzero_ps();
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    for (int p = 0; p < NB; ++p) {
      __m512 v = _mm512_add_ps(_mm512_loadu_ps(cb + r * 32 + p * 16), bias[p]);
      if (e.residual) {
        const __m256i h = _mm256_maskz_loadu_epi16(mk[p], e.residual + r * e.ldr + col0 + p * 16);
        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      }
      if (e.relu) v = _mm512_max_ps(zero, v);  // max(0, v): NaN stays NaN
      _mm256_mask_storeu_epi16(c + r * ldc + p * 16, mk[p], (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// As gemm_bf16_avx512 for a plain GEMM (taps = 1), on AMX tiles (see the top of this file).
SHVIT_TARGET_AMX void gemm_bf16_amx(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda,
                                    const uint16_t* wp, uint16_t* c, int64_t ldc, const EpilogueBf16& epi) {
  const int64_t k32 = (k + 31) / 32 * 32, ks = k32 / 32, np = (n + 15) / 16, bps = bf16_panel_size(k);
  // A's rows in place (a k that is a multiple of 32) up to the last full 16; the rest copied
  // into a buffer of 16-row groups with rows of k32, zero past k and past m
  const int64_t m_in_place = k == k32 ? m / 16 * 16 : 0, copied = (m - m_in_place + 15) / 16 * 16;
  thread_local std::vector<uint16_t> buffer;
  if (copied > 0) {
    if (buffer.size() < static_cast<size_t>(copied * k32)) buffer.resize(static_cast<size_t>(copied * k32));
    for (int64_t i = m_in_place; i < m_in_place + copied; ++i) {
      uint16_t* dst = buffer.data() + (i - m_in_place) * k32;
      const int64_t valid = i < m ? k : 0;  // rows past m: zeros only
      if (valid > 0) std::memcpy(dst, a + i * lda, valid * 2);
      std::fill(dst + valid, dst + k32, uint16_t{0});
    }
  }
  const uint16_t* copy = buffer.data();
  const auto row = [&](int64_t i) { return i < m_in_place ? a + i * lda : copy + (i - m_in_place) * k32; };
  const auto stride = [&](int64_t i) { return i < m_in_place ? lda : k32; };
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  // Blocks of 32 rows, each against every pair of panels: the block's A (32 x k) stays in L1
  // while the panels stream from L2.
  alignas(64) float cb[32 * 32];
  for (int64_t i = 0; i < m; i += 32) {
    const int64_t rows = std::min<int64_t>(32, m - i);
    const uint16_t *a0 = row(i), *a1 = rows > 16 ? row(i + 16) : a0;
    const int64_t l0 = stride(i), l1 = rows > 16 ? stride(i + 16) : l0;
    EpilogueBf16 e = epi;
    if (e.residual) e.residual += i * e.ldr;
    for (int64_t jp = 0; jp < np; jp += 2) {
      const bool two = np - jp >= 2;
      const int64_t col0 = jp * 16, nv = std::min<int64_t>(two ? 32 : 16, n - col0);
      const uint16_t* b = wp + jp * bps;
      if (rows > 16) {
        (two ? amx_block<2, 2> : amx_block<2, 1>)(ks, a0, l0, a1, l1, b, bps, cb);
      } else {
        (two ? amx_block<1, 2> : amx_block<1, 1>)(ks, a0, l0, a1, l1, b, bps, cb);
      }
      (two ? amx_epilogue<2> : amx_epilogue<1>)(rows, nv, cb, c + i * ldc + col0, ldc, col0, e);
    }
  }
  _tile_release();
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

bool amx_available() {
#ifdef SHVIT_X86
  static const bool usable = amx_usable();
  return usable && bf16_available();
#else
  return false;
#endif
}

std::string bf16_kernel(const std::string& kernel) {
#ifdef SHVIT_X86
  if (kernel == "amx" || kernel == "avx512_bf16") {
    if (kernel == "amx" && !amx_available()) {
      throw std::invalid_argument("bf16_kernel: this CPU has no usable AMX-BF16");
    }
    amx_wanted() = kernel == "amx";
  } else if (!kernel.empty()) {
    throw std::invalid_argument("bf16_kernel: expected \"amx\", \"avx512_bf16\" or \"\", got \"" + kernel + "\"");
  }
  return amx_on() ? "amx" : bf16_available() ? "avx512_bf16" : "";
#else
  if (!kernel.empty()) throw std::invalid_argument("bf16_kernel: no bfloat16 GEMM on this CPU");
  return "";
#endif
}

void pack_weight_bf16(const uint16_t* w, int64_t n, int64_t k, int64_t ldw, uint16_t* out) {
  const int64_t np = (n + 15) / 16, size = bf16_panel_size(k);
  std::memset(out, 0, static_cast<size_t>(np * size) * sizeof(uint16_t));
  for (int64_t p = 0; p < np; ++p) {
    uint16_t* panel = out + p * size;
    for (int64_t j = 0; j < 16 && p * 16 + j < n; ++j) {
      for (int64_t kk = 0; kk < k; ++kk) panel[(kk / 2) * 32 + 2 * j + kk % 2] = w[(p * 16 + j) * ldw + kk];
    }
  }
}

void gemm_bf16(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint16_t* wp, uint16_t* c,
               int64_t ldc, const EpilogueBf16& epi) {
  if (m <= 0 || n <= 0) return;
#ifdef SHVIT_X86
  if (bf16_available()) {
    if (amx_on()) {
      gemm_bf16_amx(m, n, k, a, lda, wp, c, ldc, epi);
    } else {
      gemm_bf16_avx512(m, n, k, 1, nullptr, a, lda, wp, c, ldc, epi);
    }
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
    gemm_bf16_avx512(m, n, kt, taps, rows, nullptr, 0, wp, c, ldc, epi);  // AVX512-BF16 (AMX CPUs convolve on oneDNN)
    return;
  }
#endif
  (void)rows, (void)wp, (void)c, (void)ldc;
  throw std::runtime_error("gemm_taps_bf16 needs a CPU with AVX512-BF16 at the avx512 level");
}

}  // namespace shvit_gemm
