// Depthwise 3x3 convolution (padding 1, stride 1 or 2) of a channels_last float32 or bfloat16
// batch, with bias and an optional ReLU: CPU kernel of shvit_cpp::dw_conv3x3 (see
// shvit_kernels/pointwise.py; bfloat16 for shvit_kernels/onednn.py). bfloat16 inputs are
// widened exactly, summed in float32 with the float32 weights, and the result rounded once to
// nearest even (as torch rounds), on AVX-512; at other levels through a float32 copy, with the
// same result.
//
// Token-major layout makes every tap a contiguous run of channels: each output pixel is
// bias + sum over the 3x3 taps of w[tap, c] * x[pixel under tap, c], computed 32 channels at a
// time in AVX registers (x86-64 with AVX2/FMA; a portable loop elsewhere; on AVX-512, up to
// 8 pixels at a time across all channels, each input column loaded once for all of its taps).
// Output rows are split across threads.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

#include "cpu_isa.h"

namespace shvit_cpu {

namespace {

struct DwArgs {
  const void* x;   // float, or c10::BFloat16 (AVX-512 only)
  const float* w;  // (9, C): tap-major
  const float* bias;
  void* out;             // x's type
  const void* zeros;     // a row of W * C zeros of x's type (AVX-512 path)
  int64_t H, W, C, OH, OW, stride;
  bool relu;
};

// The input pixels under the 9 taps of output pixel (oy, ox) of image b (null: padding).
inline void tap_rows(const DwArgs& a, int64_t b, int64_t oy, int64_t ox, const float* rows[9]) {
  for (int64_t ky = 0; ky < 3; ++ky) {
    const int64_t iy = oy * a.stride - 1 + ky;
    for (int64_t kx = 0; kx < 3; ++kx) {
      const int64_t ix = ox * a.stride - 1 + kx;
      rows[ky * 3 + kx] =
          (iy >= 0 && iy < a.H && ix >= 0 && ix < a.W) ? static_cast<const float*>(a.x) + ((b * a.H + iy) * a.W + ix) * a.C
                                                       : nullptr;
    }
  }
}

void pixel_portable(const DwArgs& a, const float* const rows[9], float* o) {
  for (int64_t c = 0; c < a.C; ++c) {
    float s = a.bias[c];
    for (int t = 0; t < 9; ++t) {
      if (rows[t]) s += a.w[t * a.C + c] * rows[t][c];
    }
    o[c] = a.relu && s < 0.f ? 0.f : s;
  }
}

#ifdef SHVIT_X86
SHVIT_TARGET_AVX2 void pixel_avx2(const DwArgs& a, const float* const rows[9], float* o) {
  const int64_t C = a.C;
  const __m256 z = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    __m256 s0 = _mm256_loadu_ps(a.bias + c), s1 = _mm256_loadu_ps(a.bias + c + 8);
    __m256 s2 = _mm256_loadu_ps(a.bias + c + 16), s3 = _mm256_loadu_ps(a.bias + c + 24);
    for (int t = 0; t < 9; ++t) {
      const float* r = rows[t];
      if (!r) continue;
      const float* w = a.w + t * C + c;
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w), _mm256_loadu_ps(r + c), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8), _mm256_loadu_ps(r + c + 8), s1);
      s2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 16), _mm256_loadu_ps(r + c + 16), s2);
      s3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 24), _mm256_loadu_ps(r + c + 24), s3);
    }
    if (a.relu) {  // max(0, v): NaN stays NaN, as in torch.relu
      s0 = _mm256_max_ps(z, s0), s1 = _mm256_max_ps(z, s1), s2 = _mm256_max_ps(z, s2), s3 = _mm256_max_ps(z, s3);
    }
    _mm256_storeu_ps(o + c, s0), _mm256_storeu_ps(o + c + 8, s1);
    _mm256_storeu_ps(o + c + 16, s2), _mm256_storeu_ps(o + c + 24, s3);
  }
  for (; c + 8 <= C; c += 8) {
    __m256 s = _mm256_loadu_ps(a.bias + c);
    for (int t = 0; t < 9; ++t) {
      if (rows[t]) s = _mm256_fmadd_ps(_mm256_loadu_ps(a.w + t * C + c), _mm256_loadu_ps(rows[t] + c), s);
    }
    if (a.relu) s = _mm256_max_ps(z, s);
    _mm256_storeu_ps(o + c, s);
  }
  for (; c < C; ++c) {
    float s = a.bias[c];
    for (int t = 0; t < 9; ++t) {
      if (rows[t]) s += a.w[t * C + c] * rows[t][c];
    }
    o[c] = a.relu && s < 0.f ? 0.f : s;
  }
}

// 16 (masked) values of T widened to float32, and stored from float32 (bfloat16: rounded to
// nearest even, NaN to 0x7FC0, as c10::BFloat16 rounds).
template <typename T>
SHVIT_TARGET_AVX512 inline __m512 dw_load_z(__mmask16 m, const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
}

template <typename T>
SHVIT_TARGET_AVX512 inline void dw_store_z(const DwArgs& a, __m512 v, __mmask16 m, T* o) {
  if (a.relu) v = _mm512_max_ps(_mm512_setzero_ps(), v);  // max(0, v): NaN stays NaN
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(o, m, v);
  } else {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                          _mm512_set1_epi32(0x7FFF));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(o, m, _mm512_cvtepi32_epi16(r));
  }
}

// N output pixels of a row from ox on, whose taps in columns [K0, K1) are inside the image
// (the others are padding), all channels, 16 at a time (N sums at once). Each of the three
// input rows' columns under the N pixels is loaded once per 16 channels, then used by every
// tap that covers it.
template <int S, int N, int K0, int K1, typename T>
SHVIT_TARGET_AVX512 inline void dw_pixels_z(const DwArgs& a, const T* const in[3], int64_t ox, T* orow) {
  constexpr int kCols = (N - 1) * S + K1;  // columns K0 .. kCols - 1 under the pixels
  const int64_t C = a.C, x0 = ox * S - 1;
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = C - c >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (C - c)) - 1u);
    const __m512 bias = _mm512_maskz_loadu_ps(m, a.bias + c);
    __m512 v[N];
#pragma GCC unroll 8
    for (int n = 0; n < N; ++n) v[n] = bias;
#pragma GCC unroll 3
    for (int ky = 0; ky < 3; ++ky) {
      __m512 col[kCols];
#pragma GCC unroll 16
      for (int j = K0; j < kCols; ++j) col[j] = dw_load_z(m, in[ky] + (x0 + j) * C + c);
#pragma GCC unroll 3
      for (int kx = K0; kx < K1; ++kx) {
        const __m512 wt = _mm512_maskz_loadu_ps(m, a.w + (ky * 3 + kx) * C + c);
#pragma GCC unroll 8
        for (int n = 0; n < N; ++n) v[n] = _mm512_fmadd_ps(wt, col[n * S + kx], v[n]);
      }
    }
#pragma GCC unroll 8
    for (int n = 0; n < N; ++n) dw_store_z(a, v[n], m, orow + (ox + n) * C + c);
  }
}

// Pixels [ox, hi) of a row, all of their taps inside the image: N at a time, then fewer.
template <int S, int N, typename T>
SHVIT_TARGET_AVX512 inline void dw_interior_z(const DwArgs& a, const T* const in[3], int64_t ox, int64_t hi, T* orow) {
  for (; hi - ox >= N; ox += N) dw_pixels_z<S, N, 0, 3>(a, in, ox, orow);
  if constexpr (N > 1) dw_interior_z<S, N / 2>(a, in, ox, hi, orow);
}

// One output row on AVX-512, pixel by pixel across all channels (the input and output rows are
// read and written in memory order). Rows above or below the image read a row of zeros; the
// left and right edge pixels leave out their padding columns. The taps are summed in the same
// order as pixel_avx2 (the zero rows add +-0), so the two give identical results.
template <int S, typename T>
SHVIT_TARGET_AVX512 void row_avx512(const DwArgs& a, int64_t b, int64_t oy, T* orow) {
  const T* in[3];
  for (int ky = 0; ky < 3; ++ky) {
    const int64_t iy = oy * S - 1 + ky;
    in[ky] = iy >= 0 && iy < a.H ? static_cast<const T*>(a.x) + (b * a.H + iy) * a.W * a.C
                                 : static_cast<const T*>(a.zeros);
  }
  if (a.W == 1) return dw_pixels_z<S, 1, 1, 2>(a, in, 0, orow);
  dw_pixels_z<S, 1, 1, 3>(a, in, 0, orow);
  const int64_t hi = std::min<int64_t>(a.OW, (a.W - 2) / S + 1);  // pixels with all three columns inside
  dw_interior_z<S, S == 1 ? 8 : 4, T>(a, in, 1, hi, orow);
  if (hi < a.OW) dw_pixels_z<S, 1, 0, 2>(a, in, a.OW - 1, orow);
}
#endif

}  // namespace

// x in any memory format (a channels_last copy is made of any other).
Tensor dw_conv3x3(const Tensor& x_in, const Tensor& weight, const Tensor& bias, int64_t stride, bool relu) {
  check_input(x_in, "x");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x_in.scalar_type());
  const Tensor x = as_channels_last(x_in);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "weight must be a float32 (", C, ", 1, 3, 3) depthwise kernel, got ", weight.sizes(), " ",
              weight.scalar_type());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C && bias.scalar_type() == at::kFloat && bias.device().is_cpu(),
              "bias must be a float32 vector of ", C, ", got ", bias.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  const bool avx512 = shvit_isa::active() == shvit_isa::Isa::kAvx512;
  if (bf16 && !avx512) return dw_conv3x3(x.to(at::kFloat), weight, bias, stride, relu).to(at::kBFloat16);
  const int64_t OH = (H - 1) / stride + 1, OW = (W - 1) / stride + 1;
  Tensor out = at::empty({B, C, OH, OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  // (9, C), tap-major, by a plain loop: ATen ops here would cost more than a small image's conv
  const Tensor wc = weight.contiguous();
  std::vector<float> w9(static_cast<size_t>(9 * C));
  const float* pw = wc.const_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < 9; ++k) w9[k * C + c] = pw[c * 9 + k];
  }
  const Tensor b = bias.contiguous();
  const bool simd = shvit_isa::at_least(shvit_isa::Isa::kAvx2);
  const std::vector<float> zeros(avx512 ? static_cast<size_t>(W * C) : 0);  // zero bits: 0 in either type
  const DwArgs a{x.const_data_ptr(), w9.data(), b.const_data_ptr<float>(), out.data_ptr(), zeros.data(),
                 H, W, C, OH, OW, stride, relu};
  (void)simd;
  parallel_tiles(B * OH, [&](const auto& take) {  // output rows
    const float* rows[9];
    for (int64_t r; (r = take()) >= 0;) {
      const int64_t bb = r / OH, oy = r % OH;
#ifdef SHVIT_X86
      if (avx512 && bf16) {
        using bf = c10::BFloat16;
        (stride == 1 ? row_avx512<1, bf> : row_avx512<2, bf>)(a, bb, oy, static_cast<bf*>(a.out) + r * OW * C);
        continue;
      }
      if (avx512) {
        (stride == 1 ? row_avx512<1, float> : row_avx512<2, float>)(a, bb, oy, static_cast<float*>(a.out) + r * OW * C);
        continue;
      }
#endif
      for (int64_t ox = 0; ox < OW; ++ox) {
        tap_rows(a, bb, oy, ox, rows);
        float* o = static_cast<float*>(a.out) + (r * OW + ox) * C;
#ifdef SHVIT_X86
        if (simd) {
          pixel_avx2(a, rows, o);
          continue;
        }
#endif
        pixel_portable(a, rows, o);
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(shvit_cpp, CPU, m) { m.impl("dw_conv3x3", &dw_conv3x3); }

}  // namespace shvit_cpu
