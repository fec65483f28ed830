"""Microbenchmarks of each fused op with pytest-benchmark: providers ``eager`` (the reference
composition), ``compile`` (``torch.compile`` of that composition) and ``fused`` (the
shvit_kernels op), modes ``forward`` / ``backward`` / ``forward+backward``, at SHViT-S4's
real shapes (stage 2 and stage 3 at 256 px; batch 16 on CPU, 256 on CUDA).

    pytest benchmarks --benchmark-only                     # time (groups: op, shape, mode)
    pytest benchmarks --benchmark-disable                  # run each once (smoke test)
    pytest benchmarks --benchmark-only -k "attention and s4-stage2"
"""
from __future__ import annotations

import copy

import pytest
import torch

import shvit_kernels
from benchmarks.bench_shsa import eager_region, fused_train_region, make_module
from shvit_kernels.shsa_attention import shsa_attention_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
BATCH = 256 if DEVICE == "cuda" else 16
SHAPES = {"s4-stage2": (336, 72, 8, 8), "s4-stage3": (448, 96, 4, 4)}
PROVIDERS = ["eager", "compile", "fused"]
MODES = ["forward", "backward", "forward+backward"]


def _gn_eager(x1, w, b):
    return torch.nn.functional.group_norm(x1, 1, w, b, 1e-5)


def _gn_fused(x1, w, b):
    return shvit_kernels.group_norm_partial(x1, w, b, 1e-5)


def _attn_eager(qkv, x2):
    return shsa_attention_torch(qkv, x2, 16, 0.25)


def _attn_fused(qkv, x2):
    return shvit_kernels.shsa_attention(qkv, x2, 16, 0.25)


_compiled: dict[str, object] = {}


def _compile(name, fn):
    if name not in _compiled:
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _case(op: str, shape: str, provider: str):
    """(forward callable, its inputs that want gradients)."""
    dim, pdim, H, W = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, dim, H, W, generator=g).to(DEVICE, DTYPE).requires_grad_()
    if op == "group_norm":
        w = (torch.rand(pdim, generator=g) + 0.5).to(DEVICE, DTYPE).requires_grad_()
        b = torch.randn(pdim, generator=g).to(DEVICE, DTYPE).requires_grad_()
        fn = {"eager": _gn_eager, "compile": _compile("gn", _gn_eager), "fused": _gn_fused}[provider]
        return (lambda: fn(x[:, :pdim], w, b)), [x, w, b]
    if op == "attention":
        qkv = torch.randn(BATCH, 32 + pdim, H, W, generator=g).to(DEVICE, DTYPE).requires_grad_()
        fn = {"eager": _attn_eager, "compile": _compile("attn", _attn_eager), "fused": _attn_fused}[provider]
        return (lambda: fn(qkv, x[:, pdim:])), [qkv, x]
    if op == "region-train":  # GroupNorm -> qkv Conv2d_BN (batch statistics) -> attention
        m = make_module(dim, pdim, DEVICE, DTYPE).train()
        fn = {"eager": eager_region, "compile": _compile("region", eager_region), "fused": fused_train_region}[provider]
        return (lambda: fn(m, x)), [x, *m.parameters()]
    raise ValueError(op)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("op", ["group_norm", "attention", "region-train"])
def test_op(benchmark, op, shape, provider, mode):
    benchmark.group = f"{op} {shape} {mode}"
    fwd, leaves = _case(op, shape, provider)
    grad = torch.randn_like(fwd())
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), batch=BATCH)

    if mode == "forward":
        def run():
            fwd()
            _sync()
        benchmark(run)
    elif mode == "forward+backward":
        def run():
            fwd().backward(grad)
            _sync()
        benchmark(run)
    else:  # backward only: the forward runs in the (untimed) setup of each round
        def setup():
            for t in leaves:
                t.grad = None
            return (fwd(),), {}

        def run(out):
            out.backward(grad)
            _sync()
        benchmark.pedantic(run, setup=setup, rounds=20, warmup_rounds=2)
    if provider != "eager":  # the timed provider computes what eager computes
        eager_fwd, _ = _case(op, shape, "eager")
        torch.testing.assert_close(fwd(), eager_fwd(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_inference_region(benchmark, shape, provider):
    """The BN-folded mixer region in eval mode (forward only): the one-pass op vs eager."""
    benchmark.group = f"inference {shape} forward"
    dim, pdim, H, W = SHAPES[shape]
    ref = make_module(dim, pdim, DEVICE, DTYPE).eval()
    folded = copy.deepcopy(ref).fuse()
    fused = copy.deepcopy(ref)
    fused.fused = True
    fused = fused.fuse()
    x = torch.randn(BATCH, dim, H, W, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    fns = {
        "eager": lambda: eager_region(folded, x),
        "compile": lambda: _compile("infer", eager_region)(folded, x),
        "fused": lambda: shvit_kernels.shsa_inference(x, fused.weight, fused.bias, pdim, 16, 1e-5),
    }

    def run():
        fns[provider]()
        _sync()

    with torch.inference_mode():
        benchmark(run)
        if provider != "eager":  # the timed provider computes what eager computes
            torch.testing.assert_close(fns[provider](), fns["eager"](), rtol=1e-3, atol=1e-3)
