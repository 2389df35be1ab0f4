"""Smoke test of ``benchmarks/train_step.py``: a tiny CPU run writes a complete JSON and markdown report.

Timing numbers are not asserted (speed lives in the benchmark's own results); what is checked is that every
variant ran, the ratios are the ratios of the medians, and the report says how it was run.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_step.py"
VARIANTS = {"transformer_pp", "transformer_pp_fused", "ebt_cached", "ebt_cached_math_context", "ebt_uncached"}


def test_tiny_cpu_run_writes_a_complete_report(tmp_path):
    command = [sys.executable, str(SCRIPT), "--size", "4xs", "--seq-len", "16", "--batch-size", "2", "--rounds", "2",
               "--warmup", "0", "--threads", "1", "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "train_step_cpu.json").read_text())
    report, settings = result["report"], result["settings"]
    assert settings["flush_denormal"] is True and settings["size"] == "4xs" and settings["rounds"] == 2
    assert set(report["median_step_seconds"]) == VARIANTS
    assert all(len(times) == 2 and min(times) > 0 for times in report["step_seconds"].values())
    medians = report["median_step_seconds"]
    baseline = report["headline_baseline"]
    assert baseline == min(("transformer_pp", "transformer_pp_fused"), key=medians.get)
    assert report["ratio_ebt_cached_to_tpp"] == pytest.approx(medians["ebt_cached"] / medians[baseline])
    assert report["speedup_cached_over_uncached"] == pytest.approx(medians["ebt_uncached"] / medians["ebt_cached"])
    assert set(report["peak_memory_growth_bytes"]) == VARIANTS
    markdown = (tmp_path / "train_step_cpu.md").read_text()
    assert "denormals flushed to zero" in markdown and "| ebt_cached |" in markdown


def test_cuda_mode_without_a_gpu_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    completed = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0 and "no CUDA device is available" in completed.stderr
    assert not any(tmp_path.iterdir())  # nothing written
