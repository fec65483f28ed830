"""ONNX export of reference and fused models: the default (dynamo) exporter with a dynamic
batch, and the legacy exporter, checked in ONNX Runtime (and OpenVINO, float32) against the
golden logits and the float64 reference model."""
from __future__ import annotations

import copy

import pytest
import torch

import shvit
from conftest import assert_rel_close, load_golden

ort = pytest.importorskip("onnxruntime", reason="ONNX tests need onnxruntime (requirements.txt)")
onnx = pytest.importorskip("onnx", reason="ONNX tests need onnx (requirements.txt)")
pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (requirements.txt)")

KINDS = ["reference", "fused", "fused+fuse"]
TOL = 1e-5  # float32 runtimes against float64 results


def _model(kind: str, g: dict) -> shvit.SHViT:
    model = shvit.SHViT(**g["config"], fused=kind != "reference")
    model.load_state_dict(g["state_dict_official"])
    model.eval()
    return model.fuse() if kind.endswith("fuse") else model


def _batches(g: dict):
    """The golden batch (3 images) and a batch of 5 from the same images, with its float64
    reference logits."""
    x = g["input"].float()
    ref = shvit.SHViT(**g["config"]).double()
    ref.load_state_dict(g["state_dict_official"])
    x5 = torch.cat([x, x.flip(0)[:2] * 0.5])
    with torch.no_grad():
        return [(x, g["eval_logits"]), (x5, ref.eval()(x5.double()))]


def _check_graph(path) -> set[str]:
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    ops, domains = set(), set()
    for fn_graph in [m.graph] + [f for f in m.functions]:
        for node in fn_graph.node:
            ops.add(node.op_type)
            domains.add(node.domain)
    custom = {d for d in domains if d not in ("", "ai.onnx") and not d.startswith("pkg.onnxscript")}
    assert not custom, f"operators outside the standard domain: {custom}"
    return ops


def _run_ort(path, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("kind", KINDS)
def test_dynamo_export_dynamic_batch(kind, tmp_path):
    g = load_golden("tiny_b")
    model = _model(kind, g)
    x = g["input"].float()
    program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "model.onnx"
    program.save(str(path))
    ops = _check_graph(path)
    assert {"MatMul", "Concat", "Relu"} <= ops and ops & {"Softmax", "Exp"}, ops
    for xb, want in _batches(g):
        assert_rel_close(_run_ort(path, xb), want, TOL, f"{kind}: ONNX Runtime, batch {xb.shape[0]}")


def test_default_export_call(tmp_path):
    """The plain call, no options: torch.onnx.export(model, (x,), dynamo=True)."""
    g = load_golden("tiny_b")
    path = tmp_path / "model.onnx"
    torch.onnx.export(_model("fused+fuse", g), (g["input"].float(),), dynamo=True).save(str(path))
    assert_rel_close(_run_ort(path, g["input"].float()), g["eval_logits"], TOL, "default export")


@pytest.mark.parametrize("dynamo", [True, False])
def test_export_after_inference(dynamo, tmp_path):
    """A model that has run on the CPU (its C++ plan cached) exports under no_grad as a fresh
    one does: the exporters see the modules' torch composition, not the plan."""
    g = load_golden("tiny_b")
    model = _model("fused+fuse", g)
    x = g["input"].float()
    path = tmp_path / "model.onnx"
    with torch.no_grad():
        model(x)
        if dynamo:
            torch.onnx.export(model, (x,), dynamo=True).save(str(path))
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False)
    _check_graph(path)
    assert_rel_close(_run_ort(path, x), g["eval_logits"], TOL, f"export after inference (dynamo={dynamo})")


@pytest.mark.parametrize("kind", ["fused", "fused+fuse"])
def test_legacy_export(kind, tmp_path):
    g = load_golden("tiny_b")
    path = tmp_path / "model.onnx"
    torch.onnx.export(_model(kind, g), (g["input"].float(),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    for xb, want in _batches(g):
        assert_rel_close(_run_ort(path, xb), want, TOL, f"{kind}: legacy export, batch {xb.shape[0]}")


def test_openvino_float32(tmp_path):
    ov = pytest.importorskip("openvino", reason="the OpenVINO check needs openvino (requirements.txt)")
    g = load_golden("tiny_b")
    path = tmp_path / "model.onnx"
    torch.onnx.export(_model("fused+fuse", g), (g["input"].float(),), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},)).save(str(path))
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for xb, want in _batches(g):
        got = torch.from_numpy(compiled(xb.numpy())[0])
        assert_rel_close(got, want, TOL, f"OpenVINO float32, batch {xb.shape[0]}")


def test_exported_program_decomposes_to_aten():
    """A torch.export graph keeps the shvit ops; shvit_kernels.export.decomposition_table()
    lowers them to ATen (what the ONNX exporter does), with the same results."""
    from shvit_kernels import export

    g = load_golden("tiny_b")
    model = _model("fused+fuse", g)
    x = g["input"].float()
    ep = torch.export.export(copy.deepcopy(model), (x,))
    assert any("shvit" in str(n.target) for n in ep.graph.nodes)
    lowered = ep.run_decompositions(export.decomposition_table())
    assert not any("shvit" in str(n.target) for n in lowered.graph.nodes)
    assert_rel_close(lowered.module()(x), g["eval_logits"], TOL, "decomposed program")
