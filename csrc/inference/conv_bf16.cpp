// The GEMM blocks of the bfloat16 inference plan on our own AVX512-BF16 GEMM (gemm/gemm_bf16.h):
// shvit_cpp::pack_weight_bf16, and bf16_pw, bf16_conv3x3, bf16_ffn, bf16_shsa, bf16_se,
// bf16_pool_linear, the counterparts of onednn_blocks.cpp's ops (shvit_kernels/onednn.py uses them on CPUs with
// AVX512-BF16 and no AMX). At batch 1 oneDNN's linear op spent more time per call on its
// set-up than on SHViT's small GEMMs.
//
// Activations are channels_last bfloat16 (a copy is made of any other input: float32 under
// autocast, or another layout); biases float32 (the bfloat16 bias widened); outputs channels_last
// bfloat16.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "gemm/gemm_bf16.h"
#include "gemm/gemm_threads.h"
#include "inference/conv_taps.h"

namespace shvit_cpu {

Tensor gn_rows(const Tensor& x, int64_t pdim, double eps);                                   // shsa_inference.cpp
Tensor attend_concat_relu(const Tensor& qkv, const Tensor& x, int64_t pdim, int64_t qk_dim);  // shsa_inference.cpp

namespace {

// FFN rows per tile: the hidden tile (rows x 2C bfloat16) stays in L2 between its two GEMMs.
constexpr int64_t kFfnRows = 96;
// Rows per tile of a lone 1x1 conv split across threads.
constexpr int64_t kPwRows = 144;
// 3x3 convolution: output pixels per tile (one table of 3 x rows input-row pointers).
constexpr int64_t kConvRows = 96;

const uint16_t* u16(const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()); }
uint16_t* u16(Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

Tensor bf16_rows(const Tensor& x, const char* name, int64_t channels) {
  check_input(x, name);
  TORCH_CHECK(channels < 0 || x.size(1) == channels, name, " must have ", channels, " channels, got ", x.size(1));
  return x.to(at::kBFloat16).contiguous(at::MemoryFormat::ChannelsLast);
}

// wp: pack_weight_bf16 of an (n, k) weight; bias (n,) float32.
void check_packed(const Tensor& wp, const Tensor& bias, int64_t k, const char* name) {
  TORCH_CHECK(shvit_gemm::bf16_available(), name, ": needs a CPU with AVX512-BF16 at the avx512 level");
  TORCH_CHECK(bias.dim() == 1 && bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.device().is_cpu(),
              name, ": bias must be a contiguous float32 CPU vector, got ", bias.sizes(), " ", bias.scalar_type());
  const int64_t n = bias.size(0);
  TORCH_CHECK(wp.dim() == 3 && wp.scalar_type() == at::kBFloat16 && wp.device().is_cpu() &&
                  wp.size(0) == (n + 15) / 16 && wp.size(1) == k && wp.size(2) == 16 &&
                  wp.stride(0) == shvit_gemm::bf16_panel_size(k) && wp.stride(1) == 16 && wp.stride(2) == 1,
              name, ": expected a weight packed by shvit_cpp::pack_weight_bf16 for ", n, " outputs and ", k,
              " inputs, got ", wp.sizes(), " ", wp.scalar_type());
}

Tensor empty_cl(const Tensor& x, int64_t channels) {
  return at::empty({x.size(0), channels, x.size(2), x.size(3)},
                   x.options().dtype(at::kBFloat16).memory_format(at::MemoryFormat::ChannelsLast));
}

// out (m, n; contiguous rows) = relu?(A (m, k) @ W^T + bias + residual), A and the residual
// (m, n) contiguous bfloat16 rows (or null), the rows split across threads.
void gemm_rows(int64_t m, int64_t n, int64_t k, const uint16_t* a, const Tensor& wp, const Tensor& bias, bool relu,
               const uint16_t* residual, uint16_t* out) {
  if (m == 0) return;
  const uint16_t* pw = u16(wp);
  const float* pb = bias.const_data_ptr<float>();
  const RowTiles tiles(m, kPwRows, std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, m / 48)));
  parallel_tiles(tiles.count, [&](const auto& take) {
    for (int64_t t; (t = take()) >= 0;) {
      const int64_t r0 = tiles.begin(t), rows = tiles.end(t) - r0;
      if (rows <= 0) continue;
      shvit_gemm::EpilogueBf16 e;
      e.bias = pb;
      e.relu = relu;
      e.residual = residual ? residual + r0 * n : nullptr;
      e.ldr = n;
      shvit_gemm::gemm_bf16(rows, n, k, a + r0 * k, k, pw, out + r0 * n, n, e);
    }
  });
}

// relu?(A @ W^T + bias) for the (m, k) rows a (bfloat16, made contiguous), as a new (m, n) tensor.
Tensor linear(const Tensor& a_in, const Tensor& wp, const Tensor& bias, bool relu, const char* name) {
  const Tensor a = a_in.to(at::kBFloat16).contiguous();
  check_packed(wp, bias, a.size(1), name);
  Tensor out = at::empty({a.size(0), bias.size(0)}, a.options());
  gemm_rows(a.size(0), bias.size(0), a.size(1), u16(a), wp, bias, relu, nullptr, u16(out));
  return out;
}

}  // namespace

bool bf16_gemm_available() { return shvit_gemm::bf16_available(); }

std::string bf16_gemm_kernel(const std::string& kernel) { return shvit_gemm::bf16_kernel(kernel); }

Tensor pack_weight_bf16(const Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && at::isFloatingType(w.scalar_type()), "w must be a floating-point CPU tensor");
  TORCH_CHECK(w.dim() == 2 || (w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1),
              "w must be (out, in) or a 1x1 conv weight (out, in, 1, 1), got ", w.sizes());
  const Tensor w2 = w.reshape({w.size(0), w.size(1)}).to(at::kBFloat16).contiguous();
  const int64_t n = w2.size(0), k = w2.size(1);
  // (panels, k, 16), each panel padded to bf16_panel_size(k) elements (whole AMX tiles)
  Tensor out = at::empty({(n + 15) / 16, shvit_gemm::bf16_panel_size(k) / 16, 16}, w2.options());
  shvit_gemm::pack_weight_bf16(u16(w2), n, k, k, u16(out));
  return out.narrow(1, 0, k);
}

// relu?(conv1x1(x) + bias + residual)
Tensor bf16_pw(const Tensor& x_in, const Tensor& w_packed, const Tensor& bias, bool relu,
               const std::optional<Tensor>& residual_in) {
  const Tensor x = bf16_rows(x_in, "x", -1);
  const int64_t k = x.size(1);
  check_packed(w_packed, bias, k, "bf16_pw");
  const int64_t n = bias.size(0);
  std::optional<Tensor> residual;
  if (residual_in.has_value()) {
    residual = bf16_rows(*residual_in, "residual", n);
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({x.size(0), n, x.size(2), x.size(3)}), "residual must be (",
                x.size(0), ", ", n, ", ", x.size(2), ", ", x.size(3), "), got ", residual->sizes());
  }
  Tensor out = empty_cl(x, n);
  gemm_rows(x.size(0) * x.size(2) * x.size(3), n, k, u16(x), w_packed, bias, relu,
            residual.has_value() ? u16(*residual) : nullptr, u16(out));
  return out;
}

// relu?(conv3x3(x) + bias), padding 1, stride 1 or 2: the taps read in place (conv_taps.h)
// times the weight permuted to (Cout, 3, 3, Cin) and packed; Cin even (a k pair within a tap).
Tensor bf16_conv3x3(const Tensor& x_in, const Tensor& w_packed, const Tensor& bias, int64_t stride, bool relu) {
  const Tensor x = bf16_rows(x_in, "x", -1);
  TORCH_CHECK(stride == 1 || stride == 2, "bf16_conv3x3: stride must be 1 or 2, got ", stride);
  const int64_t B = x.size(0), c = x.size(1), H = x.size(2), W = x.size(3), seg = 3 * c;
  TORCH_CHECK(c % 2 == 0, "bf16_conv3x3: x must have an even number of channels, got ", c);
  check_packed(w_packed, bias, 3 * seg, "bf16_conv3x3 (weight permuted to (Cout, 3, 3, Cin))");
  const int64_t n = bias.size(0);
  const int64_t OH = (H - 1) / stride + 1, OW = (W - 1) / stride + 1;
  Tensor out = at::empty({B, n, OH, OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t m = B * OH * OW;
  if (m == 0) return out;
  const uint16_t* px = u16(x);
  const uint16_t* pw = u16(w_packed);
  const float* pb = bias.const_data_ptr<float>();
  uint16_t* po = u16(out);
  const std::vector<uint16_t> zero(static_cast<size_t>(seg), 0);
  parallel_tiles((m + kConvRows - 1) / kConvRows, [&](const auto& take) {
    std::vector<const uint16_t*> rows(static_cast<size_t>(3 * kConvRows));
    std::vector<uint16_t> edges;
    for (int64_t t; (t = take()) >= 0;) {
      const int64_t r0 = t * kConvRows, count = std::min(kConvRows, m - r0);
      conv3x3_tap_rows(px, H, W, c, OH, OW, stride, r0, count, zero.data(), edges, rows.data());
      shvit_gemm::gemm_taps_bf16(count, n, seg, 3, rows.data(), pw, po + r0 * n, n, pb, relu);
    }
  });
  return out;
}

// x + conv1x1_2(relu(conv1x1_1(x) + b1)) + b2, tile by tile (the hidden activation, rounded
// to bfloat16 as a bfloat16 model's would be, never leaves the cache).
Tensor bf16_ffn(const Tensor& x_in, const Tensor& w1_packed, const Tensor& b1, const Tensor& w2_packed,
                const Tensor& b2) {
  const Tensor x = bf16_rows(x_in, "x", -1);
  const int64_t c = x.size(1);
  check_packed(w1_packed, b1, c, "bf16_ffn (first conv)");
  const int64_t h = b1.size(0);
  check_packed(w2_packed, b2, h, "bf16_ffn (second conv)");
  TORCH_CHECK(b2.size(0) == c, "bf16_ffn: the second conv must map back to ", c, " channels, got ", b2.size(0));
  Tensor out = empty_cl(x, c);
  const int64_t m = x.size(0) * x.size(2) * x.size(3);
  if (m == 0) return out;
  const uint16_t* px = u16(x);
  const uint16_t* pw1 = u16(w1_packed);
  const uint16_t* pw2 = u16(w2_packed);
  const float* pb1 = b1.const_data_ptr<float>();
  const float* pb2 = b2.const_data_ptr<float>();
  uint16_t* po = u16(out);
  ffn_tiles<uint16_t>(
      m, h, kFfnRows,
      [&](int64_t r0, int64_t rows, uint16_t* hidden) {
        shvit_gemm::EpilogueBf16 e1;
        e1.bias = pb1;
        e1.relu = true;
        shvit_gemm::gemm_bf16(rows, h, c, px + r0 * c, c, pw1, hidden, h, e1);
      },
      [&](int64_t r0, int64_t rows, const uint16_t* hidden) {
        shvit_gemm::EpilogueBf16 e2;
        e2.bias = pb2;
        e2.residual = px + r0 * c;
        e2.ldr = c;
        shvit_gemm::gemm_bf16(rows, c, h, hidden, h, pw2, po + r0 * c, c, e2);
      });
  return out;
}

// x + proj(relu(concat(attention(qkv(gn(x1))), x2))): GroupNorm and attention + concat + ReLU
// (float32 inside, each rounded to bfloat16 once) between the qkv and projection GEMMs, the
// residual add in the projection's epilogue.
Tensor bf16_shsa(const Tensor& x_in, const Tensor& w_qkv, const Tensor& b_qkv, const Tensor& w_proj,
                 const Tensor& b_proj, int64_t pdim, int64_t qk_dim, double eps) {
  const Tensor x = bf16_rows(x_in, "x", -1);
  const int64_t c = x.size(1);
  check_packed(w_proj, b_proj, c, "bf16_shsa (projection)");
  TORCH_CHECK(b_proj.size(0) == c, "bf16_shsa: the projection must map back to ", c, " channels, got ", b_proj.size(0));
  const Tensor qkv = linear(gn_rows(x, pdim, eps), w_qkv, b_qkv, false, "bf16_shsa (qkv)");
  const Tensor z = attend_concat_relu(qkv, x, pdim, qk_dim);
  Tensor out = empty_cl(x, c);
  gemm_rows(z.size(0), c, c, u16(z), w_proj, b_proj, false, u16(x), u16(out));
  return out;
}

// x * sigmoid(fc2(relu(fc1(mean_hw(x))))) (SqueezeExcite), the two 1x1 convs on the pooled
// (B, C) rows.
Tensor bf16_se(const Tensor& x_in, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  const Tensor x = bf16_rows(x_in, "x", -1);
  const Tensor s = linear(linear(x.mean({2, 3}), w1, b1, true, "bf16_se (fc1)"), w2, b2, false, "bf16_se (fc2)");
  return x * s.sigmoid_().view({s.size(0), s.size(1), 1, 1});
}

// linear(mean_hw(x), w, b): global pooling and the classifier.
Tensor bf16_pool_linear(const Tensor& x_in, const Tensor& w, const Tensor& b) {
  return linear(bf16_rows(x_in, "x", -1).mean({2, 3}), w, b, false, "bf16_pool_linear");
}

TORCH_LIBRARY_IMPL(shvit_cpp, CPU, m) {
  m.impl("pack_weight_bf16", &pack_weight_bf16);
  m.impl("bf16_pw", &bf16_pw);
  m.impl("bf16_conv3x3", &bf16_conv3x3);
  m.impl("bf16_ffn", &bf16_ffn);
  m.impl("bf16_shsa", &bf16_shsa);
  m.impl("bf16_se", &bf16_se);
  m.impl("bf16_pool_linear", &bf16_pool_linear);
}

}  // namespace shvit_cpu
