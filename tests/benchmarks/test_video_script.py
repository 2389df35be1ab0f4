"""Smoke test of ``benchmarks/video.py``: a tiny run times both models, measures their memory in subprocesses and
their rollouts. Timing numbers are not asserted (speed lives in the benchmark's results); what is checked is that
both models ran, the ratios are ratios of the medians, and the report says how it was run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "video.py"


def test_tiny_run_writes_a_complete_report(tmp_path):
    command = [sys.executable, str(SCRIPT), "--frames", "6", "--side", "8", "--batch", "2", "--context", "3",
               "--rollout", "2", "--rounds", "2", "--warmup", "0", "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    record = json.loads((tmp_path / "video.json").read_text())
    report, settings = record["report"], record["settings"]
    assert settings["frames"] == 6 and settings["side"] == 8 and settings["rounds"] == 2
    medians = report["median_step_seconds"]
    assert set(medians) == {"ebt", "transformer"} and all(len(v) == 2 for v in report["step_seconds"].values())
    assert report["ratio_step_ebt_to_transformer"] == pytest.approx(medians["ebt"] / medians["transformer"])
    assert all(value > 0 for value in report["peak_memory_growth_bytes"].values())
    fps = report["rollout_frames_per_second"]
    assert fps["ebt"] == pytest.approx(2 * 2 / report["rollout_seconds"]["ebt"])
    assert "| EBT (System 1, 2 descent steps) |" in (tmp_path / "video.md").read_text()
