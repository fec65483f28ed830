"""Checkpoint key layouts (the authors' and timm's) and a forgiving loader."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping

import torch
from torch import nn

__all__ = ["timm_to_official", "official_to_timm", "load_checkpoint"]

# stages.{i}.downsample.{k}: the five modules of the authors' blocks{i+1}.0 .. .2
_DOWNSAMPLE = {"0": "0.0", "1": "0.1", "2": "1", "3": "2.0", "4": "2.1"}
_DOWNSAMPLE_INV = {v: k for k, v in _DOWNSAMPLE.items()}
_TIMM_RE = re.compile(r"stages\.(\d+)\.(downsample|blocks)\.(\d+)\.(.*)")
_OFFICIAL_RE = re.compile(r"blocks(\d+)\.(\d+)\.(.*)")


def _timm_key(rest: str) -> str | None:
    m = _TIMM_RE.fullmatch(rest)
    if m is None:
        return None
    stage, kind, idx, tail = int(m[1]), m[2], int(m[3]), m[4]
    if kind == "downsample":
        if stage == 0 or str(idx) not in _DOWNSAMPLE:
            return None
        return f"blocks{stage + 1}.{_DOWNSAMPLE[str(idx)]}.{tail}"
    offset = 0 if stage == 0 else 3
    return f"blocks{stage + 1}.{idx + offset}.{tail}"


def timm_to_official(state_dict: MutableMapping[str, torch.Tensor], prefix: str = "") -> MutableMapping:
    """Rename, in place and keeping the order, timm-layout keys under ``prefix`` to the authors' layout."""
    if not any(k.startswith(prefix + "stages.") for k in state_dict):
        return state_dict
    items = list(state_dict.items())
    state_dict.clear()
    for k, v in items:
        if k.startswith(prefix + "stages."):
            new = _timm_key(k[len(prefix):])
            if new is not None:
                k = prefix + new
        state_dict[k] = v
    return state_dict


def official_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with the authors' keys renamed to timm's layout."""
    out = {}
    for k, v in state_dict.items():
        m = _OFFICIAL_RE.fullmatch(k)
        if m is not None:
            stage, idx, tail = int(m[1]) - 1, int(m[2]), m[3]
            if stage == 0:
                k = f"stages.0.blocks.{idx}.{tail}"
            elif idx >= 3:
                k = f"stages.{stage}.blocks.{idx - 3}.{tail}"
            else:
                if idx == 1:
                    pos, rest = "1", tail
                else:
                    sub, _, rest = tail.partition(".")
                    pos = f"{idx}.{sub}"
                k = f"stages.{stage}.downsample.{_DOWNSAMPLE_INV[pos]}.{rest}"
        out[k] = v
    return out


def _unwrap(obj) -> Mapping[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_ema", "state_dict_ema"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"a checkpoint must be a state dict or a dict holding one, got {type(obj).__name__}")
    return obj


def load_checkpoint(model: nn.Module, checkpoint, strict: bool = True, map_location="cpu") -> nn.Module:
    """Load released SHViT weights into ``model``.

    ``checkpoint`` is a path or an object: a state dict in the authors' or timm's
    layout, or a dict with it under ``"model"`` / ``"state_dict"``. A ``module.``
    prefix (DistributedDataParallel) is dropped, and 2-D weights whose model
    tensor is 4-D are reshaped as the authors' loader does. Raises a
    ``RuntimeError`` listing missing and unexpected keys on mismatch (strict).
    Returns the model.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location=map_location, weights_only=True)
    sd = dict(_unwrap(checkpoint))
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    timm_to_official(sd)
    own = model.state_dict()
    for k, v in sd.items():
        target = own.get(k)
        if target is not None and v.dim() == 2 and target.dim() == 4:
            sd[k] = v[:, :, None, None]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"checkpoint does not match {type(model).__name__}: "
            f"{len(missing)} missing keys {missing}, {len(unexpected)} unexpected keys {unexpected}"
        )
    model.load_state_dict(sd, strict=strict)
    return model
