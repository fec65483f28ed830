// The first stem convolution (3x3, padding 1, few input channels) read straight from the NCHW
// image and written channels_last, with bias and ReLU: CPU kernel of shvit_cpp::stem_conv3x3
// (see shvit_kernels/pointwise.py). It saves the NCHW -> channels_last copy of the image that
// an NHWC convolution would need first.
//
// Per output row: the 3 input rows of each channel are copied once into zero-padded buffers
// (so the taps need no bounds checks), then each group of output pixels accumulates the 9*Cin
// taps into AVX registers holding all its output channels (up to 32; 8 accumulators: 4 pixels
// x 16 channels or 2 pixels x 32 channels; on AVX-512, 12 pixels in zmm registers). x86-64
// with AVX2/FMA only; the caller falls back to oneDNN elsewhere.
//
// shvit_cpp::stem_conv3x3_bf16 is the same convolution for the bfloat16 plan (a bfloat16
// image, or a float32 one rounded to bfloat16 first, as autocast would): the rows are widened
// exactly into the float32 buffers, the float32 sums (bfloat16-rounded weights in float32)
// rounded once to bfloat16 when stored. AVX-512 only.
#include <torch/library.h>

#include <vector>

#include "common.h"

#include "cpu_isa.h"

namespace shvit_cpu {

namespace {

// Floats of zeros after each padded input row: a short last step of 12 pixels reads up to
// 2 * 12 + 2 past its first pixel (the AVX2 kernel's groups, at most 2 past the row).
constexpr int64_t kStemTail = 26;

struct StemArgs {
  const void* x;      // (B, Cin, H, W), float32 or (bf16) bfloat16
  const float* w;     // (9 * Cin, CoP): tap-major, zero past Cout
  const float* bias;  // (CoP,), zero past Cout
  void* out;          // (B, OH, OW, Cout), float32 or (bf16) bfloat16
  int64_t Cin, H, W, OH, OW, Cout, CoP, stride;
  bool relu, bf16;
};

#ifdef SHVIT_X86

// Store one pixel's NV vectors of output channels (masked past Cout).
SHVIT_TARGET_AVX2 inline void store_pixel(const StemArgs& a, float* o, const __m256* v, int nv) {
  const __m256 z = _mm256_setzero_ps();
  for (int j = 0; j < nv; ++j) {
    __m256 r = a.relu ? _mm256_max_ps(z, v[j]) : v[j];  // max(0, v): NaN stays NaN
    const int64_t c0 = j * 8;
    if (c0 + 8 <= a.Cout) {
      _mm256_storeu_ps(o + c0, r);
    } else {
      const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(a.Cout - c0)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      _mm256_maskstore_ps(o + c0, m, r);
    }
  }
}

// One output row with NV vectors (8 channels each) per pixel and 8 / NV pixels per step.
// rows[ci * 3 + ky] is input row oy * stride - 1 + ky of channel ci, padded: rows[..][ix + 1].
template <int NV>
SHVIT_TARGET_AVX2 void stem_row(const StemArgs& a, const float* const* rows, float* orow) {
  constexpr int PX = 8 / NV;
  constexpr int64_t CoP = 8 * NV;
  const int64_t s = a.stride, nrows = a.Cin * 3;
  for (int64_t ox0 = 0; ox0 < a.OW; ox0 += PX) {
    int64_t px[PX];
    for (int p = 0; p < PX; ++p) px[p] = std::min<int64_t>(ox0 + p, a.OW - 1) * s;  // short groups repeat
    __m256 acc0 = _mm256_loadu_ps(a.bias), acc1 = _mm256_loadu_ps(a.bias + 8);
    __m256 acc2, acc3, acc4, acc5, acc6, acc7;
    if (NV == 2) {
      acc2 = acc4 = acc6 = acc0;
      acc3 = acc5 = acc7 = acc1;
    } else {
      acc2 = _mm256_loadu_ps(a.bias + 16), acc3 = _mm256_loadu_ps(a.bias + 24);
      acc4 = acc0, acc5 = acc1, acc6 = acc2, acc7 = acc3;
    }
    for (int64_t rr = 0; rr < nrows; ++rr) {  // input row (ci, ky), then its 3 taps kx
      const float* row = rows[rr];
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx) {
        const float* r = row + kx;
        const float* w = a.w + (rr * 3 + kx) * CoP;
        if (NV == 2) {
          const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
          __m256 v = _mm256_broadcast_ss(r + px[0]);
          acc0 = _mm256_fmadd_ps(v, w0, acc0), acc1 = _mm256_fmadd_ps(v, w1, acc1);
          v = _mm256_broadcast_ss(r + px[1 % PX]);
          acc2 = _mm256_fmadd_ps(v, w0, acc2), acc3 = _mm256_fmadd_ps(v, w1, acc3);
          v = _mm256_broadcast_ss(r + px[2 % PX]);
          acc4 = _mm256_fmadd_ps(v, w0, acc4), acc5 = _mm256_fmadd_ps(v, w1, acc5);
          v = _mm256_broadcast_ss(r + px[3 % PX]);
          acc6 = _mm256_fmadd_ps(v, w0, acc6), acc7 = _mm256_fmadd_ps(v, w1, acc7);
        } else {
          const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
          const __m256 w2 = _mm256_loadu_ps(w + 16), w3 = _mm256_loadu_ps(w + 24);
          __m256 v = _mm256_broadcast_ss(r + px[0]);
          acc0 = _mm256_fmadd_ps(v, w0, acc0), acc1 = _mm256_fmadd_ps(v, w1, acc1);
          acc2 = _mm256_fmadd_ps(v, w2, acc2), acc3 = _mm256_fmadd_ps(v, w3, acc3);
          v = _mm256_broadcast_ss(r + px[1 % PX]);
          acc4 = _mm256_fmadd_ps(v, w0, acc4), acc5 = _mm256_fmadd_ps(v, w1, acc5);
          acc6 = _mm256_fmadd_ps(v, w2, acc6), acc7 = _mm256_fmadd_ps(v, w3, acc7);
        }
      }
    }
    const __m256 all[8] = {acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7};
    for (int p = 0; p < PX && ox0 + p < a.OW; ++p) store_pixel(a, orow + (ox0 + p) * a.Cout, all + p * NV, NV);
  }
}

// float32 -> bfloat16, rounding to nearest even (NaN stays NaN, made quiet).
SHVIT_TARGET_AVX512 inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// stem_row on AVX-512 for stride S: 12 pixels per step, NV zmm vectors (16 channels each) per
// pixel, so 12 or 24 accumulators and one broadcast per 16 or 32 FMA lanes (the AVX2 kernel:
// 8). A step's taps lie at fixed offsets from one pointer (the padded rows run kStemTail
// floats past the image, so the pixels of a short last step read zeros and are not stored).
// The taps are summed in the same order as stem_row, so the two give identical results.
template <int NV, int S>
SHVIT_TARGET_AVX512 void stem_row_z(const StemArgs& a, const float* const* rows, int64_t r) {
  constexpr int PX = 12;
  const int64_t nrows = a.Cin * 3;
  __mmask16 mk[NV];
  for (int j = 0; j < NV; ++j) {
    const int64_t v = std::min<int64_t>(16, a.Cout - j * 16);
    mk[j] = v <= 0 ? 0 : static_cast<__mmask16>((1u << v) - 1u);
  }
  const __m512 z = _mm512_setzero_ps();
  for (int64_t ox0 = 0; ox0 < a.OW; ox0 += PX) {
    __m512 acc[PX * NV];
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) {
      const __m512 b = _mm512_loadu_ps(a.bias + j * 16);
#pragma GCC unroll 12
      for (int p = 0; p < PX; ++p) acc[p * NV + j] = b;
    }
    for (int64_t rr = 0; rr < nrows; ++rr) {  // input row (ci, ky), then its 3 taps kx
      const float* row = rows[rr] + ox0 * S;
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx) {
        const float* w = a.w + (rr * 3 + kx) * a.CoP;
        // one base pointer, the pixels at constant offsets from it: opaque to the compiler, or
        // GCC hoists the twelve pixel offsets out of the loops into registers and spills
        // accumulators to the stack
        const float* r = row + kx;
        asm("" : "+r"(r));
        __m512 wv[NV];
#pragma GCC unroll 2
        for (int j = 0; j < NV; ++j) wv[j] = _mm512_loadu_ps(w + j * 16);
#pragma GCC unroll 12
        for (int p = 0; p < PX; ++p) {
          const __m512 v = _mm512_set1_ps(r[p * S]);
#pragma GCC unroll 2
          for (int j = 0; j < NV; ++j) acc[p * NV + j] = _mm512_fmadd_ps(v, wv[j], acc[p * NV + j]);
        }
      }
    }
    const int64_t np = std::min<int64_t>(PX, a.OW - ox0);
#pragma GCC unroll 12
    for (int p = 0; p < PX; ++p) {
      if (p >= np) break;
      const int64_t o = (r * a.OW + ox0 + p) * a.Cout;
#pragma GCC unroll 2
      for (int j = 0; j < NV; ++j) {
        __m512 v = acc[p * NV + j];
        if (a.relu) v = _mm512_max_ps(z, v);  // max(0, v): NaN stays NaN
        if (a.bf16) {
          _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.out) + o + j * 16, mk[j], to_bf16(v));
        } else {
          _mm512_mask_storeu_ps(static_cast<float*>(a.out) + o + j * 16, mk[j], v);
        }
      }
    }
  }
}
#endif

}  // namespace

namespace {

// x: contiguous NCHW, float32 or (bf16) bfloat16; the output in the same dtype.
Tensor stem_conv(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t stride, bool relu, bool bf16) {
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == Cin && weight.size(2) == 3 && weight.size(3) == 3 &&
                  weight.scalar_type() == at::kFloat,
              "weight must be a float32 (Cout, ", Cin, ", 3, 3) kernel, got ", weight.sizes(), " ", weight.scalar_type());
  const int64_t Cout = weight.size(0);
  TORCH_CHECK(Cin * 9 <= 64 && Cout <= 32 && Cout > 0, "stem_conv3x3 takes Cin * 9 <= 64 and Cout <= 32, got Cin ",
              Cin, ", Cout ", Cout);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == Cout && bias.scalar_type() == at::kFloat,
              "bias must be a float32 vector of ", Cout);
  TORCH_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  const int64_t OH = (H - 1) / stride + 1, OW = (W - 1) / stride + 1;
  Tensor out = at::empty({B, Cout, OH, OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const int64_t CoP = Cout <= 16 ? 16 : 32;
  // (Cout, Cin, 3, 3) -> (Cin * 9, CoP), zero-padded
  Tensor wt = at::zeros({Cin * 9, CoP}, weight.options());
  wt.narrow(1, 0, Cout).copy_(weight.reshape({Cout, Cin * 9}).t());
  Tensor bp = at::zeros({CoP}, weight.options());
  bp.narrow(0, 0, Cout).copy_(bias);
  const StemArgs a{x.const_data_ptr(), wt.const_data_ptr<float>(), bp.const_data_ptr<float>(),
                   out.data_ptr(), Cin, H, W, OH, OW, Cout, CoP, stride, relu, bf16};
#ifdef SHVIT_X86
  const bool avx512 = shvit_isa::active() == shvit_isa::Isa::kAvx512;
  parallel_tiles(B * OH, [&](const auto& take) {  // output rows
    const int64_t Wp = W + 2 + kStemTail;  // zeros past the row for the taps of a short last step
    std::vector<float> pad(static_cast<size_t>(Cin * 3 * Wp), 0.f);
    std::vector<const float*> rows(static_cast<size_t>(Cin * 3));
    const std::vector<float> zero_row(static_cast<size_t>(Wp), 0.f);
    for (int64_t r; (r = take()) >= 0;) {
      const int64_t b = r / OH, oy = r % OH;
      for (int64_t ci = 0; ci < Cin; ++ci) {
        for (int64_t ky = 0; ky < 3; ++ky) {
          const int64_t iy = oy * stride - 1 + ky;
          if (iy < 0 || iy >= H) {
            rows[ci * 3 + ky] = zero_row.data();
            continue;
          }
          float* p = pad.data() + (ci * 3 + ky) * Wp;  // p[0] and p[W + 1..] stay 0
          const int64_t at = ((b * Cin + ci) * H + iy) * W;
          if (bf16) {  // widened exactly
            const uint16_t* src = static_cast<const uint16_t*>(a.x) + at;
            for (int64_t i = 0; i < W; ++i) p[i + 1] = c10::detail::f32_from_bits(src[i]);
          } else {
            std::copy_n(static_cast<const float*>(a.x) + at, W, p + 1);
          }
          rows[ci * 3 + ky] = p;
        }
      }
      if (avx512) {
        if (stride == 1) {
          (CoP == 16 ? stem_row_z<1, 1> : stem_row_z<2, 1>)(a, rows.data(), r);
        } else {
          (CoP == 16 ? stem_row_z<1, 2> : stem_row_z<2, 2>)(a, rows.data(), r);
        }
      } else {
        (CoP == 16 ? stem_row<2> : stem_row<4>)(a, rows.data(), static_cast<float*>(a.out) + r * OW * Cout);
      }
    }
  });
#endif
  return out;
}

}  // namespace

// relu?(conv2d(x, weight, bias, stride, padding=1)) for a 3x3 kernel, NCHW float32 x with
// Cin * 9 <= 64 and Cout <= 32 (an NCHW copy is made of x in any other layout); the output
// is channels_last.
Tensor stem_conv3x3(const Tensor& x_in, const Tensor& weight, const Tensor& bias, int64_t stride, bool relu) {
  check_input(x_in, "x");
  TORCH_CHECK(shvit_isa::at_least(shvit_isa::Isa::kAvx2),
              "stem_conv3x3 needs the AVX2 level (an x86-64 CPU with AVX2 and FMA)");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "x must be float32, got ", x_in.scalar_type());
  return stem_conv(x_in.contiguous(), weight, bias, stride, relu, false);
}

// The same in bfloat16: x rounded to bfloat16 (if it is not), float32 weight and bias (the
// bfloat16 ones widened), float32 sums, a channels_last bfloat16 output.
Tensor stem_conv3x3_bf16(const Tensor& x_in, const Tensor& weight, const Tensor& bias, int64_t stride, bool relu) {
  check_input(x_in, "x");
  TORCH_CHECK(shvit_isa::at_least(shvit_isa::Isa::kAvx512),
              "stem_conv3x3_bf16 needs the avx512 level (an x86-64 CPU with AVX-512)");
  return stem_conv(x_in.to(at::kBFloat16).contiguous(), weight, bias, stride, relu, true);
}

TORCH_LIBRARY_IMPL(shvit_cpp, CPU, m) {
  m.impl("stem_conv3x3", &stem_conv3x3);
  m.impl("stem_conv3x3_bf16", &stem_conv3x3_bf16);
}

}  // namespace shvit_cpu
