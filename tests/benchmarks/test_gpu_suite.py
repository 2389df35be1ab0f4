"""``benchmarks/gpu_suite.py`` stays runnable while no GPU is lent: without CUDA it refuses ``--device cuda`` in one
line, and its device-against-CPU second-order check runs (here the CPU against itself, exactly equal)."""
from __future__ import annotations

import pytest
import torch


def test_the_suite_refuses_a_missing_gpu_and_its_second_order_check_runs(load_script, tmp_path):
    suite = load_script("benchmarks/gpu_suite.py", "gpu_suite")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device here"):
            suite.main(["--device", "cuda", "--out", str(tmp_path)])
    check = suite.second_order(torch.device("cpu"), tiny=True)
    assert check["passed"] and check["max_relative_gradient_difference"] == 0.0
    text = suite.markdown({"device": suite.device_info(torch.device("cpu")), "checks": {"second_order": check}})
    assert "second order (float64, device vs CPU)" in text and "pass" in text
