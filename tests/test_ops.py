"""torch.library checks of every registered op (schema, fake tensors, autograd registration)."""
from __future__ import annotations

import pytest
import torch

import shvit_kernels  # noqa: F401  (registers the ops)
from conftest import use_backend


def _samples(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 5, 7, generator=g, dtype=dtype)
    x1 = x[:, :9]
    w, b = torch.rand(9, generator=g, dtype=dtype) + 0.5, torch.randn(9, generator=g, dtype=dtype)
    qkv = torch.randn(2, 41, 5, 7, generator=g, dtype=dtype)
    x2 = x[:, 9:]
    out, lse = torch.ops.shvit.shsa_attn_fwd(qkv, x2, 16, 0.25)
    y, mean, rstd = torch.ops.shvit.gn_partial_fwd(x1, w, b, 1e-5)
    wi, bi = torch.randn(41, 9, generator=g, dtype=dtype), torch.randn(41, generator=g, dtype=dtype)
    return {
        "gn_partial_fwd": [(x1.clone().requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5)],
        "gn_partial_bwd": [(torch.randn_like(y), x1, w.detach(), mean, rstd)],
        "shsa_attn_fwd": [(qkv.requires_grad_(), x2.clone().requires_grad_(), 16, 0.25)],
        "shsa_attn_bwd": [(torch.randn_like(out), qkv.detach(), out, lse, 16, 0.25)],
        "shsa_infer": [
            (x, wi, bi, 9, 16, 1e-5),
            # with gradients: the registered autograd (recomputing backward)
            (x.clone().requires_grad_(), wi.clone().requires_grad_(), bi.clone().requires_grad_(), 9, 16, 1e-5),
        ],
    }


@pytest.mark.parametrize(
    "op", ["gn_partial_fwd", "gn_partial_bwd", "shsa_attn_fwd", "shsa_attn_bwd", "shsa_infer"]
)
@pytest.mark.parametrize("backend", ["triton", "cpp", "auto"])
def test_opcheck(op, backend, monkeypatch):
    if backend == "auto":
        monkeypatch.setenv("SHVIT_KERNELS_BACKEND", "auto")
    else:
        use_backend(monkeypatch, backend, "cpu")
    for args in _samples()[op]:
        torch.library.opcheck(getattr(torch.ops.shvit, op), args)


def test_backend_env_is_validated(monkeypatch):
    monkeypatch.setenv("SHVIT_KERNELS_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="SHVIT_KERNELS_BACKEND"):
        shvit_kernels.backend.select(torch.zeros(1))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_shsa_infer_op_gradcheck(backend, monkeypatch):
    """The inference op's registered backward (used by compiled/exported graphs)."""
    use_backend(monkeypatch, backend, "cpu")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 13, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(21, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(21, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.shvit.shsa_infer(*a, 5, 8, 1e-5), (x, w, b))
