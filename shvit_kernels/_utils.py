"""Validation and layout helpers shared by the ops."""
from __future__ import annotations

import weakref
from typing import Callable, Hashable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_4d(name: str, t: torch.Tensor, channels: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(t.shape)}")
    if channels is not None and t.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, got {t.shape[1]} (shape {tuple(t.shape)})")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def is_dw3x3(conv: torch.nn.Conv2d) -> bool:
    """A depthwise 3x3 conv with padding 1 and stride 1 or 2 (the ``dw_conv3x3`` kernel's)."""
    return (
        conv.groups == conv.in_channels == conv.out_channels
        and conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.stride in ((1, 1), (2, 2))
    )


def is_conv3x3(conv: torch.nn.Conv2d) -> bool:
    """A dense 3x3 conv with padding 1 and stride 1 or 2 (the taps GEMMs': ``conv3x3``,
    ``bf16_conv3x3``)."""
    return (
        conv.groups == 1
        and conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.stride in ((1, 1), (2, 2))
    )


def is_stem3x3(conv: torch.nn.Conv2d) -> bool:
    """A dense 3x3 conv with few input channels (an image) that ``stem_conv3x3`` takes from NCHW."""
    return is_conv3x3(conv) and conv.in_channels * 9 <= 64 and conv.out_channels <= 32


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def bcn_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """Strides (batch, channel, token) of a (B, C, H, W) tensor read as (B, C, N = H*W).

    Works for NCHW, channels_last and channel slices of either; ``None`` when the two
    spatial dimensions cannot be flattened into one stride.
    """
    _, _, h, w = t.shape
    sb, sc, sh, sw = t.stride()
    if w == 1:
        return sb, sc, sh
    if h == 1 or sh == w * sw:
        return sb, sc, sw
    return None


def as_bcn(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` itself with its (B, C, N) strides, or a contiguous copy when it has none."""
    s = bcn_strides(t)
    if s is None:
        t = t.contiguous()
        s = bcn_strides(t)
    return t, s


def next_pow2(n: int, minimum: int = 16) -> int:
    p = minimum
    while p < n:
        p *= 2
    return p


# (id(weight), tag) -> (weakref to weight, version, data_ptr, derived); entries go with their weight
_derived: dict[tuple[int, Hashable], tuple] = {}


def weight_cache(weight: torch.Tensor, tag: Hashable, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``make(weight)`` (a packed or converted copy), cached per ``tag`` until the weight
    changes (in place, or is replaced) or is freed."""
    key = (id(weight), tag)
    hit = _derived.get(key)
    # an inference tensor has no version counter (and cannot change outside inference mode)
    version = -1 if weight.is_inference() else weight._version
    if hit is not None and hit[0]() is weight and hit[1:3] == (version, weight.data_ptr()):
        return hit[3]
    with torch.no_grad():
        derived = make(weight.detach())
    if hit is None or hit[0]() is not weight:
        weakref.finalize(weight, _derived.pop, key, None)
    _derived[key] = (weakref.ref(weight), version, weight.data_ptr(), derived)
    return derived
