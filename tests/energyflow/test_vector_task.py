"""A non-text task through the same trainer: denoising score matching of a Gaussian energy on continuous
vectors (``energyflow.data.VectorData``, ``energyflow.tasks.EnergyModelTask``). It trains from its recipes,
resumes bit for bit, matches one process under two-process gloo DDP, and fits DSM's known answer."""
from __future__ import annotations

import shutil

import gin
import pytest
import torch

from energyflow.configurables import parse_recipe
from energyflow.data import VectorData, gaussian_data
from energyflow.experiment import evaluate_steps
from energyflow.runs import load_run
from test_ddp import _history, _torchrun, _validation

DEBUG = "experiments/gaussian_dsm_debug.gin"


def _train(recipe, out, bindings=()):
    gin.clear_config()
    parse_recipe(recipe, ["Trainer.progress = False", f"OUT_DIR = '{out}'", *bindings])
    result = gin.get_configurable("launch")()
    gin.clear_config()
    return result


def test_the_debug_recipe_trains_and_resumes_bit_exactly(tmp_path):
    result = _train(DEBUG, tmp_path / "run")
    history = result.history
    assert len(history) == 6 and {"loss", "score_matching_loss", "energy", "grad_norm"} <= set(history[0])
    assert not any("perplexity" in key for key in history[0])  # no cross-entropy, no perplexity
    assert set(result.validation) == {"loss", "score_matching_loss", "energy"}
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "checkpoints" / "step_00000003.pt", resumed_dir / "checkpoints")
    resumed = _train(DEBUG, resumed_dir)
    assert [entry["step"] for entry in resumed.history] == [4.0, 5.0, 6.0]
    assert [entry["loss"] for entry in resumed.history] == [entry["loss"] for entry in history[3:]]
    assert resumed.validation == result.validation


def test_two_process_gloo_run_validates_as_one_process_does(tmp_path):
    """Two processes (gloo) train the debug recipe (each rank draws its own noise, so the losses are not one
    process's); the run's all-reduced validation equals one process evaluating its final checkpoint, and the
    checkpoint loads and resumes like any other."""
    bindings = ["Trainer.progress = False", "Trainer.eval_every = 0"]
    double = tmp_path / "double"
    _torchrun(tmp_path, DEBUG, double, bindings, tmp_path / "rank_logs")
    history = _history(double)
    assert [e["step"] for e in history] == [1, 2, 3, 4, 5, 6]  # rank 0 writes
    run, _, step = load_run(double, device="cpu")
    single = evaluate_steps(run, [1])[None]
    assert step == 6 and _validation(double) == pytest.approx([single["loss"]], rel=1e-6)


def test_the_full_recipe_fits_the_noised_gaussian():
    """DSM's minimizer is N(m, S + sigma^2 I) (the noised data). Compared with the *sample* moments of the
    training vectors (removing their own sampling noise): measured within 0.02 per entry; 0.08 leaves room for
    another CPU's rounding, while a wrong sign or a missing sigma term misses by more than 0.09 (sigma^2)."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        result = _train("experiments/gaussian_dsm.gin", out)
        run, _, _ = load_run(out, device="cpu")
    data: VectorData = run.data
    model = run.task.model
    sigma = float(run.task.objective.sigma)
    expected = torch.cov(data.train.T) + sigma**2 * torch.eye(data.dim)
    assert (model.location.detach() - data.train.mean(0)).abs().max() < 0.08
    assert (model.covariance() - expected).abs().max() < 0.08
    assert result.validation["loss"] < result.history[0]["loss"]


def test_vector_data_refuses_bad_shapes_and_is_deterministic():
    first, second = gaussian_data(dim=3, num_train=10, num_validation=4, seed=5), gaussian_data(
        dim=3, num_train=10, num_validation=4, seed=5)
    assert torch.equal(first.train, second.train) and first.validation.shape == (4, 3)
    with pytest.raises(ValueError, match="float tensor"):
        VectorData(torch.zeros(4, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="differ in shape"):
        VectorData(torch.zeros(4, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="fewer than one batch"):
        first.validation_batches(8)
