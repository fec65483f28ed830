"""Exporting models with the fused ops to ONNX.

Every ``shvit::`` op has its torch composition (the eager reference each backend is tested
against) registered as its decomposition in torch's decomposition table. Exporters that
lower a graph to standard operators then see GroupNorm, MatMul, Softmax, Concat and ReLU:
``torch.onnx.export(model, (x,), dynamo=True)`` translates those with its own ONNX functions
(onnxscript's torchlib), so the ONNX model runs in any runtime (ONNX Runtime, OpenVINO).
Compiled graphs (inductor) use their own decomposition table and keep the ops; graphs of
``torch.export`` keep them too unless ``run_decompositions`` is given this table.
"""
from __future__ import annotations

import torch
from torch._decomp import register_decomposition

from .group_norm import gn_partial_bwd_torch, gn_partial_fwd_torch
from .shsa_attention import shsa_attn_bwd_torch, shsa_attn_fwd_torch
from .shsa_inference import shsa_infer_torch

COMPOSITIONS = {
    torch.ops.shvit.gn_partial_fwd.default: gn_partial_fwd_torch,
    torch.ops.shvit.gn_partial_bwd.default: gn_partial_bwd_torch,
    torch.ops.shvit.shsa_attn_fwd.default: shsa_attn_fwd_torch,
    torch.ops.shvit.shsa_attn_bwd.default: shsa_attn_bwd_torch,
    torch.ops.shvit.shsa_infer.default: shsa_infer_torch,
}

for _op, _fn in COMPOSITIONS.items():
    if _op not in torch._decomp.decomposition_table:
        register_decomposition(_op)(_fn)


def decomposition_table() -> dict:
    """The ``shvit::`` ops' decompositions, for ``ExportedProgram.run_decompositions``."""
    return dict(COMPOSITIONS)
