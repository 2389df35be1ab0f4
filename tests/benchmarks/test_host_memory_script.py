"""Smoke test of ``benchmarks/host_memory.py``: a tiny run writes a complete report, every cell measured.

No timing is asserted (speed lives in the benchmark's results): what is checked is that each (variant,
allocator) cell ran in its own subprocess, the retaining mode took effect where glibc allows it, and the
ratios are those of the medians.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from energyflow import host_memory

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "host_memory.py"


def test_tiny_run_writes_a_complete_report(tmp_path):
    command = [sys.executable, str(SCRIPT), "--size", "4xs", "--seq-len", "16", "--batch-size", "2", "--steps", "1",
               "--rounds", "1", "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "host_memory.json").read_text())["report"]
    cells = {f"{v}/{m}" for v in ("transformer_pp_fused", "ebt_cached") for m in ("retained", "returned")}
    assert set(report["runs"]) == set(report["median"]) == cells
    assert all(len(runs) == 1 and runs[0]["step_seconds"][0] > 0 for runs in report["runs"].values())
    assert report["retained_took_effect"] is (host_memory._glibc() is not None)
    assert not any(run["retained"] for run in report["runs"]["ebt_cached/returned"])
    seconds = {key: value["step_seconds"] for key, value in report["median"].items()}
    assert report["speedup_retained"]["ebt_cached"] == pytest.approx(
        seconds["ebt_cached/returned"] / seconds["ebt_cached/retained"])
    assert "| ebt_cached/retained |" in (tmp_path / "host_memory.md").read_text()
