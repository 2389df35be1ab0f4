"""Mass matrices (samplers.mass): each representation against explicit dense float64 formulas, the pooled
estimators against direct computations, and what a dense mass buys on a rotated ill-conditioned Gaussian.
Monte Carlo checks state their standard errors; the sampler-level moment checks live in test_targets.py."""
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from samplers import HMC, MALA
from samplers.adaptation import PooledScatter, low_rank_from_covariance, low_rank_from_draws, regularized_covariance
from samplers.diagnostics import effective_sample_size
from samplers.integrators import kinetic_energy, leapfrog, sample_momentum, velocity
from samplers.mala import init as mala_init
from samplers.mala import step as mala_step
from samplers.mass import DenseMass, LowRankMass, proposal_log_density, propose
from samplers.zoo import Gaussian

EVENT = (2, 3)  # a 2-D event: every representation works on the flattened 6 coordinates
DIM = 6


def _random_representations():
    """name -> (inverse mass as the samplers take it, its explicit [d, d] Sigma), float64."""
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(DIM, DIM, generator=generator, dtype=torch.float64)
    dense_sigma = a @ a.T / DIM + 0.3 * torch.eye(DIM, dtype=torch.float64)
    scale = torch.rand(DIM, generator=generator, dtype=torch.float64) + 0.5
    vectors, _ = torch.linalg.qr(torch.randn(DIM, 2, generator=generator, dtype=torch.float64))
    eigenvalues = torch.tensor([4.0, 0.2], dtype=torch.float64)
    inner = torch.eye(DIM, dtype=torch.float64) + vectors @ torch.diag(eigenvalues - 1) @ vectors.T
    low_rank_sigma = scale[:, None] * inner * scale[None, :]
    diagonal = torch.rand(DIM, generator=generator, dtype=torch.float64) + 0.5
    return {
        "diagonal": (diagonal.view(1, *EVENT), torch.diag(diagonal)),
        "dense": (DenseMass(dense_sigma), dense_sigma),
        "low_rank": (LowRankMass(scale, vectors, eigenvalues), low_rank_sigma),
    }


REPRESENTATIONS = _random_representations()


@pytest.mark.parametrize("name", list(REPRESENTATIONS))
def test_velocity_and_kinetic_energy_match_the_dense_formulas(name):
    inverse_mass, sigma = REPRESENTATIONS[name]
    momentum = torch.randn(5, *EVENT, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flat = momentum.flatten(1)
    torch.testing.assert_close(velocity(momentum, inverse_mass), (flat @ sigma).view_as(momentum))
    torch.testing.assert_close(kinetic_energy(momentum, inverse_mass), 0.5 * ((flat @ sigma) * flat).sum(dim=1))
    if name != "diagonal":
        torch.testing.assert_close(inverse_mass.inverse_mass_matrix(), sigma)
        quadratic = (flat @ torch.linalg.inv(sigma) * flat).sum(dim=1)
        torch.testing.assert_close(inverse_mass.whiten(momentum).square().sum(dim=1), quadratic)


@pytest.mark.parametrize("name", list(REPRESENTATIONS))
def test_momentum_covariance_is_the_mass(name):
    """p ~ N(0, M = Sigma^-1): with n = 100k draws the empirical second moment of (p_i, p_j) has standard
    error sqrt((M_ii M_jj + M_ij^2) / n); all 21 entries within 4.9 SE (Bonferroni for a family error of
    1e-5). A momentum drawn with Sigma instead of M, or with the wrong factor, is off by O(1) relative."""
    inverse_mass, sigma = REPRESENTATIONS[name]
    num_draws = 100_000
    y = torch.zeros(num_draws, *EVENT, dtype=torch.float64)
    momentum, kinetic = sample_momentum(y, inverse_mass, torch.Generator().manual_seed(1))
    assert momentum.shape == y.shape
    torch.testing.assert_close(kinetic, kinetic_energy(momentum, inverse_mass))
    flat = momentum.flatten(1)
    mass = torch.linalg.inv(sigma)
    empirical = flat.T @ flat / num_draws
    standard_error = ((mass.diagonal()[:, None] * mass.diagonal()[None, :] + mass.square()) / num_draws).sqrt()
    z = ((empirical - mass) / standard_error).abs()
    assert z.max() < 4.9, z.max()


@pytest.mark.parametrize("name", list(REPRESENTATIONS))
def test_mala_proposal_density_is_the_multivariate_normal(name):
    """log q(point | origin) = log N(point; origin - eta Sigma g, 2 eta Sigma) against torch's MultivariateNormal,
    with one step size per chain; and ``propose`` draws from it: its log density at its own draw is that of
    the standard-normal noise, -|xi|^2 / 2 - (d log(4 pi eta) + log det Sigma) / 2."""
    inverse_mass, sigma = REPRESENTATIONS[name]
    generator = torch.Generator().manual_seed(2)
    origin, point, grad, noise = (torch.randn(4, *EVENT, generator=generator, dtype=torch.float64) for _ in range(4))
    eta = torch.tensor([0.05, 0.1, 0.3, 1.0], dtype=torch.float64).view(4, 1, 1)
    drift = (grad.flatten(1) @ sigma).view_as(grad)
    expected = torch.stack([
        MultivariateNormal(origin[c].flatten() - eta[c, 0, 0] * drift[c].flatten(), 2 * eta[c, 0, 0] * sigma)
        .log_prob(point[c].flatten()) for c in range(4)
    ])
    torch.testing.assert_close(proposal_log_density(point, origin, drift, eta, inverse_mass), expected)
    proposal = propose(origin, drift, eta, noise, inverse_mass)
    own = -0.5 * (noise.flatten(1).square().sum(dim=1) + DIM * torch.log(4 * math.pi * eta.flatten())
                  + torch.logdet(sigma))
    torch.testing.assert_close(proposal_log_density(proposal, origin, drift, eta, inverse_mass), own)


def test_leapfrog_under_a_low_rank_mass_equals_its_dense_matrix():
    """The O(d k) low-rank path and the dense path integrate the same Hamiltonian step by step; against a
    hand-written float64 leapfrog with the explicit Sigma on a quadratic energy."""
    inverse_mass, sigma = REPRESENTATIONS["low_rank"]
    precision = torch.linalg.inv(REPRESENTATIONS["dense"][1])
    energy_fn = lambda y: 0.5 * ((y.flatten(1) @ precision) * y.flatten(1)).sum(dim=1)  # noqa: E731
    generator = torch.Generator().manual_seed(4)
    y, momentum = (torch.randn(3, *EVENT, generator=generator, dtype=torch.float64) for _ in range(2))
    grad = (y.flatten(1) @ precision).view_as(y)
    step_size = torch.tensor([0.1, 0.2, 0.05], dtype=torch.float64).view(3, 1, 1)
    low_rank = leapfrog(y, momentum, grad, energy_fn, step_size=step_size, num_steps=5, inverse_mass=inverse_mass)
    dense = leapfrog(y, momentum, grad, energy_fn, step_size=step_size, num_steps=5, inverse_mass=DenseMass(sigma))
    eps = step_size.flatten(1)
    q, p = y.flatten(1).clone(), momentum.flatten(1) - 0.5 * eps * grad.flatten(1)
    for index in range(5):
        q = q + eps * (p @ sigma)
        p = p - (eps if index < 4 else 0.5 * eps) * (q @ precision)
    for result in (low_rank, dense):
        torch.testing.assert_close(result[0].flatten(1), q)
        torch.testing.assert_close(result[1].flatten(1), p)


def test_mala_energy_error_with_a_dense_mass_matches_an_independent_computation():
    """-log a = E(y') - E(y) + log q(y' | y) - log q(y | y'), here from MultivariateNormal densities."""
    inverse_mass, sigma = REPRESENTATIONS["dense"]
    energy_fn = lambda y: (y.pow(4) / 4 + y).flatten(1).sum(dim=1)  # noqa: E731
    grad_fn = lambda y: y.pow(3) + 1  # noqa: E731
    y = torch.randn(2, *EVENT, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 0.5
    eta = torch.tensor([0.05, 0.1], dtype=torch.float64).view(2, 1, 1)
    new_state, info = mala_step(mala_init(y, energy_fn), energy_fn, step_size=eta, inverse_mass=inverse_mass,
                                generator=torch.Generator().manual_seed(5))
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).flatten(1)
    factor = torch.linalg.cholesky(sigma)
    flat_eta = eta.flatten(1)
    proposal = y.flatten(1) - flat_eta * (grad_fn(y).flatten(1) @ sigma) + (2 * flat_eta).sqrt() * (noise @ factor.T)

    def log_q(to, origin, c):
        mean = origin - eta[c, 0, 0] * (grad_fn(origin) @ sigma)
        return MultivariateNormal(mean, 2 * eta[c, 0, 0] * sigma).log_prob(to)

    expected = torch.stack([
        energy_fn(proposal[c].view(1, *EVENT))[0] - energy_fn(y[c:c + 1])[0]
        + log_q(proposal[c], y[c].flatten(), c) - log_q(y[c].flatten(), proposal[c], c) for c in range(2)
    ])
    torch.testing.assert_close(info.energy_error, expected)


def test_pooled_scatter_is_the_covariance_of_all_draws():
    """Combined from per-step chain averages (pyro's dense Welford) plus within-step scatter: exact."""
    draws = torch.randn(30, 8, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + \
        torch.arange(8, dtype=torch.float64)[None, :, None]  # chains with different means
    scatter = PooledScatter()
    for step_draws in draws:
        scatter.update(step_draws)
    all_draws = draws.flatten(0, 1)
    expected = regularized_covariance(torch.cov(all_draws.T) * (all_draws.shape[0] - 1), all_draws.shape[0])
    torch.testing.assert_close(scatter.covariance(), expected)


def test_low_rank_estimates_recover_a_spiked_covariance_and_agree_with_the_correlation_eigenpairs():
    """Sigma = D^{1/2}(I + U diag(lambda - 1) U^T)D^{1/2} with a correlation matrix that is exactly rank 2 away from
    the identity (unit diagonal: U's columns are +-1/sqrt(d) sign vectors with u1_i^2 = u2_i^2, lambda = 1.8 and
    0.2), d = 30. From N = 20,000 draws the rank-2 estimate recovers Sigma within 5% relative Frobenius error
    (a sample covariance's relative error is ~ sqrt(d / N) = 4%; the truncation drops most of it; shrinkage
    is negligible at this N). With N = 20 < d draws the Gram route gives the top eigenpairs of the explicit
    sample correlation matrix (shrunk towards 1)."""
    dim, generator = 30, torch.Generator().manual_seed(8)
    scale = torch.linspace(0.5, 3.0, dim, dtype=torch.float64)
    signs = torch.randint(0, 2, (dim,), generator=generator).double() * 2 - 1
    halves = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(dim // 2)
    vectors = torch.stack([signs, signs * halves], dim=1) / dim**0.5  # orthonormal, equal squares per row
    eigenvalues = torch.tensor([1.8, 0.2], dtype=torch.float64)
    sigma = LowRankMass(scale, vectors, eigenvalues).inverse_mass_matrix()
    torch.testing.assert_close(sigma.diagonal(), scale.square())  # D is the marginal variance, as estimated
    draws = torch.randn(20_000, dim, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T
    scatter = PooledScatter()
    for chunk in draws.view(200, 100, dim):
        scatter.update(chunk)
    estimate = low_rank_from_covariance(scatter.covariance(), 2, scatter.total)
    error = torch.linalg.matrix_norm(estimate.inverse_mass_matrix() - sigma) / torch.linalg.matrix_norm(sigma)
    assert error < 0.05, error  # measured 0.013
    few = draws[:20]
    gram = low_rank_from_draws(few, 3)
    torch.testing.assert_close(gram.vectors.T @ gram.vectors, torch.eye(3, dtype=torch.float64))
    variance = (20 / 25) * few.var(dim=0) + 1e-3 * 5 / 25
    standardized = (few - few.mean(dim=0)) / variance.sqrt()
    correlation_eigenvalues = torch.linalg.eigvalsh(standardized.T @ standardized / 19).flip(0)[:3]
    torch.testing.assert_close(gram.eigenvalues, (20 * correlation_eigenvalues + 5) / 25)


def _rotated_run(mass: str):
    target = Gaussian.ill_conditioned(dim=20, condition_number=100.0, rotate=True)
    generator = torch.Generator().manual_seed(0)
    sampler = HMC(0.1, 2, pooled_mass=True, shared_step_size=True, step_size_jitter=0.3, mass=mass)
    return target, sampler.run(target, target.initial_state(64, generator), num_steps=200, warmup=300,
                               generator=generator)


def test_dense_mass_whitens_a_rotated_gaussian_and_beats_the_diagonal():
    """Rotated 20-d Gaussian, condition number 100; 64 chains, 300 warmup, 200 draws, L = 2, the same for both.
    The dense estimate comes from the last window's 100 x 64 draws; whitened by the true precision it must be
    within 0.3 of the identity in spectral norm: a sample covariance of N_eff >= 1,600 effective draws (a
    quarter of the raw ones) deviates by about 2 sqrt(d / N_eff) + d / N_eff = 0.24 at the Marchenko-Pastur
    edge (measured 0.12). The diagonal mass cannot undo the rotation (its whitened error, checked as power,
    is above 1). Same gradients per draw, so the ESS ratio is the ESS-per-gradient ratio: measured 25x on
    the draws and 15x on the squares; required 5x."""
    target, diagonal = _rotated_run("diagonal")
    _, dense = _rotated_run("dense")
    precision_factor = torch.linalg.cholesky(target.precision)
    whitened = precision_factor.T @ dense.adapted["inverse_mass_matrix"].double() @ precision_factor
    assert torch.linalg.matrix_norm(whitened - torch.eye(20, dtype=torch.float64), ord=2) < 0.3
    diagonal_whitened = precision_factor.T @ torch.diag(diagonal.adapted["inverse_mass"][0].double()) @ precision_factor
    assert torch.linalg.matrix_norm(diagonal_whitened - torch.eye(20, dtype=torch.float64), ord=2) > 1.0
    for power in (1, 2):
        ratio = effective_sample_size(dense.states ** power).min() / effective_sample_size(diagonal.states ** power).min()
        assert ratio > 5.0, (power, ratio)


@pytest.mark.parametrize("make, match", [
    (lambda: HMC(mass="block"), "unknown mass 'block'"),
    (lambda: HMC(mass="dense"), "pass pooled_mass=True"),
    (lambda: MALA(0.1, adapt_mass=True, mass="low_rank", mass_rank=1), "pass pooled_mass=True"),
    (lambda: HMC(mass="low_rank", pooled_mass=True), "needs mass_rank"),
    (lambda: HMC(mass="low_rank", mass_rank=0, pooled_mass=True), "needs mass_rank"),
    (lambda: HMC(mass_rank=2), "only read with mass='low_rank'"),
    (lambda: HMC(mass="dense", pooled_mass=True, adapt_mass=False), "with adapt_mass=False pass a fixed"),
    (lambda: DenseMass(-torch.eye(3)), "symmetric positive-definite"),
    (lambda: DenseMass(torch.ones(3)), r"square \[d, d\]"),
    (lambda: LowRankMass(torch.ones(3), torch.eye(3)[:, :1], torch.zeros(1)), "positive scale and eigenvalues"),
])
def test_bad_mass_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _quadratic(y):
    return 0.5 * y.square().sum(dim=1)


def test_bad_mass_for_the_state():
    y0 = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="mass_rank=3 must be below the event size 3"):
        HMC(0.1, 2, mass="low_rank", mass_rank=3, pooled_mass=True).run(_quadratic, y0, num_steps=1, warmup=20)
    with pytest.raises(ValueError, match="DenseMass has dimension 2 but the state's event"):
        HMC(0.1, 2, inverse_mass=DenseMass(torch.eye(2)), adapt_mass=False).run(_quadratic, y0, num_steps=1)
    with pytest.raises(ValueError, match="needs a scalar or per-chain step size"):
        MALA(torch.full((4, 3), 0.1), inverse_mass=DenseMass(torch.eye(3)), adapt_step_size=False).run(
            _quadratic, y0, num_steps=1)


def test_fixed_masses_are_cast_to_the_state_and_reported():
    """A float64 mass runs on a float32 state (copied, the original untouched); adapted masses are reported
    as the tensors that rebuild them."""
    mass = DenseMass(torch.eye(3, dtype=torch.float64))
    trace = HMC(0.1, 2, inverse_mass=mass, adapt_mass=False).run(_quadratic, torch.zeros(4, 3), num_steps=3)
    assert trace.states.dtype == torch.float32 and mass.sigma.dtype == torch.float64
    adapted = HMC(0.1, 2, mass="low_rank", mass_rank=1, pooled_mass=True).run(
        _quadratic, torch.zeros(4, 3), num_steps=1, warmup=30, generator=torch.Generator().manual_seed(0)).adapted
    rebuilt = LowRankMass(adapted["inverse_mass_scale"], adapted["inverse_mass_vectors"],
                          adapted["inverse_mass_eigenvalues"])
    assert rebuilt.rank == 1 and rebuilt.dim == 3
