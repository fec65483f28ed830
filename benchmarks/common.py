"""Shared benchmark plumbing: machine description, CPU timing, result files."""
from __future__ import annotations

import csv
import ctypes
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable

import torch

RESULTS = pathlib.Path(__file__).parent / "results"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20


def configure_allocator(mode: str) -> str:
    """Set up the C heap for CPU timing; returns what the results record as ``allocator``.

    ``"steady"`` (the benchmarks' default): glibc keeps freed blocks of up to 32 MiB in its
    heap instead of returning them to the system (mmap threshold 32 MiB, no trimming), so
    every call reuses memory that is already mapped. With glibc's defaults, each call of an
    eager block maps fresh pages for its activations, and on a virtual machine, where a page
    fault is expensive, that cost varies between runs and dominates the memory-bound passes:
    SHViT-S4's residual SHSA block at 14x14 tokens, batch 16, one thread, took 34-43 ms per
    eager call with the defaults and 20-22 ms with a steady heap (2-core AMD EPYC VM). The
    setting is what jemalloc or tcmalloc, which CPU tuning guides recommend for PyTorch, give.
    ``"default"``: glibc's own behaviour, for comparison. Call before the timed allocations.
    """
    if mode == "default":
        return "glibc default" if platform.libc_ver()[0] == "glibc" else "system default"
    if mode != "steady":
        raise ValueError(f"allocator mode must be 'steady' or 'default', got {mode!r}")
    if platform.libc_ver()[0] != "glibc":
        return "system default (steady heap needs glibc)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "glibc default (mallopt not found)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) != 1 or mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "glibc default (mallopt refused)"
    return "glibc steady heap (mmap threshold 32 MiB, no trim)"


# the CPU features that decide which kernels run (AVX2/AVX-512 for ours, AVX512-BF16 and AMX
# for oneDNN's bfloat16 GEMMs)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "asimd", "sve")


def cpu_flags() -> list[str]:
    """The flags of ``CPU_FLAGS`` that /proc/cpuinfo lists (empty where it cannot be read)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FLAGS if f in have]
    except OSError:
        pass
    return []


def machine_info() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = dict(
        cpu=cpu_model(),
        cpu_flags=cpu_flags(),
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        triton=triton_version,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    try:  # the vector width ATen's own CPU kernels dispatch to (eager's side of the tables)
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        pass
    from shvit_kernels import _cpp

    # the instruction-set level the C++ kernels run at (cpu_isa.h)
    info["cpu_isa"] = _cpp.isa() if _cpp.available() else "not built"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(info: dict) -> str:
    dev = f"GPU {info['gpu']}, " if "gpu" in info else ""
    return (
        f"{dev}CPU {info['cpu']} ({info['cores']} cores"
        + (f"; {' '.join(info['cpu_flags'])}" if info.get("cpu_flags") else "")
        + f"), {info['threads']} thread(s), "
        f"torch {info['torch']}, triton {info['triton'] or 'not installed'}, {info['date']}"
        + (f", allocator: {info['allocator']}" if info.get("allocator") else "")
        + (
            f", CPU kernels: ATen {info['torch_cpu_capability']}, shvit_kernels {info['cpu_isa']}"
            if info.get("torch_cpu_capability") and info.get("cpu_isa")
            else ""
        )
    )


def time_cpu(fn: Callable[[], object], min_reps: int = 5, min_time: float = 2.0, warmup: int = 2) -> dict:
    """Median wall time of ``fn`` over at least ``min_reps`` calls and ``min_time`` seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return dict(median_s=statistics.median(times), min_s=times[0], reps=len(times))


def time_cpu_interleaved(fns: dict[str, Callable[[], object]], min_time: float = 2.0, min_reps: int = 5,
                         warmup: int = 2, turn_s: float = 0.0) -> dict[str, dict]:
    """Median (and min, total) wall time of each callable, the providers taking turns (the
    order rotating each round, every provider one turn per round) until the slowest has run
    for ``min_time`` seconds and each at least ``min_reps`` times.

    A shared VM changes speed within a second (the same eager call took 10 ms and 18 ms in
    neighbouring tenths of a second on the benchmark machine); alternating single calls puts
    every provider into the same slow and fast phases, which rounds of many calls per provider
    did not (a ratio moved from 1.4 to 1.1 between two runs). ``turn_s`` = 0: a turn is one
    call. ``turn_s`` > 0, for multi-threaded runs: a turn is calls for ``turn_s`` seconds, its
    first call not counted. A runtime's worker threads spin-wait after its call (ONNX Runtime's
    intra-op pool, PyTorch's OpenMP threads), and on a machine with as many cores as threads
    they take a core from whatever runs next: fused S1 at batch 16 on two threads, alternating
    call by call with ONNX Runtime, had a median of 102 ms, and 72 ms with ONNX Runtime's
    spinning turned off. ``paired_ratio`` in each entry: the median over rounds of this
    provider's median time in the round divided by the first provider's."""
    names = list(fns)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in names}
    turns: dict[str, list[float]] = {name: [] for name in names}
    spent = dict.fromkeys(names, 0.0)
    rnd = 0
    while max(spent.values()) < min_time or min(len(v) for v in samples.values()) < min_reps:
        for i in range(len(names)):
            name = names[(rnd + i) % len(names)]
            if turn_s > 0:
                fns[name]()  # meets the previous provider's spinning threads: not counted
            times: list[float] = []
            start = time.perf_counter()
            while not times or time.perf_counter() - start < turn_s:
                t0 = time.perf_counter()
                fns[name]()
                times.append(time.perf_counter() - t0)
            samples[name] += times
            turns[name].append(statistics.median(times))
            spent[name] += sum(times)
        rnd += 1
    first = turns[names[0]]
    return {
        name: dict(median_s=statistics.median(ts), min_s=min(ts), reps=len(ts), total_s=sum(ts),
                   paired_ratio=statistics.median(t / f for t, f in zip(turns[name], first)))
        for name, ts in samples.items()
    }


def write_results(name: str, info: dict, rows: list[dict], directory: pathlib.Path | None = None) -> pathlib.Path:
    """``<name>.json`` (machine + rows) and ``<name>.csv`` (one line per row, machine fields
    repeated) under ``directory`` (default ``benchmarks/results``); returns the JSON path."""
    directory = pathlib.Path(directory) if directory is not None else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(dict(machine=info, rows=rows), indent=2) + "\n")
    fields = list(dict.fromkeys(k for r in rows for k in r))
    machine_fields = [f"machine_{k}" for k in info]
    with open(directory / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields + machine_fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{f"machine_{k}": v for k, v in info.items()}})
    return path


class Progress:
    """A one-line progress bar on stderr (``[#####-----] 5/10 label  1m02s``); one line per
    step when stderr is not a terminal (CI logs)."""

    def __init__(self, total: int, width: int = 24):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        """Announce the step about to run."""
        filled = int(self.width * self.done / self.total)
        elapsed = int(time.perf_counter() - self.start)
        bar = "#" * filled + "-" * (self.width - filled)
        text = f"[{bar}] {self.done + 1}/{self.total} {label}  {elapsed // 60}m{elapsed % 60:02d}s"
        if self.tty:
            sys.stderr.write("\r" + text.ljust(100))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()
        self.done += 1

    def close(self) -> None:
        elapsed = int(time.perf_counter() - self.start)
        sys.stderr.write(("\r" if self.tty else "") + f"[{'#' * self.width}] done in {elapsed // 60}m{elapsed % 60:02d}s".ljust(100) + "\n")
        sys.stderr.flush()


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])
