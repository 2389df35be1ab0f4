"""The quickstart: `energyflow train recipes/experiments/quickstart.gin` trains the Transformer++ baseline and a
small EBT and ends with a table of validation losses (baseline; EBT at 1, 2, 4, 8 descent steps)."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from energyflow.cli import main


def _table_rows(recipe: str, out, capsys) -> dict[tuple[str, str], float]:
    status = main(["train", recipe, "--out", str(out), "--bind", "Trainer.progress = False"],
                  console=Console(file=io.StringIO(), width=200))
    assert status == 0
    text = capsys.readouterr().out  # compare prints its table on stdout
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines()
            if line.startswith(("│ baseline", "│ ebt"))]
    return {(row[0], row[1]): float(row[2]) for row in rows}


def test_quickstart_debug_prints_the_comparison_table(tmp_path, capsys):
    rows = _table_rows("recipes/experiments/quickstart_debug.gin", tmp_path / "quickstart", capsys)
    assert list(rows) == [("baseline", "-"), ("ebt", "1"), ("ebt", "2"), ("ebt", "4"), ("ebt", "8")]
    assert all(loss > 0 for loss in rows.values())


@pytest.mark.slow
def test_full_quickstart_second_step_pays_off(tmp_path, capsys):
    """The full recipe (minutes): the EBT's validation loss at 2 steps is below its loss at 1 step."""
    rows = _table_rows("recipes/experiments/quickstart.gin", tmp_path / "quickstart", capsys)
    assert rows[("ebt", "2")] < rows[("ebt", "1")]
