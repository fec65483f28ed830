"""Microbenchmarks of the fused SHSA mixer against the eager (reference) modules.

Cases (SHViT-S4 shapes), each fused vs eager:
- ``op:group_norm`` / ``op:attention`` (forward+backward ``-fb``): each training op alone
  against its eager composition (GroupNorm on the slice; attention, concat and ReLU);
- ``inference``: the mixer region "GroupNorm on x1 -> qkv -> attention -> concat -> ReLU"
  with BN folded (the one-pass ``shsa_inference`` op vs the eager sequence it replaces);
- ``train-forward`` / ``train-backward`` / ``train-forward+backward``: the same region in training as
  ``SHSA(fused=True)`` runs it (cpp backend: one op for norm, qkv conv + BatchNorm with batch
  statistics, attention; other backends: fused GroupNorm, PyTorch Conv2d_BN, fused attention);
  ``train-backward`` times the backward alone, through a graph kept from one forward
  (``retain_graph=True``);
- ``module-inference`` / ``module-train-forward+backward``: the whole residual SHSA
  block ``x + SHSA(x)`` with its projection (``fused=True`` vs the reference module).
Training cases start each backward from cleared gradients (as ``optimizer.zero_grad()``
leaves them), so no case times an accumulation into a leaf's ``.grad``. Reports time,
speedup, achieved bandwidth of the inference op (bytes: read x once, write
the output once) against a measured device copy, peak memory, and the max error
against the float64 reference.

    python -m benchmarks.bench_shsa --device cuda --dtype float16 --batch 256
    python -m benchmarks.bench_shsa --device cpu --batch 16 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import pathlib

import torch

import shvit
import shvit_kernels
from benchmarks.common import (
    Progress,
    configure_allocator,
    format_table,
    machine_info,
    machine_line,
    time_cpu_interleaved,
    write_results,
)
from shvit_kernels.shsa_attention import shsa_attention_torch

# (name, dim, pdim, H, W): S4 stage 2 and 3 at 256 px, stage 2 at 1024 and 2048 px
SHAPES = [
    ("s4-stage2-256px", 336, 72, 8, 8),
    ("s4-stage3-256px", 448, 96, 4, 4),
    ("s4-stage2-448px", 336, 72, 14, 14),
    ("s4-stage2-1024px", 336, 72, 32, 32),
    ("s4-stage2-2048px", 336, 72, 64, 64),
]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def timer(device: str, min_time: float):
    """``run(eager_fn, fused_fn) -> (eager_s, fused_s)``, medians; on CPU the two alternate call by call."""
    if device == "cuda":
        import triton.testing

        def one(fn):
            ms = triton.testing.do_bench(fn, warmup=25, rep=max(100, int(min_time * 1000)), return_mode="median")
            return ms / 1e3

        return lambda *fns: tuple(one(f) for f in fns)

    def run(*fns):
        t = time_cpu_interleaved({str(i): f for i, f in enumerate(fns)}, min_time=min_time)
        return tuple(t[str(i)]["median_s"] for i in range(len(fns)))

    return run


def peak_memory(device: str, fn) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(device: str, nbytes: int, run) -> float:
    src = torch.empty(max(nbytes // 4, 1 << 24), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    (t,) = run(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / t


def make_module(dim: int, pdim: int, device: str, dtype: torch.dtype) -> shvit.SHSA:
    torch.manual_seed(0)
    m = shvit.SHSA(dim, 16, pdim)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return m.to(device=device, dtype=dtype)


def eager_region(m: shvit.SHSA, x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.split([m.pdim, m.dim - m.pdim], dim=1)
    return shsa_attention_torch(m.qkv(m.pre_norm(x1)), x2, m.qk_dim, m.scale)


def fused_train_region(m: shvit.SHSA, x: torch.Tensor) -> torch.Tensor:
    return m.fused_mixer(x)  # the fused module's path


def bench_case(name, dim, pdim, H, W, args, run) -> list[dict]:
    dev, dtype, B = args.device, DTYPES[args.dtype], args.batch
    if H * W >= 4096 and dev == "cuda":
        B = min(B, args.large_batch)
    x = torch.randn(B, dim, H, W, device=dev, dtype=dtype)
    rows = []
    base = dict(case=name, batch=B, dim=dim, pdim=pdim, tokens=H * W, dtype=args.dtype)

    # each training op alone, forward and forward+backward
    pd_w = (torch.rand(pdim, device=dev) + 0.5).to(dtype).requires_grad_()
    pd_b = torch.randn(pdim, device=dev, dtype=dtype, requires_grad=True)
    qkv = torch.randn(B, 32 + pdim, H, W, device=dev, dtype=dtype, requires_grad=True)
    xo = x.clone().requires_grad_()

    def gn_eager():
        return torch.nn.functional.group_norm(xo[:, :pdim], 1, pd_w, pd_b, 1e-5)

    def gn_fused():
        return shvit_kernels.group_norm_partial(xo[:, :pdim], pd_w, pd_b)

    def attn_eager():
        return shsa_attention_torch(qkv, xo[:, pdim:], 16, 0.25)

    def attn_fused():
        return shvit_kernels.shsa_attention(qkv, xo[:, pdim:], 16, 0.25)

    def clear_grads(*tensors):
        # as optimizer.zero_grad() (set_to_none) before each step: every backward starts from
        # no gradient, so none of the cases times an accumulation into a leaf's .grad
        for t in tensors:
            t.grad = None

    def with_backward(fn):
        def f():
            clear_grads(pd_w, pd_b, qkv, xo)
            fn().sum().backward()
        return f

    for op, fe, ff in (("group_norm", gn_eager, gn_fused), ("attention", attn_eager, attn_fused)):
        with torch.no_grad():
            t_e, t_f = run(fe, ff)
        rows.append(dict(base, mode=f"op:{op}", eager_ms=t_e * 1e3, fused_ms=t_f * 1e3, speedup=t_e / t_f))
        t_e, t_f = run(with_backward(fe), with_backward(ff))
        rows.append(dict(base, mode=f"op:{op}-fb", eager_ms=t_e * 1e3, fused_ms=t_f * 1e3, speedup=t_e / t_f))

    # inference: eager sequence (BN folded) vs the one-pass op
    ref = make_module(dim, pdim, dev, dtype).eval()
    eager_m = copy.deepcopy(ref).fuse()
    fused_m = copy.deepcopy(ref)
    fused_m.fused = True
    fused_m = fused_m.fuse()
    with torch.inference_mode():
        exact = eager_region(copy.deepcopy(ref).double(), x.double())
        f_out = shvit_kernels.shsa_inference(x, fused_m.weight, fused_m.bias, pdim, 16, 1e-5)
        e_out = eager_region(eager_m, x)
        t_e, t_f = run(
            lambda: eager_region(eager_m, x),
            lambda: shvit_kernels.shsa_inference(x, fused_m.weight, fused_m.bias, pdim, 16, 1e-5),
        )
        mem_e = peak_memory(dev, lambda: eager_region(eager_m, x))
        mem_f = peak_memory(dev, lambda: shvit_kernels.shsa_inference(x, fused_m.weight, fused_m.bias, pdim, 16, 1e-5))
    nbytes = 2 * x.numel() * x.element_size()
    rows.append(dict(base, mode="inference", eager_ms=t_e * 1e3, fused_ms=t_f * 1e3, speedup=t_e / t_f,
                     fused_GBps=nbytes / t_f / 1e9, peak_mem_eager=mem_e, peak_mem_fused=mem_f,
                     max_err_fused=(f_out.double() - exact).abs().max().item(),
                     max_err_eager=(e_out.double() - exact).abs().max().item()))

    # training: forward, backward, forward+backward of the region (qkv Conv2d_BN in train mode)
    m = make_module(dim, pdim, dev, dtype).train()
    xg = x.clone().requires_grad_()
    g = torch.randn_like(eager_region(m, xg))

    def fwd_bwd(region):
        def f():
            clear_grads(xg, *m.parameters())
            out = region(m, xg)
            out.backward(g)
        return f

    def bwd_only(region):
        # a module of its own: the other region's forwards update the running statistics in
        # place, which a kept graph may hold
        mb = copy.deepcopy(m)
        out = region(mb, xg)

        def f():
            clear_grads(xg, *mb.parameters())
            out.backward(g, retain_graph=True)
        return f

    t_ef, t_ff = run(lambda: eager_region(m, xg), lambda: fused_train_region(m, xg))
    t_eo, t_fo = run(bwd_only(eager_region), bwd_only(fused_train_region))
    t_eb, t_fb = run(fwd_bwd(eager_region), fwd_bwd(fused_train_region))
    mem_e = peak_memory(dev, fwd_bwd(eager_region))
    mem_f = peak_memory(dev, fwd_bwd(fused_train_region))
    rows.append(dict(base, mode="train-forward", eager_ms=t_ef * 1e3, fused_ms=t_ff * 1e3, speedup=t_ef / t_ff))
    rows.append(dict(base, mode="train-backward", eager_ms=t_eo * 1e3, fused_ms=t_fo * 1e3, speedup=t_eo / t_fo))
    rows.append(dict(base, mode="train-forward+backward", eager_ms=t_eb * 1e3, fused_ms=t_fb * 1e3,
                     speedup=t_eb / t_fb, peak_mem_eager=mem_e, peak_mem_fused=mem_f))

    # the whole residual block x + SHSA(x), projection included, as the fused model runs it
    eager_block = shvit.Residual(copy.deepcopy(ref)).eval().fuse()
    fused_block = copy.deepcopy(ref)
    fused_block.fused = True
    fused_block = shvit.Residual(fused_block).eval().fuse()
    with torch.inference_mode():
        t_e, t_f = run(lambda: eager_block(x), lambda: fused_block(x))
    rows.append(dict(base, mode="module-inference", eager_ms=t_e * 1e3, fused_ms=t_f * 1e3, speedup=t_e / t_f))
    fused_train = copy.deepcopy(m)
    fused_train.fused = True

    def block_step(mod):
        block = shvit.Residual(mod)  # as the model holds it: x + SHSA(x)

        def f():
            clear_grads(xg, *mod.parameters())
            block(xg).backward(g)
        return f

    t_e, t_f = run(block_step(m), block_step(fused_train))
    rows.append(dict(base, mode="module-train-forward+backward", eager_ms=t_e * 1e3, fused_ms=t_f * 1e3,
                     speedup=t_e / t_f))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--large-batch", type=int, default=16, help="batch for the 2048 px case on CUDA")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", nargs="+", default=None, help="subset of case names")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per provider and measurement (CPU)")
    p.add_argument("--allocator", default="steady", choices=["steady", "default"],
                   help="C heap for the timing: steady (freed memory kept mapped; default) or glibc's "
                        "default (see benchmarks/common.py: configure_allocator)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/shsa_<device>.json)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    args.batch = args.batch or (256 if args.device == "cuda" else 16)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    allocator = configure_allocator(args.allocator)
    info = machine_info()
    info["allocator"] = allocator
    info["backend"] = shvit_kernels.backend.select(torch.empty(0, device=args.device))
    print(machine_line(info), f"backend {info['backend']}", flush=True)
    run = timer(args.device, args.min_time)
    # CPU default: SHViT's own sizes (256/448 px); the 1024 px step takes minutes of eager
    # attention on a small CPU (add it with --cases) and 2048 px ~1 GB of eager scores
    default = [s[0] for s in SHAPES if args.device == "cuda" or s[3] * s[4] <= 196]
    shapes = [s for s in SHAPES if s[0] in (args.cases or default)]
    rows = []
    progress = Progress(len(shapes))
    for shape in shapes:
        progress.step(f"SHSA {shape[0]}: ops, region, module; eager vs fused")
        rows += bench_case(*shape, args, run)
    progress.close()
    if args.device == "cuda":
        info["copy_GBps"] = copy_bandwidth(args.device, 1 << 30, run) / 1e9
        for r in rows:
            if "fused_GBps" in r:
                r["fraction_of_copy_bw"] = r["fused_GBps"] / info["copy_GBps"]
    fmt_mem = lambda v: "" if v is None else f"{v / 2**20:.1f}"
    print()
    print(machine_line(info))
    print(format_table(
        ["case", "B", "N", "mode", "eager ms", "fused ms", "speedup", "GB/s", "mem eager MiB", "mem fused MiB", "err fused", "err eager"],
        [[r["case"], str(r["batch"]), str(r["tokens"]), r["mode"], f"{r['eager_ms']:.3f}", f"{r['fused_ms']:.3f}",
          f"{r['speedup']:.2f}x", f"{r['fused_GBps']:.0f}" if "fused_GBps" in r else "",
          fmt_mem(r.get("peak_mem_eager")), fmt_mem(r.get("peak_mem_fused")),
          f"{r['max_err_fused']:.1e}" if "max_err_fused" in r else "",
          f"{r['max_err_eager']:.1e}" if "max_err_eager" in r else ""] for r in rows],
    ))
    if args.out:
        out = pathlib.Path(args.out)
        path = write_results(out.stem, info, rows, out.parent)
    else:
        path = write_results(f"shsa_{args.device}", info, rows)
    print(f"\nwrote {path} (and .csv)")
    return rows


if __name__ == "__main__":
    main()
