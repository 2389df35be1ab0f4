"""`energyflow generate` and `energyflow think` on real (one-step) debug runs of the EBT and the baseline."""
import io
import json

import gin
import pytest
from rich.console import Console

from energyflow.cli import main
from energyflow.configurables import parse_recipe

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


def test_generate_ranks_baseline_samples_by_ebt_energy(runs):
    status, text = _run(["generate", str(runs["tpp"]), "--prompt", "The", "--max-new", "4", "--strategy", "sample",
                         "--candidates", "3", "--rerank-with", str(runs["ebt"])])
    assert status == 0 and "ranked by" in text and "12 tokens in" in text
    energies = [float(line.split("│")[2]) for line in text.splitlines() if line.startswith("│")]
    assert len(energies) == 3 and energies == sorted(energies)


def test_generate_refuses_bad_requests(runs):
    status, text = _run(["generate", str(runs["ebt"]), "--prompt", "x" * 10, "--max-new", "10"])
    assert status == 1 and "max_seq_len=16" in text and "--max-new" in text
    status, text = _run(["generate", str(runs["tpp"]), "--prompt", "x", "--max-new", "2", "--candidates", "2"])
    assert status == 1 and "--rerank-with" in text
    status, text = _run(["generate", str(runs["tpp"]), "--prompt", "x", "--max-new", "2", "--strategy", "sample",
                         "--candidates", "2", "--rerank-with", str(runs["tpp"])])
    assert status == 1 and "not an EBT run" in text
    status, text = _run(["generate", str(runs["tpp"]), "--prompt", "x", "--max-new", "2", "--samples", "4"])
    assert status == 1 and "apply to EBT runs" in text


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


def test_thinking_options_reach_the_config(runs):
    from energyflow.cli import build_parser
    from energyflow.runs import load_run
    from energyflow.inference.commands import _config

    args = build_parser().parse_args(["think", str(runs["ebt"]), "--step-size", "3", "--noise", "0.5",
                                      "--energy-tolerance", "0.1", "--grad-tolerance", "0.2", "--accept-if-lower",
                                      "--check-every", "3"])
    task = load_run(runs["ebt"], device="cpu")[0].task
    config = _config(task, args, 4)
    assert (config.num_steps, config.step_size, config.noise_scale) == (4, 3.0, 0.5)
    assert (config.energy_tolerance, config.grad_tolerance, config.accept_if_lower) == (0.1, 0.2, True)
    assert config.check_every == 3
    learned = _config(task, build_parser().parse_args(["think", str(runs["ebt"])]), 2)
    assert float(learned.step_size) == float(task.objective.sampler.step_size.detach())
    assert learned.check_every is None  # without a tolerance nothing freezes: no early-exit check, no sync


def test_adaptive_think_reports_the_steps_used_and_seeds_repeat(runs, tmp_path):
    status, text = _run(["think", str(runs["ebt"]), "--steps", "1,4", "--samples", "1", "--batches", "1",
                         "--batch-size", "1", "--energy-tolerance", "1e9", "--out", str(tmp_path)])
    # A tolerance no change can beat freezes every position after one step: 1.00 steps used, not 4.
    saved = json.loads((tmp_path / "think.json").read_text())
    assert status == 0 and saved["mean_steps"]["1"] == 1.0 and saved["fixed_budget_loss"] > 0
    assert "1.00 steps per position on average" in text and "fixed budget of 4 steps" in text
    outputs = [_run(["generate", str(runs["tpp"]), "--prompt", "a", "--max-new", "6", "--strategy", "sample",
                     "--seed", str(seed), "--device", "cpu"])[1].splitlines()[0] for seed in (1, 1, 2)]
    assert outputs[0] == outputs[1] != outputs[2]
