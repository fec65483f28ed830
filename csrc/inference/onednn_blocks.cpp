// The bfloat16 inference blocks of a folded fused model on oneDNN (shvit_kernels/onednn.py):
// each block is one op that calls oneDNN's fused-epilogue convolution and linear ops
// (torch.ops.mkldnn, as inductor does) on channels_last bfloat16 activations, so that a model
// runs them as one Plan (plan.cpp) instead of a dozen Python-level calls per block.
//
// Weights come reordered into oneDNN's blocked layout (mkldnn::_reorder_*_weight) and biases
// in bfloat16; inputs are cast to bfloat16 channels_last (under autocast they are float32).
// Outputs are channels_last bfloat16.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common.h"

namespace shvit_cpu {

Tensor gn_rows(const Tensor& x, int64_t pdim, double eps);                                   // shsa_inference.cpp
Tensor attend_concat_relu(const Tensor& qkv, const Tensor& x, int64_t pdim, int64_t qk_dim);  // shsa_inference.cpp

namespace {

// oneDNN's ops through the dispatcher, boxed (their schemas are torch's, not ours), each
// looked up once.
enum class OneDnnOp { kLinear, kLinearBinary, kConv, kReorderConvWeight };

Tensor call_boxed(OneDnnOp which, std::vector<c10::IValue> stack) {
  static const c10::OperatorHandle ops[] = {
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", ""),
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "binary"),
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", ""),
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_reorder_convolution_weight", ""),
  };
  ops[static_cast<int>(which)].callBoxed(&stack);
  return std::move(stack[0]).toTensor();
}

c10::IValue no_scalars() { return c10::List<std::optional<c10::Scalar>>(); }

// A (rows, K) @ W^T + bias, then attr ("none" or "relu").
Tensor linear(const Tensor& a, const Tensor& w, const Tensor& b, const char* attr) {
  return call_boxed(OneDnnOp::kLinear, {a, w, b, std::string(attr), no_scalars(), std::string()});
}

// A @ W^T + bias + other.
Tensor linear_add(const Tensor& a, const Tensor& other, const Tensor& w, const Tensor& b) {
  return call_boxed(OneDnnOp::kLinearBinary, {a, other, w, b, std::string("add")});
}

Tensor cl(const Tensor& x) { return x.to(at::kBFloat16).contiguous(at::MemoryFormat::ChannelsLast); }

// A channels_last (B, C, H, W) tensor as its (B*H*W, C) token rows (a view), and back.
Tensor rows(const Tensor& x) { return x.permute({0, 2, 3, 1}).reshape({-1, x.size(1)}); }
Tensor unrows(const Tensor& y, const Tensor& like) {
  return y.view({like.size(0), like.size(2), like.size(3), y.size(1)}).permute({0, 3, 1, 2});
}

void check_x(const Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be (B, C, H, W), got ", x.sizes());
}

}  // namespace

// A convolution's bfloat16 weight in the blocked layout that oneDNN's primitive for each input
// shape expects (mkldnn::_reorder_convolution_weight given the input's sizes, as inductor does
// when it freezes a graph), made on the first call with that shape; up to kShapes shapes, the
// oldest dropped. One layout for all shapes is not enough: reordered without the sizes, S3's
// stem conv (96 -> 192 channels on 28 x 28, AVX512-BF16) took 14.3 ms at batch 1 instead of
// 0.36, its primitive not matching the layout.
struct OneDnnConvWeight : torch::CustomClassHolder {
  static constexpr size_t kShapes = 8;
  Tensor weight;  // (Cout, Cin / groups, kh, kw), bfloat16
  std::vector<int64_t> padding, stride, dilation;
  int64_t groups;
  c10::IValue padding_list, stride_list, dilation_list;  // the same as arguments of oneDNN's op
  std::mutex mutex;
  std::vector<std::pair<std::vector<int64_t>, Tensor>> packed;  // by input sizes

  OneDnnConvWeight(Tensor w, std::vector<int64_t> padding_, std::vector<int64_t> stride_,
                   std::vector<int64_t> dilation_, int64_t groups_)
      : weight(w.to(at::kBFloat16).contiguous()),
        padding(std::move(padding_)),
        stride(std::move(stride_)),
        dilation(std::move(dilation_)),
        groups(groups_),
        padding_list(padding),
        stride_list(stride),
        dilation_list(dilation) {
    TORCH_CHECK(weight.dim() == 4 && padding.size() == 2 && stride.size() == 2 && dilation.size() == 2,
                "OneDnnConvWeight: a 2-d convolution's weight, padding, stride and dilation");
  }

  Tensor for_input(at::IntArrayRef sizes) {
    std::lock_guard<std::mutex> lock(mutex);
    for (const auto& [s, t] : packed) {
      if (sizes.equals(s)) return t;
    }
    Tensor t = call_boxed(OneDnnOp::kReorderConvWeight, {weight, padding, stride, dilation, groups, sizes.vec()});
    if (packed.size() == kShapes) packed.erase(packed.begin());
    packed.emplace_back(sizes.vec(), t);
    return t;
  }
};

namespace {

// relu?(conv2d(x)), the ReLU in oneDNN's epilogue.
Tensor onednn_conv(const Tensor& x, const c10::intrusive_ptr<OneDnnConvWeight>& w, const Tensor& b, bool relu) {
  check_x(x, "onednn_conv");
  TORCH_CHECK(x.size(1) == w->weight.size(1) * w->groups, "onednn_conv: x must have ", w->weight.size(1) * w->groups,
              " channels, got ", x.size(1));
  const Tensor xc = cl(x);
  return call_boxed(OneDnnOp::kConv, {xc, w->for_input(xc.sizes()), b, w->padding_list, w->stride_list,
                                      w->dilation_list, w->groups, std::string(relu ? "relu" : "none"), no_scalars(),
                                      std::string()});
}

// relu?(conv1x1(x) + residual): a GEMM on the token rows, bias and ReLU or the residual add in
// its epilogue (a ReLU after the add runs in place afterwards).
Tensor onednn_pw(const Tensor& x, const Tensor& w, const Tensor& b, bool relu, const std::optional<Tensor>& residual) {
  check_x(x, "onednn_pw");
  const Tensor xc = cl(x);
  if (!residual.has_value()) return unrows(linear(rows(xc), w, b, relu ? "relu" : "none"), xc);
  Tensor y = linear_add(rows(xc), rows(cl(*residual)), w, b);
  if (relu) y.relu_();
  return unrows(y, xc);
}

// x + pw2(relu(pw1(x))): the ReLU and the residual add in the two GEMMs' epilogues.
Tensor onednn_ffn(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  check_x(x, "onednn_ffn");
  const Tensor xc = cl(x);
  const Tensor r = rows(xc);
  return unrows(linear_add(linear(r, w1, b1, "relu"), r, w2, b2), xc);
}

// x + proj(relu(concat(attention(qkv(gn(x1))), x2))): GroupNorm and attention + concat + ReLU
// (float32 inside, each rounded to bfloat16 once) between the qkv and projection GEMMs, the
// residual add in the projection's epilogue.
Tensor onednn_shsa(const Tensor& x, const Tensor& w_qkv, const Tensor& b_qkv, const Tensor& w_proj,
                   const Tensor& b_proj, int64_t pdim, int64_t qk_dim, double eps) {
  check_x(x, "onednn_shsa");
  const Tensor xc = cl(x);
  const Tensor qkv = linear(gn_rows(xc, pdim, eps), w_qkv, b_qkv, "none");
  return unrows(linear_add(attend_concat_relu(qkv, xc, pdim, qk_dim), rows(xc), w_proj, b_proj), xc);
}

// x * sigmoid(fc2(relu(fc1(mean_hw(x))))) (SqueezeExcite), the two 1x1 convs on the pooled
// (B, C) rows.
Tensor onednn_se(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  check_x(x, "onednn_se");
  const Tensor xc = cl(x);
  const Tensor s = linear(linear(xc.mean({2, 3}), w1, b1, "relu"), w2, b2, "none").sigmoid_();
  return xc * s.view({s.size(0), s.size(1), 1, 1});
}

// linear(mean_hw(x), w, b): global pooling and the classifier.
Tensor onednn_pool_linear(const Tensor& x, const Tensor& w, const Tensor& b) {
  check_x(x, "onednn_pool_linear");
  return linear(cl(x).mean({2, 3}), w, b, "none");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shvit_cpp, m) {
  m.class_<OneDnnConvWeight>("OneDnnConvWeight")
      .def(torch::init<Tensor, std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, int64_t>());
  m.def("onednn_conv(Tensor x, __torch__.torch.classes.shvit_cpp.OneDnnConvWeight w, Tensor b, bool relu) -> Tensor");
  m.def("onednn_pw(Tensor x, Tensor w, Tensor b, bool relu, Tensor? residual) -> Tensor");
  m.def("onednn_ffn(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor");
  m.def("onednn_shsa(Tensor x, Tensor w_qkv, Tensor b_qkv, Tensor w_proj, Tensor b_proj, int pdim, int qk_dim, "
        "float eps) -> Tensor");
  m.def("onednn_se(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor");
  m.def("onednn_pool_linear(Tensor x, Tensor w, Tensor b) -> Tensor");
}

namespace {
void register_impls(torch::Library& m) {
  m.impl("onednn_conv", &onednn_conv);
  m.impl("onednn_pw", &onednn_pw);
  m.impl("onednn_ffn", &onednn_ffn);
  m.impl("onednn_shsa", &onednn_shsa);
  m.impl("onednn_se", &onednn_se);
  m.impl("onednn_pool_linear", &onednn_pool_linear);
}
}  // namespace

// A reordered linear weight is one of oneDNN's opaque tensors, whose dispatch key (MkldnnCPU)
// then selects the kernel.
TORCH_LIBRARY_IMPL(shvit_cpp, CPU, m) { register_impls(m); }
TORCH_LIBRARY_IMPL(shvit_cpp, MkldnnCPU, m) { register_impls(m); }

}  // namespace shvit_cpu
