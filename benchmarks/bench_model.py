"""Model throughput by the paper's CPU protocol: batch 16, one thread, eval mode.

Providers: ``eager`` (the reference model as loaded), ``eager+fuse`` (BatchNorm folded
with ``model.fuse()``, the paper's setting) and ``fused+fuse`` (``fused=True``: the SHSA
mixers as fused ops, then ``fuse()``; same weights). Prints a table, writes
``benchmarks/results/model_cpu.json``.

    python -m benchmarks.bench_model [--variants shvit_s1 shvit_s4] [--batch 16] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy

import torch

import shvit
import shvit_kernels
from benchmarks.common import format_table, machine_info, machine_line, time_cpu_interleaved, write_results

RESOLUTION = {"shvit_s1": 224, "shvit_s2": 224, "shvit_s3": 224, "shvit_s4": 256}


def build_providers(variant: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    model = shvit.create_model(variant).eval()
    fused = shvit.create_model(variant, fused=True).eval()
    fused.load_state_dict(model.state_dict())
    return {"eager": model, "eager+fuse": copy.deepcopy(model).fuse(), "fused+fuse": fused.fuse()}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(RESOLUTION), choices=list(RESOLUTION))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-time", type=float, default=3.0, help="seconds of timing per measurement")
    p.add_argument("--out", default="model_cpu", help="result file name under benchmarks/results/")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    info = machine_info()
    info["backend"] = shvit_kernels.backend.select(torch.empty(0))
    print(machine_line(info), f"fused backend: {info['backend']}", flush=True)
    rows = []
    for variant in args.variants:
        res = RESOLUTION[variant]
        x = torch.randn(args.batch, 3, res, res)
        providers = build_providers(variant)
        print(f"  {variant} {res}px: {', '.join(providers)} ...", flush=True)
        with torch.inference_mode():
            times = time_cpu_interleaved({n: (lambda m=m: m(x)) for n, m in providers.items()}, min_time=args.min_time)
        base = args.batch / times["eager"]["median_s"]
        for name, t in times.items():
            ips = args.batch / t["median_s"]
            rows.append(
                dict(variant=variant, resolution=res, batch=args.batch, threads=args.threads, provider=name,
                     images_per_s=ips, median_ms=t["median_s"] * 1e3, reps=t["reps"], speedup_vs_eager=ips / base)
            )
    print()
    print(machine_line(info), f"fused backend: {info['backend']}")
    print(
        format_table(
            ["model", "px", "provider", "images/s", "ms/batch", "vs eager"],
            [[r["variant"], str(r["resolution"]), r["provider"], f"{r['images_per_s']:.1f}",
              f"{r['median_ms']:.1f}", f"{r['speedup_vs_eager']:.2f}x"] for r in rows],
        )
    )
    path = write_results(args.out, info, rows)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
