"""Model throughput by the paper's protocols, and a training-step benchmark.

Inference (eval mode), providers, all from the same weights:
- ``eager``: the reference model as loaded;
- ``eager+fuse``: BatchNorm folded with ``model.fuse()`` (the paper's setting);
- ``compile``: ``torch.compile`` of the ``eager+fuse`` model (its compile time is reported:
  the first call, with a fresh inductor cache unless ``TORCHINDUCTOR_CACHE_DIR`` is set);
- ``fused+fuse``: ``fused=True`` (the SHSA mixers as fused ops), then ``fuse()``;
- ``onnxruntime``, ``openvino``: the ``eager+fuse`` model exported to ONNX, in ONNX Runtime and
  OpenVINO, float32 (``benchmarks/runtimes.py``; when installed: ``pip install ".[onnx]"``);
- bfloat16, on CPU: ``eager-bf16`` (``eager+fuse`` in bfloat16, channels_last),
  ``compile-bf16`` (``torch.compile`` of that with inductor's ``freezing``, where the CPU has
  bfloat16 hardware), ``fused-bf16`` (``fused+fuse`` in bfloat16) and ``openvino-bf16``
  (OpenVINO's bfloat16 inference precision, where the CPU has bfloat16 hardware).
Each provider's logits are compared with ``eager``'s: ``max_rel_err`` = max |y - y_eager| /
max |y_eager|. Protocols: CPU batch 16, one thread (``--threads``); CUDA batch 256 under
float16 autocast. 224 px, S4 at 256 px. On CPU the model is also timed at batch 1 (one thread)
and at batch 16 with two threads (``--extra-settings``; without the compile providers).

Training (``--train-variants``; train mode, cross-entropy, one SGD step with momentum per
call): ``eager`` vs ``fused``.

Prints tables headed by the machine line, writes ``benchmarks/results/model_<device>.json``
and ``.csv``; a progress bar runs on stderr.

    python -m benchmarks.bench_model [--variants shvit_s1 shvit_s4] [--batch 16] [--threads 1]
    python -m benchmarks.bench_model --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import pathlib
import tempfile
import time

import torch
import torch._inductor.config
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import shvit
import shvit_kernels
from shvit_kernels.plan import call
from benchmarks import runtimes
from benchmarks.common import (
    Progress,
    configure_allocator,
    format_table,
    machine_info,
    machine_line,
    time_cpu_interleaved,
    write_results,
)

RESOLUTION = {"shvit_s1": 224, "shvit_s2": 224, "shvit_s3": 224, "shvit_s4": 256}


def parse_setting(text: str) -> tuple[int, int]:
    """``"BxT"``: batch B with T threads."""
    b, _, t = text.partition("x")
    return int(b), int(t or 1)


def build_providers(variant: str, device: str, x: torch.Tensor, threads: int, compile_: bool,
                    runtimes_: list[str], bf16: bool, onnx_dir: pathlib.Path | None) -> dict[str, tuple]:
    """name -> (model or callable, its input), all from the same weights."""
    torch.manual_seed(0)
    model = shvit.create_model(variant).eval().to(device)
    fused = shvit.create_model(variant, fused=True).eval().to(device)
    fused.load_state_dict(model.state_dict())
    folded = copy.deepcopy(model).fuse()
    providers = {"eager": (model, x), "eager+fuse": (folded, x)}
    if compile_:
        providers["compile"] = (torch.compile(copy.deepcopy(folded)), x)
    providers["fused+fuse"] = (fused.fuse(), x)
    if runtimes_:
        path = onnx_dir / f"{variant}.onnx"
        if not path.exists():
            runtimes.export(folded, x, path)
        for name in runtimes_:
            providers[name] = (runtimes.session(name, path, threads), x)
    if bf16:
        hardware = shvit_kernels.onednn.bf16_hardware()
        xb = x.to(torch.bfloat16)
        xb_cl = xb.contiguous(memory_format=torch.channels_last)
        eager_bf16 = copy.deepcopy(folded).to(torch.bfloat16).to(memory_format=torch.channels_last)
        providers["eager-bf16"] = (eager_bf16, xb_cl)
        if compile_ and hardware:  # compiled with freezing at its first call (main)
            providers["compile-bf16"] = (torch.compile(copy.deepcopy(eager_bf16)), xb_cl)
        providers["fused-bf16"] = (copy.deepcopy(fused).to(torch.bfloat16), xb)
        if "openvino" in runtimes_ and hardware:
            providers["openvino-bf16"] = (runtimes.session("openvino", path, threads, "bf16"), x)
    return providers


def model_flops(variant: str, res: int) -> float:
    """Floating-point operations of one image (a multiply-add counts two), as torch's flop
    counter sees the BN-folded model: convolutions and matrix products."""
    model = shvit.create_model(variant).eval().fuse()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, res, res))
    return float(counter.get_total_flops())


def gemm_peak(dtype: torch.dtype, n: int = 1024) -> float:
    """GFLOP/s of one n x n x n ``torch.mm`` in ``dtype`` (oneDNN/MKL), median of 20, at the
    current thread count: the dense-GEMM bar the model's GFLOP/s is read against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = time_cpu_interleaved({"mm": lambda: torch.mm(a, b)}, min_time=0.5, min_reps=20)["mm"]["median_s"]
    return 2 * n**3 / t / 1e9


def packed_gemm_peak(n: int = 1024) -> float | None:
    """GFLOP/s of our packed float32 GEMM on the same n x n x n product (a 1x1 convolution
    of n channels over n tokens, the plan's op), median of 20; ``None`` without it."""
    if not shvit_kernels.pointwise.gemm_available():
        return None
    step = shvit_kernels.pointwise.conv_step(torch.nn.Conv2d(n, n, 1))
    x = torch.randn(1, n, 32, n // 32).contiguous(memory_format=torch.channels_last)
    t = time_cpu_interleaved({"mm": lambda: call(step, x)}, min_time=0.5, min_reps=20)["mm"]["median_s"]
    return 2 * n**3 / t / 1e9


def timer(device: str, min_time: float, threads: int = 1):
    if device == "cuda":
        import triton.testing

        def run(fns):
            return {n: dict(median_s=triton.testing.do_bench(f, warmup=25, rep=int(min_time * 1000),
                                                             return_mode="median") / 1e3, reps=None)
                    for n, f in fns.items()}

        return run
    # with more than one thread, turns of 0.5 s (the other runtimes' spinning worker threads)
    return lambda fns: time_cpu_interleaved(fns, min_time=min_time, turn_s=0.0 if threads == 1 else 0.5)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--variants", nargs="+", default=list(RESOLUTION), choices=list(RESOLUTION))
    p.add_argument("--train-variants", nargs="*", default=["shvit_s1"], choices=list(RESOLUTION),
                   help="variants for the training-step benchmark (none: skip)")
    p.add_argument("--batch", type=int, default=None, help="default: 16 on CPU, 256 on CUDA")
    p.add_argument("--train-batch", type=int, default=None, help="default: 16 on CPU, 128 on CUDA")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    p.add_argument("--no-runtimes", action="store_true", help="skip the ONNX Runtime and OpenVINO providers")
    p.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 providers (CPU)")
    p.add_argument("--extra-settings", nargs="*", default=None, metavar="BxT",
                   help="more CPU inference settings, batch x threads (default: 1x1 16x2; none: skip)")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per measurement")
    p.add_argument("--allocator", default="steady", choices=["steady", "default"],
                   help="C heap for the timing: steady (freed memory kept mapped; default) or glibc's "
                        "default (see benchmarks/common.py: configure_allocator)")
    p.add_argument("--out", default=None,
                   help="result name under benchmarks/results/, or a path without suffix (default model_<device>)")
    args = p.parse_args(argv)
    dev = args.device
    batch = args.batch or (256 if dev == "cuda" else 16)
    train_batch = args.train_batch or (128 if dev == "cuda" else 16)
    autocast = torch.autocast("cuda", dtype=torch.float16) if dev == "cuda" else contextlib.nullcontext()

    if dev == "cpu":
        torch.set_num_threads(args.threads)
    if not args.no_compile and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # a fresh inductor cache: the compile time reported is a cold compile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="shvit-bench-inductor-")
    allocator = configure_allocator(args.allocator)
    info = machine_info()
    info["allocator"] = allocator
    info["backend"] = shvit_kernels.backend.select(torch.empty(0, device=dev))
    info["protocol"] = f"batch {batch}, " + ("float16 autocast" if dev == "cuda" else f"{args.threads} thread(s)")
    print(machine_line(info), f"| fused backend: {info['backend']} | {info['protocol']}", flush=True)
    run = timer(dev, args.min_time, args.threads)  # the training benchmark
    settings = [(batch, args.threads)]
    if dev == "cpu":
        extra = ["1x1", "16x2"] if args.extra_settings is None else args.extra_settings
        settings += [s for s in map(parse_setting, extra) if s != settings[0]]
    runtimes_ = [] if dev == "cuda" or args.no_runtimes else runtimes.available()
    bf16 = dev == "cpu" and not args.no_bf16
    info["bf16_hardware"] = shvit_kernels.onednn.bf16_hardware() if dev == "cpu" else None
    onnx_dir = pathlib.Path(tempfile.mkdtemp(prefix="shvit-bench-onnx-")) if runtimes_ else None
    flops = {v: model_flops(v, RESOLUTION[v]) for v in args.variants}
    info["gflop_per_image"] = {v: round(f / 1e9, 3) for v, f in flops.items()}
    for name in runtimes_:
        info[name] = __import__(name).__version__
    if dev == "cpu":
        info["gemm_peak_gflops"] = {str(d).removeprefix("torch."): round(gemm_peak(d), 1)
                                    for d in ((torch.float32, torch.bfloat16) if bf16 else (torch.float32,))}
        packed = packed_gemm_peak()
        if packed is not None:
            info["gemm_peak_gflops"]["float32 packed (ours)"] = round(packed, 1)
    n_compiles = 0 if args.no_compile else 1 + (bf16 and bool(info["bf16_hardware"]))
    n_steps = len(args.variants) * (len(settings) + n_compiles) + len(args.train_variants)
    progress = Progress(n_steps)
    rows = []
    for (bsz, threads), variant in [(s, v) for s in settings for v in args.variants]:
        first = (bsz, threads) == settings[0]
        if dev == "cpu":
            torch.set_num_threads(threads)
        res = RESOLUTION[variant]
        x = torch.randn(bsz, 3, res, res, generator=torch.Generator().manual_seed(0)).to(dev)
        providers = build_providers(variant, dev, x, threads, first and not args.no_compile, runtimes_,
                                    bf16, onnx_dir)
        compile_s = {}
        outputs = {}
        with torch.inference_mode(), autocast:
            for name, (m, xi) in providers.items():
                if name.startswith("compile"):
                    progress.step(f"{variant}: compiling ({name})")
                t0 = time.perf_counter()
                with torch._inductor.config.patch(freezing=name == "compile-bf16"):
                    outputs[name] = m(xi).float()
                if dev == "cuda":
                    torch.cuda.synchronize()
                if name.startswith("compile"):
                    compile_s[name] = time.perf_counter() - t0
            progress.step(f"{variant} {res}px batch {bsz}" + (f" {threads} threads" if dev == "cpu" else "")
                          + f": timing {len(providers)} providers")
            times = timer(dev, args.min_time, threads)({n: (lambda m=m, xi=xi: m(xi)) for n, (m, xi) in providers.items()})
        ref = outputs["eager"]
        base = bsz / times["eager"]["median_s"]
        folded = bsz / times["eager+fuse"]["median_s"]
        for name, t in times.items():
            ips = bsz / t["median_s"]
            err = ((outputs[name] - ref).abs().max() / ref.abs().max()).item()
            rows.append(dict(kind="inference", variant=variant, resolution=res, batch=bsz, device=dev,
                             threads=threads if dev == "cpu" else None, provider=name, images_per_s=ips,
                             median_ms=t["median_s"] * 1e3, reps=t["reps"], speedup_vs_eager=ips / base,
                             speedup_vs_eager_fuse=ips / folded, max_rel_err=err,
                             gflops=flops[variant] * ips / 1e9 if flops.get(variant) else None,
                             compile_s=compile_s.get(name)))
    if dev == "cpu":
        torch.set_num_threads(args.threads)
    for variant in args.train_variants:
        res = RESOLUTION[variant]
        progress.step(f"{variant} {res}px: training step, eager vs fused")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(train_batch, 3, res, res, generator=g).to(dev)
        y = torch.randint(0, 1000, (train_batch,), generator=g).to(dev)
        torch.manual_seed(0)
        ref = shvit.create_model(variant).to(dev).train()
        fused = shvit.create_model(variant, fused=True).to(dev).train()
        fused.load_state_dict(ref.state_dict())
        steps = {}
        for name, model in (("eager", ref), ("fused", fused)):
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                with autocast:
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()

            steps[name] = step
        peak = {}
        if dev == "cuda":
            for name, fn in steps.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                peak[name] = torch.cuda.max_memory_allocated()
        times = run(steps)
        base = train_batch / times["eager"]["median_s"]
        for name, t in times.items():
            ips = train_batch / t["median_s"]
            rows.append(dict(kind="train-step", variant=variant, resolution=res, batch=train_batch, device=dev,
                             threads=args.threads if dev == "cpu" else None, provider=name, images_per_s=ips,
                             median_ms=t["median_s"] * 1e3, reps=t["reps"], speedup_vs_eager=ips / base,
                             peak_mem_bytes=peak.get(name)))
    progress.close()
    print()
    print(machine_line(info), f"| fused backend: {info['backend']} | {info['protocol']}")
    if info.get("gemm_peak_gflops"):
        print("GEMM peak (1024^3; torch.mm unless named), GFLOP/s:", info["gemm_peak_gflops"])
    print(format_table(
        ["kind", "model", "px", "batch", "threads", "provider", "images/s", "ms/batch", "vs eager", "vs eager+fuse",
         "GFLOP/s", "max rel err", "compile s"],
        [[r["kind"], r["variant"], str(r["resolution"]), str(r["batch"]), str(r["threads"] or ""), r["provider"],
          f"{r['images_per_s']:.1f}", f"{r['median_ms']:.1f}", f"{r['speedup_vs_eager']:.2f}x",
          f"{r['speedup_vs_eager_fuse']:.2f}x" if r.get("speedup_vs_eager_fuse") else "",
          f"{r['gflops']:.0f}" if r.get("gflops") else "",
          f"{r['max_rel_err']:.1e}" if r.get("max_rel_err") is not None else "",
          f"{r['compile_s']:.0f}" if r.get("compile_s") else ""] for r in rows],
    ))
    out = pathlib.Path(args.out or f"model_{dev}")
    path = write_results(out.stem, info, rows, out.parent if str(out.parent) != "." else None)
    print(f"\nwrote {path} (and .csv)")
    return rows


if __name__ == "__main__":
    main()
