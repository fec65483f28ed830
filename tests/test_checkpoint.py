"""Loading released checkpoints: both key layouts, wrappers, 2-D weights, clear mismatch errors."""
from __future__ import annotations

import pytest
import torch

import shvit
from conftest import assert_rel_close, load_golden


@pytest.fixture
def tiny():
    g = load_golden("tiny_b")
    return g, g["state_dict_official"]


def _logits(model, g):
    with torch.no_grad():
        return model.eval()(g["input"])


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module_prefix"])
@pytest.mark.parametrize("layout", ["official", "timm"])
def test_load_checkpoint_wrappers_and_layouts(tiny, tmp_path, wrap, layout):
    g, sd = tiny
    if layout == "timm":
        sd = shvit.official_to_timm(sd)
    obj = {
        "plain": sd,
        "model": {"model": sd, "epoch": 300},
        "state_dict": {"state_dict": sd},
        "module_prefix": {"model": {"module." + k: v for k, v in sd.items()}},
    }[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    for source in (obj, path, str(path)):
        model = shvit.load_checkpoint(shvit.SHViT(**g["config"]), source)
        assert_rel_close(_logits(model, g), g["eval_logits"], 1e-4, f"{wrap}/{layout}")


def test_timm_round_trip_is_exact(tiny):
    g, sd = tiny
    timm_sd = shvit.official_to_timm(sd)
    assert list(timm_sd) != list(sd)
    back = shvit.timm_to_official(dict(timm_sd))
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_load_state_dict_accepts_timm_layout_inside_a_parent(tiny):
    g, sd = tiny
    parent = torch.nn.Sequential(shvit.SHViT(**g["config"]))
    parent.load_state_dict({"0." + k: v for k, v in shvit.official_to_timm(sd).items()})
    assert_rel_close(_logits(parent[0], g), g["eval_logits"], 1e-4, "nested load")


def test_two_dim_weights_are_reshaped(tiny):
    g, sd = tiny
    flat = {k: (v.flatten(1) if v.dim() == 4 and v.shape[-1] == 1 else v) for k, v in sd.items()}
    n_flat = sum(1 for k in sd if sd[k].dim() == 4 and flat[k].dim() == 2)
    assert n_flat > 10
    model = shvit.load_checkpoint(shvit.SHViT(**g["config"]), {"model": flat})
    assert_rel_close(_logits(model, g), g["eval_logits"], 1e-4, "reshaped weights")


def test_mismatch_lists_missing_and_unexpected(tiny):
    g, sd = tiny
    bad = dict(sd)
    bad.pop("head.l.bias")
    bad["head.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"1 missing keys \['head.l.bias'\], 1 unexpected keys \['head.extra'\]"):
        shvit.load_checkpoint(shvit.SHViT(**g["config"]), bad)
    # non-strict loads what matches
    model = shvit.load_checkpoint(shvit.SHViT(**g["config"]), bad, strict=False)
    assert torch.equal(model.head.l.weight, sd["head.l.weight"])


def test_wrong_variant_fails_loudly(tiny):
    g, sd = tiny
    with pytest.raises(RuntimeError):
        shvit.load_checkpoint(shvit.shvit_s1(num_classes=7), sd)
    with pytest.raises(TypeError, match="state dict"):
        shvit.load_checkpoint(shvit.SHViT(**g["config"]), [1, 2, 3])
