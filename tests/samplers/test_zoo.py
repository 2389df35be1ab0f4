"""The zoo's stated moments against exact sampling, and its energies against closed forms."""
import math

import pytest
import torch
from torch import distributions as D

from samplers.diagnostics import bonferroni_threshold, moment_z_scores
from samplers.zoo import Banana, DoubleWell, Funnel, Gaussian, GaussianMixture

NUM_DRAWS = 100_000


def _targets_with_all_moments():
    return [
        Gaussian.ill_conditioned(dim=20, condition_number=100.0, seed=3),
        Gaussian.ill_conditioned(dim=5, condition_number=10.0, rotate=False),
        GaussianMixture.two_modes(dim=3),
        DoubleWell(dim=2, barrier=2.0),
        Banana(curvature=0.8, location=0.5, scale=1.0, conditional_scale=0.5),
        Funnel(dim=3, scale=1.0),  # a mild funnel: x's fourth moments small enough for a reliable MCSE
    ]


@pytest.mark.parametrize("target", _targets_with_all_moments(), ids=lambda t: t.name)
def test_stated_moments_match_exact_draws(target):
    # iid draws: ESS = n, so z = |estimate - truth| / (sd / sqrt(n)) is ~N(0, 1) per moment. With 2*dim
    # moments per target, a Bonferroni bound keeps the chance of any false alarm below 1e-3.
    draws = target.sample(NUM_DRAWS, torch.Generator().manual_seed(11))
    assert draws.shape == (NUM_DRAWS, target.dim)
    z_mean, z_variance = moment_z_scores(draws.unsqueeze(1), target.mean, target.variance, iid=True)
    threshold = bonferroni_threshold(2 * target.dim)
    assert z_mean.max() < threshold, (z_mean, threshold)
    assert z_variance.max() < threshold, (z_variance, threshold)


def test_stated_covariances_match_exact_draws():
    # Off-diagonal covariances (the banana's and the mixture's are non-zero) within a few MCSE of truth.
    for target in (Banana(location=1.0), GaussianMixture.two_modes(dim=2), Gaussian.ill_conditioned(dim=4, seed=1)):
        draws = target.sample(NUM_DRAWS, torch.Generator().manual_seed(5))
        centered = draws - target.mean
        products = centered[:, 0] * centered[:, 1]
        z = (products.mean() - target.covariance[0, 1]).abs() / (products.std() / math.sqrt(NUM_DRAWS))
        assert z < bonferroni_threshold(3), (target.name, z)


def test_neals_funnel_marginal_of_v_and_heavy_tailed_x():
    funnel = Funnel(dim=10, scale=3.0)
    draws = funnel.sample(NUM_DRAWS, torch.Generator().manual_seed(2))
    z_mean, z_variance = moment_z_scores(draws[:, None, :1], funnel.mean[:1], funnel.variance[:1], iid=True)
    assert z_mean.max() < bonferroni_threshold(2) and z_variance.max() < bonferroni_threshold(2)
    assert funnel.variance[0] == 9.0
    assert torch.allclose(funnel.variance[1:], torch.full((9,), math.exp(4.5), dtype=torch.float64))


def test_energies_are_exact_negative_log_densities():
    y = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gaussian = Gaussian.ill_conditioned(dim=3, condition_number=30.0, seed=4)
    reference = D.MultivariateNormal(gaussian.mean, gaussian.covariance)
    torch.testing.assert_close(gaussian.energy(y), -reference.log_prob(y))

    mixture = GaussianMixture.two_modes(dim=3)
    components = D.Independent(D.Normal(mixture.means, mixture.scales), 1)
    reference = D.MixtureSameFamily(D.Categorical(logits=mixture.log_weights), components)
    torch.testing.assert_close(mixture.energy(y), -reference.log_prob(y))

    funnel = Funnel(dim=3, scale=3.0)
    log_prob = D.Normal(0.0, 3.0).log_prob(y[:, 0]) + D.Normal(0.0, torch.exp(y[:, :1] / 2)).log_prob(y[:, 1:]).sum(-1)
    torch.testing.assert_close(funnel.energy(y), -log_prob)

    banana = Banana(curvature=0.7, location=0.3, scale=1.2, conditional_scale=0.4)
    y2 = y[:, :2]
    log_prob = D.Normal(0.3, 1.2).log_prob(y2[:, 0]) + D.Normal(0.7 * y2[:, 0] ** 2, 0.4).log_prob(y2[:, 1])
    torch.testing.assert_close(banana.energy(y2), -log_prob)


def test_double_well_energy_and_quadrature_variance():
    well = DoubleWell(dim=2, barrier=1.5)
    points = torch.tensor([[0.0, 0.0], [1.0, -1.0], [2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(well.energy(points), torch.tensor([3.0, 0.0, 1.5 * 9 + 1.5], dtype=torch.float64))
    # The variance lies between the modes' squared distance (1) shrunk by the barrier and spread by it.
    assert 0.5 < well.variance[0] < 1.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_energy_follows_input_dtype_and_initial_state(dtype):
    generator = torch.Generator().manual_seed(0)
    for target in (Gaussian.ill_conditioned(dim=4), GaussianMixture.two_modes(), DoubleWell(), Banana(), Funnel()):
        y0 = target.initial_state(7, generator, dtype=dtype)
        assert y0.shape == (7, target.dim) and y0.dtype == dtype
        energy = target(y0)
        assert energy.shape == (7,) and energy.dtype == dtype and bool(torch.isfinite(energy).all())
    again = Funnel().initial_state(7, torch.Generator().manual_seed(1), dtype=dtype)
    torch.testing.assert_close(again, Funnel().initial_state(7, torch.Generator().manual_seed(1), dtype=dtype))


def test_ill_conditioned_gaussian_has_the_stated_condition_number():
    gaussian = Gaussian.ill_conditioned(dim=50, condition_number=1000.0, seed=0)
    eigenvalues = torch.linalg.eigvalsh(gaussian.covariance)
    torch.testing.assert_close(eigenvalues.max() / eigenvalues.min(), torch.tensor(1000.0, dtype=torch.float64))
    assert gaussian.covariance[0, 1].abs() > 1e-3  # rotated: correlated coordinates


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="covariance"):
        Gaussian(torch.zeros(3), torch.eye(2))
    with pytest.raises(torch.linalg.LinAlgError):
        Gaussian(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 2), torch.ones(2, 2), torch.ones(3))
    with pytest.raises(ValueError, match="dim >= 2"):
        Funnel(dim=1)
    with pytest.raises(ValueError, match="barrier"):
        DoubleWell(barrier=0.0)
