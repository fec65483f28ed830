// A bfloat16 GEMM for token-major (channels_last) activations times a pre-packed weight, on
// AMX tiles (tdpbf16ps) where the CPU has them, else on AVX512-BF16 (vdpbf16ps): float32 sums
// of bfloat16 products, with the epilogues of SHViT's 1x1 convolutions fused: bias, residual
// add, ReLU, one rounding to bfloat16.
//
//   C[m, n] = bf16(relu?( sum_k A[m, k] * W[n, k] + bias[n] + residual[m, n] ))
//
// W (N, K) is packed once into panels of 16 output channels, each a stack of rows of 16 column pairs
// (W[j, 2q], W[j, 2q + 1]): one 64-byte row per pair of k, which vdpbf16ps multiplies with a
// pair of A broadcast to every lane, and 16 of which make an AMX B tile. An odd K's last pair
// is (W[j, K - 1], 0), and the panel is padded with zero rows to a multiple of 32 k (whole
// tiles). bfloat16 data is passed as uint16_t.
#pragma once

#include <cstdint>
#include <string>

namespace shvit_gemm {

// Whether gemm_bf16 runs: the active ISA level (cpu_isa.h) is AVX-512 and the CPU has AVX512-BF16.
bool bf16_available();

// Whether this CPU runs the GEMM on AMX tiles: bf16_available(), AMX-BF16, and the tile state
// granted by the OS (asked for once).
bool amx_available();

// The kernel the GEMMs use: "amx" (the default where amx_available()), "avx512_bf16" (the default
// elsewhere where bf16_available()) or "" (none). A non-empty `kernel` switches to it first (for
// tests and comparisons; not while GEMMs run on other threads); "amx" needs amx_available().
std::string bf16_kernel(const std::string& kernel);

// Elements (uint16) of a packed panel: k rounded up to a multiple of 32 (whole AMX B tiles), x 16.
inline int64_t bf16_panel_size(int64_t k) { return (k + 31) / 32 * 32 * 16; }

// out[p * bf16_panel_size(k) + q * 32 + 2 j + e] = w[(p * 16 + j) * ldw + 2 q + e] for 2 q + e < k,
// zero past k (an odd k's last pair is (w, 0)) and past n.
void pack_weight_bf16(const uint16_t* w, int64_t n, int64_t k, int64_t ldw, uint16_t* out);

struct EpilogueBf16 {
  const float* bias = nullptr;         // (N,) float32, or null
  const uint16_t* residual = nullptr;  // (M, N) bfloat16 with row stride ldr, or null
  int64_t ldr = 0;
  bool relu = false;  // applied last
};

// C (m, n; row stride ldc) = epi(A (m, k; row stride lda) @ W^T) in bfloat16, W packed by
// pack_weight_bf16. C may alias the residual (same pointer and stride) but not A.
void gemm_bf16(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint16_t* wp, uint16_t* c,
               int64_t ldc, const EpilogueBf16& epi);

// C (m, n; row stride ldc) = bf16(relu?(A @ W^T + bias)) where A (m, taps * kt) is given as a
// table of row pointers, A[i, t * kt + kk] = rows[t * m + i][kk] (a convolution's taps read in
// place, as gemm_taps in gemm.h), W packed by pack_weight_bf16 for k = taps * kt. kt must be
// even when taps > 1 (a k pair never spans two taps). bias (n,) float32 or null. On AVX512-BF16
// whatever bf16_kernel says.
void gemm_taps_bf16(int64_t m, int64_t n, int64_t kt, int64_t taps, const uint16_t* const* rows, const uint16_t* wp,
                    uint16_t* c, int64_t ldc, const float* bias, bool relu);

}  // namespace shvit_gemm
