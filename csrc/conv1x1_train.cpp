// A 1x1 convolution without bias for float32 NCHW tensors, forward and backward on the packed
// GEMM (shvit_cpp::conv1x1_train; SHSA's projection conv in training, see shvit/layers.py).
//
// Channel-major, image by image, no transposes of activations:
//   y_b  = W @ x_b         A = W (Cout, Cin),   B = x_b packed as token panels
//   dx_b = W^T @ dy_b      A = W^T,             B = dy_b packed as token panels
//   dW   = sum_b dy_b @ x_b^T   one GEMM with k = B*N: A = dy as (Cout, B*N) rows, B = x
//          packed as a (Cin, B*N) weight; rows of dW split across threads (the same bits for
//          any thread count).
// PyTorch runs this conv as oneDNN's NCHW 1x1 convolution; at SHViT-S4's projection shapes
// on the benchmark machine this op took 5-18% less time, forward + backward (interleaved runs).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "attention_cm.h"
#include "common.h"
#include "gemm.h"
#include "proj_train.h"

namespace shvit_cpu {

// out (B, Cout, H, W) contiguous = a (Cout, Cin) @ x per image, x any strides.
Tensor conv1x1_cm(const Tensor& x, const Tensor& a, int64_t cout) {
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3), N = H * W;
  Tensor out = at::empty({B, cout, H, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || N == 0 || cout == 0) return out;
  const Tensor xv = as_bcn(x);
  const float* px = xv.const_data_ptr<float>();
  const float* pa = a.const_data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t sb = xv.stride(0), sc = xv.stride(1);
  // Rows of whole 64-byte lines and at least 256 tokens: the GEMM reads x in place (at 32 x 32
  // tokens 15-20% faster than packing first). Other widths are packed: unaligned rows made the
  // in-place kernel slower than the copy it saves (14 x 14 tokens, 7 x 7).
  const bool aligned = reinterpret_cast<uintptr_t>(px) % 64 == 0 && sb % 16 == 0 && sc % 16 == 0;
  if (aligned && N % shvit_gemm::kPanel == 0 && N >= 256) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        shvit_gemm::gemm_rows(cout, N, Cin, pa, Cin, px + b * sb, sc, po + b * cout * N, N, shvit_gemm::Epilogue{});
      }
    });
    return out;
  }
  // Images of 16 tokens (4 x 4) are one token panel each as they lie: the AVX-512 tiles take four
  // images at a time (at 448 channels about 190 GFLOP/s on the benchmark machine, against 155-172
  // with 12 x 16 tiles image by image)
  if (N == shvit_gemm::kPanel && sc == N) {
    at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
      shvit_gemm::gemm_image_panels(cout, b1 - b0, Cin, pa, Cin, px + b0 * sb, sb, po + b0 * cout * N, cout * N,
                                    shvit_gemm::Epilogue{});
    });
    return out;
  }
  // a last partial token panel of at most 8 columns runs transposed against the packed weight
  std::vector<float> ap;
  if (shvit_gemm::transposes_tail(N)) {
    ap.resize(static_cast<size_t>(shvit_gemm::packed_size(cout, Cin)));
    shvit_gemm::pack_weight(pa, cout, Cin, Cin, ap.data());
  }
  const float* pap = ap.empty() ? nullptr : ap.data();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    const Scratch panels(kScratchPanels, static_cast<size_t>(shvit_gemm::packed_size(N, Cin)));
    for (int64_t b = b0; b < b1; ++b) {
      pack_tokens_copy(px + b * sb, sc, Cin, N, panels.data());
      shvit_gemm::gemm_token_panels(cout, N, Cin, pa, Cin, pap, panels.data(), po + b * cout * N, N,
                                    shvit_gemm::Epilogue{});
    }
  });
  return out;
}

// dW (Cout, Cin) = sum_b dy_b @ x_b^T as one GEMM over k = B*N tokens: x packed as a
// (Cin, B*N) weight, dy read in place as B segments of N columns (rows of dW split across
// threads: the same bits for any thread count).
Tensor conv1x1_weight_grad(const Tensor& dy, const Tensor& x) {
  const int64_t B = x.size(0), Cin = x.size(1), N = x.size(2) * x.size(3), Cout = dy.size(1), K = B * N;
  Tensor dw = at::empty({Cout, Cin}, x.options());
  if (K == 0) return dw.zero_();
  const Tensor xv = as_bcn(x), dyv = as_bcn(dy);
  const int64_t np = (Cin + shvit_gemm::kPanel - 1) / shvit_gemm::kPanel;
  const Scratch xp(kScratchA, static_cast<size_t>(np * K * shvit_gemm::kPanel));
  const float* px = xv.const_data_ptr<float>();
  const float* pdy = dyv.const_data_ptr<float>();
  const int64_t sb = xv.stride(0), sc = xv.stride(1), dsb = dyv.stride(0), dsc = dyv.stride(1);
  parallel_rows(B, 1, [&](int64_t b) {  // image b's k-range of every panel
    shvit_gemm::pack_weight_cols(px + b * sb, Cin, N, sc, xp.data() + b * N * shvit_gemm::kPanel,
                                 K * shvit_gemm::kPanel);
  });
  float* pw = dw.data_ptr<float>();
  at::parallel_for(0, Cout, 6, [&](int64_t r0, int64_t r1) {
    shvit_gemm::gemm_packed_segmented(r1 - r0, Cin, B, N, pdy + r0 * dsc, dsc, dsb, xp.data(), pw + r0 * Cin, Cin,
                                      shvit_gemm::Epilogue{});
  });
  return dw;
}

namespace {

void check_conv_args(const Tensor& x, const Tensor& w) {
  check_input(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "conv1x1_train supports float32, got ", x.scalar_type());
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat, "weight must be a float32 CPU tensor, got ",
              w.scalar_type(), " on ", w.device());
  TORCH_CHECK((w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1) || w.dim() == 2,
              "weight must be (out, in, 1, 1) or (out, in), got ", w.sizes());
  TORCH_CHECK(w.size(1) == x.size(1), "weight takes ", w.size(1), " input channels, x has ", x.size(1));
  TORCH_CHECK(shvit_gemm::available(), "conv1x1_train needs an x86-64 CPU with AVX2 and FMA");
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Conv1x1Train : public torch::autograd::Function<Conv1x1Train> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight) {
    const Tensor w = contiguous_as(weight, at::kFloat);  // rows of Cin
    ctx->save_for_backward({x, weight});
    return conv1x1_cm(x, w, w.size(0));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    NoAutocast no_autocast;
    const auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &weight = s[1];
    const Tensor dy = cast_to(grads[0], at::kFloat);
    const int64_t cout = weight.size(0), cin = weight.size(1);
    Tensor dx, dw;
    if (ctx->needs_input_grad(0)) {
      const Tensor w = contiguous_as(weight, at::kFloat);
      Tensor wt = at::empty({cin, cout}, w.options());  // W^T (Cin, Cout)
      shvit_gemm::transpose(w.const_data_ptr<float>(), cin, wt.data_ptr<float>(), cout, cout, cin);
      dx = conv1x1_cm(dy, wt, cin);
    }
    if (ctx->needs_input_grad(1)) dw = conv1x1_weight_grad(dy, x).view(weight.sizes());
    return {dx, dw};
  }
};

Tensor conv1x1_train(const Tensor& x, const Tensor& weight) {
  NoAutocast no_autocast;
  check_conv_args(x, weight);
  return Conv1x1Train::apply(x, weight);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shvit_cpp, m) { m.def("conv1x1_train(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(shvit_cpp, CompositeImplicitAutograd, m) { m.impl("conv1x1_train", &conv1x1_train); }

}  // namespace shvit_cpu
