"""Smoke test of ``benchmarks/image_denoising.py``: a tiny run times the four operations and reads the quality
of a trained debug experiment. Timing numbers are not asserted (speed lives in the benchmark's results); what
is checked is that every operation ran, the ratios are ratios to one DiT pass, and the quality rows are
``energyflow eval``'s numbers."""
from __future__ import annotations

import json

import gin
import pytest

from energyflow.configurables import parse_recipe

pytest.importorskip("sklearn", reason="the images extra: pip install 'energyflow[images]'")


def test_tiny_run_writes_speed_and_quality(tmp_path, load_script):
    runs = tmp_path / "runs"
    gin.clear_config()
    parse_recipe("experiments/image_denoising_debug.gin", ["Trainer.progress = False", f"OUT_DIR = '{runs}'"])
    compared = gin.get_configurable("launch")()
    gin.clear_config()
    benchmark = load_script("benchmarks/image_denoising.py", "image_denoising_benchmark")
    out = tmp_path / "results"
    assert benchmark.main(["--size", "4xs", "--image-size", "8", "--patch-size", "2", "--batch", "2", "--rounds", "2",
                           "--runs", str(runs), "--out", str(out)]) == 0
    record = json.loads((out / "image_denoising.json").read_text())
    assert set(record["seconds"]) == set(benchmark.OPERATIONS) and min(record["seconds"].values()) > 0
    assert record["ratio_to_dit_forward"]["dit_sampling_step"] == 1.0
    quality = record["quality"]
    assert quality["ebt"]["steps"]["1"]["psnr@0.1"] == pytest.approx(compared["ebt"][1]["psnr@0.1"], rel=1e-9)
    assert sorted(quality["dit"]["steps"], key=int) == ["1", "2", "5"]
    table = (out / "image_denoising.md").read_text()
    assert "| noisy input | 0 |" in table and "| EBT | 1 | 1 | 1 |" in table and "| DIT | 5 | 5 | 0 |" in table
