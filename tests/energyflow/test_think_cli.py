"""`energyflow generate` and `energyflow think` on real (one-step) debug runs of the EBT and the baseline."""
import io
import json

import gin
import pytest
from rich.console import Console

from energyflow.cli import main
from energyflow.config import parse_recipe

RUN_BINDINGS = ["Trainer.progress = False", "NUM_STEPS = 1", "SEQ_LEN = 16", "Trainer.eval_batches = 1",
                "Trainer.batch_size = 2"]


def _run(cli_args):
    buffer = io.StringIO()
    status = main(cli_args, console=Console(file=buffer, width=200))
    return status, buffer.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-step runs of the EBT and Transformer++ debug recipes (what the commands load is what matters)."""
    out = {}
    for name, recipe in (("ebt", "experiments/ebt_system1_debug.gin"), ("tpp", "experiments/transformer_pp_debug.gin")):
        out[name] = tmp_path_factory.mktemp(name)
        gin.clear_config()
        parse_recipe(recipe, RUN_BINDINGS + [f"OUT_DIR = '{out[name]}'"])
        gin.get_configurable("launch")()
    gin.clear_config()
    return out


def test_generate_with_the_ebt_and_the_baseline(runs, tmp_path):
    html_path = tmp_path / "continuation.html"
    status, text = _run(["generate", str(runs["ebt"]), "--prompt", "The <list>", "--max-new", "5", "--samples", "2",
                         "--steps", "2", "--html", str(html_path)])
    assert status == 0 and text.startswith("The <list>") and "5 tokens in" in text
    assert html_path.is_file() and "title=\"energy" in html_path.read_text()
    status, text = _run(["generate", str(runs["tpp"]), "--prompt", "The", "--max-new", "4", "--strategy", "sample",
                         "--temperature", "0.7", "--top-p", "0.9"])
    assert status == 0 and text.startswith("The") and "4 tokens in" in text


def test_generate_refuses_a_prompt_that_does_not_fit(runs):
    status, text = _run(["generate", str(runs["ebt"]), "--prompt", "x" * 10, "--max-new", "10"])
    assert status == 1 and "max_seq_len=16" in text and "--max-new" in text


def test_think_prints_a_table_and_writes_plots(runs, tmp_path):
    data = tmp_path / "code.py"
    data.write_text("def f(x):\n    return x + 1\n" * 20)
    status, text = _run(["think", str(runs["ebt"]), "--baseline", str(runs["tpp"]), "--steps", "1,2",
                         "--samples", "1,2", "--data", str(data), "--batches", "1", "--batch-size", "2",
                         "--accept-if-lower", "--out", str(tmp_path / "think")])
    assert status == 0 and "Transformer++" in text and "2 steps" in text
    saved = json.loads((tmp_path / "think" / "think.json").read_text())
    assert saved["steps"] == [1, 2] and saved["samples"] == [1, 2] and saved["baseline_loss"] > 0
    for name in ("loss_vs_steps.png", "verification_gain.png", "energy_vs_step.png"):
        assert (tmp_path / "think" / name).is_file()


def test_think_refuses_a_baseline_run_and_bad_lists(runs):
    status, text = _run(["think", str(runs["tpp"]), "--steps", "1"])
    assert status == 1 and "not an EBT run" in text
    with pytest.raises(SystemExit):
        _run(["think", str(runs["ebt"]), "--steps", "0,2"])
