"""``scripts/scaling_fit.py``: slopes recovered from a known power law, their intervals, the FLOP count."""
from __future__ import annotations

import math
import random

import pytest


def test_a_power_law_slope_is_recovered_with_an_honest_interval(load_script):
    script = load_script("scripts/scaling_fit.py")
    x = [1e4, 2e4, 4e4, 8e4] * 3
    exact = script.fit_slope(x, [5.0 * v ** -0.2 for v in x])
    assert exact.slope == pytest.approx(-0.2, abs=1e-12) and exact.stderr == pytest.approx(0.0, abs=1e-12)
    rng = random.Random(0)  # multiplicative noise of 2%: the interval holds the true slope in ~95% of draws
    covered = 0
    for _ in range(200):
        fit = script.fit_slope(x, [5.0 * v ** -0.2 * math.exp(rng.gauss(0.0, 0.02)) for v in x])
        covered += fit.low <= -0.2 <= fit.high
    assert 180 <= covered <= 200  # 95% of 200 is 190; the binomial sd is ~3
    ratio, low, high = script.slope_ratio(script.Fit(-0.27, 0.01, 0, 0, 12), script.Fit(-0.2, 0.01, 0, 0, 12))
    assert ratio == pytest.approx(1.35) and low < 1.35 < high
    with pytest.raises(ValueError, match="at least 3 points"):
        script.fit_slope([1.0, 2.0], [1.0, 2.0])


def test_the_ebt_flop_count_is_five_transformer_passes_at_two_steps(load_script):
    script = load_script("scripts/scaling_fit.py")
    base = script.training_flops("baseline", 1000.0, 10_000, 2, 64, 128)
    assert base == pytest.approx(3 * (2 * 10_000 + 2 * 2 * 64 * 128) * 1000.0)
    assert script.training_flops("ebt", 1000.0, 10_000, 2, 64, 128, descent_steps=2) == pytest.approx(5 * base)


def test_a_tiny_data_sweep_is_fitted_end_to_end(tmp_path, load_script):
    """Three budgets of the quickstart's debug variant through `energyflow sweep`, then the fit: every run is
    rebuilt, counted (tokens = steps x batch x context) and fitted."""
    import json

    from energyflow.cli import main

    out = tmp_path / "sweep"
    assert main(["sweep", "experiments/quickstart_debug.gin", "--axis", "NUM_STEPS = [2, 4, 8]", "--bind",
                 "compare.eval_steps = [2]", "--out", str(out), "--threads-per-trial", "1"]) == 0
    script = load_script("scripts/scaling_fit.py")
    assert script.main([str(out)]) == 0
    payload = json.loads((out / "scaling.json").read_text())
    tokens = sorted({p["tokens"] for p in payload["points"] if p["model"] == "baseline"})
    assert tokens == [2 * 4 * 16, 4 * 4 * 16, 8 * 4 * 16]  # steps x batch 4 x 16-byte context
    assert {"tokens", "flops"} <= set(payload["fits"]) and "| tokens |" in (out / "scaling.md").read_text()


def test_a_ratio_to_a_flat_baseline_is_reported_undefined(load_script):
    script = load_script("scripts/scaling_fit.py")
    points = []
    for seed, noise in enumerate((0.01, -0.01, 0.0)):
        for flops in (1e11, 1e12, 1e13):
            points.append(script.Point("t", "baseline", seed, 1.8 * math.exp(noise * (1 if flops > 5e11 else -1)),
                                       1e5, flops, None, 1))
            points.append(script.Point("t", "ebt", seed, 3.0 * flops ** -0.05 * math.exp(noise), 1e5, 7 * flops, None, 1))
    text, payload = script.report(points, "sweep")
    assert "undefined: the Transformer++'s slope is not distinguishable from 0" in text
    assert payload["fits"]["flops"]["ratio"] is None
