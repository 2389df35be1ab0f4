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

from samplers import Langevin, SamplerWarning
from samplers.diagnostics import bonferroni_threshold
from samplers.energy import energy_and_grad
from samplers.sgmcmc import SGHMC, SGLD, MinibatchEnergy


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


# SGHMC on the same model, 2-d (x_i ~ N(theta, I)), with the friction C per element, inverse mass m^-1 and
# V the variance of the minibatch gradient N (theta - xbar_B) per coordinate. Centred on xbar, one step is the
# linear AR(1) z' = A z + b n in z = (theta - xbar, p) (the kick, then the drift at the new momentum):
#   p' = -eta L y + (1 - eta C m^-1) p + n,   y' = y + eta m^-1 p',   Var n = Q = eta^2 V + 2 eta (C - B_hat),
# so its stationary covariance solves the discrete Lyapunov equation S = A S A^T + Q b b^T. An exact correction
# (B_hat = eta V / 2) leaves Q = 2 eta C; so does the estimated one in expectation (its V_hat is unbiased and
# independent of the injected noise, and clamps never happen here: B_hat / C = 0.24 on average, and over these
# runs' ~490,000 estimates per coordinate one would need s^2 > 4.2 times its mean: chi^2_24 > 101, p ~ 2e-11).
# Chains start at xbar with p = 0 (S_0 = 0); the test checks that 60 steps bring S_t within 0.01% of S.
# Tolerance: the variance over C independent chains against its MCSE, sd((y - xbar)^2) / sqrt(C), at a
# Bonferroni threshold over the 8 z-scores of this file's SGHMC runs (family error 1e-3). Power: the
# correction moves the variance by ~24% of 1 / L, about 10 MCSEs at C = 4000.
SGHMC_N, SGHMC_BATCH, SGHMC_CHAINS, SGHMC_ETA, SGHMC_INVERSE_MASS, SGHMC_STEPS = 50, 25, 4000, 0.02, 4.0, 60
SGHMC_FRICTION = (2.0, 3.0)
SGHMC_Z = bonferroni_threshold(8)


def _lyapunov_variance(eta, friction, inverse_mass, precision, noise, num_steps=None):
    """Var(theta) of the AR(1) above: stationary (float64 solve) or after ``num_steps`` from S_0 = 0."""
    damping = 1 - eta * friction * inverse_mass
    a = torch.tensor([[1 - eta ** 2 * inverse_mass * precision, eta * inverse_mass * damping],
                      [-eta * precision, damping]], dtype=torch.float64)
    b = torch.tensor([eta * inverse_mass, 1.0], dtype=torch.float64)
    q = noise * torch.outer(b, b)
    if num_steps is None:
        solved = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - torch.kron(a, a), q.reshape(-1))
        return float(solved.reshape(2, 2)[0, 0])
    s = torch.zeros(2, 2, dtype=torch.float64)
    for _ in range(num_steps):
        s = a @ s @ a.T + q
    return float(s[0, 0])


def _sghmc_setup():
    n, batch = SGHMC_N, SGHMC_BATCH
    data = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = n ** 2 * data.var(dim=0, unbiased=False) / batch * (n - batch) / (n - 1)  # V per coordinate
    return data, noise


def _sghmc_variance(data, gradient_noise, noise_smoothing=0.0):
    energy = _gaussian_mean_energy(data, SGHMC_BATCH, seed=1)
    sampler = SGHMC(SGHMC_ETA, torch.tensor(SGHMC_FRICTION, dtype=torch.float64), inverse_mass=SGHMC_INVERSE_MASS,
                    gradient_noise=gradient_noise, noise_smoothing=noise_smoothing)
    y0 = data.mean(dim=0).expand(SGHMC_CHAINS, 2).clone()
    final = sampler.run(energy, y0, num_steps=SGHMC_STEPS, generator=torch.Generator().manual_seed(2)).final_state
    squared = (final - data.mean(dim=0)) ** 2
    return squared.mean(dim=0), squared.std(dim=0) / math.sqrt(SGHMC_CHAINS)


def _expected(noise_per_coordinate):
    """Stationary Var(theta) per coordinate for the given Q's, checking the burn-in of SGHMC_STEPS steps."""
    expected = []
    for friction, q in zip(SGHMC_FRICTION, noise_per_coordinate):
        args = (SGHMC_ETA, friction, SGHMC_INVERSE_MASS, SGHMC_N, q)
        expected.append(_lyapunov_variance(*args))
        assert _lyapunov_variance(*args, num_steps=SGHMC_STEPS) == pytest.approx(expected[-1], rel=1e-4)
    return torch.tensor(expected, dtype=torch.float64)


@pytest.mark.filterwarnings("error::samplers.base.SamplerWarning")  # no clamping here
@pytest.mark.parametrize("noise_smoothing", [0.0, 0.9])
def test_sghmc_with_the_estimated_noise_correction_matches_its_exact_stationary_variance(noise_smoothing):
    data, noise = _sghmc_setup()
    measured, mcse = _sghmc_variance(data, "estimate", noise_smoothing)
    expected = _expected([2 * SGHMC_ETA * c for c in SGHMC_FRICTION])  # 1.0222 / L and 1.0233 / L
    uncorrected = _expected([2 * SGHMC_ETA * c + SGHMC_ETA ** 2 * float(v) for c, v in zip(SGHMC_FRICTION, noise)])
    assert ((measured - expected).abs() / mcse < SGHMC_Z).all(), (measured * SGHMC_N, expected * SGHMC_N)
    assert ((uncorrected - expected).abs() / mcse > 2 * SGHMC_Z).all()  # the test tells the correction from none


@pytest.mark.filterwarnings("error::samplers.base.SamplerWarning")
def test_sghmc_with_the_exact_correction_is_closer_to_the_posterior_than_without():
    """Lyapunov, x 1/L: with B_hat = eta V / 2, 1.0222 and 1.0233 (the discretisation alone); without, 1.2642
    and 1.2645 (the minibatch noise heats the momentum by eta^2 V per step). Measured (seeded): 1.028 and 1.054
    against 1.272 and 1.305, MCSE 0.024-0.030."""
    data, noise = _sghmc_setup()
    exact = _expected([2 * SGHMC_ETA * c for c in SGHMC_FRICTION])
    uncorrected = _expected([2 * SGHMC_ETA * c + SGHMC_ETA ** 2 * float(v) for c, v in zip(SGHMC_FRICTION, noise)])
    with_correction, mcse_with = _sghmc_variance(data, noise)
    without, mcse_without = _sghmc_variance(data, None)
    assert ((with_correction - exact).abs() / mcse_with < SGHMC_Z).all(), (with_correction * SGHMC_N, exact)
    assert ((without - uncorrected).abs() / mcse_without < SGHMC_Z).all(), (without * SGHMC_N, uncorrected * SGHMC_N)
    posterior = 1.0 / SGHMC_N
    assert ((with_correction - posterior).abs() < (without - posterior).abs()).all()


def test_the_gradient_noise_estimate_is_unbiased_and_its_gradient_is_the_minibatch_gradient():
    data = torch.randn(30, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    data = data * torch.tensor([1.0, 2.0], dtype=torch.float64)
    batch, theta = 6, torch.full((20000, 2), 0.4, dtype=torch.float64)
    evaluated, estimate = _gaussian_mean_energy(data, batch, seed=5).energy_grad_and_noise(theta)
    # the same minibatches (same seed) through the plain energy and autograd
    reference = energy_and_grad(_gaussian_mean_energy(data, batch, seed=5), theta)
    torch.testing.assert_close(evaluated.grad, reference.grad)
    torch.testing.assert_close(evaluated.energy, reference.energy)
    n = data.shape[0]
    truth = n ** 2 * data.var(dim=0, unbiased=False) / batch * (n - batch) / (n - 1)
    torch.testing.assert_close(evaluated.grad.var(dim=0), truth, rtol=0.05, atol=0.0)  # what V_hat estimates
    standard_error = estimate.std(dim=0) / math.sqrt(theta.shape[0])
    assert ((estimate.mean(dim=0) - truth).abs() < 4 * standard_error).all()


def test_sghmc_clamps_an_oversized_correction_with_one_warning():
    """B_hat > C everywhere: no injected noise, so the run is deterministic whatever the generator."""
    energy = lambda y: 0.5 * y.pow(2).sum(-1)  # noqa: E731
    y0 = torch.ones(3, 2)
    runs = []
    for seed in (0, 1):
        with pytest.warns(SamplerWarning, match="clamped") as record:
            runs.append(SGHMC(0.1, 0.5, gradient_noise=100.0).run(energy, y0, num_steps=5,
                                                                   generator=torch.Generator().manual_seed(seed)))
        assert len([w for w in record if issubclass(w.category, SamplerWarning)]) == 1
    assert torch.equal(runs[0].states, runs[1].states)
    assert set(runs[0].info) >= {"acceptance_prob", "accepted", "divergent", "step_size"}
    noisy = SGHMC(0.1, 0.5).run(energy, y0, num_steps=5, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(noisy.states, runs[0].states)


def test_sghmc_is_differentiable_through_the_estimated_path():
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    data = torch.randn(20, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    energy = MinibatchEnergy(lambda y, x: 0.5 * scale * (y[:, None, :] - x).pow(2).sum(-1), data, 4,
                             generator=torch.Generator().manual_seed(1))
    final = SGHMC(0.01, 1.0, gradient_noise="estimate").run(energy, torch.zeros(3, 1, dtype=torch.float64),
                                                           num_steps=4, differentiable=True,
                                                           generator=torch.Generator().manual_seed(2)).final_state
    final.pow(2).sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


def test_sghmc_bad_input_is_named():
    data = torch.randn(10, 1, dtype=torch.float64)
    for kwargs, match in [(dict(step_size=0.0, friction=1.0), "step_size must be finite and positive"),
                          (dict(step_size=0.1, friction=0.0), "friction must be finite and positive"),
                          (dict(step_size=0.1, friction=-1.0), "friction"),
                          (dict(step_size=0.1, friction=1.0, gradient_noise="online"), "gradient_noise must be"),
                          (dict(step_size=0.1, friction=1.0, gradient_noise=-1.0), "gradient_noise must be"),
                          (dict(step_size=0.1, friction=1.0, noise_smoothing=0.5), "noise_smoothing"),
                          (dict(step_size=0.1, friction=1.0, gradient_noise="estimate", noise_smoothing=1.0),
                           "noise_smoothing")]:
        with pytest.raises(ValueError, match=match):
            SGHMC(**kwargs)
    estimating = SGHMC(0.1, 1.0, gradient_noise="estimate")
    with pytest.raises(ValueError, match="estimates the noise from a MinibatchEnergy"):
        estimating.run(lambda y: y.pow(2).sum(-1), torch.zeros(2, 1), num_steps=1)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        estimating.run(_gaussian_mean_energy(data, 1, seed=0), torch.zeros(2, 1, dtype=torch.float64), num_steps=1)
    with pytest.raises(ValueError, match="SGHMC friction of shape"):
        SGHMC(0.1, torch.ones(3)).run(lambda y: y.pow(2).sum(-1), torch.zeros(2, 2), num_steps=1)
