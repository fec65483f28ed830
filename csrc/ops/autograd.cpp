// Autograd of the CPU ops in C++: shvit_cpp::group_norm_partial and
// shvit_cpp::shsa_attention run forward and backward without entering Python, so that
// small shapes (SHViT at 224 px: 49 and 16 tokens) do not pay Python dispatch per op.
// The Python `shvit::` ops (with their Python autograd) remain the entry point for
// torch.compile / export and for the other backends.
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <initializer_list>

#include "common.h"

namespace shvit_cpu {

std::tuple<Tensor, Tensor, Tensor> gn_partial_fwd(const Tensor& x1, const Tensor& weight, const Tensor& bias,
                                                  double eps);
std::tuple<Tensor, Tensor, Tensor> gn_partial_bwd(const Tensor& dy, const Tensor& x1, const Tensor& weight,
                                                  const Tensor& mean, const Tensor& rstd);
std::tuple<Tensor, Tensor> shsa_attn_fwd(const Tensor& qkv, const Tensor& x2, int64_t qk_dim, double scale);
std::tuple<Tensor, Tensor> shsa_attn_bwd(const Tensor& dout, const Tensor& qkv, const Tensor& out,
                                         const Tensor& lse, int64_t qk_dim, double scale);
Tensor shsa_attn_fwd_nolse(const Tensor& qkv, const Tensor& x2, int64_t qk_dim, double scale);

namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct GroupNormPartial : public torch::autograd::Function<GroupNormPartial> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x1, const Tensor& weight, const Tensor& bias,
                        double eps) {
    auto [y, mean, rstd] = gn_partial_fwd(x1, weight, bias, eps);
    ctx->save_for_backward({x1, weight, mean, rstd});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dx, dw, db] = gn_partial_bwd(grads[0], saved[0], saved[1], saved[2], saved[3]);
    return {dx, dw, db, Tensor()};
  }
};

struct ShsaAttention : public torch::autograd::Function<ShsaAttention> {
  static Tensor forward(AutogradContext* ctx, const Tensor& qkv, const Tensor& x2, int64_t qk_dim, double scale) {
    auto [out, lse] = shsa_attn_fwd(qkv, x2, qk_dim, scale);
    ctx->save_for_backward({qkv, out, lse});
    ctx->saved_data["qk_dim"] = qk_dim;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["x2_dtype"] = static_cast<int64_t>(x2.scalar_type());
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dqkv, dx2] = shsa_attn_bwd(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["qk_dim"].toInt(),
                                     ctx->saved_data["scale"].toDouble());
    const auto x2_dtype = static_cast<at::ScalarType>(ctx->saved_data["x2_dtype"].toInt());
    return {dqkv, dx2.scalar_type() == x2_dtype ? dx2 : dx2.to(x2_dtype), Tensor(), Tensor()};
  }
};

bool needs_grad(std::initializer_list<Tensor> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : ts) {
    if (t.requires_grad()) return true;
  }
  return false;
}

// Without a gradient to compute, skip the autograd node (and the attention's log-sum-exp).
Tensor group_norm_partial(const Tensor& x1, const Tensor& weight, const Tensor& bias, double eps) {
  if (!needs_grad({x1, weight, bias})) return std::get<0>(gn_partial_fwd(x1, weight, bias, eps));
  return GroupNormPartial::apply(x1, weight, bias, eps);
}

Tensor shsa_attention(const Tensor& qkv, const Tensor& x2, int64_t qk_dim, double scale) {
  if (!needs_grad({qkv, x2})) return shsa_attn_fwd_nolse(qkv, x2, qk_dim, scale);
  return ShsaAttention::apply(qkv, x2, qk_dim, scale);
}
}  // namespace

TORCH_LIBRARY_IMPL(shvit_cpp, CompositeImplicitAutograd, m) {
  m.impl("group_norm_partial", &group_norm_partial);
  m.impl("shsa_attention", &shsa_attention);
}

}  // namespace shvit_cpu
