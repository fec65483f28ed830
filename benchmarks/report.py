"""Render the committed benchmark results as Markdown tables, and refresh them in the docs.

    python -m benchmarks.report            # print the tables
    python -m benchmarks.report --readme   # replace the marked blocks in README.md and docs/*.md

Blocks are delimited by ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``, where NAME is
a result file under benchmarks/results/ without ``.json``, or ``FILE:VIEW`` for another table of
the same file (``model_cpu:bf16``, ``model_cpu:errors``).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re

from benchmarks.common import RESULTS, machine_line

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


FP32 = ["eager", "eager+fuse", "compile", "fused", "onnxruntime", "openvino"]  # fused: fused=True + fuse()
BF16 = ["eager-bf16", "compile-bf16", "fused-bf16", "openvino-bf16"]
RUNTIMES = ["onnxruntime", "openvino"]
NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "openvino-bf16": "OpenVINO bf16"}


def _groups(data: dict) -> dict[tuple, dict]:
    """(kind, model, px, batch, threads) -> provider -> row."""
    groups: dict[tuple, dict] = {}
    for r in data["rows"]:
        key = (r.get("kind", "inference"), r["variant"], r["resolution"], r["batch"], r.get("threads") or "")
        groups.setdefault(key, {})[r["provider"].replace("fused+fuse", "fused")] = r
    return groups


def _ips(r: dict | None) -> str:
    if not r:
        return ""
    cell = f"{r['images_per_s']:.1f}"
    return cell + (f" ({r['compile_s']:.0f} s)" if r.get("compile_s") else "")


def _ratio(a: dict | None, b: dict | None) -> str:
    return f"{a['images_per_s'] / b['images_per_s']:.2f}×" if a and b else ""


def _key_cells(key: tuple) -> list[str]:
    kind, variant, res, batch, threads = key
    return [kind, variant.removeprefix("shvit_").upper(), str(res), str(batch), str(threads)]


def model_table(data: dict) -> str:
    """float32: one row per (kind, model, batch, threads), images/s of each provider, the fused
    model against the best uncompiled baseline (eager+fuse in inference, eager in training)
    and against the faster runtime."""
    groups = _groups(data)
    cols = [p for p in FP32 if any(p in g for g in groups.values())]
    has_rt = any(p in cols for p in RUNTIMES)
    rows = []
    for key, g in groups.items():
        fused = g.get("fused")
        base = g.get("eager+fuse") or g.get("eager")
        best_rt = max((g[p] for p in RUNTIMES if p in g), key=lambda r: r["images_per_s"], default=None)
        rows.append(_key_cells(key) + [_ips(g.get(p)) for p in cols] + [_ratio(fused, base)]
                    + ([_ratio(fused, best_rt)] if has_rt else []))
    heads = [NAMES.get(p, p) for p in cols] + ["fused vs baseline"] + (["fused vs faster runtime"] if has_rt else [])
    return _table(["kind", "model", "px", "batch", "threads", *heads], rows)


def bf16_table(data: dict) -> str:
    """bfloat16 inference: images/s of each bfloat16 provider, fused bfloat16 against eager
    bfloat16, OpenVINO bfloat16, compile-with-freezing and fused float32."""
    groups = {k: g for k, g in _groups(data).items() if any(p in g for p in BF16)}
    cols = [p for p in BF16 if any(p in g for g in groups.values())]
    rows = []
    for key, g in groups.items():
        f = g.get("fused-bf16")
        rows.append(_key_cells(key)[1:] + [_ips(g.get(p)) for p in cols]
                    + [_ratio(f, g.get("eager-bf16")), _ratio(f, g.get("openvino-bf16")),
                       _ratio(f, g.get("compile-bf16")), _ratio(f, g.get("fused"))])
    heads = [NAMES.get(p, p) for p in cols]
    return _table(["model", "px", "batch", "threads", *heads, "fused-bf16 vs eager-bf16", "vs OpenVINO bf16",
                   "vs compile-bf16", "vs fused fp32"], rows)


def error_table(data: dict) -> str:
    """The main setting (the first timed): each provider's largest logit error against eager
    float32 (max |y - y_eager| / max |y_eager|) and its GFLOP/s, per model."""
    rows0 = [r for r in data["rows"] if r.get("kind", "inference") == "inference"]
    main = (rows0[0]["batch"], rows0[0].get("threads"))
    groups = {k: g for k, g in _groups(data).items() if k[0] == "inference" and (k[3], k[4] or None) == main}
    variants = [k[1] for k in groups]
    provs = [p for p in FP32 + BF16 if p != "eager" and any(p in g for g in groups.values())]
    peak = data["machine"].get("gemm_peak_gflops") or {}

    def cell(g: dict, p: str) -> str:
        r = g.get(p)
        if not r or r.get("max_rel_err") is None:
            return ""
        return f"{r['max_rel_err']:.1e} / {r['gflops']:.0f}" if r.get("gflops") else f"{r['max_rel_err']:.1e}"

    rows = [[NAMES.get(p, p)] + [cell(g, p) for g in groups.values()] for p in provs]
    heads = [f"{v.removeprefix('shvit_').upper()} ({data['machine'].get('gflop_per_image', {}).get(v, '?')} GFLOP)"
             for v in variants]
    note = ""
    if peak:
        note = ("\n\nGEMM peak here (1024³; `torch.mm` unless named): "
                + ", ".join(f"{d} {v:.0f} GFLOP/s" for d, v in peak.items()) + ".")
    return _table(["provider: max rel err / GFLOP/s", *heads], rows) + note


def shsa_table(data: dict) -> str:
    """One row per mode, one column per case: eager ms / fused ms (speedup)."""
    cases = list(dict.fromkeys(r["case"] for r in data["rows"]))
    heads = {r["case"]: f"{r['case']} ({r['dim']}/{r['pdim']}, N={r['tokens']})" for r in data["rows"]}
    cells: dict[str, dict] = {}
    for r in data["rows"]:
        cells.setdefault(r["mode"], {})[r["case"]] = f"{r['eager_ms']:.3f} / {r['fused_ms']:.3f} ({r['speedup']:.2f}×)"
    rows = [[mode, *(by.get(c, "") for c in cases)] for mode, by in cells.items()]
    return _table(["mode: eager ms / fused ms", *(heads[c] for c in cases)], rows)


RENDER = {
    "model_cpu": model_table,
    "model_cpu:bf16": bf16_table,
    "model_cpu:errors": error_table,
    "model_cpu_zen4": model_table,  # a run on a CPU without AMX (docs/benchmarking.md)
    "model_cpu_zen4:bf16": bf16_table,
    "model_cuda": model_table,
    "shsa_cpu": shsa_table,
    "shsa_cpu_1024px": shsa_table,
    "shsa_cuda": shsa_table,
}


def render(name: str) -> str:
    """The block ``name`` (a result file, or ``file:view``), headed by its machine line."""
    data = json.loads((RESULTS / f"{name.split(':')[0]}.json").read_text())
    if ":" in name:  # a further table of a file whose first table carries the machine line
        return RENDER[name](data)
    info = data["machine"]
    head = f"Machine: {machine_line(info)}"
    if "backend" in info:
        head += f"; fused backend: {info['backend']}"
    if "protocol" in info:
        head += f"; {info['protocol']}"
    batch = {r.get("batch") for r in data["rows"]}
    head += f"; batch {', '.join(str(b) for b in sorted(batch))}."
    return head + "\n\n" + RENDER[name](data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", action="store_true", help="rewrite the marked blocks of README.md")
    args = p.parse_args()
    names = [n for n in RENDER if (RESULTS / f"{n.split(':')[0]}.json").exists()]
    if not args.readme:
        for n in names:
            print(f"## {n}\n\n{render(n)}\n")
        return
    for doc in DOCS:
        text = doc.read_text()
        for n in names:
            pattern = re.compile(rf"(<!-- results:{n} -->\n)(?:.*?\n)?(<!-- /results:{n} -->)", re.S)
            text, count = pattern.subn(lambda m: m.group(1) + render(n) + "\n" + m.group(2), text)
            if count:
                print(f"{doc.relative_to(ROOT)}: refreshed {n}")
        doc.write_text(text)


if __name__ == "__main__":
    main()
