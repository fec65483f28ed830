// GroupNorm (one group) on the first pdim channels, read in place: CPU kernels of
// shvit_cpp::gn_partial_fwd / gn_partial_bwd (see shvit_kernels/group_norm.py).
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace shvit_cpu {

namespace {

template <typename scalar_t, typename acc_t>
void gn_fwd_impl(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor& y, Tensor& mean,
                 Tensor& rstd) {
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  const int64_t sb = x.stride(0), sc = x.stride(1);
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  const acc_t* pw = w.const_data_ptr<acc_t>();
  const acc_t* pb = b.const_data_ptr<acc_t>();
  scalar_t* py = y.data_ptr<scalar_t>();
  acc_t* pm = mean.data_ptr<acc_t>();
  acc_t* pr = rstd.data_ptr<acc_t>();
  parallel_rows(B, 1, [&](int64_t i) {
    const scalar_t* xb = px + i * sb;
    const auto mom = rows_moments<scalar_t, acc_t>(xb, C, sc, N);
    const acc_t mu = mom.first;
    const double var = mom.second;
    const acc_t r = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
    pm[i] = mu;
    pr[i] = r;
    scalar_t* yb = py + i * C * N;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* row = xb + c * sc;
      scalar_t* out = yb + c * N;
      const acc_t a = r * pw[c];
      const acc_t o = pb[c] - mu * a;
      for (int64_t n = 0; n < N; ++n) out[n] = static_cast<scalar_t>(static_cast<acc_t>(row[n]) * a + o);
    }
  });
}

template <typename scalar_t, typename acc_t>
void gn_bwd_impl(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                 Tensor& dx, Tensor& dw_part, Tensor& db_part) {
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  const int64_t sxb = x.stride(0), sxc = x.stride(1), sdb = dy.stride(0), sdc = dy.stride(1);
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
  const acc_t* pw = w.const_data_ptr<acc_t>();
  const acc_t* pm = mean.const_data_ptr<acc_t>();
  const acc_t* pr = rstd.const_data_ptr<acc_t>();
  scalar_t* pdx = dx.data_ptr<scalar_t>();
  acc_t* pdw = dw_part.data_ptr<acc_t>();
  acc_t* pdb = db_part.data_ptr<acc_t>();
  const double inv_cnt = 1.0 / static_cast<double>(C * N);
  parallel_rows(B, 1, [&](int64_t i) {
    const scalar_t* xb = px + i * sxb;
    const scalar_t* db = pdy + i * sdb;
    const acc_t mu = pm[i], r = pr[i];
    // per channel: sum(dy * xhat) and sum(dy); sum(g) and sum(g * xhat) follow with g = dy * w
    double c1 = 0, c2 = 0;
    for (int64_t c = 0; c < C; ++c) {
      auto [sdyx, sdy] = row_dot_sum<scalar_t, acc_t>(db + c * sdc, xb + c * sxc, N, mu);
      sdyx *= r;
      pdw[i * C + c] = sdyx;
      pdb[i * C + c] = sdy;
      c1 += static_cast<double>(pw[c]) * sdy;
      c2 += static_cast<double>(pw[c]) * sdyx;
    }
    const acc_t m1 = static_cast<acc_t>(c1 * inv_cnt), m2 = static_cast<acc_t>(c2 * inv_cnt);
    scalar_t* dxb = pdx + i * C * N;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* xr = xb + c * sxc;
      const scalar_t* dr = db + c * sdc;
      scalar_t* out = dxb + c * N;
      const acc_t wc = pw[c];
      for (int64_t n = 0; n < N; ++n) {
        const acc_t xh = (static_cast<acc_t>(xr[n]) - mu) * r;
        out[n] = static_cast<scalar_t>(r * (static_cast<acc_t>(dr[n]) * wc - m1 - xh * m2));
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> gn_partial_fwd(const Tensor& x1, const Tensor& weight, const Tensor& bias,
                                                  double eps) {
  NoAutocast no_autocast;
  check_input(x1, "x1");
  const int64_t B = x1.size(0), C = x1.size(1);
  TORCH_CHECK(weight.numel() == C && bias.numel() == C, "weight and bias must have ", C, " elements, got ",
              weight.numel(), " and ", bias.numel());
  const auto acc = acc_type(x1.scalar_type());
  Tensor x = as_bcn(x1);
  Tensor w = contiguous_as(weight, acc), b = contiguous_as(bias, acc);
  Tensor y = at::empty(x1.sizes(), x1.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor mean = at::empty({B}, x1.options().dtype(acc));
  Tensor rstd = at::empty({B}, x1.options().dtype(acc));
  if (B == 0 || x.size(2) == 0) return {y, mean.zero_(), rstd.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gn_partial_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gn_fwd_impl<scalar_t, acc_t>(x, w, b, eps, y, mean, rstd);
  });
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> gn_partial_bwd(const Tensor& dy, const Tensor& x1, const Tensor& weight,
                                                  const Tensor& mean, const Tensor& rstd) {
  NoAutocast no_autocast;
  check_input(x1, "x1");
  check_input(dy, "dy");
  TORCH_CHECK(dy.sizes() == x1.sizes(), "dy must have the shape of x1 ", x1.sizes(), ", got ", dy.sizes());
  const int64_t B = x1.size(0), C = x1.size(1);
  const auto acc = acc_type(x1.scalar_type());
  Tensor x = as_bcn(x1);
  Tensor g = as_bcn(cast_to(dy, x1.scalar_type()));
  Tensor w = contiguous_as(weight, acc);
  Tensor m = contiguous_as(mean, acc), r = contiguous_as(rstd, acc);
  Tensor dx = at::empty(x1.sizes(), x1.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dw_part = at::empty({B, C}, x1.options().dtype(acc));
  Tensor db_part = at::empty({B, C}, x1.options().dtype(acc));
  if (x.size(2) == 0) {
    dw_part.zero_();
    db_part.zero_();
  } else if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gn_partial_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      gn_bwd_impl<scalar_t, acc_t>(g, x, w, m, r, dx, dw_part, db_part);
    });
  }
  // per-image partials summed over the images in order: deterministic for any thread count
  Tensor dw = at::zeros({C}, dw_part.options()), db = at::zeros({C}, db_part.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "gn_partial_bwd_sum", [&] {
    const scalar_t* pw = dw_part.const_data_ptr<scalar_t>();
    const scalar_t* pb = db_part.const_data_ptr<scalar_t>();
    scalar_t* ow = dw.data_ptr<scalar_t>();
    scalar_t* ob = db.data_ptr<scalar_t>();
    for (int64_t i = 0; i < B; ++i) {
      for (int64_t c = 0; c < C; ++c) {
        ow[c] += pw[i * C + c];
        ob[c] += pb[i * C + c];
      }
    }
  });
  return {dx, cast_to(dw, weight.scalar_type()), cast_to(db, weight.scalar_type())};
}

TORCH_LIBRARY_IMPL(shvit_cpp, CPU, m) {
  m.impl("gn_partial_fwd", &gn_partial_fwd);
  m.impl("gn_partial_bwd", &gn_partial_bwd);
}

}  // namespace shvit_cpu
