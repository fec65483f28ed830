"""The whole residual SHSA block in training as one op of the cpp backend
(``shvit_cpp::shsa_block_train``, what ``Residual(SHSA(fused=True))`` runs in training):
against the reference block ``x + SHSA(x)`` (outputs, input and parameter gradients, both
BatchNorms' running statistics), against the separate fused ops it replaces (float32: the
same bits), gradcheck in float64, thread counts, fallbacks and argument checks."""
from __future__ import annotations

import copy

import pytest
import torch

import shvit
import shvit.layers
from conftest import assert_rel_close, use_backend
from test_region_train import SHAPES, _count_calls, _input, _module, _two_steps_match_reference

# every test once per packed-GEMM kernel family this CPU runs (conftest.each_gemm_isa)
pytestmark = pytest.mark.usefixtures("each_gemm_isa")


def _blocks(shape, dtype, momentum=0.1):
    """(reference block, fused block, float64 reference block) for shape, in training."""
    _, dim, pdim, qk_dim, _, _ = shape
    ref = _module(dim, pdim, qk_dim, dtype)
    ref.qkv.bn.momentum = momentum
    ref.proj[1].bn.momentum = momentum
    fused = copy.deepcopy(ref)
    fused.fused = True
    return shvit.Residual(ref), shvit.Residual(fused), shvit.Residual(copy.deepcopy(ref).double())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_block_train_matches_reference(shape, dtype, momentum, layout, monkeypatch):
    use_backend(monkeypatch, "cpp", "cpu")
    calls = _count_calls(monkeypatch, "shsa_block_train")
    ref, fused, exact = _blocks(shape, dtype, momentum)
    _two_steps_match_reference(ref, fused, exact, shape, dtype, layout, exact.m.pre_norm)
    assert len(calls) == 2, "the block op must run in training on the cpp backend"


def _step(block, x, g):
    """Output, input gradient, parameter gradients and buffers of one step of a copy of block."""
    b = copy.deepcopy(block)
    xi = x.clone().requires_grad_()
    out = b(xi)
    out.backward(g)
    return [out.detach(), xi.grad] + [p.grad for p in b.parameters()] + list(b.buffers())


class _SeparateOps(torch.nn.Module):
    """x + m(x) with PyTorch's add: the fused SHSA's separate ops."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return x + self.m(x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3]], ids=lambda s: "x".join(map(str, s)))
def test_block_train_float32_equals_separate_ops(shape, layout, monkeypatch):
    """float32: the block op gives the bits of the ops it replaces (the region op, the packed
    projection conv, the C++ BatchNorm, PyTorch's residual add and autograd's sum of the two
    gradients of x): the same operations in the same order."""
    if not torch.ops.shvit_cpp.gemm_available():
        pytest.skip("the float32 projection ops need the packed GEMM")
    use_backend(monkeypatch, "cpp", "cpu")
    calls = _count_calls(monkeypatch, "shsa_block_train")
    B, dim, _, _, H, W = shape
    _, fused, _ = _blocks(shape, torch.float32)
    x = _input(B, dim, H, W, torch.float32, layout)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    one_op = _step(fused, x, g)
    assert len(calls) == 1
    for a, b in zip(one_op, _step(_SeparateOps(fused.m), x, g)):
        assert torch.equal(a, b)
    assert len(calls) == 1


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
def test_block_train_one_and_two_threads_agree(shape, monkeypatch):
    use_backend(monkeypatch, "cpp", "cpu")
    B, dim, _, _, H, W = shape
    _, fused, _ = _blocks(shape, torch.float32)
    x = _input(B, dim, H, W, torch.float32, "contiguous")
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_step(fused, x, g))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert_rel_close(a.double(), b.double(), 1e-6, f"{shape}: 1 vs 2 threads")


def _op_args(dt, g, C=9, P=5, QK=4):
    CQ = 2 * QK + P
    return dict(
        x=torch.randn(2, C, 3, 4, dtype=dt, generator=g),
        gw=torch.rand(P, dtype=dt, generator=g) + 0.5,
        gb=torch.randn(P, dtype=dt, generator=g),
        cw=torch.randn(CQ, P, 1, 1, dtype=dt, generator=g),
        bw=torch.rand(CQ, dtype=dt, generator=g) + 0.5,
        bb=torch.randn(CQ, dtype=dt, generator=g),
        pw=torch.randn(C, C, 1, 1, dtype=dt, generator=g) / 3,
        pbw=torch.rand(C, dtype=dt, generator=g) + 0.5,
        pbb=torch.randn(C, dtype=dt, generator=g),
    )


def _call(a, P=5, QK=4, counters=(None, None)):
    CQ, C, dt = 2 * QK + P, a["x"].shape[1], a["x"].dtype
    rm, rv = torch.zeros(CQ, dtype=dt), torch.ones(CQ, dtype=dt)
    prm, prv = torch.zeros(C, dtype=dt), torch.ones(C, dtype=dt)
    return torch.ops.shvit_cpp.shsa_block_train(
        a["x"], a["gw"], a["gb"], a["cw"], a["bw"], a["bb"], rm, rv, a["pw"], a["pbw"], a["pbb"], prm, prv,
        0.1, 0.1, 1e-5, 1e-5, 1e-5, P, QK, 0.5, *counters,
    )


def test_block_train_gradcheck():
    a = _op_args(torch.float64, torch.Generator().manual_seed(4))
    names = list(a)
    for t in a.values():
        t.requires_grad_()

    def f(*ts):
        return _call(dict(zip(names, ts)))

    assert torch.autograd.gradcheck(f, tuple(a.values()))


def test_block_train_op_counts_both_batches_and_updates_running_stats():
    a = _op_args(torch.float32, torch.Generator().manual_seed(1))
    n, pn = torch.tensor(0, dtype=torch.long), torch.tensor(3, dtype=torch.long)
    with torch.no_grad():
        _call(a, counters=(n, pn))
    assert (int(n), int(pn)) == (1, 4)
    # without gradients the op still runs the forward's statistics, as the module in training does
    ref = _module(40, 9, 8, torch.float32)
    fused = copy.deepcopy(ref)
    fused.fused = True
    x = _input(3, 40, 4, 4, torch.float32, "contiguous")
    with torch.no_grad():
        assert_rel_close(shvit.Residual(fused)(x), x + ref(x), 2e-5, "output")
    for (name, b), bf in zip(ref.named_buffers(), fused.buffers()):
        assert_rel_close(bf.double(), b.double(), 2e-5, name)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(pw=torch.randn(9, 8, 1, 1, dtype=torch.float64)), "proj_weight"),
        (dict(pw=torch.randn(9, 9, 3, 3, dtype=torch.float64)), "proj_weight"),
        (dict(pbw=torch.ones(4, dtype=torch.float64)), "projection's BatchNorm"),
        (dict(cw=torch.randn(12, 5, 1, 1, dtype=torch.float64)), "conv_weight"),
        (dict(x=torch.randn(2, 9, 3, 4, dtype=torch.float16)), "float32 and float64"),
        (dict(x=torch.randn(1, 9, 1, 1, dtype=torch.float64)), "more than 1 value per channel"),
    ],
)
def test_block_train_op_rejects_bad_arguments(change, match):
    a = _op_args(torch.float64, torch.Generator().manual_seed(0))
    a.update(change)
    with pytest.raises(RuntimeError, match=match):
        _call(a)


def test_block_op_not_used_where_it_does_not_apply(monkeypatch):
    """Other backends, autocast, evaluation, a projection conv with a bias: the block runs
    x + SHSA(x) through the module, with the same results as the reference."""
    calls = _count_calls(monkeypatch, "shsa_block_train")
    ref = _module(40, 9, 8, torch.float32)
    x = _input(3, 40, 4, 4, torch.float32, "contiguous")
    fused = copy.deepcopy(ref)
    fused.fused = True
    block = shvit.Residual(fused)
    use_backend(monkeypatch, "cpp", "cpu")
    with torch.no_grad():
        assert_rel_close(copy.deepcopy(block).eval()(x), x + copy.deepcopy(ref).eval()(x), 1e-5, "eval")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        copy.deepcopy(block)(x)
    use_backend(monkeypatch, "torch", "cpu")
    assert_rel_close(copy.deepcopy(block)(x), x + copy.deepcopy(ref)(x), 1e-5, "torch backend")
    use_backend(monkeypatch, "cpp", "cpu")
    biased = copy.deepcopy(block)
    conv = biased.m.proj[1].c
    conv.bias = torch.nn.Parameter(torch.full((40,), 0.25))
    ref_biased = copy.deepcopy(ref)
    ref_biased.proj[1].c.bias = torch.nn.Parameter(torch.full((40,), 0.25))
    assert_rel_close(biased(x), x + ref_biased(x), 1e-5, "projection with a bias")
    assert calls == []
    block(x)
    assert len(calls) == 1
