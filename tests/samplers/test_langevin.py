"""Unadjusted Langevin: its exact, step-size-biased stationary variance, temperature, schedules.

For E(y) = y^2 / (2 s^2) the ULA update is the AR(1) recursion
    y' = (1 - eta / s^2) y + sqrt(2 eta T) xi,
whose stationary variance v solves v = (1 - eta/s^2)^2 v + 2 eta T, i.e.
    v = 2 eta T / (2 eta / s^2 - eta^2 / s^4) = T s^2 / (1 - eta / (2 s^2)).
So at s = 1, eta = 0.5, T = 1 the chain's variance is 4/3, not the target's 1. A ULA with the wrong noise
scale sqrt(eta T) would have variance T s^2 / (2 - eta / s^2) = 2/3 instead. The tolerance is a z-score
of the sample variance in units of its Monte Carlo standard error (ESS-based).
"""
import pytest
import torch

from samplers import GeometricAnneal, Langevin, LinearAnneal
from samplers.diagnostics import moment_z_scores

STD, ETA = 1.0, 0.5


def ula_variance(temperature: float, noise_factor: float = 2.0) -> float:
    """Stationary variance of y' = (1 - eta/s^2) y + sqrt(noise_factor * eta * T) xi."""
    rho = 1.0 - ETA / STD**2
    return noise_factor * ETA * temperature / (1.0 - rho**2)


def run_ula(temperature: float, generator: torch.Generator) -> torch.Tensor:
    energy_fn = lambda y: 0.5 * (y / STD).square().sum(dim=1)  # noqa: E731
    y0 = torch.zeros(256, 4, dtype=torch.float64)
    # rho = 0.5: 50 burn-in steps forget the start to 1e-15.
    trace = Langevin(ETA, temperature=temperature).run(energy_fn, y0, num_steps=400, warmup=50, generator=generator)
    return trace.states


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_ula_matches_its_biased_stationary_variance(temperature, generator):
    states = run_ula(temperature, generator)
    zeros = torch.zeros(4, dtype=torch.float64)
    predicted = ula_variance(temperature)
    assert predicted == pytest.approx(temperature * STD**2 / (1 - ETA / (2 * STD**2)))
    _, z_correct = moment_z_scores(states, zeros, torch.full((4,), predicted))
    assert z_correct.max() < 4.0, z_correct  # 4 coordinates: P(any |z| > 4) ~ 2.5e-4
    # The same statistic rejects the target's own variance (ULA is biased) and a wrong-noise ULA.
    _, z_unbiased = moment_z_scores(states, zeros, torch.full((4,), temperature * STD**2))
    _, z_wrong_noise = moment_z_scores(states, zeros, torch.full((4,), ula_variance(temperature, noise_factor=1.0)))
    assert z_unbiased.min() > 10.0 and z_wrong_noise.min() > 10.0


def test_wrong_noise_scale_is_detected(generator):
    """T = 0.5 makes the noise sqrt(2 eta T) = sqrt(eta): exactly the wrong ULA. The test above would fail it."""
    states = run_ula(0.5, generator)
    zeros = torch.zeros(4, dtype=torch.float64)
    _, z = moment_z_scores(states, zeros, torch.full((4,), ula_variance(1.0)))
    assert z.min() > 10.0


def flat_increments(sampler: Langevin, num_steps: int, generator: torch.Generator) -> torch.Tensor:
    """Per-step increment variance [num_steps] on a flat energy (grad = 0): exactly 2 eta_t T_t."""
    energy_fn = lambda y: 0.0 * y.sum(dim=1)  # noqa: E731
    y0 = torch.zeros(4000, 1, dtype=torch.float64)
    states = sampler.run(energy_fn, y0, num_steps=num_steps, generator=generator).states[:, :, 0]
    increments = torch.diff(torch.cat([y0.T, states]), dim=0)
    return increments.square().mean(dim=1)


def test_temperature_schedule_anneals_the_noise(generator):
    sampler = Langevin(0.1, temperature=1.0, temperature_schedule=GeometricAnneal(start_scale=10.0, end_scale=1.0))
    variance = flat_increments(sampler, 3, generator)
    expected = torch.tensor([2 * 0.1 * 10.0, 2 * 0.1 * 10.0**0.5, 2 * 0.1 * 1.0], dtype=torch.float64)
    # 4000 chi-square(1) draws: relative sd sqrt(2/4000) = 2.2%; 10% is > 4 sd.
    torch.testing.assert_close(variance, expected, rtol=0.1, atol=0)


def test_step_size_schedule_anneals_the_step(generator):
    sampler = Langevin(0.2, schedule=LinearAnneal(start_scale=1.0, end_scale=0.1))
    variance = flat_increments(sampler, 2, generator)
    expected = torch.tensor([2 * 0.2, 2 * 0.02], dtype=torch.float64)
    torch.testing.assert_close(variance, expected, rtol=0.1, atol=0)
    trace = sampler.run(lambda y: y.square().sum(1), torch.zeros(3, 2), num_steps=2, generator=generator)
    torch.testing.assert_close(trace.info["step_size"], torch.tensor([[0.2] * 3, [0.02] * 3]))


def test_non_finite_chain_is_flagged_and_others_continue(generator):
    """Unadjusted: nothing to reject. The chain that leaves the support goes NaN and stays flagged."""
    def energy_fn(y):  # finite only for y <= 1; NaN energy and gradient beyond, so the state turns NaN
        return 0.5 * y[:, 0].square() - torch.sqrt(1.0 - y[:, 0])

    y0 = torch.tensor([[-3.0], [0.9]])  # chain 0: tiny steps, far from the wall
    step_size = torch.tensor([1e-4, 1.0])  # chain 1 takes big noisy steps and leaves quickly
    trace = Langevin(step_size).run(energy_fn, y0, num_steps=50, generator=generator)
    assert not trace.info["divergent"][:, 0].any() and torch.isfinite(trace.states[:, 0]).all()
    assert trace.info["divergent"][-1, 1] and torch.isnan(trace.states[-1, 1]).all()
