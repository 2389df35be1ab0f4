"""Smoke test of the parity scripts: ``scripts/parity.py`` trains the quickstart recipe under a setting and
rule and writes its validation losses; ``scripts/parity_table.py`` reads those files beside the reference
driver's and prints the table of docs/fidelity.md (means and every seed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_parity_run_and_table(tmp_path):
    out = tmp_path / "ef_s1_l_s3.json"
    command = [sys.executable, str(SCRIPTS / "parity.py"), "--setting", "system1", "--seed", "3", "--steps", "2",
               "--descent-space", "logits", "--runs", "ebt", "--bind", "SEQ_LEN = 16", "--bind",
               "Trainer.batch_size = 4", "--bind", "Trainer.eval_batches = 1", "--out", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["descent_space"] == "logits" and report["steps"] == 2 and report["seed"] == 3
    assert "GradientDescent.step_size = 500.0" in report["bindings"]  # the System 1 setting was applied
    assert set(report["validation"]) == {"ebt"} and set(report["validation"]["ebt"]) == {"1", "2", "4", "8"}
    # a reference result in the driver's format, two seeds
    for seed, loss in ((3, 2.5), (4, 2.7)):
        (tmp_path / f"ref_s1_ebt_s{seed}.json").write_text(json.dumps({"validation": {"1": loss, "2": loss - 0.1,
                                                                                      "4": loss, "8": loss}}))
    table = subprocess.run([sys.executable, str(SCRIPTS / "parity_table.py"), str(tmp_path)], capture_output=True,
                           text=True, timeout=60, check=True).stdout
    rows = [line for line in table.splitlines() if line.startswith("| paper System 1")]
    assert len(rows) == 2
    assert "| reference code | 3, 4 |" in rows[0] and "**2.500** (2.400 / 2.600)" in rows[0]
    two_steps = report["validation"]["ebt"]["2"]
    assert "| energyflow, `logits` | 3 |" in rows[1] and f"**{two_steps:.3f}** ({two_steps:.3f})" in rows[1]
