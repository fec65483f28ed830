"""The fused model (fused=True) against the authors' golden outputs, per backend."""
from __future__ import annotations

import pytest
import torch

import shvit
from conftest import BACKEND_DEVICES, assert_rel_close, use_backend
from test_model import TOL, TRAIN_TOL_FP32

# every test once per instruction-set level of the C++ kernels this CPU runs (conftest.each_isa)
pytestmark = pytest.mark.usefixtures("each_isa")

# Triton computes in float32: float64 runs on cpp and torch
RUNS = [
    (b, d, dt)
    for b, d in BACKEND_DEVICES
    for dt in (torch.float32, torch.float64)
    if not (b == "triton" and dt == torch.float64)
]
IDS = [f"{b}-{d}-{'fp32' if dt == torch.float32 else 'fp64'}" for b, d, dt in RUNS]


def _fused(g: dict, dtype: torch.dtype, layout: str = "official", device: str = "cpu") -> shvit.SHViT:
    model = shvit.SHViT(**g["config"], fused=True).to(device=device, dtype=dtype)
    sd = g["state_dict_official"] if layout == "official" else shvit.official_to_timm(g["state_dict_official"])
    model.load_state_dict(sd)
    return model


def test_fused_model_has_reference_parameters():
    for variant in ("shvit_s1", "shvit_s4"):
        ref, fused = shvit.create_model(variant), shvit.create_model(variant, fused=True)
        assert [(k, v.shape) for k, v in ref.state_dict().items()] == [
            (k, v.shape) for k, v in fused.state_dict().items()
        ]
        fused.load_state_dict(ref.state_dict())
        ref.load_state_dict(fused.state_dict())


@pytest.mark.parametrize("layout", ["official", "timm"])
@pytest.mark.parametrize("backend,device,dtype", RUNS, ids=IDS)
def test_fused_golden_eval_and_grads(golden, device, backend, dtype, layout, monkeypatch):
    use_backend(monkeypatch, backend, device)
    model = _fused(golden, dtype, layout, device).eval()
    x = golden["input"].to(device=device, dtype=dtype).requires_grad_()
    logits = model(x)
    assert_rel_close(logits, golden["eval_logits"], TOL[dtype], "eval logits")
    (logits * golden["grad_weights"].to(device=device, dtype=dtype)).sum().backward()
    assert_rel_close(x.grad, golden["input_grad"], TOL[dtype], "input grad")
    params = dict(model.named_parameters())
    for name, expected in golden["param_grads"].items():
        assert_rel_close(params[name].grad, expected, TOL[dtype], f"grad of {name}")


@pytest.mark.parametrize("backend,device,dtype", RUNS, ids=IDS)
def test_fused_golden_train_logits(golden, device, backend, dtype, monkeypatch):
    use_backend(monkeypatch, backend, device)
    model = _fused(golden, dtype, device=device).train()
    logits = model(golden["input"].to(device=device, dtype=dtype))
    tol = TRAIN_TOL_FP32[golden["variant"]] if dtype == torch.float32 else TOL[dtype]
    assert_rel_close(logits, golden["train_logits"], tol, "train logits")


@pytest.mark.parametrize("backend,device,dtype", RUNS, ids=IDS)
def test_fused_golden_after_fuse(golden, device, backend, dtype, monkeypatch):
    use_backend(monkeypatch, backend, device)
    model = _fused(golden, dtype, device=device).eval().fuse()
    n_inference = sum(isinstance(m, shvit.SHSAInference) for m in model.modules())
    assert n_inference == sum(d for d, t in zip(golden["config"]["depth"], golden["config"]["types"]) if t == "s")
    with torch.no_grad():
        logits = model(golden["input"].to(device=device, dtype=dtype))
    assert_rel_close(logits, golden["eval_logits"], TOL[dtype], "eval logits after fuse()")
