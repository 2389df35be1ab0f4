"""Step-size / temperature schedules: exact multipliers, per-element randomization, gradients to the base."""
import math

import pytest
import torch

from samplers import Constant, CosineAnneal, GeometricAnneal, LinearAnneal, RandomizedStepSize

BASE = torch.tensor(0.5, dtype=torch.float64)
SHAPE = torch.Size([3, 2])


def values(schedule, num_steps):
    return [float(schedule(BASE, index, num_steps, shape=SHAPE)) for index in range(num_steps)]


def test_annealing_multipliers():
    assert values(Constant(), 3) == [0.5, 0.5, 0.5]
    assert values(LinearAnneal(1.0, 0.2), 3) == pytest.approx([0.5, 0.3, 0.1])
    assert values(GeometricAnneal(1.0, 0.01), 3) == pytest.approx([0.5, 0.05, 0.005])
    assert values(CosineAnneal(1.0, 0.2), 3) == pytest.approx([0.5, 0.3, 0.1])
    quarter = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4))
    assert values(CosineAnneal(1.0, 0.2), 5)[1] == pytest.approx(0.5 * quarter)
    assert values(LinearAnneal(1.0, 0.2), 1) == pytest.approx([0.1])  # a one-step run is at its end


def test_temperature_annealing_goes_up_or_down():
    assert values(GeometricAnneal(start_scale=10.0, end_scale=1.0), 2) == pytest.approx([5.0, 0.5])


def test_randomized_step_size_is_per_element_in_range():
    """U(a/s, a*s) per element: range, shape, and the mean a (s + 1/s) / 2 within 5 standard errors."""
    schedule = RandomizedStepSize(scale=2.0)
    draws = schedule(BASE, 0, 1, shape=torch.Size([20000, 3]), generator=torch.Generator().manual_seed(0))
    assert draws.shape == (20000, 3) and draws.dtype == torch.float64
    assert draws.min() >= 0.25 and draws.max() <= 1.0
    mean, standard_error = 0.5 * (2.0 + 0.5) / 2, (0.75 / math.sqrt(12)) / math.sqrt(draws.numel())
    assert abs(draws.mean() - mean) < 5 * standard_error
    assert draws.std() > 0.2  # elements differ


def test_schedules_keep_the_graph_of_a_learnable_base():
    base = torch.tensor(0.5, requires_grad=True)
    for schedule in (LinearAnneal(1.0, 0.2), RandomizedStepSize(2.0)):
        (grad,) = torch.autograd.grad(schedule(base, 1, 3, shape=SHAPE).sum(), base)
        assert grad > 0


@pytest.mark.parametrize("make", [lambda: LinearAnneal(0.0, 1.0), lambda: GeometricAnneal(1.0, -1.0),
                                  lambda: RandomizedStepSize(0.5)])
def test_bad_arguments(make):
    with pytest.raises(ValueError):
        make()
