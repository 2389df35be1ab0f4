"""The baseline debug recipe end to end (golden loss curve), `energyflow eval`, `compare`, and the CLI."""
from __future__ import annotations

import io
import json
import math

import gin
import pytest
from rich.console import Console

from energyflow.cli import main
from energyflow.configurables import parse_recipe
from energyflow.experiment import evaluate_steps
from energyflow.runs import load_run
from golden_corpus import on_the_recorded_corpus

# First five training losses of experiments/transformer_pp_debug.gin (seed 0, CPU, 1 thread) in float64
# (Trainer.dtype = 'float64'): float64 rounding differences between CPUs and BLAS builds (~1e-16) stay far below
# rel=1e-8 over five first-order steps. Regenerated when the recipe took the EBT reference's initialization
# (N(0, 1) token embeddings, xavier-normal, RMSNorm eps 1e-5); the old values were float32 with N(0, 0.02).
GOLDEN_LOSSES = [5.847135769244013, 5.493174532258366, 5.1133209566276445, 4.643319860117555, 4.3025067739904905]


def _run(cli_args, width=200):
    buffer = io.StringIO()
    status = main(cli_args, console=Console(file=buffer, width=width))
    return status, buffer.getvalue()


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    """The debug recipe exactly as written (20 steps), trained once for the tests below."""
    out = tmp_path_factory.mktemp("debug_run")
    gin.clear_config()
    parse_recipe("experiments/transformer_pp_debug.gin", ["Trainer.progress = False", f"OUT_DIR = '{out}'"])
    result = gin.get_configurable("launch")()
    gin.clear_config()
    return out, result


@on_the_recorded_corpus
def test_golden_loss_curve(tmp_path):
    gin.clear_config()
    parse_recipe("experiments/transformer_pp_debug.gin", ["Trainer.progress = False", f"OUT_DIR = '{tmp_path}'",
                                                           "Trainer.dtype = 'float64'", "NUM_STEPS = 5"])
    losses = [entry["loss"] for entry in gin.get_configurable("launch")().history]
    gin.clear_config()
    # A changed model, init, data order, schedule or loss moves these by far more than 1e-8. (Five steps of
    # the recipe with NUM_STEPS = 5: its own warm-up and cosine over five steps.)
    assert losses == pytest.approx(GOLDEN_LOSSES, rel=1e-8)


def test_the_debug_recipe_learns(debug_run):
    _, result = debug_run
    losses = [entry["loss"] for entry in result.history]
    assert len(losses) == 20 and losses[-1] < losses[0] - 1.5
    for name in ("config.gin", "operative_config.gin", "history.jsonl"):
        assert (debug_run[0] / name).is_file()


def test_eval_rebuilds_the_run_from_its_operative_config(debug_run):
    out, result = debug_run
    rebuilt, trainer, step = load_run(out, device="cpu")
    assert step == 20 and trainer.num_steps == 20
    assert evaluate_steps(rebuilt, [1, 2]) == {None: result.validation}  # one row: the baseline ignores steps
    status, text = _run(["eval", str(out)])
    assert status == 0 and f"{result.validation['loss']:.4f}" in text and "(step 20)" in text
    path = out.parent / "eval.json"  # --json: what it prints, every metric, for a one-shot text task too
    status, _ = _run(["eval", str(out), "--json", str(path)])
    (written,) = json.loads(path.read_text())["runs"].values()
    assert status == 0 and written["steps"] == {"-": pytest.approx(result.validation)}
    status, text = _run(["eval", str(out), "--json", "/proc/no-such-dir/eval.json"])  # refused before evaluating
    assert status == 1 and "cannot write --json" in text and "Traceback" not in text


def test_compare_trains_scoped_runs_and_prints_a_table(tmp_path, capsys):
    recipe = tmp_path / "compare.gin"
    recipe.write_text("# two seeds of the debug baseline\ninclude 'experiments/transformer_pp_debug.gin'\n"
                      "NUM_STEPS = 2\nTrainer.progress = False\nlaunch.program = @compare\n"
                      "compare.out_dir = %OUT_DIR\ncompare.runs = ['one', 'two']\ncompare.eval_steps = [1, 2]\n"
                      "two/transformer_preset.size = '3xs'\n")
    status, _ = _run(["train", str(recipe), "--out", str(tmp_path / "out")])
    assert status == 0
    text = capsys.readouterr().out  # compare prints its table on the main process's stdout
    rows = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith(("│ one", "│ two"))]
    assert [[cell.strip() for cell in row[:2]] for row in rows] == [["one", "-"], ["two", "-"]]
    one, two = (float(row[2]) for row in rows)
    assert one != two
    # `eval` must rebuild run two inside its scope (a 3xs model) or the checkpoint would be refused
    by_steps = evaluate_steps(load_run(tmp_path / "out" / "two", device="cpu")[0], [1])
    assert by_steps[None]["loss"] == pytest.approx(two, abs=1e-4)
    assert math.isfinite(by_steps[None]["perplexity"])


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["recipes"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    assert "usage: energyflow" in capsys.readouterr().out


def test_recipes_lists_descriptions():
    status, text = _run(["recipes"], width=300)
    assert status == 0
    assert "experiments/transformer_pp_debug.gin" in text and "debug variant" in text


def test_cli_reports_errors_with_exit_status_1(tmp_path):
    status, text = _run(["train", "experiments/transformer_pp_debug.gin", "--bind", "Trainer.sed = 1",
                         "--out", str(tmp_path)])
    assert status == 1 and "doesn't have a parameter named 'sed'" in text
    status, text = _run(["train", "experiments/missing"])
    assert status == 1 and "no recipe" in text
    status, text = _run(["eval", str(tmp_path)])
    assert status == 1 and "not a run directory" in text


def test_tables_print_the_metrics_each_task_reports():
    """No hard-coded perplexity column: a run shows its task's ``table_metrics``; another's columns read "-"."""
    from energyflow.experiment import comparison_table

    results = {"text": {None: {"loss": 1.5, "perplexity": 4.4817}}, "image": {1: {"loss": 0.25, "psnr": 21.5}}}
    table = comparison_table(results, {"text": {}, "image": {"descent": "state"}},
                             {"text": ("loss", "perplexity"), "image": ("loss", "psnr")})
    buffer = io.StringIO()
    Console(file=buffer, width=200).print(table)
    text = buffer.getvalue()
    header = next(line for line in text.splitlines() if line.startswith("┃ run"))
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["run", "optimization steps", "loss", "perplexity",
                                                                 "psnr", "descent"]
    rows = {row[0]: row for row in ([cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines()
                                    if line.startswith(("│ text", "│ image")))}
    assert rows["text"] == ["text", "-", "1.5000", "4.482", "-", "-"]
    assert rows["image"] == ["image", "1", "0.2500", "-", "21.500", "state"]  # PSNR in dB, three decimals


def test_a_configurable_refusing_its_setting_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    status, printed = _run(["train", "experiments/ebt_system1_debug.gin", "--out", str(out),
                            "--bind", "DESCENT_SPACE = 'simplex'"])
    assert status == 1 and "Traceback" not in printed
    assert "descent_space must be 'probabilities'" in printed and "in configurable 'EBTObjective'" in printed
    assert not out.exists()
    with pytest.raises(ValueError, match="descent_space"):  # --debug re-raises with the traceback
        main(["--debug", "train", "experiments/ebt_system1_debug.gin", "--out", str(out),
              "--bind", "DESCENT_SPACE = 'simplex'"], console=Console(file=io.StringIO()))
