// The attention + concat + ReLU core shared by the training and the inference CPU ops.
#pragma once

#include "common.h"

namespace shvit_cpu {

// Queries per chunk so that a (B, chunk, N) score buffer stays within a fixed budget.
int64_t query_chunk(int64_t B, int64_t N, int64_t elem_size);

// out[:, :PD] = ReLU(v @ softmax(qT @ k)^T), out[:, PD:] = ReLU(x2); optionally the row
// log-sum-exp. qT (B, N, QK) carries the scale; k (B, QK, N); v (B, PD, N) (acc dtype,
// strides that bmm accepts); x2 (B, C2, N) with unit token stride; out (B, PD+C2, N).
void attention_forward_core(const Tensor& qT, const Tensor& k, const Tensor& v, const Tensor& x2, Tensor& out,
                            Tensor* lse);

}  // namespace shvit_cpu
