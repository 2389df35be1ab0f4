"""Annealed importance sampling recovers known log-normalizers within its own standard error.

Tolerance: |estimate - truth| <= 4 se + se^2 -- four standard errors (a fixed-seed check that would fail at
random ~1 in 16,000 times), plus the estimator's known downward bias of ~se^2 / 2 in log Z (Jensen), doubled."""
import pytest
import torch

from samplers import HMC
from samplers.ais import annealed_importance_sampling, geometric_schedule
from samplers.zoo import Gaussian, GaussianMixture


def _kernel(step_size: float, leapfrog: int) -> HMC:
    return HMC(step_size, leapfrog, adapt_step_size=False, adapt_mass=False)


@pytest.mark.parametrize("case", ["mixture", "gaussian_100d"])
def test_ais_recovers_the_exact_log_normalizer(case):
    if case == "mixture":  # a normalized two-mode mixture, shifted: exp(-(E + 3)) integrates to exp(-3)
        target, dim, kernel, options = GaussianMixture.two_modes(2), 2, _kernel(0.3, 5), {"num_temperatures": 100}
    else:  # a rotated 100-d Gaussian with sds 0.1-1, from a base of sd 0.3 on a linear path
        target, dim, kernel = Gaussian.ill_conditioned(dim=100, condition_number=100.0), 100, _kernel(0.04, 8)
        options = {"schedule": torch.linspace(0, 1, 301, dtype=torch.float64), "base_scale": 0.3}
    result = annealed_importance_sampling(lambda y: target.energy(y) + 3.0, kernel, num_chains=128, dim=dim,
                                          generator=torch.Generator().manual_seed(0), **options)
    se = result.log_z_se
    assert 0 < se < 0.5 and 0 < result.ess <= 128
    assert abs(result.log_z - (-3.0)) <= 4 * se + se ** 2


def test_schedules_and_bad_settings_are_checked():
    schedule = geometric_schedule(4, power=2.0)
    torch.testing.assert_close(schedule, torch.tensor([0.0, 1 / 16, 1 / 4, 9 / 16, 1.0], dtype=torch.float64))
    energy = GaussianMixture.two_modes(2).energy
    with pytest.raises(ValueError, match="rise strictly from 0 to 1"):
        annealed_importance_sampling(energy, _kernel(0.1, 2), num_chains=8, dim=2, schedule=[0.0, 0.5, 0.4, 1.0])
    with pytest.raises(ValueError, match="num_chains"):
        annealed_importance_sampling(energy, _kernel(0.1, 2), num_chains=1, dim=2)
