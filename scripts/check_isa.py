"""Checks that a build of shvit_kernels._C runs on any CPU of its architecture: no AVX
instruction outside the kernels compiled per instruction-set level.

Disassembles the extension (objdump -d) and lists every function with an AVX, AVX2,
AVX-512 or AMX instruction (a VEX/EVEX "v" mnemonic, a ymm/zmm register, an AVX-512 mask
register or an AMX tile register). Each must be one of the functions csrc/ marks with SHVIT_TARGET_AVX2 /
SHVIT_TARGET_AVX512 / SHVIT_TARGET_AVX512_BF16 / SHVIT_TARGET_AMX (or the GEMM's SHVIT_AVX2 / SHVIT_AVX512
aliases), which run only when the CPU has that level (csrc/cpu_isa.h). Anything else -- a std:: template, a baseline kernel
auto-vectorised for a wider ISA -- fails the check, as it would fault on an older CPU.

    python scripts/check_isa.py [path/to/_C*.so]   (default: the installed shvit_kernels._C)
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKS = r"SHVIT_TARGET_AVX2|SHVIT_TARGET_AVX512|SHVIT_TARGET_AVX512_BF16|SHVIT_TARGET_AMX|SHVIT_AVX2|SHVIT_AVX512"
AVX = re.compile(r"%[yzt]mm\d|%k[0-7]\b")


def targeted_functions() -> set[str]:
    """Names of the functions csrc/ declares with a target mark."""
    names = set()
    for path in (ROOT / "csrc").rglob("*"):
        if path.suffix not in (".cpp", ".h"):
            continue
        text = path.read_text()
        for m in re.finditer(rf"^(?!#define).*\b(?:{MARKS})\b([^;{{]*?)\(", text, re.M):
            ident = re.findall(r"[A-Za-z_]\w*", m.group(1))
            if ident:
                names.add(ident[-1])
    return names


def avx_functions(so: pathlib.Path) -> dict[str, str]:
    """{demangled function: first AVX instruction} over the extension's code."""
    dis = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(so)], capture_output=True, text=True,
                         check=True).stdout
    found, cur = {}, None
    for line in dis.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            cur = head.group(1)
            continue
        parts = line.split("\t")
        if cur is None or len(parts) < 2 or cur in found:
            continue
        insn = parts[-1].strip()
        if insn.startswith(("v", "tile", "ldtilecfg", "sttilecfg")) or AVX.search(insn):
            found[cur] = insn
    return found


def base_name(demangled: str) -> str:
    """The function's own identifier: `ns::(anonymous namespace)::tile_z<6, 4, true>(long, ...)
    [clone .constprop.0]` -> `tile_z` (OpenMP outlined parts: the enclosing function)."""
    s = re.sub(r"\[clone [^\]]*\]|\._omp_fn\.\d+|\.(?:part|cold|constprop|isra)\.\d+", "", demangled)
    depth, cut = 0, len(s)
    for i, c in enumerate(s):  # the parameter list: the last top-level "(" ... ")"
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "(" and depth == 0 and not s[i:].startswith("(anonymous"):
            cut = i
            break
    s = s[:cut]
    s = re.sub(r"<.*>$", "", s).strip()
    return re.split(r"::|\s", s)[-1]


def main() -> int:
    if len(sys.argv) > 1:
        so = pathlib.Path(sys.argv[1])
    else:
        import shvit_kernels._C as ext

        so = pathlib.Path(ext.__file__)
    allowed = targeted_functions()
    found = avx_functions(so)
    bad = {f: insn for f, insn in found.items() if base_name(f) not in allowed}
    print(f"{so.name}: {len(found)} functions with AVX instructions, all in kernels marked for their level"
          if not bad else f"{so.name}: {len(bad)} of {len(found)} functions with AVX instructions are not ISA kernels:")
    for f in sorted(found):
        print(("  ok    " if f not in bad else "  FAIL  ") + f[:110] + ("" if f not in bad else f"   ({bad[f]})"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
