"""``benchmarks/gpu_suite.py`` stays runnable while no GPU is lent: ``--smoke`` runs every check at toy sizes on the
CPU and writes complete records; without CUDA it refuses ``--device cuda`` in one line; the largest-batch search
stops at out-of-memory, at its cap or at the time budget, and lets any other error through."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.py"


def test_the_smoke_run_writes_every_check(tmp_path):
    # A fresh process, as a user runs it (its compile backend stays out of this test process).
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    checks = result["checks"]
    assert set(checks) == {"second_order", "bf16", "train_matrix", "thinking", "generation", "hmc", "train_step",
                           "largest_batch"}
    assert not [name for name, check in checks.items() if "error" in check]
    assert checks["second_order"]["passed"] and checks["second_order"]["max_relative_gradient_difference"] == 0.0
    assert checks["bf16"]["passed"]
    rows = checks["train_matrix"]["rows"]  # one size x one sequence x two precisions x two models
    assert {(r["model"], r["precision"]) for r in rows} == {(m, p) for m in ("transformer_pp", "ebt")
                                                          for p in ("float32", "bf16")}
    for row in rows:
        assert row["tokens_per_second"] > 0 and 0 < row["mfu"] and row["model_flops_per_step"] > 0
    ebt = next(r for r in rows if r["model"] == "ebt")
    transformer = next(r for r in rows if r["model"] == "transformer_pp")
    assert ebt["model_flops_per_step"] > 4 * transformer["model_flops_per_step"]  # 2 descent steps: ~5x the FLOPs
    for row in checks["largest_batch"]["rows"]:  # on the CPU the smoke's cap of 64 tokens (4 sequences) ends it
        assert row["largest"] == 4 and row["stopped"].startswith("cap") and row["result"]["tokens_per_second"] > 0
    assert set(checks["thinking"]["ms_per_step"]) == {"eager", "compiled"} and checks["thinking"]["compile"] == "ready"
    assert set(checks["generation"]["tokens_per_second"]) == {"transformer_pp", "ebt_eager", "ebt_compiled"}
    hmc = checks["hmc"]["rows"]
    assert set(hmc) == {"eager", "compiled energy"}
    assert all(row["ess_squares_min"] > 0 and row["gradient_evaluations"] > 0 for row in hmc.values())
    report = checks["train_step"]["report"]
    assert report["ebt_cached"]["mfu"] > 0 and report["ratio_ebt_cached_to_tpp"] > 1
    assert result["compile_backend"] == "aot_eager" and result["machine"]["device"] == "cpu"
    markdown = (tmp_path / "gpu_suite.md").read_text()
    for heading in ("Smoke run", "Training steps at batch 2", "Largest power-of-two batch", "HMC (ChEES warmup), 64 "
                    "chains", "second order (float64, device vs CPU)", "generation (4xs"):
        assert heading in markdown


def test_the_suite_refuses_a_missing_gpu(load_script, tmp_path):
    suite = load_script("benchmarks/gpu_suite.py", "gpu_suite")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(SystemExit, match="no CUDA device here"):
        suite.main(["--device", "cuda", "--out", str(tmp_path)])
    for bad in (["--device", "tpu"], ["--smoke", "--budget-seconds", "0"]):  # argparse's one line, exit status 2
        with pytest.raises(SystemExit) as exited:
            suite.main([*bad, "--out", str(tmp_path)])
        assert exited.value.code == 2
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_largest_batch_search(load_script):
    suite = load_script("benchmarks/gpu_suite.py", "gpu_suite")
    tried = []

    def fits(batch):
        tried.append(batch)
        if batch > 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"tokens_per_second": float(batch)}

    later = time.perf_counter() + 3600
    found = suite.search_largest(fits, 8, 1024, later)
    assert found == {"largest": 32, "result": {"tokens_per_second": 32.0}, "stopped": "out of memory at batch 64"}
    assert tried == [8, 16, 32, 64]
    assert suite.search_largest(fits, 8, 16, later)["stopped"] == "cap of 16 sequences reached"
    assert suite.search_largest(fits, 8, 1024, time.perf_counter() - 1) == {"largest": None, "result": None,
                                                                            "stopped": "time budget"}

    def broken(batch):
        raise ValueError("a shape mismatch, not memory")

    with pytest.raises(ValueError, match="shape mismatch"):
        suite.search_largest(broken, 8, 1024, later)


def test_a_failing_check_keeps_its_traceback_and_the_others_run(load_script, tmp_path, monkeypatch, capsys):
    # A device run is scarce: a check that breaks there must leave enough to diagnose it, and not cost the rest.
    suite = load_script("benchmarks/gpu_suite.py", "gpu_suite")
    ran = []

    def failing(*_):
        ran.append("thinking")
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ...")

    monkeypatch.setattr(suite, "thinking", failing)
    for name in ("second_order", "bf16", "train_matrix", "generation", "hmc", "train_step", "largest_batch"):
        monkeypatch.setattr(suite, name, lambda *_, name=name: ran.append(name) or {"error": f"{name} skipped here"})
    assert suite.main(["--smoke", "--out", str(tmp_path)]) == 1  # a failed check: exit status 1
    assert len(ran) == 8  # every check ran after the failure
    check = json.loads((tmp_path / "gpu_suite.json").read_text())["checks"]["thinking"]
    assert check["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert check["traceback"].startswith("Traceback (most recent call last)") and "in failing" in check["traceback"]
    assert check["wall_seconds"] >= 0
    assert "in failing" in capsys.readouterr().err  # and on stderr, which the device run's log keeps
    assert "illegal memory access" in (tmp_path / "gpu_suite.md").read_text()


def test_the_device_script_without_its_wheels_says_how_to_get_them(tmp_path):
    script = SCRIPT.parent / "gpu_device.sh"
    done = subprocess.run(["bash", str(script), "run"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "WHEEL_DIR": str(tmp_path / "none")})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"no wheels in {tmp_path / 'none'}/: run 'bash benchmarks/gpu_device.sh prepare' first and carry "
        f"{tmp_path / 'none'}"]
