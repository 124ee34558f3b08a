"""bench/threads.py in miniature, so it cannot rot: a real daemon, real function processes
of threads, this checkout beside the in-order revision of its history."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@pytest.fixture
def bench_threads(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "")  # the bench extends it for the processes it starts
    monkeypatch.syspath_prepend(str(BENCH))
    import threads

    return threads


def _has_revision(revision: str) -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{revision}^{{commit}}"],
                          capture_output=True).returncode == 0


def test_the_warm_phase_runs_every_client_and_writes_its_report(bench_threads, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(BENCH / "threads.py"), "--threads", "4", "--models", "4", "--model-mib", "1",
               "--seconds", "1", "--phases", "warm", "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert finished.returncode == 0, finished.stderr[-3000:]

    warm = json.loads((out / "threads.json").read_text())["warm"]
    expected = {"one thread", "shared", "per-thread"}
    if _has_revision(bench_threads.IN_ORDER_REVISION):
        expected |= {"one thread, in order", "in order"}
    assert set(warm) == expected
    for row in warm.values():
        assert row["requests"] > 0 and row["ran_out_of_time"] == 0
        assert len(row["open_cdf_ms"]) == 101 and row["open_cdf_ms"] == sorted(row["open_cdf_ms"])
        assert row["open_ms"]["p50"] <= row["request_ms"]["p99"]
    assert warm["one thread"]["ping_ms"]["p50"] > 0
    report = (out / "threads.md").read_text()
    assert "| warm | one client shared by every thread |" in report and "a client per thread" in report
    assert (out / "threads.png").stat().st_size > 0


def test_under_pressure_threads_sharing_a_client_never_run_out_of_time(bench_threads, tmp_path, monkeypatch):
    """Host memory for 2 of 4 models and 4 threads: opens wait for the others' releases, which
    the shared connection carries past them. (The in-order client is left out: its stalls
    last the whole busy timeout.)"""
    monkeypatch.setattr(bench_threads, "IN_ORDER_REVISION", "0" * 40)
    results = bench_threads.measure(tmp_path, threads=4, models=4, model_bytes=2**20, resident=2, seconds=1.0,
                                    busy_timeout=30.0, phases=["pressure"])
    pressure = results["pressure"]
    assert set(pressure) == {"shared", "per-thread"}
    for row in pressure.values():
        assert row["requests"] > 0 and row["ran_out_of_time"] == 0
