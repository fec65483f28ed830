// Shared helpers of the CPU kernels: argument checks, dtype plumbing, row loops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_isa.h"

namespace shvit_cpu {

using at::Tensor;

// dst[i] = max(src[i], 0) for i < n, NaN kept (as torch.relu). Branch-free at every level: on
// x86-64 MAXPS(0, v) returns v where v is NaN (SSE, part of the baseline ISA); written as a
// comparison, the compiler kept a branch per element at the baseline level, which random
// signs mispredict half of the time.
inline void relu_copy(const float* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef SHVIT_X86
  const __m128 zero = _mm_setzero_ps();
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(dst + i, _mm_max_ps(zero, _mm_loadu_ps(src + i)));
#endif
  for (; i < n; ++i) dst[i] = src[i] < 0.f ? 0.f : src[i];
}

// dst[i] = max(src[i], 0) converted to D, NaN kept; float to float through relu_copy.
template <typename S, typename D>
inline void relu_convert(const S* src, D* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const D v = static_cast<D>(src[i]);
    dst[i] = v < D(0) ? D(0) : v;
  }
}
inline void relu_convert(const float* src, float* dst, int64_t n) { relu_copy(src, dst, n); }

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

// t in the channels_last (token-major) memory format: t itself when it already is, else a copy.
inline Tensor as_channels_last(const Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) ? t : t.contiguous(at::MemoryFormat::ChannelsLast);
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

// t itself when it already has dtype dt and is contiguous, else a contiguous copy in dt. The
// check runs without the dispatcher: at SHViT's small sizes the per-call cost of a no-op
// `.to().contiguous()` adds up across the few dozen such calls of an op.
inline Tensor contiguous_as(const Tensor& t, at::ScalarType dt) {
  if (t.scalar_type() == dt && t.is_contiguous()) return t;
  return t.to(dt).contiguous();
}

// t converted to dtype dt (t itself when it has it).
inline Tensor cast_to(const Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// running = (1 - momentum) * running + factor * momentum * value over n entries, as
// nn.BatchNorm2d updates its running statistics; written in place (the version counter
// bumped, as an in-place op would), through ATen when `running` is not a contiguous
// float/double tensor.
template <typename V>
inline void update_running_stat(Tensor& running, const V* value, int64_t n, double momentum, double factor) {
  if (running.is_contiguous() && (running.scalar_type() == at::kFloat || running.scalar_type() == at::kDouble)) {
    AT_DISPATCH_FLOATING_TYPES(running.scalar_type(), "update_running_stat", [&] {
      scalar_t* r = running.data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) {
        r[i] = static_cast<scalar_t>((1.0 - momentum) * static_cast<double>(r[i]) +
                                     momentum * factor * static_cast<double>(value[i]));
      }
    });
    if (!running.is_inference()) running.unsafeGetTensorImpl()->bump_version();
    return;
  }
  at::NoGradGuard no_grad;
  Tensor v = at::from_blob(const_cast<V*>(value), {n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<V>::value));
  running.mul_(1.0 - momentum).add_(v.to(running.scalar_type()).view(running.sizes()), momentum * factor);
}

// nn.BatchNorm2d's `num_batches_tracked += 1`, in place, when the counter is given (one C++
// increment instead of an ATen call from Python per BatchNorm).
inline void count_batch(const std::optional<Tensor>& counter) {
  if (!counter.has_value() || !counter->defined()) return;
  const Tensor& n = *counter;
  TORCH_CHECK(n.device().is_cpu() && n.scalar_type() == at::kLong && n.numel() == 1,
              "num_batches_tracked must be a one-element int64 CPU tensor, got ", n.scalar_type(), " ", n.sizes(),
              " on ", n.device());
  *n.data_ptr<int64_t>() += 1;
  if (!n.is_inference()) n.unsafeGetTensorImpl()->bump_version();
}

// Row reductions with independent accumulators: without -ffast-math the compiler keeps a
// single float sum in order (one add per 4 cycles). Rows of at least 128 values: 32 lanes
// (four vector registers of eight, or two of sixteen, so the adds pipeline); then 8 lanes for
// the rest (all of a shorter row, where merging 32 lanes costs more than it saves), then one
// by one.
template <typename T, typename A>
inline A row_sum8(const T* x, int64_t n, int64_t i, A s) {
  A lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) lane[j] += static_cast<A>(x[i + j]);
  }
  for (; i < n; ++i) s += static_cast<A>(x[i]);
  for (int j = 0; j < 8; ++j) s += lane[j];
  return s;
}

template <typename T, typename A>
inline A row_sum(const T* x, int64_t n) {
  if (n < 128) return row_sum8<T, A>(x, n, 0, A(0));
  A wide[32] = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int j = 0; j < 32; ++j) wide[j] += static_cast<A>(x[i + j]);
  }
  A s = 0;
  for (int j = 0; j < 32; ++j) s += wide[j];
  return row_sum8<T, A>(x, n, i, s);
}

template <typename T, typename A>
inline A row_sq_dev8(const T* x, int64_t n, A mu, int64_t i, A s) {
  A lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const A d = static_cast<A>(x[i + j]) - mu;
      lane[j] += d * d;
    }
  }
  for (; i < n; ++i) {
    const A d = static_cast<A>(x[i]) - mu;
    s += d * d;
  }
  for (int j = 0; j < 8; ++j) s += lane[j];
  return s;
}

// sum((x - mu)^2)
template <typename T, typename A>
inline A row_sq_dev(const T* x, int64_t n, A mu) {
  if (n < 128) return row_sq_dev8<T, A>(x, n, mu, 0, A(0));
  A wide[32] = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int j = 0; j < 32; ++j) {
      const A d = static_cast<A>(x[i + j]) - mu;
      wide[j] += d * d;
    }
  }
  A s = 0;
  for (int j = 0; j < 32; ++j) s += wide[j];
  return row_sq_dev8<T, A>(x, n, mu, i, s);
}

// Mean and biased variance of `rows` rows of `len` elements (row i at x + i * stride): two
// passes (no cancellation), per-row sums in A, across rows in double.
template <typename T, typename A>
inline std::pair<A, double> rows_moments(const T* x, int64_t rows, int64_t stride, int64_t len) {
  const double inv_cnt = 1.0 / static_cast<double>(rows * len);
  double sum = 0;
  for (int64_t i = 0; i < rows; ++i) sum += row_sum<T, A>(x + i * stride, len);
  const A mu = static_cast<A>(sum * inv_cnt);
  double sq = 0;
  for (int64_t i = 0; i < rows; ++i) sq += row_sq_dev<T, A>(x + i * stride, len, mu);
  return {mu, sq * inv_cnt};
}

// Per-channel mean and biased variance over a batch for channels [c0, c1) of x (channel c of
// image i at x + i * sb + c * sc, N contiguous values): mu[c - c0], var[c - c0]. The sums of
// rows_moments, in the same order, but walked image by image: each pass reads B contiguous
// blocks. (Channel by channel, the B rows are an image apart -- often a multiple of 4 KiB --
// and compete for the same cache sets.)
template <typename T>
inline void batch_channel_moments(const T* x, int64_t B, int64_t N, int64_t sb, int64_t sc, int64_t c0, int64_t c1,
                                  T* mu, double* var) {
  const int64_t nc = c1 - c0;
  const double inv_cnt = 1.0 / static_cast<double>(B * N);
  std::vector<double> acc(static_cast<size_t>(nc), 0.0);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t c = c0; c < c1; ++c) acc[c - c0] += row_sum<T, T>(x + i * sb + c * sc, N);
  }
  for (int64_t c = 0; c < nc; ++c) {
    mu[c] = static_cast<T>(acc[c] * inv_cnt);
    acc[c] = 0.0;
  }
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t c = c0; c < c1; ++c) acc[c - c0] += row_sq_dev<T, T>(x + i * sb + c * sc, N, mu[c - c0]);
  }
  for (int64_t c = 0; c < nc; ++c) var[c] = acc[c] * inv_cnt;
}

#ifdef SHVIT_X86
// row_dot_sum's eight lanes over the first n / 8 * 8 values in AVX2 registers; returns how many
// values it took. (GCC's own vectorisation of the two interleaved lane arrays shuffled them
// about 3x slower on rows of 64 floats.)
SHVIT_TARGET_AVX2 inline int64_t row_dot_sum_avx2(const float* g, const float* x, int64_t n, float mu, float* lg,
                                                  float* lgx) {
  __m256 vg = _mm256_setzero_ps(), vgx = _mm256_setzero_ps();
  const __m256 vm = _mm256_set1_ps(mu);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    vg = _mm256_add_ps(vg, gv);
    vgx = _mm256_add_ps(vgx, _mm256_mul_ps(gv, _mm256_sub_ps(_mm256_loadu_ps(x + i), vm)));
  }
  _mm256_storeu_ps(lg, vg);
  _mm256_storeu_ps(lgx, vgx);
  return i;
}

// The same for float inputs summed in double: eight double lanes in four registers, widened
// from one load of eight floats (GCC left this loop scalar: a conversion and two adds per value).
SHVIT_TARGET_AVX2 inline int64_t row_dot_sum_avx2(const float* g, const float* x, int64_t n, double mu, double* lg,
                                                  double* lgx) {
  __m256d g0 = _mm256_setzero_pd(), g1 = g0, d0 = g0, d1 = g0;
  const __m256d vm = _mm256_set1_pd(mu);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i), xv = _mm256_loadu_ps(x + i);
    const __m256d ga = _mm256_cvtps_pd(_mm256_castps256_ps128(gv));
    const __m256d gb = _mm256_cvtps_pd(_mm256_extractf128_ps(gv, 1));
    const __m256d xa = _mm256_cvtps_pd(_mm256_castps256_ps128(xv));
    const __m256d xb = _mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1));
    g0 = _mm256_add_pd(g0, ga);
    g1 = _mm256_add_pd(g1, gb);
    d0 = _mm256_fmadd_pd(ga, _mm256_sub_pd(xa, vm), d0);
    d1 = _mm256_fmadd_pd(gb, _mm256_sub_pd(xb, vm), d1);
  }
  _mm256_storeu_pd(lg, g0);
  _mm256_storeu_pd(lg + 4, g1);
  _mm256_storeu_pd(lgx, d0);
  _mm256_storeu_pd(lgx + 4, d1);
  return i;
}
#endif

// (sum(g * (x - mu)), sum(g))
template <typename T, typename A>
inline std::pair<A, A> row_dot_sum(const T* g, const T* x, int64_t n, A mu) {
  A lg[8] = {0, 0, 0, 0, 0, 0, 0, 0}, lgx[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
#ifdef SHVIT_X86
  if constexpr (std::is_same_v<T, float>) {
    if (shvit_isa::at_least(shvit_isa::Isa::kAvx2)) i = row_dot_sum_avx2(g, x, n, mu, lg, lgx);
  }
#endif
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const A gv = static_cast<A>(g[i + j]);
      lg[j] += gv;
      lgx[j] += gv * (static_cast<A>(x[i + j]) - mu);
    }
  }
  A sg = 0, sgx = 0;
  for (; i < n; ++i) {
    const A gv = static_cast<A>(g[i]);
    sg += gv;
    sgx += gv * (static_cast<A>(x[i]) - mu);
  }
  for (int j = 0; j < 8; ++j) {
    sg += lg[j];
    sgx += lgx[j];
  }
  return {sgx, sg};
}

// Blocked transpose with an elementwise map: dst[j * ldd + i] = f(src[i * lds + j], i, j) for
// i < rows, j < cols. 8x8 tiles go through a local buffer, so loads run along src's rows and
// stores along dst's rows (a plain double loop strides one of them by a whole row per element).
template <typename in_t, typename out_t, typename F>
inline void transpose_map(const in_t* src, int64_t lds, out_t* dst, int64_t ldd, int64_t rows, int64_t cols,
                          const F& f) {
  constexpr int64_t T = 8;
  for (int64_t i0 = 0; i0 < rows; i0 += T) {
    const int64_t ti = std::min(T, rows - i0);
    for (int64_t j0 = 0; j0 < cols; j0 += T) {
      const int64_t tj = std::min(T, cols - j0);
      if (ti == T && tj == T) {
        in_t tile[T][T];
        for (int64_t i = 0; i < T; ++i) {
          const in_t* s = src + (i0 + i) * lds + j0;
          for (int64_t j = 0; j < T; ++j) tile[j][i] = s[j];
        }
        for (int64_t j = 0; j < T; ++j) {
          out_t* d = dst + (j0 + j) * ldd + i0;
          for (int64_t i = 0; i < T; ++i) d[i] = f(tile[j][i], i0 + i, j0 + j);
        }
      } else {
        for (int64_t j = 0; j < tj; ++j) {
          for (int64_t i = 0; i < ti; ++i) {
            dst[(j0 + j) * ldd + i0 + i] = f(src[(i0 + i) * lds + j0 + j], i0 + i, j0 + j);
          }
        }
      }
    }
  }
}

// m[r, c] += bias[c] for a contiguous (rows, cols) matrix (ATen's addmm first copies the
// broadcast bias into the output, a slow strided copy at these sizes).
template <typename T>
inline void add_row_bias(T* m, const T* bias, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = m + r * cols;
      for (int64_t c = 0; c < cols; ++c) row[c] += bias[c];
    }
  });
}

// Runs body(take) once on each thread, where take() hands out the indices [0, n) one at a
// time (-1 once none is left): tiles of work claimed dynamically. at::parallel_for splits its
// range evenly up front, so every parallel region waits for the slower thread's whole half,
// and on a VM a vCPU is slowed now and then by the host. Two threads, model level, the same
// kernels with an even split up front (alternating call by call, 2-core VM): S1 at batch 16
// 1.9% faster, S3 7%, S1 at batch 1 unchanged; one thread unchanged.
template <typename F>
inline void parallel_tiles(int64_t n, const F& body) {
  std::atomic<int64_t> next{0};
  const auto take = [&]() -> int64_t {
    const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
    return t < n ? t : -1;
  };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  if (threads == 1) {
    body(take);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { body(take); });
}

// Rows [0, m) cut into `count` tiles for parallel_tiles: a multiple of the thread count, each
// at most max_rows, their bounds multiples of 6 (the GEMM's row tile) spaced as evenly as
// that allows (tiles of few rows may be empty).
struct RowTiles {
  int64_t m, count;
  RowTiles(int64_t rows, int64_t max_rows, int64_t threads) : m(rows) {
    const int64_t per = std::max<int64_t>(1, threads) * max_rows;
    count = std::max<int64_t>(1, threads) * ((m + per - 1) / per);
  }
  int64_t begin(int64_t t) const { return t >= count ? m : std::min(m, (t * m / count + 3) / 6 * 6); }
  int64_t end(int64_t t) const { return begin(t + 1); }
};

// f(i) for i in [0, n), in chunks of `grain` claimed dynamically by the threads (parallel_tiles).
template <typename F>
inline void parallel_rows(int64_t n, int64_t grain, const F& f) {
  const int64_t g = std::max<int64_t>(1, grain);
  parallel_tiles((n + g - 1) / g, [&](const auto& take) {
    for (int64_t t; (t = take()) >= 0;) {
      for (int64_t i = t * g, end = std::min(n, (t + 1) * g); i < end; ++i) f(i);
    }
  });
}

}  // namespace shvit_cpu
