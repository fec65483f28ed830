"""Render the committed benchmark results as Markdown tables, and refresh them in README.md.

    python -m benchmarks.report            # print the tables
    python -m benchmarks.report --readme   # replace the blocks between the markers in README.md

README blocks are delimited by ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``, where
NAME is a result file under benchmarks/results/ without ``.json``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re

from benchmarks.common import RESULTS, machine_line

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def model_table(data: dict) -> str:
    rows = [
        [r.get("kind", "inference"), r["variant"], str(r["resolution"]), str(r["batch"]), str(r.get("threads") or ""),
         r["provider"], f"{r['images_per_s']:.1f}", f"{r['median_ms']:.1f}", f"{r['speedup_vs_eager']:.2f}×",
         f"{r['speedup_vs_eager_fuse']:.2f}×" if r.get("speedup_vs_eager_fuse") else "",
         f"{r['compile_s']:.0f}" if r.get("compile_s") else ""]
        for r in data["rows"]
    ]
    return _table(["kind", "model", "px", "batch", "threads", "provider", "images/s", "ms / batch", "vs eager",
                   "vs eager+fuse", "compile s"], rows)


def shsa_table(data: dict) -> str:
    rows = []
    for r in data["rows"]:
        rows.append([
            r["case"], f"{r['dim']}/{r['pdim']}", str(r["tokens"]), r["mode"], f"{r['eager_ms']:.3f}",
            f"{r['fused_ms']:.3f}", f"{r['speedup']:.2f}×",
        ])
    return _table(["case", "dim/pdim", "N", "mode", "eager ms", "fused ms", "speedup"], rows)


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
    text = README.read_text()
    for n in names:
        pattern = re.compile(rf"(<!-- results:{n} -->\n)(?:.*?\n)?(<!-- /results:{n} -->)", re.S)
        text, count = pattern.subn(lambda m: m.group(1) + render(n) + "\n" + m.group(2), text)
        if count:
            print(f"README: refreshed {n}")
    README.write_text(text)


if __name__ == "__main__":
    main()
