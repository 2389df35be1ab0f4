"""``energyflow sweep`` and ``energyflow report``: trials as ordinary run directories, resumable (skip finished,
resume killed), failures reported without stopping the others, bad axes refused up front, the report's means
equal to the trials' own evaluations, and the Ray engine writing what the local one writes."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from energyflow.cli import main
from energyflow.experiment import evaluate_steps
from energyflow.runs import load_run
from energyflow.sweeps import expand, load_sweep_file, parse_axis, read_record
from energyflow.sweeps.spec import SweepError, split_values, validate, variant_axis

RECIPE = "experiments/gaussian_dsm_debug.gin"
AXIS = "DenoisingScoreMatching.sigma = [0.2, 0.5]"


def _sweep(out, *extra, axis=AXIS, seeds="0,1", workers="2"):
    return main(["sweep", RECIPE, "--axis", axis, "--seeds", seeds, "--out", str(out), "--workers", workers, *extra])


def _losses(out: Path) -> dict[str, float]:
    manifest = json.loads((out / "sweep.json").read_text())
    return {name: read_record(out / name)["runs"]["run"]["steps"]["-"]["loss"] for name in manifest["trials"]}


def test_a_grid_trains_every_trial_and_the_report_means_the_trials_own_numbers(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert _sweep(out) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "4 trials trained, 0 already done, 0 failed" in printed
    losses = _losses(out)
    assert sorted(losses) == ["sigma=0.2,seed=0", "sigma=0.2,seed=1", "sigma=0.5,seed=0", "sigma=0.5,seed=1"]
    # each trial is an ordinary run: rebuilt from its directory it evaluates to what the sweep recorded
    run, _, _ = load_run(out / "sigma=0.5,seed=1", device="cpu")
    assert evaluate_steps(run, [1])[None]["loss"] == pytest.approx(losses["sigma=0.5,seed=1"], rel=1e-6)
    report = json.loads((out / "report.json").read_text())
    rows = {row["axes"]["DenoisingScoreMatching.sigma"]: row for row in report["rows"] if row["metric"] == "loss"}
    for sigma in ("0.2", "0.5"):
        values = [losses[f"sigma={sigma},seed={s}"] for s in (0, 1)]
        assert rows[sigma]["mean"] == pytest.approx(sum(values) / 2) and rows[sigma]["seeds"] == 2
        assert rows[sigma]["stderr"] == pytest.approx(abs(values[0] - values[1]) / 2)  # sd / sqrt(2) for two seeds
    assert (out / "report.md").read_text().count("| 0.") == 2
    assert (out / "plots" / "loss_vs_DenoisingScoreMatching.sigma.png").is_file()
    assert (out / "plots" / "training_curves.png").is_file()
    # rerunning the same command skips every finished trial and trains nothing
    stamps = {name: (out / name / "trial.json").stat().st_mtime_ns for name in losses}
    assert _sweep(out) == 0
    assert "0 trials trained, 4 already done" in " ".join(capsys.readouterr().out.split())
    assert stamps == {name: (out / name / "trial.json").stat().st_mtime_ns for name in losses}
    assert main(["report", str(out), "--metric", "energy", "--no-plots"]) == 0
    assert "energy" in capsys.readouterr().out
    # another sweep into the same directory is refused rather than mixed in
    assert _sweep(out, axis="DenoisingScoreMatching.sigma = [0.3]") == 1
    assert "holds another sweep" in " ".join(capsys.readouterr().out.split())


def test_a_failing_trial_is_reported_and_the_others_finish(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", RECIPE, "--axis", "DenoisingScoreMatching.sigma = [0.3, -1.0]", "--out", str(out),
                 "--workers", "2"]) == 1  # a negative sigma parses, and fails when the trial builds the objective
    printed = " ".join(capsys.readouterr().out.split())
    assert "1 trials trained, 0 already done, 1 failed" in printed and "sigma=-1.0,seed=0" in printed
    failed = read_record(out / "sigma=-1.0,seed=0")
    assert failed["status"] == "failed" and "needs sigma > 0" in failed["error"]
    assert read_record(out / "sigma=0.3,seed=0")["status"] == "done"
    assert "Failed trials" in (out / "report.md").read_text()


@pytest.mark.parametrize("axis, message", [
    ("Nope.value = [1, 2]", "axis Nope.value"),
    ("NOT_A_MACRO = [1, 2]", "binds no macro NOT_A_MACRO"),
    ("DenoisingScoreMatching.sigma = []", "has no values"),
    ("DenoisingScoreMatching.sigma = [0.1, (]", "unterminated quote or bracket"),
    ("DenoisingScoreMatching.sigma = [0.1, @nothing()]", "axis DenoisingScoreMatching.sigma, value @nothing()"),
    ("sigma 0.1", "not of the form"),
])
def test_bad_axes_fail_before_anything_runs(tmp_path, capsys, axis, message):
    out = tmp_path / "sweep"
    assert main(["sweep", RECIPE, "--axis", axis, "--out", str(out)]) == 1
    printed = " ".join(capsys.readouterr().out.split())
    assert message in printed and "Traceback" not in printed
    assert not out.exists()  # nothing ran, nothing was written


def test_axes_expand_to_a_grid_or_pairs():
    assert split_values("1, 'a,b', @f(x=1, y=[2, 3]), [4, 5]") == ["1", "'a,b'", "@f(x=1, y=[2, 3])", "[4, 5]"]
    a, b = parse_axis("A = [1, 2]"), parse_axis("ebt/Trainer.learning_rate = [0.1, 0.2]")
    grid = expand("r.gin", [a, b], [0, 1])
    assert len(grid) == 8 and grid[0].bindings == ("A = 1", "ebt/Trainer.learning_rate = 0.1", "Trainer.seed = 0")
    paired = expand("r.gin", [a, b], [0], paired=True)
    assert [t.axes for t in paired] == [{"A": "1", "ebt/Trainer.learning_rate": "0.1"},
                                         {"A": "2", "ebt/Trainer.learning_rate": "0.2"}]
    with pytest.raises(SweepError, match="same number of values"):
        expand("r.gin", [a, parse_axis("B = [1]")], [0], paired=True)
    with pytest.raises(SweepError, match="repeats a value"):
        parse_axis("A = [1, 1]")


def test_the_report_takes_a_perplexity_as_exp_of_the_mean_loss():
    from energyflow.sweeps.report import aggregate

    manifest = {"axes": [{"name": "A", "values": ["1"]}]}
    records = [{"name": f"t{s}", "status": "done", "axes": {"A": "1"}, "seed": s,
                "runs": {"run": {"table_metrics": ["loss", "perplexity"],
                                 "steps": {"-": {"loss": loss, "perplexity": math.exp(loss)}}}}}
               for s, loss in enumerate([1.0, 3.0])]
    rows = {row.metric: row for row in aggregate(manifest, records)}
    assert rows["loss"].mean == pytest.approx(2.0) and rows["loss"].stderr == pytest.approx(1.0)
    assert rows["perplexity"].mean == pytest.approx(math.exp(2.0))  # not (e + e^3) / 2
    assert rows["perplexity"].stderr == pytest.approx(math.exp(2.0) * 1.0)


def test_a_variant_axis_is_an_ablation_of_named_binding_sets():
    axis = variant_axis("variant", {"full": [], "no_replay": ["EBTObjective.replay_buffer = None"]})
    trials = expand("r.gin", [axis], [0], fixed=["NUM_STEPS = 3"])
    assert [t.name for t in trials] == ["variant=full,seed=0", "variant=no_replay,seed=0"]
    assert trials[1].bindings == ("NUM_STEPS = 3", "EBTObjective.replay_buffer = None", "Trainer.seed = 0")
    with pytest.raises(SweepError, match="list of gin bindings"):
        variant_axis("variant", {"bad": "EBTObjective.truncate = 1"})


def test_the_sweep_recipes_name_a_base_recipe_axes_and_seeds():
    from energyflow.config import list_recipes

    sweeps = [name for name, _ in list_recipes() if name.startswith("sweeps/")]
    assert sweeps
    for name in sweeps:
        recipe, axes, seeds, _, fixed = load_sweep_file(Path(__file__).resolve().parents[2] / "recipes" / name)
        assert recipe.startswith("experiments/") and axes and seeds
        validate(expand(recipe, axes, seeds, fixed=fixed), axes, fixed)  # every trial's bindings parse


def test_a_killed_sweep_resumes_its_trial_from_its_checkpoint(tmp_path):
    """Kill the whole sweep (SIGKILL to its process group) while a trial is between checkpoints, rerun it: the
    sweep finishes, and the killed trial resumed from its checkpoint rather than starting over."""
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "energyflow.cli", "sweep", RECIPE, "--axis", "DenoisingScoreMatching.sigma = "
               "[0.3]", "--out", str(out), "--workers", "1", "--threads-per-trial", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    bind = ["--bind", "NUM_STEPS = 4000", "--bind", "Trainer.checkpoint_every = 100", "--bind", "Trainer.eval_every = 0"]
    process = subprocess.Popen(command + bind, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    trial = out / "sigma=0.3,seed=0"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not list((trial / "checkpoints").glob("step_*.pt")):
            time.sleep(0.2)
        assert list((trial / "checkpoints").glob("step_*.pt")), "no checkpoint appeared"
        time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert read_record(trial) is None or read_record(trial)["status"] != "done"
    completed = subprocess.run(command + bind, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert read_record(trial)["status"] == "done"
    assert "resuming" in (trial / "train.log").read_text()


def test_the_ray_engine_writes_what_the_local_engine_writes(tmp_path, capsys):
    pytest.importorskip("ray", reason="the ray extra: pip install 'energyflow[ray]'")
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert _sweep(local, seeds="0") == 0
    assert _sweep(remote, "--engine", "ray", "--cpus-per-trial", "1", seeds="0") == 0
    assert sorted(p.name for p in remote.iterdir() if p.is_dir()) == sorted(p.name for p in local.iterdir()
                                                                             if p.is_dir())
    assert _losses(remote) == pytest.approx(_losses(local), rel=1e-6)
    rows = lambda out: [(r["axes"], r["metric"], r["mean"]) for r in json.loads(  # noqa: E731
        (out / "report.json").read_text())["rows"]]
    assert [(a, m) for a, m, _ in rows(remote)] == [(a, m) for a, m, _ in rows(local)]
    assert [v for *_, v in rows(remote)] == pytest.approx([v for *_, v in rows(local)], rel=1e-6)
