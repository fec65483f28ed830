// The attention + concat + ReLU core shared by the training and the inference CPU ops.
#pragma once

#include "common.h"

namespace shvit_cpu {

// Queries per chunk so that a (B, chunk, N) score buffer stays within a fixed budget.
int64_t query_chunk(int64_t B, int64_t N, int64_t elem_size);

// out[:, :PD] = ReLU(v @ softmax(qT @ k)^T), out[:, PD:] = ReLU(x2); optionally the row
// log-sum-exp. qT (B, N, QK) carries the scale; k (B, QK, N); v (B, PD, N) (acc dtype,
// strides that bmm accepts); x2 (B, C2, N) with unit token stride; out (B, PD+C2, N).
// With p_keep, the (B, N, N) probabilities are kept when they fit one query chunk.
void attention_forward_core(const Tensor& qT, const Tensor& k, const Tensor& v, const Tensor& x2, Tensor& out,
                            Tensor* lse, Tensor* p_keep = nullptr);

// Backward of the above: returns dq, dk, dv (B, QK|QK|PD, N) in f's dtype; writes the gradient of
// x2 into dx2 (B, C2, N, unit token stride). f is qkv as (B, CQ, N) (acc dtype, unit token
// stride, unscaled q); p_saved, when defined, is the forward's (B, N, N) probabilities.
std::tuple<Tensor, Tensor, Tensor> attention_backward_core(const Tensor& dout, const Tensor& f, const Tensor& out,
                                                           int64_t qk_dim, double scale, const Tensor& p_saved,
                                                           Tensor& dx2);

// float32 on the packed GEMM (shvit_gemm::available()), channel-major, one image per task
// (attention_cm_image): the forward above for qkv (B, CQ, N) and x2 (B, C2, N) with unit token
// strides (q unscaled), out (B, PD + C2, N) contiguous. With p_keep, the probability panels
// are kept when they fit the score budget; with lse (B, N) float32, the log-sum-exp of each
// query's scaled scores.
void attention_forward_cm(const Tensor& qkv, const Tensor& x2, int64_t qk_dim, double scale, Tensor& out,
                          Tensor* p_keep, Tensor* lse);

// Its backward: d(qkv) into dqkv (B, CQ, N) contiguous, the gradient of x2 into dx2 (B, C2, N,
// unit token stride). dout, out (B, PD + C2, N) float32 with unit token strides; probs is the
// forward's kept panels or undefined (recomputed). With dx2_add (B, C2, N, unit token stride)
// defined, dx2 receives that tensor plus the gradient (a residual branch's gradient, summed
// in the same pass).
void attention_backward_cm(const Tensor& dout, const Tensor& qkv, const Tensor& out, int64_t qk_dim, double scale,
                           const Tensor& probs, Tensor& dx2, Tensor& dqkv, const Tensor& dx2_add = Tensor());

}  // namespace shvit_cpu
