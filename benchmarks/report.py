"""Render the committed benchmark results as Markdown tables, and refresh them in the docs.

    python -m benchmarks.report            # print the tables
    python -m benchmarks.report --readme   # replace the marked blocks in README.md and docs/*.md

Blocks are delimited by ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``, where NAME is
a result file under benchmarks/results/ without ``.json``.
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


PROVIDERS = ["eager", "eager+fuse", "compile", "fused"]  # fused: fused=True, in inference + fuse()


def model_table(data: dict) -> str:
    """One row per (kind, model, batch, threads): images/s of each provider, and the fused
    model against the best uncompiled baseline (eager+fuse in inference, eager in training)."""
    groups: dict[tuple, dict] = {}
    for r in data["rows"]:
        key = (r.get("kind", "inference"), r["variant"], r["resolution"], r["batch"], r.get("threads") or "")
        groups.setdefault(key, {})[r["provider"].replace("fused+fuse", "fused")] = r
    cols = [p for p in PROVIDERS if any(p in g for g in groups.values())]
    rows = []
    for (kind, variant, res, batch, threads), g in groups.items():
        fused = g.get("fused")
        base = g.get("eager+fuse") or g.get("eager")
        cells = []
        for p in cols:
            r = g.get(p)
            cell = f"{r['images_per_s']:.1f}" if r else ""
            if r and r.get("compile_s"):
                cell += f" ({r['compile_s']:.0f} s)"
            cells.append(cell)
        gain = f"{fused['images_per_s'] / base['images_per_s']:.2f}×" if fused and base else ""
        rows.append([kind, variant.removeprefix("shvit_").upper(), str(res), str(batch), str(threads), *cells, gain])
    return _table(["kind", "model", "px", "batch", "threads", *cols, "fused vs baseline"], rows)


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
    "model_cuda": model_table,
    "shsa_cpu": shsa_table,
    "shsa_cpu_1024px": shsa_table,
    "shsa_cuda": shsa_table,
}


def render(name: str) -> str:
    data = json.loads((RESULTS / f"{name}.json").read_text())
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
    names = [n for n in RENDER if (RESULTS / f"{n}.json").exists()]
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
