"""``scripts/ablation_thinking.py``: the thinking gain per variant of a sweep, on a tiny sweep of the System 1
debug EBT (2 variants x 2 seeds)."""
from __future__ import annotations

import json

import pytest

from energyflow.cli import main


def test_gains_per_variant_are_the_trials_own_losses(tmp_path, load_script):
    out = tmp_path / "sweep"
    assert main(["sweep", "experiments/ebt_system1_debug.gin", "--axis", "GradientDescent.step_size = [5.0, 20.0]",
                 "--seeds", "0,1", "--out", str(out), "--workers", "2", "--threads-per-trial", "1"]) == 0
    script = load_script("scripts/ablation_thinking.py")
    assert script.main([str(out), "--steps", "1", "3", "--batches", "1", "--batch-size", "2"]) == 0
    payload = json.loads((out / "thinking.json").read_text())
    # without a variant axis every trial is its own row
    assert sorted(payload) == ["step_size=20.0,seed=0", "step_size=20.0,seed=1", "step_size=5.0,seed=0",
                               "step_size=5.0,seed=1"]
    first = next(iter(payload.values()))
    for name, values in first.items():
        assert len(values["gain"]) == len(values["loss_short"]) >= 1
    direct = script.trial_losses(out / "step_size=5.0,seed=0", (1, 3), 1, 2)
    for name in direct:
        assert payload["step_size=5.0,seed=0"][name]["gain"] == [pytest.approx(direct[name][1] - direct[name][3])]
    assert "| variant | seeds |" in (out / "thinking.md").read_text()
