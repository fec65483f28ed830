// The row-pointer table of a 3x3 convolution (padding 1, stride 1 or 2) on a channels_last
// input, for the GEMMs that read a convolution's taps in place (gemm_taps in gemm/gemm.h,
// gemm_taps_bf16 in gemm/gemm_bf16.h): output pixel r0 + i's kernel row ky starts at
// rows[ky * count + i], 3 * C contiguous elements (its three pixels' channels). Kernel rows
// outside the image point at `zero` (3 * C zeros); those that overhang the image's left or
// right edge are copied, zero-padded, into `edges`.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace shvit_cpu {

template <typename T>
void conv3x3_tap_rows(const T* px, int64_t H, int64_t W, int64_t c, int64_t OH, int64_t OW, int64_t stride,
                      int64_t r0, int64_t count, const T* zero, std::vector<T>& edges, const T** rows) {
  const int64_t seg = 3 * c;
  const size_t room = static_cast<size_t>(3 * count * seg);  // at most 3 overhanging kernel rows a pixel
  if (!edges.empty() && edges.size() < room) edges.resize(room);  // never later: rows point into it
  int64_t b = r0 / (OH * OW), oy = r0 / OW % OH, ox = r0 % OW, used = 0;
  // runs of pixels along one output row: a kernel row's start advances by stride * C
  for (int64_t i = 0; i < count;) {
    const int64_t run = std::min(count - i, OW - ox);
    for (int64_t ky = 0; ky < 3; ++ky) {
      const int64_t iy = oy * stride - 1 + ky;
      const T** dst = rows + ky * count + i;
      if (iy < 0 || iy >= H) {
        std::fill(dst, dst + run, zero);
        continue;
      }
      const T* line = px + (b * H + iy) * W * c;
      for (int64_t j = 0; j < run; ++j) {
        const int64_t ix0 = (ox + j) * stride - 1;
        if (ix0 >= 0 && ix0 + 2 < W) {
          dst[j] = line + ix0 * c;
          continue;
        }
        if (edges.empty()) edges.resize(room);
        T* e = edges.data() + used++ * seg;
        for (int64_t kx = 0; kx < 3; ++kx) {
          const int64_t ix = ix0 + kx;
          if (ix >= 0 && ix < W) {
            std::copy(line + ix * c, line + (ix + 1) * c, e + kx * c);
          } else {
            std::fill(e + kx * c, e + (kx + 1) * c, T(0));
          }
        }
        dst[j] = e;
      }
    }
    i += run;
    if ((ox += run) == OW) {
      ox = 0;
      if (++oy == OH) oy = 0, ++b;
    }
  }
}

}  // namespace shvit_cpu
