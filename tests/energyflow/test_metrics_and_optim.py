"""Perplexity from the mean loss; the warmup-cosine schedule; parameter groups; the paper's LR table."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from energyflow.data import to_batch
from energyflow.evaluation import evaluate_task, step_counts
from energyflow.metrics import mean_metrics, with_perplexities
from energyflow.optim import paper_learning_rate, param_groups, warmup_cosine


def test_perplexity_is_exp_of_the_mean_loss_not_a_mean_of_perplexities():
    losses = [1.0, 3.0]
    means = mean_metrics([{"loss": torch.tensor(v)} for v in losses])
    metrics = with_perplexities({k: float(v) for k, v in means.items()}, ("loss",))
    assert metrics["perplexity"] == pytest.approx(math.exp(2.0))
    assert metrics["perplexity"] < sum(math.exp(v) for v in losses) / 2  # Jensen: the wrong way is larger
    derived = with_perplexities({"loss_step_2": 1.0, "energy_gap": 0.5}, ("loss_step_*",))
    assert derived["perplexity_step_2"] == pytest.approx(math.e) and "energy_gap_perplexity" not in derived


def test_metrics_must_be_scalars_with_the_same_names():
    with pytest.raises(ValueError, match="'energies' must be a scalar tensor"):
        mean_metrics([{"energies": torch.zeros(3)}])
    with pytest.raises(ValueError, match="metric names differ"):
        mean_metrics([{"loss": torch.tensor(1.0)}, {"lost": torch.tensor(1.0)}])


def test_evaluate_task_averages_batches_then_exponentiates(make_task, tiny_data):
    task = make_task()
    batches = tiny_data.validation_batches(4, max_batches=3)
    metrics = evaluate_task(task, batches, to_batch, device=torch.device("cpu"))
    with torch.no_grad():
        per_batch = [F.cross_entropy(task.model(b["tokens"]).flatten(0, 1), b["targets"].flatten())
                     for b in map(to_batch, batches)]
    mean = torch.stack(per_batch).mean().item()
    assert metrics["loss"] == pytest.approx(mean, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(mean), rel=1e-6)
    assert task.training  # evaluation restores the training mode


def test_step_counts():
    assert step_counts(8) == [1, 2, 4, 8] and step_counts(6) == [1, 2, 4, 6] and step_counts(1) == [1]


def test_warmup_cosine_shape():
    factors = [warmup_cosine(s, warmup_steps=4, total_steps=14, min_lr_ratio=0.1) for s in range(14)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors[3:], factors[4:]))  # strictly decaying after the peak
    assert factors[8] == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert warmup_cosine(0, warmup_steps=0, total_steps=5, min_lr_ratio=0.0) == 1.0


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)
        self.step_size = nn.Parameter(torch.tensor(1.0))
        self.table = nn.Parameter(torch.zeros(4, 3))


def test_param_groups_decay_and_multipliers():
    groups = param_groups(_Toy().named_parameters(), weight_decay=0.01, lr_multipliers={"step_size": 1500.0},
                          no_weight_decay=("table",))
    by_name = {name: group for group in groups for name in group["param_names"]}
    assert by_name["linear.weight"]["weight_decay"] == 0.01 and by_name["linear.weight"]["lr_multiplier"] == 1.0
    for exempt in ("linear.bias", "norm.weight", "norm.bias", "table"):
        assert by_name[exempt]["weight_decay"] == 0.0
    assert by_name["step_size"]["lr_multiplier"] == 1500.0 and by_name["step_size"]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="match no trainable parameter"):
        param_groups(_Toy().named_parameters(), weight_decay=0.0, lr_multipliers={"*typo*": 2.0}, no_weight_decay=())


def test_paper_learning_rates():
    assert paper_learning_rate("4xs") == 0.0024 and paper_learning_rate("xxs") == 0.0012
    assert paper_learning_rate("xl") == 0.0002
    with pytest.raises(ValueError, match="choose one of"):
        paper_learning_rate("huge")


def test_spearman_is_the_rank_correlation():
    from energyflow.metrics import spearman

    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert float(spearman(x, x ** 3)) == pytest.approx(1.0)  # any increasing map: ranks agree
    assert float(spearman(x, -x)) == pytest.approx(-1.0)
    assert float(spearman(x, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0]))) == pytest.approx(0.8)  # 1 - 6*4/(5*24)
