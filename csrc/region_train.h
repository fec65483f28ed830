// The SHSA mixer region in training (shsa_region_train.cpp) as functions, for the ops that
// build on it: the region op itself and the whole residual block (shsa_block_train.cpp).
#pragma once

#include <torch/csrc/autograd/custom_function.h>

#include <array>
#include <vector>

#include "common.h"

namespace shvit_cpu {

struct RegionForward {
  Tensor out;     // (B, C, H, W): ReLU(concat(attention, x2))
  Tensor yT;      // (B*N, P): GroupNorm output, token-major (input of the conv); ATen path only
  Tensor zhat;    // (B, CQ, N): normalised conv output (BatchNorm before its affine)
  Tensor qkv;     // (B, CQ, N): BatchNorm output = q, k, v (unscaled)
  Tensor p;       // the attention probabilities when they fit the budget, else undefined
  Tensor stats;   // (2B + 3CQ): GroupNorm mean and 1/std per image, then BatchNorm's 1/std,
                  // batch mean and biased variance per channel
};

// The RegionForward kept by an autograd function: its six tensors saved in this order from
// s[i] on (out, yT, zhat, qkv, p, stats).
template <typename Saved>
RegionForward region_saved(const Saved& s, size_t i) {
  RegionForward f;
  f.out = s[i];
  f.yT = s[i + 1];
  f.zhat = s[i + 2];
  f.qkv = s[i + 3];
  f.p = s[i + 4];
  f.stats = s[i + 5];
  return f;
}

// Saves x, gw, gb, cw, bw, f's six tensors (region_saved(s, 5) reads them back) and then
// extra, with pdim, qk_dim and scale as saved data.
inline void save_region(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& gw, const Tensor& gb,
                        const Tensor& cw, const Tensor& bw, const RegionForward& f, const std::vector<Tensor>& extra,
                        int64_t pdim, int64_t qk_dim, double scale) {
  std::vector<Tensor> s{x, gw, gb, cw, bw, f.out, f.yT, f.zhat, f.qkv, f.p, f.stats};
  s.insert(s.end(), extra.begin(), extra.end());
  ctx->save_for_backward(s);
  ctx->saved_data["pdim"] = pdim;
  ctx->saved_data["qk_dim"] = qk_dim;
  ctx->saved_data["scale"] = scale;
}

// Shapes, dtypes and devices of the region's arguments (float32 or float64 x).
void check_region_args(const Tensor& x, const Tensor& gw, const Tensor& gb, const Tensor& cw, const Tensor& bw,
                       const Tensor& bb, const Tensor& rm, const Tensor& rv, int64_t pdim, int64_t qk_dim);

// GroupNorm(x1) -> qkv conv -> BatchNorm (batch statistics; rm, rv updated) -> attention +
// concat + ReLU; with keep_p, what the backward needs is kept in the result.
RegionForward region_forward(const Tensor& x, const Tensor& gw, const Tensor& gb, const Tensor& cw,
                             const Tensor& bw, const Tensor& bb, Tensor& rm, Tensor& rv, double momentum,
                             double gn_eps, double bn_eps, int64_t pdim, int64_t qk_dim, double scale,
                             bool keep_p);

// The gradients of x, gn_weight, gn_bias, conv_weight, bn_weight and bn_bias from dout, the
// gradient of f.out; dx_add (B, C, H, W) or undefined is summed into dx.
std::array<Tensor, 6> region_backward(const Tensor& x, const Tensor& gw, const Tensor& gb, const Tensor& cw,
                                      const Tensor& bw, const RegionForward& f, int64_t pdim, int64_t qk_dim,
                                      double scale, const Tensor& dout, const Tensor& dx_add);

}  // namespace shvit_cpu
