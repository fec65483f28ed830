"""The benchmark harness itself: the CPU timer, the heap setting and both benchmark scripts on
tiny settings (so that the README's main job cannot break unnoticed)."""
from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import pytest
import torch

import shvit_kernels
from benchmarks import bench_model, bench_shsa, report, runtimes
from benchmarks.common import configure_allocator, time_cpu_interleaved


def test_interleaved_timer_alternates_calls_and_pairs_them():
    calls = []
    fns = {
        "fast": lambda: calls.append("fast"),
        "slow": lambda: (calls.append("slow"), time.sleep(0.002)),
        "other": lambda: calls.append("other"),
    }
    t = time_cpu_interleaved(fns, min_time=0.0, min_reps=4, warmup=0)
    assert [t[n]["reps"] for n in fns] == [4, 4, 4]
    # one call of each provider per round, the order rotating from round to round
    rounds = [calls[i:i + 3] for i in range(0, 12, 3)]
    assert all(sorted(r) == ["fast", "other", "slow"] for r in rounds)
    assert [r[0] for r in rounds] == ["fast", "slow", "other", "fast"]
    assert t["fast"]["paired_ratio"] == 1.0
    assert t["slow"]["median_s"] >= 0.002 and t["slow"]["paired_ratio"] > 1.0
    assert t["slow"]["min_s"] <= t["slow"]["median_s"]


def test_interleaved_timer_runs_each_provider_for_min_time():
    t = time_cpu_interleaved({"a": lambda: time.sleep(0.001), "b": lambda: None}, min_time=0.02, min_reps=1,
                             warmup=0)
    assert t["a"]["total_s"] >= 0.02  # until the slowest provider has run for min_time
    assert t["a"]["reps"] == t["b"]["reps"]  # one call each per round


def test_interleaved_timer_turns_for_threaded_runs():
    """With ``turn_s`` each provider runs for that long per turn; the first call of a turn (the
    one that meets the previous provider's spinning threads) is not counted."""
    calls = []
    fns = {n: (lambda n=n: (calls.append(n), time.sleep(0.001))) for n in ("a", "b")}
    t = time_cpu_interleaved(fns, min_time=0.03, min_reps=1, warmup=0, turn_s=0.005)
    turns = calls.count("a") - t["a"]["reps"]
    assert turns >= 1 and calls.count("b") - t["b"]["reps"] == turns  # one uncounted call per turn
    assert t["a"]["reps"] >= 4 * turns  # 5 ms of 1 ms calls per turn
    assert 0.5 < t["b"]["paired_ratio"] < 2.0


def test_configure_allocator_modes():
    with pytest.raises(ValueError, match="steady"):
        configure_allocator("fast")
    assert "default" in configure_allocator("default")
    steady = configure_allocator("steady")
    if platform.libc_ver()[0] == "glibc":
        assert steady.startswith("glibc steady heap")
    else:
        assert "default" in steady


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU protocol")
def test_bench_shsa_writes_results(tmp_path):
    before = torch.get_num_threads()
    try:
        rows = bench_shsa.main(["--device", "cpu", "--cases", "s4-stage3-256px", "--batch", "2", "--min-time", "0",
                                "--out", str(tmp_path / "shsa")])
    finally:
        torch.set_num_threads(before)
    data = json.loads((tmp_path / "shsa.json").read_text())
    assert data["machine"]["allocator"] and data["machine"]["backend"]
    modes = {r["mode"] for r in rows}
    assert {"inference", "train-forward", "train-backward", "train-forward+backward", "module-inference",
            "module-train-forward+backward"} <= modes
    assert all(r["eager_ms"] > 0 and r["fused_ms"] > 0 for r in rows)
    assert (tmp_path / "shsa.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU protocol")
def test_bench_model_writes_results(tmp_path):
    before = torch.get_num_threads()
    try:
        rows = bench_model.main(["--variants", "shvit_s1", "--train-variants", "shvit_s1", "--batch", "1",
                                 "--train-batch", "2", "--no-compile", "--extra-settings", "--min-time", "0",
                                 "--out", str(tmp_path / "model")])
    finally:
        torch.set_num_threads(before)
    data = json.loads((tmp_path / "model.json").read_text())
    assert data["machine"]["allocator"]
    assert isinstance(data["machine"]["cpu_flags"], list)
    providers = {(r.get("kind", "inference"), r["provider"]) for r in rows}
    assert {("inference", "eager"), ("inference", "fused+fuse"), ("train-step", "fused")} <= providers
    inference = {r["provider"]: r for r in rows if r["kind"] == "inference"}
    expected = {"eager-bf16", "fused-bf16", *runtimes.available()}
    if "openvino" in expected and shvit_kernels.onednn.bf16_hardware():
        expected.add("openvino-bf16")
    assert expected <= set(inference)
    for name, r in inference.items():  # every provider computes the same network
        assert r["max_rel_err"] < (0.1 if "bf16" in name else 1e-4), (name, r["max_rel_err"])
        assert r["gflops"] > 0
    # the report renders every table of the file
    for view in (report.model_table, report.bf16_table, report.error_table):
        assert "fused" in view(data)


def test_gpu_check_dry_run(tmp_path):
    """The lent-GPU script end to end on CPU (``--dry-run``): every step runs and passes, and
    each result file lands under $OUT, so a GPU session is not spent on a broken script."""
    pytest.importorskip("triton.backends.nvidia")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "all steps passed" in (tmp_path / "status.txt").read_text()
    for name in ["env.txt", "gpu_compile.json", "gpu_compile.md", "tests.log", "shsa_cuda.json", "model_cuda.json"]:
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "gpu_compile.json").read_text())["rows"]
