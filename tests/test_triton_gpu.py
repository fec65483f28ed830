"""The Triton kernels as a GPU runs them, checked without one: the CUDA dispatch (float64
stays exact), the dot operand types, and a compile of the kernels for sm_80 and sm_90a
(``benchmarks.gpu_compile``: no spills, shared memory within the block limit, at least 2
resident CTAs per SM, pdim padding and the inference grid at batch 1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from shvit_kernels import _triton, backend
from shvit_kernels.group_norm import gn_partial_fwd_torch, gn_partial_fwd_triton
from shvit_kernels.shsa_attention import shsa_attn_bwd_torch, shsa_attn_bwd_triton, shsa_attn_fwd_torch, shsa_attn_fwd_triton
from shvit_kernels.shsa_inference import shsa_infer_torch, shsa_infer_triton

OPS = ["gn_partial_fwd", "gn_partial_bwd", "shsa_attn_fwd", "shsa_attn_bwd", "shsa_infer"]


@pytest.mark.parametrize("op", OPS)
def test_cuda_tensors_take_the_backend_rule(op):
    """No CUDA-only registration: CUDA tensors run the op's one implementation, which asks
    ``backend.pick`` (so float64 cannot reach the TF32 kernels through a side door)."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"shvit::{op}", "CompositeExplicitAutograd")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"shvit::{op}", "CUDA")


@pytest.mark.parametrize(
    "triton_fn,torch_fn",
    [(gn_partial_fwd_triton, gn_partial_fwd_torch), (shsa_attn_fwd_triton, shsa_attn_fwd_torch),
     (shsa_attn_bwd_triton, shsa_attn_bwd_torch), (shsa_infer_triton, shsa_infer_torch)],
)
def test_float64_cuda_tensor_takes_the_composition(triton_fn, torch_fn, monkeypatch):
    monkeypatch.setattr(backend, "_triton", True)  # as on a CUDA machine with Triton
    monkeypatch.delenv(backend.ENV, raising=False)
    cuda = torch.device("cuda")
    for dtype, expected in [(torch.float64, torch_fn), (torch.float32, triton_fn), (torch.float16, triton_fn),
                            (torch.bfloat16, triton_fn)]:
        t = types.SimpleNamespace(device=cuda, is_cuda=True, is_cpu=False, dtype=dtype)  # as backend.pick sees it
        assert backend.pick(t, triton_fn, torch_fn, "unused") is expected, dtype


def test_dot_operands(monkeypatch):
    tl = pytest.importorskip("triton.language")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _triton.dot_dtype(torch.float16) == tl.float16
    assert _triton.dot_dtype(torch.bfloat16) == tl.bfloat16  # native on the GPU
    assert _triton.dot_dtype(torch.float32) == tl.float32
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _triton.dot_dtype(torch.bfloat16) == tl.float32  # widened for the interpreter only
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow, expected in [(False, "ieee"), (True, "tf32")]:
            torch.backends.cuda.matmul.allow_tf32 = allow
            assert _triton.precision() == expected
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("pdim", [48, 66, 68, 72, 75, 96])
def test_pdim_tiles_within_padding_bound(pdim):
    bp = _triton.pd_block(pdim)
    assert bp >= 16 and bp & (bp - 1) == 0
    assert -(-pdim // bp) * bp <= _triton.MAX_PAD * pdim


def test_gpu_compile_subset(tmp_path):
    """Compile the representative subset for sm_80 and sm_90a in every dtype and layout; the
    check itself fails on a compile error, a spill, shared memory over the block limit, too
    few resident CTAs, too much padding or too small a grid at batch 1."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "gpu_compile"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_compile", "--subset", "--out", str(out)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env, capture_output=True, text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out.with_suffix(".json").read_text())
    rows = res["rows"]
    assert not res["failures"]
    combos = {(r["kernel"], r["arch"], r["dtype"], r["layout"]) for r in rows}
    kernels = {r["kernel"] for r in rows}
    assert {"gn_partial_fwd", "gn_partial_bwd", "shsa_attn_fwd", "shsa_attn_bwd_pre", "shsa_attn_bwd_dkdv",
            "shsa_attn_bwd_dq", "shsa_infer", "shsa_norm_proj"} <= kernels
    assert len(combos) == len(kernels) * 2 * 3 * 2  # every kernel x arch x dtype x layout
    assert all(r["error"] is None and r["regs"] > 0 for r in rows)
