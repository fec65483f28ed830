"""Draw the benchmark results as one PNG (needs matplotlib).

Left: model throughput (images/s) per variant and provider. Right: fused-vs-eager speedup
of the SHSA mixer per case and mode.

    python -m benchmarks.plot [--device cpu] [--out benchmarks/results/cpu.png]
"""
from __future__ import annotations

import argparse
import json
import pathlib

from benchmarks.common import RESULTS, machine_line


def main(argv: list[str] | None = None) -> pathlib.Path | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    model_path, shsa_path = RESULTS / f"model_{args.device}.json", RESULTS / f"shsa_{args.device}.json"
    panels = [pth for pth in (model_path, shsa_path) if pth.exists()]
    if not panels:
        print(f"no results for {args.device} under {RESULTS}")
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.2), squeeze=False)
    info = None
    for ax, path in zip(axes[0], panels):
        data = json.loads(path.read_text())
        info = data["machine"]
        rows = data["rows"]
        if path == model_path:
            rows = [r for r in rows if r.get("kind", "inference") == "inference"]
            # the main protocol (the first setting timed); batch 1 / two threads are in the tables
            rows = [r for r in rows if (r["batch"], r.get("threads")) == (rows[0]["batch"], rows[0].get("threads"))]
            variants = list(dict.fromkeys(r["variant"] for r in rows))
            providers = list(dict.fromkeys(r["provider"] for r in rows))
            width = 0.8 / len(providers)
            for i, prov in enumerate(providers):
                vals = [next((r["images_per_s"] for r in rows if r["variant"] == v and r["provider"] == prov), 0)
                        for v in variants]
                ax.bar([j + i * width for j in range(len(variants))], vals, width, label=prov)
            ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(variants))])
            ax.set_xticklabels([v.replace("shvit_", "SHViT-").upper().replace("SHVIT", "SHViT") for v in variants])
            ax.set_ylabel("images / s (higher is better)")
            ax.set_title(f"Model throughput, eval, batch {rows[0]['batch']}")
            ax.legend(fontsize=8)
        else:
            modes = list(dict.fromkeys(r["mode"] for r in rows))
            cases = list(dict.fromkeys(r["case"] for r in rows))
            width = 0.8 / len(cases)
            for i, case in enumerate(cases):
                vals = [next((r["speedup"] for r in rows if r["case"] == case and r["mode"] == m), 0) for m in modes]
                ax.bar([j + i * width for j in range(len(modes))], vals, width, label=case)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks([j + width * (len(cases) - 1) / 2 for j in range(len(modes))])
            ax.set_xticklabels(modes, rotation=35, ha="right", fontsize=8)
            ax.set_ylabel("speedup of fused over eager (×)")
            ax.set_title("SHSA mixer: fused vs eager")
            ax.legend(fontsize=8)
    fig.suptitle(machine_line(info), fontsize=9)
    fig.tight_layout()
    out = pathlib.Path(args.out) if args.out else RESULTS / f"{args.device}.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
