// Convolutions of the BN-folded network as token-major GEMMs with fused epilogues (CPU
// kernels of shvit_cpp::pw_conv, shvit_cpp::ffn_block and shvit_cpp::conv3x3; see
// shvit_kernels/pointwise.py), and the two GEMMs on per-image channel means: the
// SqueezeExcite gate (shvit_cpp::se_gate) and the classifier head (shvit_cpp::pool_linear).
//
// Activations are channels_last float32 tensors, i.e. (B*H*W, C) row-major token rows (a
// channels_last copy is made of an input in another layout); the weights are packed once by
// shvit_cpp::pack_weight (gemm.h). Rows are split across threads.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "gemm/gemm.h"
#include "gemm/gemm_threads.h"
#include "inference/conv_taps.h"

namespace shvit_cpu {

namespace {

// FFN rows per tile: the hidden tile (rows x 2C floats) stays in L2 between its two GEMMs.
constexpr int64_t kFfnRows = 96;
// 3x3 convolution: output pixels per tile (one table of 3 x rows input-row pointers).
constexpr int64_t kConvRows = 96;

void require_gemm() {
  TORCH_CHECK(shvit_gemm::available(),
              "shvit_cpp: the packed GEMM needs an x86-64 CPU with AVX2 and FMA (use the torch path elsewhere)");
}

// An activation as the kernels read it: float32, channels_last (a copy is made of any other
// layout), `channels` channels unless that is -1.
Tensor token_major(const Tensor& x, const char* name, int64_t channels) {
  check_input(x, name);
  TORCH_CHECK(x.scalar_type() == at::kFloat, name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(channels < 0 || x.size(1) == channels, name, " must have ", channels, " channels, got ", x.size(1));
  return as_channels_last(x);
}

// wp: the packed form of an (n, k) weight; bias (n,) float32.
void check_packed(const Tensor& wp, const Tensor& bias, int64_t k, const char* name) {
  TORCH_CHECK(bias.dim() == 1 && bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.device().is_cpu(),
              name, ": bias must be a contiguous float32 CPU vector, got ", bias.sizes(), " ", bias.scalar_type());
  const int64_t n = bias.size(0);
  TORCH_CHECK(wp.dim() == 3 && wp.scalar_type() == at::kFloat && wp.is_contiguous() && wp.device().is_cpu() &&
                  wp.size(0) == (n + shvit_gemm::kPanel - 1) / shvit_gemm::kPanel && wp.size(1) == k &&
                  wp.size(2) == shvit_gemm::kPanel,
              name, ": expected a weight packed by shvit_cpp::pack_weight for ", n, " outputs and ", k,
              " inputs, got ", wp.sizes(), " ", wp.scalar_type());
}

Tensor empty_cl(const Tensor& x, int64_t channels) {
  return at::empty({x.size(0), channels, x.size(2), x.size(3)},
                   x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

}  // namespace

bool gemm_available() { return shvit_gemm::available(); }

Tensor pack_weight(const Tensor& w) {
  require_gemm();
  TORCH_CHECK(w.device().is_cpu() && at::isFloatingType(w.scalar_type()), "w must be a floating-point CPU tensor");
  TORCH_CHECK(w.dim() == 2 || (w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1),
              "w must be (out, in) or a 1x1 conv weight (out, in, 1, 1), got ", w.sizes());
  const Tensor w2 = contiguous_as(w.reshape({w.size(0), w.size(1)}), at::kFloat);
  const int64_t n = w2.size(0), k = w2.size(1);
  Tensor out = at::empty({(n + shvit_gemm::kPanel - 1) / shvit_gemm::kPanel, k, shvit_gemm::kPanel},
                         w2.options());
  shvit_gemm::pack_weight(w2.const_data_ptr<float>(), n, k, k, out.data_ptr<float>());
  return out;
}

// relu?(conv1x1(x) + bias + residual)
Tensor pw_conv(const Tensor& x_in, const Tensor& w_packed, const Tensor& bias, bool relu,
               const std::optional<Tensor>& residual_in) {
  require_gemm();
  const Tensor x = token_major(x_in, "x", -1);
  const int64_t k = x.size(1);
  check_packed(w_packed, bias, k, "pw_conv");
  const int64_t n = bias.size(0);
  std::optional<Tensor> residual;
  if (residual_in.has_value()) {
    residual = token_major(*residual_in, "residual", n);
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({x.size(0), n, x.size(2), x.size(3)}),
                "residual must be (", x.size(0), ", ", n, ", ", x.size(2), ", ", x.size(3), "), got ",
                residual->sizes());
  }
  Tensor out = empty_cl(x, n);
  const int64_t m = x.size(0) * x.size(2) * x.size(3);
  if (m == 0) return out;
  const float* px = x.const_data_ptr<float>();
  const float* pw = w_packed.const_data_ptr<float>();
  const float* pres = residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
  float* po = out.data_ptr<float>();
  shvit_gemm::Epilogue epi;
  epi.bias = bias.const_data_ptr<float>();
  epi.relu = relu;
  epi.residual = pres;
  epi.ldr = n;
  gemm_packed_threads(m, n, k, px, pw, po, epi);
  return out;
}

// x + conv1x1_2(relu(conv1x1_1(x) + b1)) + b2, tile by tile (the hidden activation never
// leaves the cache).
Tensor ffn_block(const Tensor& x_in, const Tensor& w1_packed, const Tensor& b1, const Tensor& w2_packed,
                 const Tensor& b2) {
  require_gemm();
  const Tensor x = token_major(x_in, "x", -1);
  const int64_t c = x.size(1);
  check_packed(w1_packed, b1, c, "ffn_block (first conv)");
  const int64_t h = b1.size(0);
  check_packed(w2_packed, b2, h, "ffn_block (second conv)");
  TORCH_CHECK(b2.size(0) == c, "ffn_block: the second conv must map back to ", c, " channels, got ", b2.size(0));
  Tensor out = empty_cl(x, c);
  const int64_t m = x.size(0) * x.size(2) * x.size(3);
  if (m == 0) return out;
  const float* px = x.const_data_ptr<float>();
  const float* pw1 = w1_packed.const_data_ptr<float>();
  const float* pw2 = w2_packed.const_data_ptr<float>();
  const float* pb1 = b1.const_data_ptr<float>();
  const float* pb2 = b2.const_data_ptr<float>();
  float* po = out.data_ptr<float>();
  ffn_tiles<float>(
      m, h, kFfnRows,
      [&](int64_t r0, int64_t rows, float* hidden) {
        shvit_gemm::Epilogue e1;
        e1.bias = pb1;
        e1.relu = true;
        shvit_gemm::gemm_packed(rows, h, c, px + r0 * c, c, pw1, hidden, h, e1);
      },
      [&](int64_t r0, int64_t rows, const float* hidden) {
        shvit_gemm::Epilogue e2;
        e2.bias = pb2;
        e2.residual = px + r0 * c;
        e2.ldr = c;
        shvit_gemm::gemm_packed(rows, c, h, hidden, h, pw2, po + r0 * c, c, e2);
      });
  return out;
}

// relu?(conv2d(x, weight, bias, stride, padding=1)) for a dense 3x3 kernel, x channels_last.
// In channels_last the three pixels under a kernel row are one contiguous run of 3 * C floats,
// so each output pixel reads its 3 x 3 window as three rows of A, one per kernel row (the
// packed (Cout, 3, 3, C) weight's k order), and gemm_taps multiplies them by the weight
// straight from the input, into the pixels' rows of the channels_last output, bias and ReLU in
// its epilogue. A kernel row outside the image reads zeros; one that overhangs the left or
// right edge reads a copy with the padding's zeros. The pointers are made along runs of pixels
// in one output row, with no division per pixel: S1's second stem conv has 50k output pixels
// per batch of 16, and there the tables alone (the GEMM skipped) took 0.47 ms less per call
// than with a pixel-by-pixel loop.
Tensor conv3x3(const Tensor& x_in, const Tensor& w_packed, const Tensor& bias, int64_t stride, bool relu) {
  require_gemm();
  const Tensor x = token_major(x_in, "x", -1);
  TORCH_CHECK(stride == 1 || stride == 2, "conv3x3: stride must be 1 or 2, got ", stride);
  const int64_t B = x.size(0), c = x.size(1), H = x.size(2), W = x.size(3), seg = 3 * c;
  check_packed(w_packed, bias, 3 * seg, "conv3x3 (weight permuted to (Cout, 3, 3, Cin))");
  const int64_t n = bias.size(0);
  const int64_t OH = (H - 1) / stride + 1, OW = (W - 1) / stride + 1;
  Tensor out = at::empty({B, n, OH, OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t m = B * OH * OW;
  if (m == 0) return out;
  const float* px = x.const_data_ptr<float>();
  const float* pw = w_packed.const_data_ptr<float>();
  const float* pb = bias.const_data_ptr<float>();
  float* po = out.data_ptr<float>();
  const std::vector<float> zero(static_cast<size_t>(seg), 0.f);
  const int64_t tiles = (m + kConvRows - 1) / kConvRows;
  parallel_tiles(tiles, [&](const auto& take) {
    std::vector<const float*> rows(static_cast<size_t>(3 * kConvRows));
    std::vector<float> edges;
    for (int64_t t; (t = take()) >= 0;) {
      const int64_t r0 = t * kConvRows, count = std::min(kConvRows, m - r0);
      conv3x3_tap_rows(px, H, W, c, OH, OW, stride, r0, count, zero.data(), edges, rows.data());
      shvit_gemm::gemm_taps(count, n, seg, 3, rows.data(), pw, po + r0 * n, n, pb, relu);
    }
  });
  return out;
}

namespace {

// mean[b, c] over the tokens of image b (rows of c floats), summed in token order.
std::vector<float> token_means(const Tensor& x) {
  const int64_t B = x.size(0), c = x.size(1), N = x.size(2) * x.size(3);
  std::vector<float> mean(static_cast<size_t>(B * c), 0.f);
  const float* px = x.const_data_ptr<float>();
  const float inv = N > 0 ? 1.f / static_cast<float>(N) : 0.f;
  parallel_rows(B, 1, [&](int64_t b) {
    float* mb = mean.data() + b * c;
    for (int64_t t = 0; t < N; ++t) {
      const float* row = px + (b * N + t) * c;
      for (int64_t j = 0; j < c; ++j) mb[j] += row[j];
    }
    for (int64_t j = 0; j < c; ++j) mb[j] *= inv;
  });
  return mean;
}

// C (m, n) = epi(A (m, k) @ W^T) for a few rows (one per image): the output panels split
// across threads (the weight is what is read). Bias and ReLU only.
void gemm_few_rows(int64_t m, int64_t n, int64_t k, const float* a, const Tensor& w_packed, float* c,
                   const shvit_gemm::Epilogue& epi) {
  const float* pw = w_packed.const_data_ptr<float>();
  const int64_t panels = (n + shvit_gemm::kPanel - 1) / shvit_gemm::kPanel;
  const int64_t step = 4;  // panels per tile
  parallel_tiles((panels + step - 1) / step, [&](const auto& take) {
    for (int64_t t; (t = take()) >= 0;) {
      const int64_t p0 = t * step, p1 = std::min(panels, p0 + step);
      shvit_gemm::Epilogue e = epi;
      const int64_t n0 = p0 * shvit_gemm::kPanel, n1 = std::min(n, p1 * shvit_gemm::kPanel);
      if (e.bias) e.bias += n0;
      shvit_gemm::gemm_packed(m, n1 - n0, k, a, k, pw + p0 * k * shvit_gemm::kPanel, c + n0, n, e);
    }
  });
}

}  // namespace

// x * sigmoid(fc2(relu(fc1(mean over tokens of x)))) for BN-folded 1x1 convs fc1 (c -> h) and
// fc2 (h -> c), packed: SqueezeExcite in one call.
Tensor se_gate(const Tensor& x_in, const Tensor& w1_packed, const Tensor& b1, const Tensor& w2_packed,
               const Tensor& b2) {
  require_gemm();
  const Tensor x = token_major(x_in, "x", -1);
  const int64_t B = x.size(0), c = x.size(1), N = x.size(2) * x.size(3);
  check_packed(w1_packed, b1, c, "se_gate (fc1)");
  const int64_t h = b1.size(0);
  check_packed(w2_packed, b2, h, "se_gate (fc2)");
  TORCH_CHECK(b2.size(0) == c, "se_gate: fc2 must map back to ", c, " channels, got ", b2.size(0));
  Tensor out = empty_cl(x, c);
  if (out.numel() == 0) return out;
  const std::vector<float> mean = token_means(x);
  std::vector<float> hidden(static_cast<size_t>(B * h)), gate(static_cast<size_t>(B * c));
  shvit_gemm::Epilogue e1;
  e1.bias = b1.const_data_ptr<float>();
  e1.relu = true;
  gemm_few_rows(B, h, c, mean.data(), w1_packed, hidden.data(), e1);
  shvit_gemm::Epilogue e2;
  e2.bias = b2.const_data_ptr<float>();
  gemm_few_rows(B, c, h, hidden.data(), w2_packed, gate.data(), e2);
  for (float& g : gate) g = 1.f / (1.f + std::exp(-g));
  const float* px = x.const_data_ptr<float>();
  float* po = out.data_ptr<float>();
  parallel_rows(B * N, 64, [&](int64_t r) {
    const float* g = gate.data() + r / N * c;
    for (int64_t j = 0; j < c; ++j) po[r * c + j] = px[r * c + j] * g[j];
  });
  return out;
}

// (B, n) = (mean over tokens of x) @ W^T + bias: global average pooling and a linear layer.
Tensor pool_linear(const Tensor& x_in, const Tensor& w_packed, const Tensor& bias) {
  require_gemm();
  const Tensor x = token_major(x_in, "x", -1);
  const int64_t B = x.size(0), c = x.size(1);
  check_packed(w_packed, bias, c, "pool_linear");
  const int64_t n = bias.size(0);
  Tensor out = at::empty({B, n}, x.options());
  if (B == 0) return out;
  const std::vector<float> mean = token_means(x);
  shvit_gemm::Epilogue e;
  e.bias = bias.const_data_ptr<float>();
  gemm_few_rows(B, n, c, mean.data(), w_packed, out.data_ptr<float>(), e);
  return out;
}

TORCH_LIBRARY_IMPL(shvit_cpp, CPU, m) {
  m.impl("se_gate", &se_gate);
  m.impl("pool_linear", &pool_linear);
  m.impl("conv3x3", &conv3x3);
  m.impl("pack_weight", &pack_weight);
  m.impl("pw_conv", &pw_conv);
  m.impl("ffn_block", &ffn_block);
}


}  // namespace shvit_cpu
