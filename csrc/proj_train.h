// SHSA's projection in training as functions (conv1x1_train.cpp, batch_norm_train.cpp), for
// the ops that build on them: conv1x1_train, bn_train and the whole residual block
// (shsa_block_train.cpp).
#pragma once

#include "common.h"

namespace shvit_cpu {

// out (B, cout, H, W) contiguous = a (cout, Cin; rows contiguous) @ x per image; float32 x with
// unit token stride, on the packed GEMM.
Tensor conv1x1_cm(const Tensor& x, const Tensor& a, int64_t cout);

// dW (Cout, Cin) = sum_b dy_b @ x_b^T, float32, the same bits for any thread count.
Tensor conv1x1_weight_grad(const Tensor& dy, const Tensor& x);

// BatchNorm with batch statistics over xv (B, C, N; unit token stride), float32 or float64:
// out3 (B, C, N) contiguous = residual + normalised xv * w + b (residual (B, C, N) with unit
// token stride, or undefined); mean, biased var and 1/std per channel written.
void bn_batch_forward(const Tensor& xv, const Tensor& w, const Tensor& b, double eps, Tensor& out3, Tensor& mean,
                      Tensor& var, Tensor& invstd, const Tensor& residual);

// Its backward: dx3 (B, C, N) contiguous, dw, db (C) from dyv, the gradient of out3.
void bn_batch_backward(const Tensor& dyv, const Tensor& xv, const Tensor& w, const Tensor& mean,
                       const Tensor& invstd, Tensor& dx3, Tensor& dw, Tensor& db);

}  // namespace shvit_cpu
