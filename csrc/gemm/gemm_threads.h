// gemm_packed (gemm.h) with its rows split across threads: tiles of at most kGemmTileRows rows
// (a multiple of the 6-row tile, the GEMM's row block), claimed dynamically (parallel_tiles),
// a thread per 48 rows at most. Used by the 1x1 convolutions and SHSA's projections. And the
// FFN's tiling, for the float32 and bfloat16 GEMMs.
#pragma once

#include <algorithm>
#include <vector>

#include "common.h"
#include "gemm/gemm.h"

namespace shvit_cpu {

constexpr int64_t kGemmTileRows = 144;

// C (m, n; row stride n) = epi(A (m, k; row stride k) @ W^T), W packed by pack_weight; the
// residual, if any, has row stride epi.ldr. No col_max (each tile would see only its rows).
inline void gemm_packed_threads(int64_t m, int64_t n, int64_t k, const float* a, const float* wp, float* c,
                                const shvit_gemm::Epilogue& epi) {
  TORCH_INTERNAL_ASSERT(epi.col_max == nullptr && epi.row_bias == nullptr);
  const RowTiles tiles(m, kGemmTileRows, std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, m / 48)));
  parallel_tiles(tiles.count, [&](const auto& take) {
    for (int64_t t; (t = take()) >= 0;) {
      const int64_t r0 = tiles.begin(t), r1 = tiles.end(t);
      if (r1 <= r0) continue;
      shvit_gemm::Epilogue e = epi;
      e.residual = epi.residual ? epi.residual + r0 * epi.ldr : nullptr;
      shvit_gemm::gemm_packed(r1 - r0, n, k, a + r0 * k, k, wp, c + r0 * n, n, e);
    }
  });
}

// An FFN's two GEMMs, tile by tile over rows [0, m): first(r0, rows, hidden) writes the tile's
// hidden activation (rows x h elements of T), second(r0, rows, hidden) reads it while it is still
// in cache. Tiles of at most max_rows rows, as many per thread, claimed dynamically (at two
// threads S1's 784 rows of stage 2 are ten tiles of 78 +- 6 rows; whole tiles of 84 had given
// one thread 420 rows and the other 364); a hidden buffer per thread.
template <typename T, typename First, typename Second>
void ffn_tiles(int64_t m, int64_t h, int64_t max_rows, const First& first, const Second& second) {
  const RowTiles tiles(m, max_rows, at::get_num_threads());
  parallel_tiles(tiles.count, [&](const auto& take) {
    std::vector<T> hidden;
    for (int64_t t; (t = take()) >= 0;) {
      const int64_t r0 = tiles.begin(t), rows = tiles.end(t) - r0;
      if (rows <= 0) continue;
      hidden.resize(std::max(hidden.size(), static_cast<size_t>(rows * h)));
      first(r0, rows, hidden.data());
      second(r0, rows, hidden.data());
    }
  });
}

}  // namespace shvit_cpu
