// The whole residual SHSA block in training, x + SHSA(x), forward and backward in one CPU op
// (shvit_cpp::shsa_block_train, used by shvit.Residual around a fused SHSA in training):
//   z = ReLU(concat(attention, x2)) of the mixer region (shsa_region_train's steps),
//   y = W z (the projection's 1x1 conv), out = x + BatchNorm(y) with batch statistics.
// Composed of separate ops, the residual add is a pass of its own in the forward (read x and
// BN(y), write the sum) and again in the backward (autograd sums the two gradients of x).
// Here the forward adds x where the BatchNorm writes its output, and the backward seeds dx with
// the incoming gradient where the region's backward writes dx, so neither pass exists; the
// results are those of the composition (the same operations in the same order). float32 runs
// the projection on the packed GEMM; float64 (gradcheck) and CPUs without AVX2 on ATen's.
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "gemm.h"
#include "proj_train.h"
#include "region_train.h"

namespace shvit_cpu {

namespace {

bool packed_path(const Tensor& x) { return x.scalar_type() == at::kFloat && shvit_gemm::available(); }

// y = W z for a (C, C, 1, 1) weight; NCHW contiguous.
Tensor proj_conv(const Tensor& z, const Tensor& w) {
  if (packed_path(z)) return conv1x1_cm(z, w, w.size(0));
  return at::conv2d(z, w).contiguous();
}

// dz = W^T dy and dW = sum_b dy_b z_b^T.
std::pair<Tensor, Tensor> proj_conv_backward(const Tensor& dy, const Tensor& z, const Tensor& w) {
  const int64_t cout = w.size(0), cin = w.size(1);
  if (packed_path(z)) {
    Tensor wt = at::empty({cin, cout}, w.options());  // W^T (Cin, Cout)
    shvit_gemm::transpose(w.const_data_ptr<float>(), cin, wt.data_ptr<float>(), cout, cout, cin);
    return {conv1x1_cm(dy, wt, cin), conv1x1_weight_grad(dy, z).view(w.sizes())};
  }
  Tensor dz = at::conv2d(dy, w.transpose(0, 1)).contiguous();
  Tensor dw = at::mm(dy.transpose(0, 1).reshape({cout, -1}), z.transpose(0, 1).reshape({cin, -1}).t());
  return {dz, dw.view(w.sizes())};
}

struct BlockForward {
  RegionForward region;
  Tensor y, mean, invstd, out;
};

BlockForward block_forward(const Tensor& x, const Tensor& gw, const Tensor& gb, const Tensor& cw, const Tensor& bw,
                           const Tensor& bb, Tensor& rm, Tensor& rv, const Tensor& pw, const Tensor& pbw,
                           const Tensor& pbb, Tensor& prm, Tensor& prv, double momentum, double proj_momentum,
                           double gn_eps, double bn_eps, double proj_bn_eps, int64_t pdim, int64_t qk_dim,
                           double scale, bool keep) {
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), M = B * H * W;
  BlockForward f;
  f.region = region_forward(x, gw, gb, cw, bw, bb, rm, rv, momentum, gn_eps, bn_eps, pdim, qk_dim, scale, keep);
  f.y = proj_conv(f.region.out, contiguous_as(pw, dt));
  if (!keep) f.region.out = Tensor();  // z is needed no more
  const auto opt = x.options();
  f.out = at::empty({B, C, H, W}, opt.memory_format(at::MemoryFormat::Contiguous));
  f.mean = at::empty({C}, opt);
  f.invstd = at::empty({C}, opt);
  Tensor var = at::empty({C}, opt);
  Tensor out3 = f.out.view({B, C, H * W});
  bn_batch_forward(as_bcn(f.y), contiguous_as(pbw, dt), contiguous_as(pbb, dt), proj_bn_eps, out3, f.mean, var,
                   f.invstd, as_bcn(x));
  AT_DISPATCH_FLOATING_TYPES(dt, "shsa_block_running", [&] {
    // as nn.BatchNorm2d: unbiased variance in the running estimate
    update_running_stat<scalar_t>(prm, f.mean.const_data_ptr<scalar_t>(), C, proj_momentum, 1.0);
    update_running_stat<scalar_t>(prv, var.const_data_ptr<scalar_t>(), C, proj_momentum,
                                  static_cast<double>(M) / static_cast<double>(M - 1));
  });
  return f;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct ShsaBlockTrain : public torch::autograd::Function<ShsaBlockTrain> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& gw, const Tensor& gb, const Tensor& cw,
                        const Tensor& bw, const Tensor& bb, Tensor rm, Tensor rv, const Tensor& pw,
                        const Tensor& pbw, const Tensor& pbb, Tensor prm, Tensor prv, double momentum,
                        double proj_momentum, double gn_eps, double bn_eps, double proj_bn_eps, int64_t pdim,
                        int64_t qk_dim, double scale) {
    BlockForward f = block_forward(x, gw, gb, cw, bw, bb, rm, rv, pw, pbw, pbb, prm, prv, momentum, proj_momentum,
                                   gn_eps, bn_eps, proj_bn_eps, pdim, qk_dim, scale, true);
    save_region(ctx, x, gw, gb, cw, bw, f.region, {pw, pbw, f.y, f.mean, f.invstd}, pdim, qk_dim, scale);
    return f.out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    NoAutocast no_autocast;
    const auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &pw = s[11], &pbw = s[12], &y = s[13], &mean = s[14], &invstd = s[15];
    const auto dt = x.scalar_type();
    const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    const RegionForward r = region_saved(s, 5);
    const Tensor g = cast_to(grads[0], dt);
    // BatchNorm, then the projection's two GEMMs
    Tensor dy = at::empty({B, C, H, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
    Tensor dpbw = at::empty({C}, x.options()), dpbb = at::empty({C}, x.options());
    Tensor dy3 = dy.view({B, C, H * W});
    bn_batch_backward(as_bcn(g), as_bcn(y), contiguous_as(pbw, dt), mean, invstd, dy3, dpbw, dpbb);
    auto [dz, dpw] = proj_conv_backward(dy, r.out, contiguous_as(pw, dt));
    dy = Tensor();
    // the region, with the residual's gradient g summed into dx where it is written
    const auto rg = region_backward(x, s[1], s[2], s[3], s[4], r, ctx->saved_data["pdim"].toInt(),
                                    ctx->saved_data["qk_dim"].toInt(), ctx->saved_data["scale"].toDouble(), dz, g);
    variable_list out(rg.begin(), rg.end());
    out.resize(21);
    out[8] = cast_to(dpw, pw.scalar_type());
    out[9] = cast_to(dpbw, pbw.scalar_type());
    out[10] = cast_to(dpbb, pbw.scalar_type());
    return out;
  }
};

Tensor shsa_block_train(const Tensor& x, const Tensor& gn_weight, const Tensor& gn_bias, const Tensor& conv_weight,
                        const Tensor& bn_weight, const Tensor& bn_bias, Tensor& running_mean, Tensor& running_var,
                        const Tensor& proj_weight, const Tensor& proj_bn_weight, const Tensor& proj_bn_bias,
                        Tensor& proj_running_mean, Tensor& proj_running_var, double momentum, double proj_momentum,
                        double gn_eps, double bn_eps, double proj_bn_eps, int64_t pdim, int64_t qk_dim, double scale,
                        const std::optional<Tensor>& num_batches_tracked,
                        const std::optional<Tensor>& proj_num_batches_tracked) {
  NoAutocast no_autocast;
  check_region_args(x, gn_weight, gn_bias, conv_weight, bn_weight, bn_bias, running_mean, running_var, pdim, qk_dim);
  const int64_t C = x.size(1);
  TORCH_CHECK(proj_weight.device().is_cpu() && proj_weight.dim() == 4 && proj_weight.size(0) == C &&
                  proj_weight.size(1) == C && proj_weight.size(2) == 1 && proj_weight.size(3) == 1,
              "proj_weight must be a (", C, ", ", C, ", 1, 1) CPU tensor, got ", proj_weight.sizes(), " on ",
              proj_weight.device());
  for (const Tensor* t : {&proj_bn_weight, &proj_bn_bias, static_cast<const Tensor*>(&proj_running_mean),
                          static_cast<const Tensor*>(&proj_running_var)}) {
    TORCH_CHECK(t->device().is_cpu() && t->numel() == C,
                "the projection's BatchNorm parameters and buffers must be CPU tensors of ", C, " elements, got ",
                t->sizes(), " on ", t->device());
  }
  count_batch(num_batches_tracked);
  count_batch(proj_num_batches_tracked);
  bool grad = false;
  if (at::GradMode::is_enabled()) {
    for (const auto* t : {&x, &gn_weight, &gn_bias, &conv_weight, &bn_weight, &bn_bias, &proj_weight,
                          &proj_bn_weight, &proj_bn_bias}) {
      grad |= t->requires_grad();
    }
  }
  if (!grad) {
    return block_forward(x, gn_weight, gn_bias, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                         proj_weight, proj_bn_weight, proj_bn_bias, proj_running_mean, proj_running_var, momentum,
                         proj_momentum, gn_eps, bn_eps, proj_bn_eps, pdim, qk_dim, scale, false)
        .out;
  }
  return ShsaBlockTrain::apply(x, gn_weight, gn_bias, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                               proj_weight, proj_bn_weight, proj_bn_bias, proj_running_mean, proj_running_var,
                               momentum, proj_momentum, gn_eps, bn_eps, proj_bn_eps, pdim, qk_dim, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shvit_cpp, m) {
  m.def(
      "shsa_block_train(Tensor x, Tensor gn_weight, Tensor gn_bias, Tensor conv_weight, Tensor bn_weight, "
      "Tensor bn_bias, Tensor(a!) running_mean, Tensor(b!) running_var, Tensor proj_weight, "
      "Tensor proj_bn_weight, Tensor proj_bn_bias, Tensor(c!) proj_running_mean, Tensor(d!) proj_running_var, "
      "float momentum, float proj_momentum, float gn_eps, float bn_eps, float proj_bn_eps, int pdim, int qk_dim, "
      "float scale, Tensor(e!)? num_batches_tracked=None, Tensor(f!)? proj_num_batches_tracked=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(shvit_cpp, CompositeImplicitAutograd, m) { m.impl("shsa_block_train", &shsa_block_train); }

}  // namespace shvit_cpu
