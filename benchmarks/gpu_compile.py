"""Compile every Triton kernel for real GPU targets on a machine without a GPU.

    python -m benchmarks.gpu_compile            # all of SHViT's shapes, sm_80 and sm_90a
    python -m benchmarks.gpu_compile --subset   # the representative subset CI runs

Each launcher (``*_triton`` in ``shvit_kernels``) is called with CPU tensors of the real
shapes, strides and dtypes; its kernel launches are captured instead of run, and each one is
compiled with Triton's own argument binder (the same specialisation on divisibility and unit
strides that a CUDA launch gets) for ``GPUTarget("cuda", 80 | 90, 32)``. ptxas's report
(Triton asks ptxas for it) gives registers, spill bytes and shared memory; the occupancy
follows from each architecture's limits. Every config an autotuner can pick is compiled.

The table, per kernel x arch x dtype x layout x shape: registers, spill stores/loads, shared
memory, resident CTAs per SM, grid size at batch 1 and 256, and the pdim padding waste. It is
written to ``benchmarks/results/gpu_compile.{json,md}`` (``--out``). The exit status is 1 when
a kernel fails to compile, needs more shared memory than a block may have, spills, pads pdim
by more than 1.34x, or, at the paper's shapes, has fewer than 2 resident CTAs per SM or (the
inference op at batch 1) fewer than 8 programs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import pathlib
import re
import sys
import time

# compiled kernels, not the interpreter, each compiled anew (a cache hit skips ptxas and its
# report); set before triton is imported
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated (no warning)

import torch  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
MAX_PAD = 1.34  # pdim padding allowed at SHViT's pdims
MIN_GRID_B1 = 8  # programs of the inference op at batch 1 (the paper's shapes)


# ------------------------------------------------------------------ architecture limits
@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    capability: int
    smem_per_sm: int  # bytes of shared memory per SM
    smem_per_block: int  # the most one block may have (opt-in)
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_ctas: int = 32
    reserved_smem: int = 1024  # per block, kept by the driver (sm_80 and later)


ARCHS = {
    80: Arch("sm_80 (A100)", 80, 167936, 166912),
    90: Arch("sm_90a (H100)", 90, 233472, 232448),
}


def resident_ctas(arch: Arch, regs: int, smem: int, warps: int) -> int:
    """CTAs of one kernel resident on an SM: the least of the register, shared-memory, warp
    and block limits. Registers are allocated per warp in units of 256 within each of the
    SM's four sub-partitions."""
    warp_regs = math.ceil(max(regs, 1) * 32 / 256) * 256
    warps_by_regs = 4 * ((arch.regs_per_sm // 4) // warp_regs)
    by_regs = warps_by_regs // warps
    by_warps = arch.max_warps // warps
    by_smem = arch.smem_per_sm // (smem + arch.reserved_smem)
    return min(by_regs, by_warps, by_smem, arch.max_ctas)


# ------------------------------------------------------------------------- shapes
def shsa_shapes(subset: bool) -> list[dict]:
    """Every SHSA stage of S1-S4 at the paper's resolution (224 px, S4 at 256), 384 and 512
    px, and S4's stage 2 at 1024 and 2048 px; ``paper`` marks the paper's resolutions."""
    from shvit.model import _COMMON, VARIANTS

    def grid(res: int, stage: int) -> int:
        h = res
        for _ in range(4 + stage):  # the stem's four stride-2 convs, one PatchMerging a stage
            h = (h - 1) // 2 + 1
        return h

    shapes, seen = [], set()
    for name, cfg in VARIANTS.items():
        paper = 256 if name == "shvit_s4" else 224
        for res in (paper, 384, 512, 1024, 2048):
            for stage, kind in enumerate(_COMMON["types"]):
                if kind != "s" or (res > 512 and (name != "shvit_s4" or stage != 1)):
                    continue
                h = grid(res, stage)
                key = (cfg["embed_dim"][stage], cfg["partial_dim"][stage], h)
                s = dict(variant=name, res=res, stage=stage + 1, dim=key[0], pdim=key[1], qk=16, h=h,
                         paper=res == paper)
                if key in seen:
                    continue
                seen.add(key)
                shapes.append(s)
    if subset:  # S1 7x7 (pdim 48), S4 8x8 (72) and 4x4 (96), S2 at 512 px (66, 16x16), S4 at 1024 px
        want = {(224, 48, 7), (336, 72, 8), (448, 96, 4), (308, 66, 16), (336, 72, 32)}
        shapes = [s for s in shapes if (s["dim"], s["pdim"], s["h"]) in want]
    return shapes


# ------------------------------------------------------------------ launch capture
@dataclasses.dataclass
class Launch:
    fn: object  # JITFunction or Autotuner
    grid: tuple
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def capture():
    """Record ``kernel[grid](*args, **kwargs)`` calls instead of launching them."""
    from triton.runtime.jit import KernelInterface

    launches: list[Launch] = []
    real = KernelInterface.__getitem__

    def record(self, grid):
        def launch(*args, **kwargs):
            launches.append(Launch(self, grid, args, kwargs))

        return launch

    KernelInterface.__getitem__ = record
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = real


def _empty(shape, dtype, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, memory_format=fmt)  # untouched pages: cheap at any size


def capture_paths(s: dict, dtype: torch.dtype, layout: str, batch: int) -> dict[str, list[Launch]]:
    """The launches of each fused path for one SHSA shape: training forward and backward,
    and inference after fuse() (the residual block runs the same launch and PyTorch's add)."""
    from shvit_kernels.group_norm import gn_partial_bwd_triton, gn_partial_fwd_triton
    from shvit_kernels.shsa_attention import shsa_attn_bwd_triton, shsa_attn_fwd_triton
    from shvit_kernels.shsa_inference import shsa_infer_triton

    B, dim, pdim, qk, h = batch, s["dim"], s["pdim"], s["qk"], s["h"]
    cq = 2 * qk + pdim
    x = _empty((B, dim, h, h), dtype, layout)
    w, b = torch.ones(pdim, dtype=dtype), torch.zeros(pdim, dtype=dtype)
    qkv = _empty((B, cq, h, h), dtype, layout)
    paths = {}
    with capture() as launches:
        _, mean, rstd = gn_partial_fwd_triton(x[:, :pdim], w, b, 1e-5)
        out, lse = shsa_attn_fwd_triton(qkv, x[:, pdim:], qk, qk ** -0.5)
    paths["train-fwd"] = list(launches)
    with capture() as launches:
        dy = _empty((B, pdim, h, h), dtype, layout)
        gn_partial_bwd_triton(dy, x[:, :pdim], w, mean, rstd)
        dout = _empty(out.shape, dtype, layout)
        shsa_attn_bwd_triton(dout, qkv, out, lse, qk, qk ** -0.5)
    paths["train-bwd"] = list(launches)
    with capture() as launches:
        shsa_infer_triton(x, torch.ones(cq, pdim, dtype=dtype), torch.zeros(cq, dtype=dtype), pdim, qk, 1e-5)
    paths["infer"] = list(launches)
    return paths


# ----------------------------------------------------------------------- compiling
def _configs(launch: Launch) -> list[tuple[object, dict]]:
    """(JITFunction, keyword arguments) for each config the launch can run: one, or each
    config an autotuner may pick (after its prune hook)."""
    from triton.runtime.autotuner import Autotuner

    fn, kwargs = launch.fn, dict(launch.kwargs)
    if not isinstance(fn, Autotuner):
        return [(fn, kwargs)]
    nargs = dict(zip(fn.arg_names, launch.args))
    configs = fn.prune_configs({**nargs, **kwargs}) if fn.early_config_prune or fn.perf_model else fn.configs
    out = []
    for cfg in configs:
        kw = {**kwargs, **cfg.all_kwargs()}
        out.append((fn.fn, kw))
    return out


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def compile_one(fn, args: tuple, kwargs: dict, capability: int, cache: dict) -> dict:
    """Compile one launch for ``capability`` as a CUDA launch would (Triton's binder on the
    real arguments), returning ptxas's resource report."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = dict(kwargs)
    kw.setdefault("debug", False)
    bound_args, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound_args, specialization, options)
    key = (fn.__name__, capability, str(signature), str(sorted((str(k), str(v)) for k, v in constexprs.items())),
           str(attrs), str(sorted(options.__dict__.items())))
    if key in cache:
        return cache[key]
    log = io.StringIO()
    t0 = time.perf_counter()
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        error = None
    except Exception as e:  # a compile error is a result of the check
        ck, error = None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    finally:
        knobs.nvidia.dump_ptxas_log = False
    res = dict(error=error, seconds=round(time.perf_counter() - t0, 2))
    if ck is not None:
        text = log.getvalue()
        if "registers" not in text:
            raise RuntimeError(f"no ptxas report for {fn.__name__}: {text[-300:]!r}")
        for k, rx in _PTXAS_RE.items():
            m = rx.search(text)
            res[k] = int(m.group(1)) if m else 0
        res["smem"] = int(ck.metadata.shared)
        res["num_warps"] = int(ck.metadata.num_warps)
        res["num_stages"] = int(getattr(ck.metadata, "num_stages", kw.get("num_stages", 0)))
    cache[key] = res
    return res


def _grid_size(launch: Launch) -> int:
    grid = launch.grid
    if callable(grid):
        grid = grid({**dict(zip(launch.fn.arg_names, launch.args)), **launch.kwargs})
    return math.prod(int(g) for g in grid)


def _pad_waste(kwargs: dict, pdim: int) -> float:
    bp = kwargs.get("BLOCK_PD")
    if not bp:
        return 1.0
    return math.ceil(pdim / bp) * bp / pdim


def run(shapes, archs, dtypes, layouts, batches=(1, 256), kernels=None) -> list[dict]:
    """One row per launch (at each batch size: the tiles may depend on it) and arch."""
    cache: dict = {}
    rows = []
    for s in shapes:
        for dtype in dtypes:
            for layout in layouts:
                for batch in batches:
                    for path, launches in capture_paths(s, dtype, layout, batch).items():
                        for launch in launches:
                            for cap in archs:
                                arch = ARCHS[cap]
                                for fn, kw in _configs(launch):
                                    if kernels and not any(k in fn.__name__ for k in kernels):
                                        continue
                                    r = compile_one(fn, launch.args, kw, cap, cache)
                                    row = dict(
                                        kernel=fn.__name__.lstrip("_").removesuffix("_kernel"), path=path,
                                        arch=arch.name.split()[0], dtype=str(dtype).removeprefix("torch."),
                                        layout=layout, variant=s["variant"], res=s["res"], stage=s["stage"],
                                        dim=s["dim"], pdim=s["pdim"], tokens=f"{s['h']}x{s['h']}", paper=s["paper"],
                                        batch=batch, grid=_grid_size(launch), pad=round(_pad_waste(kw, s["pdim"]), 3),
                                        config=",".join(f"{k}={v}" for k, v in sorted(kw.items())
                                                        if (k.isupper() or k.startswith("num_")) and k != "DOT"),
                                        **r,
                                    )
                                    if r["error"] is None:
                                        row["ctas_per_sm"] = resident_ctas(arch, r["regs"], r["smem"], r["num_warps"])
                                        row["smem_ok"] = r["smem"] <= arch.smem_per_block
                                    rows.append(row)
    return rows


def failures(rows: list[dict]) -> list[str]:
    bad = []
    for r in rows:
        where = (f"{r['kernel']} {r['arch']} {r['dtype']} {r['layout']} {r['variant']}@{r['res']} stage {r['stage']}"
                 f" batch {r['batch']}")
        if r["error"]:
            bad.append(f"{where}: compile error {r['error']}")
            continue
        if not r["smem_ok"]:
            bad.append(f"{where}: {r['smem']} B shared memory, over the block limit")
        if r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
        if r["paper"] and r["ctas_per_sm"] < 2:
            bad.append(f"{where}: {r['ctas_per_sm']} resident CTA per SM")
        if r["pad"] > MAX_PAD:
            bad.append(f"{where}: pdim padded {r['pad']}x")
        if r["path"] == "infer" and r["paper"] and r["batch"] == 1 and r["grid"] < MIN_GRID_B1:
            bad.append(f"{where}: {r['grid']} programs at batch 1")
    return bad


# HBM bandwidth (bytes/s) of the data-sheet parts: A100 SXM 80 GB, H100 SXM
PEAK_BW = {"A100": 2.039e12, "H100": 3.35e12}


def memory_floor(shapes, batch: int = 256, elt: int = 2) -> list[dict]:
    """The least time the inference op can take: read x once, write the output once
    (float16, weights negligible), at each GPU's peak memory bandwidth. The GPU check's
    ``bench_shsa`` measures the achieved rate against a device copy."""
    out = []
    for s in shapes:
        nbytes = 2 * batch * s["dim"] * s["h"] * s["h"] * elt
        out.append(dict(variant=s["variant"], res=s["res"], stage=s["stage"], tokens=f"{s['h']}x{s['h']}",
                        MB=nbytes / 1e6, **{f"{g}_us": nbytes / bw * 1e6 for g, bw in PEAK_BW.items()}))
    return out


def markdown(rows: list[dict], meta: dict, floors: list[dict]) -> str:
    lines = [
        "# Triton kernels compiled for GPU targets",
        "",
        f"Triton {meta['triton']}, torch {meta['torch']}, {meta['date']}; `python -m benchmarks.gpu_compile"
        f"{' --subset' if meta['subset'] else ''}` on a machine without a GPU. One row per kernel x arch x dtype x"
        " layout x shape (and autotuner config); regs / spills / smem from ptxas, CTAs per SM from the"
        " architecture's register, shared-memory and warp limits; grid = programs at that batch; pad = pdim"
        " padded to the kernel's channel tile over pdim.",
        "",
        f"**{len(rows)} compiles, {len(failures(rows))} failures** (compile error, shared memory over the block"
        " limit, any spill, pdim padded over 1.34x; at the paper's shapes fewer than 2 CTAs per SM, or fewer than"
        " 8 programs of the inference op at batch 1).",
        "",
        summary(rows),
        "",
        "## Memory floor of the inference op (batch 256, float16: x read once, output written once)",
        "",
        "| variant@px | stage | tokens | MB | A100 us (2.04 TB/s) | H100 us (3.35 TB/s) |",
        "|---|---|---|---|---|---|",
        *[f"| {f['variant']}@{f['res']} | {f['stage']} | {f['tokens']} | {f['MB']:.1f} | {f['A100_us']:.1f} |"
          f" {f['H100_us']:.1f} |" for f in floors],
        "",
        "## Compiles",
        "",
        "| kernel | path | arch | dtype | layout | variant@px | stage | tokens | pdim | batch | regs | spill st/ld B |"
        " smem B | warps | CTAs/SM | grid | pad | config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['path']} | {r['arch']} | {r['dtype']} | {r['layout']} |"
                         f" {r['variant']}@{r['res']} | {r['stage']} | {r['tokens']} | {r['pdim']} | {r['batch']} |"
                         f" ERROR: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['kernel']} | {r['path']} | {r['arch']} | {r['dtype']} | {r['layout']} | {r['variant']}@{r['res']} |"
            f" {r['stage']} | {r['tokens']} | {r['pdim']} | {r['batch']} | {r['regs']} |"
            f" {r['spill_stores']}/{r['spill_loads']} | {r['smem']} | {r['num_warps']} | {r['ctas_per_sm']} | {r['grid']} |"
            f" {r['pad']} |"
            f" {r['config']} |"
        )
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> str:
    """Per kernel over every compile: the worst of each column, as a markdown table."""
    by_kernel: dict[str, list[dict]] = {}
    for r in rows:
        if not r["error"]:
            by_kernel.setdefault(r["kernel"], []).append(r)
    out = ["| kernel | compiles | max regs | max spill B | max smem B | min CTAs/SM | min grid at batch 1 | max pad |",
           "|---|---|---|---|---|---|---|---|"]
    for k, rs in by_kernel.items():
        out.append(
            f"| {k} | {len(rs)} | {max(r['regs'] for r in rs)} | {max(r['spill_stores'] for r in rs)} |"
            f" {max(r['smem'] for r in rs)} | {min(r['ctas_per_sm'] for r in rs)} |"
            f" {min((r['grid'] for r in rs if r['batch'] == 1), default='')} | {max(r['pad'] for r in rs)} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subset", action="store_true", help="the representative subset that CI compiles")
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCHS))
    p.add_argument("--dtype", nargs="+", default=["float32", "float16", "bfloat16"])
    p.add_argument("--layout", nargs="+", default=["contiguous", "channels_last"])
    p.add_argument("--kernel", nargs="+", help="only kernels whose name contains one of these")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    p.add_argument("--shape", nargs="+", help="only these variant@px, e.g. shvit_s1@384")
    p.add_argument("--out", default=str(RESULTS / "gpu_compile"), help="results path without suffix ('' for none)")
    args = p.parse_args(argv)
    import triton

    t0 = time.perf_counter()
    shapes = [s for s in shsa_shapes(args.subset) if not args.shape or f"{s['variant']}@{s['res']}" in args.shape]
    rows = run(shapes, args.arch, [getattr(torch, d) for d in args.dtype], args.layout, args.batch,
               args.kernel)
    bad = failures(rows)
    meta = dict(triton=triton.__version__, torch=torch.__version__, subset=args.subset,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seconds=round(time.perf_counter() - t0, 1))
    print(summary(rows))
    print(f"{len(rows)} compiles in {meta['seconds']} s; {len(bad)} failures")
    for line in bad[:40]:
        print("  FAIL", line)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        floors = memory_floor(shapes)
        out.with_suffix(".json").write_text(
            json.dumps(dict(meta=meta, failures=bad, memory_floor=floors, rows=rows), indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(rows, meta, floors))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
