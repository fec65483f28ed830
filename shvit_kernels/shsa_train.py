"""The SHSA mixer region in training as one CPU op: GroupNorm(x1) -> qkv 1x1 conv ->
BatchNorm with batch statistics (running statistics updated) -> attention + concat + ReLU.

``shvit.SHSA(fused=True)`` uses it in training on the ``cpp`` backend for float32/float64
inputs outside ``torch.compile`` and CPU autocast; everywhere else the region runs as the
``group_norm_partial`` op, PyTorch's ``Conv2d_BN`` and the ``shsa_attention`` op.

The projection's 1x1 conv (before its BatchNorm) runs as ``conv1x1_train`` under the same
conditions in float32 on CPUs with AVX2+FMA: forward and both gradients on the packed GEMM,
channel-major (no layout conversion of NCHW activations); its BatchNorm in training then
runs as ``bn_train`` (C++, forward and backward).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import backend

__all__ = [
    "block_train_applies",
    "bn_train",
    "bn_train_applies",
    "conv1x1_train",
    "conv1x1_train_applies",
    "region_train_applies",
    "shsa_block_train",
    "shsa_region_train",
]


def region_train_applies(x: Tensor, bn: nn.Module) -> bool:
    """Whether the one-op training region can run ``x`` with the qkv BatchNorm ``bn``."""
    return bn_train_applies(x, bn)


def bn_train_applies(x: Tensor, bn: nn.Module) -> bool:
    """Whether the C++ training BatchNorm (``bn_train``) can run ``bn`` on ``x``."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.numel() > 0
        and x.shape[0] * x.shape[2] * x.shape[3] > 1
        and type(bn) is nn.BatchNorm2d
        and bn.training
        and bn.affine
        and bn.track_running_stats
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
        and backend.select(x) == "cpp"
    )


def _momentum(bn: nn.BatchNorm2d) -> tuple[float, Tensor | None]:
    """The running-average factor as ``nn.BatchNorm2d`` computes it, and the batch counter
    for the op to increment (``None`` when it was counted here: a cumulative average, whose
    factor depends on the new count, or no counter)."""
    counter = bn.num_batches_tracked
    if bn.momentum is not None:
        return float(bn.momentum), counter
    if counter is None:
        return 1.0, None
    counter.add_(1)
    return 1.0 / float(counter), None


def bn_train(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """``bn(x)`` in training mode (batch statistics; running statistics and
    ``num_batches_tracked`` updated as ``nn.BatchNorm2d`` does), in C++ with autograd. NCHW out."""
    momentum, counter = _momentum(bn)
    return torch.ops.shvit_cpp.bn_train(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, float(bn.eps), counter
    )


def shsa_region_train(
    x: Tensor,
    gn_weight: Tensor,
    gn_bias: Tensor,
    gn_eps: float,
    conv_weight: Tensor,
    bn: nn.BatchNorm2d,
    pdim: int,
    qk_dim: int,
    scale: float,
) -> Tensor:
    """ReLU(concat(attention(BN(conv(GroupNorm(x[:, :pdim])))), x[:, pdim:])) with ``bn`` in
    training mode: batch statistics, and ``running_mean`` / ``running_var`` /
    ``num_batches_tracked`` updated exactly as ``nn.BatchNorm2d`` does."""
    momentum, counter = _momentum(bn)
    return torch.ops.shvit_cpp.shsa_region_train(
        x, gn_weight, gn_bias, conv_weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
        momentum, float(gn_eps), float(bn.eps), pdim, qk_dim, float(scale), counter,
    )


def conv1x1_train_applies(x: Tensor, conv: nn.Module) -> bool:
    """Whether ``conv1x1_train`` can run the bias-free 1x1 ``conv`` on ``x``."""
    from . import pointwise

    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and type(conv) is nn.Conv2d
        and conv.bias is None
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.groups == 1
        and conv.weight.dtype == torch.float32
        and conv.weight.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
        and backend.select(x) == "cpp"
        and pointwise.gemm_available()
    )


def conv1x1_train(x: Tensor, weight: Tensor) -> Tensor:
    """``conv2d(x, weight)`` for a (out, in, 1, 1) float32 weight on the packed GEMM, with
    autograd (the input and weight gradients on the same GEMM). NCHW output."""
    return torch.ops.shvit_cpp.conv1x1_train(x, weight)


def block_train_applies(x: Tensor, qkv_bn: nn.Module, proj_conv: nn.Module, proj_bn: nn.Module) -> bool:
    """Whether ``shsa_block_train`` can run the residual block on ``x`` (4-D) with these modules:
    the region op's conditions, a bias-free 1x1 ``dim -> dim`` projection conv and its
    BatchNorm in training."""
    return (
        region_train_applies(x, qkv_bn)
        and bn_train_applies(x, proj_bn)
        and type(proj_conv) is nn.Conv2d
        and proj_conv.bias is None
        and proj_conv.kernel_size == (1, 1)
        and proj_conv.stride == (1, 1)
        and proj_conv.padding == (0, 0)
        and proj_conv.dilation == (1, 1)
        and proj_conv.groups == 1
        and proj_conv.in_channels == proj_conv.out_channels == x.shape[1]
        and proj_conv.weight.device.type == "cpu"
    )


def shsa_block_train(
    x: Tensor,
    gn_weight: Tensor,
    gn_bias: Tensor,
    gn_eps: float,
    conv_weight: Tensor,
    bn: nn.BatchNorm2d,
    proj_weight: Tensor,
    proj_bn: nn.BatchNorm2d,
    pdim: int,
    qk_dim: int,
    scale: float,
) -> Tensor:
    """``x + proj_bn(conv(ReLU(concat(attention, x2)), proj_weight))``: the residual SHSA block
    in training as one op (the region as in ``shsa_region_train``; both BatchNorms with batch
    statistics, their running statistics and counters updated as ``nn.BatchNorm2d`` does). The
    residual is added where the BatchNorm writes its output and its gradient where the
    backward writes ``dx``, so the add costs no pass of its own."""
    momentum, counter = _momentum(bn)
    proj_momentum, proj_counter = _momentum(proj_bn)
    return torch.ops.shvit_cpp.shsa_block_train(
        x, gn_weight, gn_bias, conv_weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
        proj_weight, proj_bn.weight, proj_bn.bias, proj_bn.running_mean, proj_bn.running_var,
        momentum, proj_momentum, float(gn_eps), float(bn.eps), float(proj_bn.eps), pdim, qk_dim, float(scale),
        counter, proj_counter,
    )
