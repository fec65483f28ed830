// The SHSA mixer up to its projection for inference: CPU kernel of shvit_cpp::shsa_infer
// (see shvit_kernels/shsa_inference.py). One pass normalises x1 into a token-major buffer,
// one GEMM over all B*N tokens projects it to q, k, v (GroupNorm affine, BatchNorm and
// scale folded into the weight), then the shared attention core writes the output.
#include <torch/library.h>

#include "attention_core.h"
#include "common.h"

namespace shvit_cpu {

namespace {
template <typename scalar_t, typename acc_t>
void normalize_token_major(const Tensor& x, int64_t pdim, double eps, Tensor& xhT) {
  // xhT[b * N + n, c] = (x[b, c, n] - mean_b) * rstd_b over the first pdim channels
  const int64_t B = x.size(0), N = x.size(2);
  const int64_t sb = x.stride(0), sc = x.stride(1);
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  acc_t* py = xhT.data_ptr<acc_t>();
  const double inv_cnt = 1.0 / static_cast<double>(pdim * N);
  parallel_rows(B, 1, [&](int64_t b) {
    const scalar_t* xb = px + b * sb;
    double sum = 0;
    for (int64_t c = 0; c < pdim; ++c) sum += row_sum<scalar_t, acc_t>(xb + c * sc, N);
    const acc_t mu = static_cast<acc_t>(sum * inv_cnt);
    double sq = 0;
    for (int64_t c = 0; c < pdim; ++c) sq += row_sq_dev<scalar_t, acc_t>(xb + c * sc, N, mu);
    const acc_t r = static_cast<acc_t>(1.0 / std::sqrt(sq * inv_cnt + eps));
    acc_t* yb = py + b * N * pdim;
    for (int64_t c = 0; c < pdim; ++c) {
      for (int64_t n = 0; n < N; ++n) yb[n * pdim + c] = (static_cast<acc_t>(xb[c * sc + n]) - mu) * r;
    }
  });
}
}  // namespace

Tensor shsa_infer(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t pdim, int64_t qk_dim,
                  double eps) {
  NoAutocast no_autocast;
  check_input(x, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), N = H * W;
  const int64_t CQ = 2 * qk_dim + pdim;
  TORCH_CHECK(pdim > 0 && pdim < C, "pdim must be in 1..", C - 1, ", got ", pdim);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == CQ && weight.size(1) == pdim, "weight must be (", CQ, ", ",
              pdim, "), got ", weight.sizes());
  TORCH_CHECK(bias.numel() == CQ, "bias must have ", CQ, " elements, got ", bias.numel());
  Tensor out = at::empty({B, C, H, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || N == 0) return out;
  const auto acc = acc_type(x.scalar_type());
  Tensor xv = as_bcn(x);
  Tensor xhT = at::empty({B * N, pdim}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "shsa_infer_norm", [&] {
    normalize_token_major<scalar_t, at::opmath_type<scalar_t>>(xv, pdim, eps, xhT);
  });
  // one GEMM for every token of the batch: (B*N, pdim) @ (pdim, CQ) + bias
  Tensor qkvT = at::addmm(bias.to(acc), xhT, weight.to(acc).t()).view({B, N, CQ});
  Tensor qT = qkvT.narrow(2, 0, qk_dim);                        // (B, N, QK), scale folded in
  Tensor k = qkvT.narrow(2, qk_dim, qk_dim).transpose(1, 2);    // (B, QK, N)
  Tensor v = qkvT.narrow(2, 2 * qk_dim, pdim).transpose(1, 2);  // (B, PD, N)
  Tensor out3 = out.view({B, C, N});
  attention_forward_core(qT, k, v, xv.narrow(1, pdim, C - pdim), out3, nullptr);
  return out;
}

TORCH_LIBRARY_IMPL(shvit_cpp, CPU, m) {
  m.impl("shsa_infer", &shsa_infer);
}

}  // namespace shvit_cpu
