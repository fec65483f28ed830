"""Building blocks of SHViT, with the authors' module and parameter names.

Every block that holds a BatchNorm has a ``fuse()`` that returns the module to
put in its place for inference (BatchNorm folded into the preceding conv or the
following linear layer), on the same device and in the same dtype.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

import shvit_kernels
from shvit_kernels import onednn
from shvit_kernels._utils import check_4d
from shvit_kernels.plan import Step
from shvit_kernels.shsa_inference import block_step as shsa_block_step

__all__ = [
    "Conv2d_BN",
    "BN_Linear",
    "Residual",
    "FFN",
    "SqueezeExcite",
    "PatchMerging",
    "GroupNorm",
    "SHSA",
    "SHSAInference",
    "BasicBlock",
    "fuse_modules",
    "ConvAct",
    "FFNInference",
    "PatchMergingInference",
    "SqueezeExciteInference",
    "fold_fused_inference",
    "cpu_plan",
]


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) that an eval-mode BatchNorm applies."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    return scale, shift


class Conv2d_BN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (children ``c`` and ``bn``)."""

    def __init__(
        self,
        a: int,
        b: int,
        ks: int = 1,
        stride: int = 1,
        pad: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ):
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        c, bn = self.c, self.bn
        scale, shift = _bn_scale_shift(bn)
        m = nn.Conv2d(
            c.in_channels,
            c.out_channels,
            c.kernel_size,
            stride=c.stride,
            padding=c.padding,
            dilation=c.dilation,
            groups=c.groups,
            bias=True,
            device=c.weight.device,
            dtype=c.weight.dtype,
        )
        m.weight.copy_(c.weight * scale[:, None, None, None])
        m.bias.copy_(shift)
        return m


class BN_Linear(nn.Sequential):
    """BatchNorm1d followed by Linear (children ``bn`` and ``l``)."""

    def __init__(self, a: int, b: int, bias: bool = True, std: float = 0.02):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(a))
        self.add_module("l", nn.Linear(a, b, bias=bias))
        nn.init.trunc_normal_(self.l.weight, std=std)
        if bias:
            nn.init.constant_(self.l.bias, 0)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        bn, l = self.bn, self.l
        scale, shift = _bn_scale_shift(bn)
        m = nn.Linear(l.in_features, l.out_features, device=l.weight.device, dtype=l.weight.dtype)
        m.weight.copy_(l.weight * scale[None, :])
        bias = l.weight @ shift
        if l.bias is not None:
            bias = bias + l.bias
        m.bias.copy_(bias)
        return m


class Residual(nn.Module):
    """``x + m(x)``."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """A residual depthwise 3x3 Conv2d_BN becomes one depthwise conv.

        The BatchNorm is folded and the identity added at the centre tap.
        Any other residual keeps its shape and has its child fused.
        """
        if isinstance(self.m, SHSA) and self.m.fused:
            return self.m.fuse(residual=True)  # the residual add runs inside the fused block
        if isinstance(self.m, Conv2d_BN):
            m = self.m.fuse()
            if _is_identity_foldable(m):
                k = m.kernel_size
                m.weight[:, 0, k[0] // 2, k[1] // 2] += 1
                return m
            self.m = m
            return self
        self.m = fuse_modules(self.m)
        return self


def _is_identity_foldable(conv: nn.Conv2d) -> bool:
    return (
        conv.groups == conv.in_channels == conv.out_channels
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and all(k % 2 == 1 for k in conv.kernel_size)
        and conv.padding == tuple(k // 2 for k in conv.kernel_size)
    )


class FFN(nn.Module):
    """Pointwise conv, ReLU, pointwise conv (``pw1``, ``pw2``)."""

    def __init__(self, ed: int, h: int):
        super().__init__()
        self.pw1 = Conv2d_BN(ed, h)
        self.act = nn.ReLU()
        self.pw2 = Conv2d_BN(h, ed, bn_weight_init=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor``, at least ``divisor``, never bumped up."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    """timm's SE module as SHViT uses it: ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``."""

    def __init__(self, channels: int, rd_ratio: float = 0.25, rd_divisor: int = 8):
        super().__init__()
        rd = make_divisible(channels * rd_ratio, rd_divisor)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.fc2(self.act(self.bn(self.fc1(s))))
        return x * self.gate(s)


class PatchMerging(nn.Module):
    """1x1 expand (x4), ReLU, depthwise 3x3 stride 2, ReLU, SE, 1x1 project."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hid_dim = int(dim * 4)
        self.conv1 = Conv2d_BN(dim, hid_dim, 1, 1, 0)
        self.act = nn.ReLU()
        self.conv2 = Conv2d_BN(hid_dim, hid_dim, 3, 2, 1, groups=hid_dim)
        self.se = SqueezeExcite(hid_dim, 0.25)
        self.conv3 = Conv2d_BN(hid_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(self.se(x))


class GroupNorm(nn.GroupNorm):
    """GroupNorm with one group: a LayerNorm over (C, H, W) with a per-channel affine."""

    def __init__(self, num_channels: int, **kwargs):
        super().__init__(1, num_channels, **kwargs)


class SHSA(nn.Module):
    """Single-head self-attention on the first ``pdim`` channels.

    Args:
        dim: channels of the input and output.
        qk_dim: width of the query and key.
        pdim: channels that take part in the attention (the rest pass through).
        fused: run GroupNorm and attention + concat + ReLU as fused ops (``shvit_kernels``);
            same parameters and names as the reference.
    """

    def __init__(self, dim: int, qk_dim: int, pdim: int, fused: bool = False):
        super().__init__()
        if not 0 < pdim < dim:
            raise ValueError(f"SHSA needs 0 < pdim < dim, got pdim={pdim}, dim={dim}")
        self.scale = qk_dim ** -0.5
        self.qk_dim = qk_dim
        self.dim = dim
        self.pdim = pdim
        self.fused = fused
        self.pre_norm = GroupNorm(pdim)
        self.qkv = Conv2d_BN(pdim, qk_dim * 2 + pdim)
        self.proj = nn.Sequential(nn.ReLU(), Conv2d_BN(dim, dim, bn_weight_init=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.proj[1](self.fused_mixer(x))  # the fused ops applied proj's ReLU
        B, C, H, W = x.shape
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=1)
        x1 = self.pre_norm(x1)
        qkv = self.qkv(x1)
        q, k, v = qkv.split([self.qk_dim, self.qk_dim, self.pdim], dim=1)
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
        attn = (q.transpose(-2, -1) @ k) * self.scale
        attn = attn.softmax(dim=-1)
        x1 = (v @ attn.transpose(-2, -1)).reshape(B, self.pdim, H, W)
        return self.proj(torch.cat([x1, x2], dim=1))

    def fused_mixer(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(concat(attention, x2)) by the fused ops (``shvit_kernels``, whose backend
        dispatch picks the kernels): everything before the projection conv."""
        check_4d("x", x, self.dim)
        # views, no copies; one split (not two slices) so the backward writes dx in one pass
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=1)
        norm = self.pre_norm
        y = shvit_kernels.group_norm_partial(x1, norm.weight, norm.bias, norm.eps)
        qkv = self.qkv(y)  # Conv2d_BN by PyTorch: its BatchNorm needs batch statistics in training
        return shvit_kernels.shsa_attention(qkv, x2, self.qk_dim, self.scale)

    @torch.no_grad()
    def fuse(self, residual: bool = False) -> nn.Module:
        """Fold the BatchNorms; a fused SHSA becomes an ``SHSAInference`` (one-pass op),
        which with ``residual=True`` also adds its input (the enclosing ``Residual``)."""
        qkv = self.qkv.fuse() if isinstance(self.qkv, Conv2d_BN) else self.qkv
        proj = self.proj[1].fuse() if isinstance(self.proj[1], Conv2d_BN) else self.proj[1]
        if self.fused:
            return SHSAInference(self, qkv, proj, residual=residual)
        if residual:
            raise ValueError("residual=True is only for fused SHSA modules")
        self.qkv, self.proj[1] = qkv, proj
        return self


class SHSAInference(nn.Module):
    """A BN-folded fused SHSA: one ``shsa_inference`` op, then the projection conv
    (with ``residual=True``: the whole block ``x + SHSA(x)``, one op on the cpp backend).

    The GroupNorm affine, the qkv BatchNorm and the attention scale are folded into
    ``weight`` (2*qk_dim + pdim, pdim) and ``bias``.
    """

    def __init__(self, shsa: SHSA, qkv: nn.Conv2d, proj: nn.Conv2d, residual: bool = False):
        super().__init__()
        self.dim, self.qk_dim, self.pdim = shsa.dim, shsa.qk_dim, shsa.pdim
        self.residual = residual
        self.eps = shsa.pre_norm.eps
        w, b = shvit_kernels.fold_shsa_weights(
            shsa.pre_norm.weight, shsa.pre_norm.bias, qkv.weight, qkv.bias, shsa.qk_dim, shsa.scale
        )
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(b)
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_4d("x", x, self.dim)
        if self.residual:
            return shvit_kernels.shsa_block_inference(
                x, self.weight, self.bias, self.proj.weight, self.proj.bias, self.pdim, self.qk_dim, self.eps
            )
        out = shvit_kernels.shsa_inference(x, self.weight, self.bias, self.pdim, self.qk_dim, self.eps)
        return self.proj(out)

    def cpu_step(self, nchw_input: bool = False, bf16: bool = False) -> Step | None:
        """The residual block as one C++ op (see ``cpu_plan``); ``None`` without ``residual``."""
        if not self.residual or not shvit_kernels.pointwise.gemm_available():
            return None
        if bf16:
            return onednn.shsa_step(self.weight, self.bias, self.proj.weight, self.proj.bias, self.pdim, self.qk_dim,
                                    self.eps)
        return shsa_block_step(self.weight, self.bias, self.proj.weight, self.proj.bias, self.pdim, self.qk_dim, self.eps)


class BasicBlock(nn.Module):
    """Residual depthwise 3x3, residual SHSA (type ``"s"``) or nothing (``"i"``), residual FFN."""

    def __init__(self, dim: int, qk_dim: int, pdim: int, type: str = "s", fused: bool = False):
        super().__init__()
        if type not in ("s", "i"):
            raise ValueError(f"block type must be 's' or 'i', got {type!r}")
        self.conv = Residual(Conv2d_BN(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=0))
        self.mixer = Residual(SHSA(dim, qk_dim, pdim, fused=fused)) if type == "s" else nn.Identity()
        self.ffn = Residual(FFN(dim, int(dim * 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.mixer(self.conv(x)))


@torch.no_grad()
def fuse_modules(module: nn.Module) -> nn.Module:
    """Fold BatchNorms for inference: a module with ``fuse()`` is replaced by what it
    returns (it fuses its own children); any other module has its children fused."""
    if callable(getattr(module, "fuse", None)):
        return module.fuse()
    for name, child in module.named_children():
        new = fuse_modules(child)
        if new is not child:
            setattr(module, name, new)
    return module


class ConvAct(nn.Module):
    """A BN-folded Conv2d with an optional ReLU, one fused op on CPU (``shvit_kernels.conv_act``)."""

    def __init__(self, conv: nn.Conv2d, relu: bool = False):
        super().__init__()
        self.conv = conv
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shvit_kernels.conv_act(x, self.conv, self.relu)

    def cpu_step(self, nchw_input: bool = False, bf16: bool = False) -> Step | None:
        if bf16:
            return onednn.conv_step(self.conv, self.relu, nchw_input)
        return shvit_kernels.pointwise.conv_step(self.conv, self.relu, nchw_input)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class FFNInference(nn.Module):
    """A BN-folded residual FFN, ``x + pw2(relu(pw1(x)))``: one op on CPU (``shvit_kernels.ffn_block``)."""

    def __init__(self, pw1: nn.Conv2d, pw2: nn.Conv2d):
        super().__init__()
        self.pw1, self.pw2 = pw1, pw2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shvit_kernels.ffn_block(x, self.pw1.weight, self.pw1.bias, self.pw2.weight, self.pw2.bias)

    def cpu_step(self, nchw_input: bool = False, bf16: bool = False) -> Step | None:
        if not shvit_kernels.pointwise.gemm_available():
            return None
        if bf16:
            return onednn.ffn_step(self.pw1.weight, self.pw1.bias, self.pw2.weight, self.pw2.bias)
        return shvit_kernels.pointwise.ffn_step(self.pw1.weight, self.pw1.bias, self.pw2.weight, self.pw2.bias)


class SqueezeExciteInference(nn.Module):
    """SqueezeExcite of a folded fused model: its two 1x1 convs on the pooled (B, C) vector
    through ``shvit_kernels.conv1x1`` (the ReLU fused), then the sigmoid gate."""

    def __init__(self, se: SqueezeExcite):
        super().__init__()
        self.fc1, self.fc2 = se.fc1, se.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = shvit_kernels.conv1x1(s, self.fc1.weight, self.fc1.bias, relu=True)
        s = shvit_kernels.conv1x1(s, self.fc2.weight, self.fc2.bias)
        return x * s.sigmoid()

    def cpu_step(self, nchw_input: bool = False, bf16: bool = False) -> Step | None:
        if not shvit_kernels.pointwise.gemm_available() or self.fc1.bias is None or self.fc2.bias is None:
            return None
        if bf16:
            return onednn.se_step(self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return shvit_kernels.pointwise.se_step(self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class PatchMergingInference(nn.Module):
    """A BN-folded PatchMerging with its ReLUs fused into the convolutions."""

    def __init__(self, pm: PatchMerging):
        super().__init__()
        self.conv1 = ConvAct(pm.conv1, relu=True)
        self.conv2 = ConvAct(pm.conv2, relu=True)
        self.se = SqueezeExciteInference(pm.se)
        self.conv3 = ConvAct(pm.conv3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(self.conv2(self.conv1(x))))


@torch.no_grad()
def fold_fused_inference(module: nn.Module) -> nn.Module:
    """After ``fuse_modules``, put the fused-epilogue modules of a ``fused=True`` model in place:
    residual FFNs -> ``FFNInference``, PatchMerging -> ``PatchMergingInference``, Conv2d (+ ReLU)
    -> ``ConvAct`` (the ReLU that followed it in a Sequential becomes an Identity). Same
    parameters and outputs; on CPU float32 inference each runs as one fused op."""
    if isinstance(module, Residual) and isinstance(module.m, FFN) and _folded(module.m.pw1, module.m.pw2):
        return FFNInference(module.m.pw1, module.m.pw2)
    if isinstance(module, PatchMerging) and _folded(module.conv1, module.conv2, module.conv3):
        return PatchMergingInference(module)
    if isinstance(module, nn.Conv2d) and module.bias is not None:
        return ConvAct(module)
    if isinstance(module, (SqueezeExcite, SHSAInference, ConvAct, FFNInference, PatchMergingInference)):
        return module
    children = list(module.named_children())
    for i, (name, child) in enumerate(children):
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        if isinstance(module, nn.Sequential) and isinstance(child, nn.Conv2d) and isinstance(nxt, nn.ReLU):
            setattr(module, name, ConvAct(child, relu=True))
            setattr(module, children[i + 1][0], nn.Identity())
            children[i + 1] = (children[i + 1][0], nn.Identity())
            continue
        new = fold_fused_inference(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _folded(*convs: nn.Module) -> bool:
    return all(isinstance(c, nn.Conv2d) and c.bias is not None for c in convs)


def cpu_plan(modules: Iterable[nn.Module], nchw_input: bool = False, bf16: bool = False) -> list[Step] | None:
    """CPU inference of a folded fused model's modules, run one after another, as a
    flat list of C++ ops (``shvit_kernels.plan.Step``, weights packed now): ``x = call(step,
    x)`` for each step gives what the modules' forwards give, without their per-call dispatch
    (the checks, the backend choice and the weight-cache lookups). Containers whose forward
    runs their children in order are flattened; ``None`` where a module has no ``cpu_step``
    or its step does not apply. ``nchw_input``: the first step receives an NCHW image (the
    stem conv reads it as is). For float32 CPU parameters, or with ``bf16`` for bfloat16 ones
    on a CPU with bfloat16 hardware (the oneDNN blocks of ``shvit_kernels.onednn``); ``SHViT``
    runs the steps as one ``shvit_kernels.plan.Plan``."""
    steps: list[Step] = []
    for m in modules:
        first = nchw_input and not steps
        if isinstance(m, nn.Identity):
            continue
        if isinstance(m, (nn.Sequential, BasicBlock, PatchMergingInference)):
            sub = cpu_plan(m.children(), first, bf16)
        elif callable(getattr(m, "cpu_step", None)):
            step = m.cpu_step(first, bf16)
            sub = None if step is None else [step]
        else:
            return None
        if sub is None:
            return None
        steps += sub
    return steps
