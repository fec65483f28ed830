// Shared helpers of the CPU kernels: argument checks, dtype plumbing, row loops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/irange.h>

#include <cmath>
#include <cstdint>

namespace shvit_cpu {

using at::Tensor;

// Statistics and GEMMs run in float (double for double inputs).
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The ops pick their own precisions: ATen calls inside them must not be re-cast by an
// enclosing torch.autocast region.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

inline void check_input(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, name, " must have shape (B, C, H, W), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

// (B, C, H, W) -> a (B, C, N) view whose token stride is 1 (channel slices of NCHW tensors
// stay views; anything else, channels_last included, is copied once).
inline Tensor as_bcn(const Tensor& t) {
  const int64_t B = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  Tensor u = t;
  const bool flat = (W == 1 ? u.stride(2) == 1 : (u.stride(3) == 1 && (H == 1 || u.stride(2) == W)));
  if (!flat || (C > 1 && u.stride(1) < H * W)) {
    u = t.contiguous();
  }
  return u.as_strided({B, C, H * W}, {u.stride(0), C > 1 ? u.stride(1) : H * W, 1});
}

// Splits [0, n) over threads in chunks of at least `grain`.
template <typename F>
inline void parallel_rows(int64_t n, int64_t grain, const F& f) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

}  // namespace shvit_cpu
