"""SGLD on a Gaussian posterior from minibatches: its stationary variance at step eta is known exactly,
including the minibatch noise, and the minibatch energy is an unbiased estimate of the full one.

Model: x_i ~ N(theta, 1), i = 1..N, flat prior: U(theta) = sum_i (theta - x_i)^2 / 2, posterior precision
L = N, mean x-bar. With a fresh minibatch of B per step (without replacement), the SGLD update is
theta' = theta - eta L (theta - xbar_B) + sqrt(2 eta) xi, so with a = 1 - eta L the stationary variance is
V = (2 eta + (eta L)^2 v_B) / (1 - a^2), v_B = (s_p^2 / B) (N - B) / (N - 1) (s_p^2 the data's population
variance). Tolerance: the variance over C independent chains at one late step has relative standard error
sqrt(2 / (C - 1)); 4 of them."""
import math

import pytest
import torch

from samplers import Langevin
from samplers.sgmcmc import SGLD, MinibatchEnergy


def _gaussian_mean_energy(data: torch.Tensor, batch_size: int, seed: int) -> MinibatchEnergy:
    def per_example(theta, x):  # theta [C, 1], x [C, B, 1]
        return 0.5 * (theta[:, None, :] - x).pow(2).sum(-1)

    return MinibatchEnergy(per_example, data, batch_size, generator=torch.Generator().manual_seed(seed))


def test_sgld_matches_its_exact_stationary_variance_with_minibatch_noise():
    n, batch, chains = 200, 10, 4000
    data = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eta = 0.2 / n  # eta L = 0.2
    energy = _gaussian_mean_energy(data, batch, seed=1)
    y0 = data.mean().expand(chains, 1).clone()
    final = SGLD(eta).run(energy, y0, num_steps=150, generator=torch.Generator().manual_seed(2)).final_state
    a = 1 - eta * n
    population = float(data.var(unbiased=False))
    v_batch = population / batch * (n - batch) / (n - 1)
    expected = (2 * eta + (eta * n) ** 2 * v_batch) / (1 - a ** 2)
    without_noise = 2 * eta / (1 - a ** 2)  # exact gradients (ULA): what minibatch noise adds to
    measured = float(((final - data.mean()) ** 2).mean())
    assert measured == pytest.approx(expected, rel=4 * math.sqrt(2 / (chains - 1)))
    assert expected > 2 * without_noise  # the test can tell the minibatch noise from none
    # and plain ULA on the exact energy gives the noise-free variance
    exact = Langevin(eta).run(energy.full, y0, num_steps=150, generator=torch.Generator().manual_seed(3)).final_state
    assert float(((exact - data.mean()) ** 2).mean()) == pytest.approx(without_noise, rel=4 * math.sqrt(2 / (chains - 1)))


def test_the_minibatch_energy_is_unbiased_and_bad_input_is_named():
    data = torch.randn(50, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    energy = _gaussian_mean_energy(data, 5, seed=4)
    theta = torch.full((20000, 1), 0.3, dtype=torch.float64)
    estimates = energy(theta)
    full = energy.full(theta[:1])
    standard_error = float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean()) - float(full)) < 4 * standard_error
    with pytest.raises(ValueError, match="batch_size"):
        MinibatchEnergy(lambda y, x: x.sum(-1), data, 0)
    with pytest.raises(ValueError, match="SGLD samples a MinibatchEnergy"):
        SGLD(0.01).run(lambda y: y.pow(2).sum(-1), torch.zeros(2, 1), num_steps=1)
    with pytest.raises(ValueError, match=r"must return \[C, B\]"):
        MinibatchEnergy(lambda y, x: x.sum(), data, 5)(torch.zeros(3, 1, dtype=torch.float64))
