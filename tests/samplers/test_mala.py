"""MALA's own behaviour: exactness where ULA is visibly biased, the proposal densities of its MH ratio,
per-chain step sizes, per-chain rejection of divergent proposals. Moment tolerances: Bonferroni z-scores
in units of the ESS-based Monte Carlo standard error."""
import torch

from samplers import MALA, ClampGradient
from samplers.diagnostics import bonferroni_threshold, moment_z_scores
from samplers.mala import init, step

SCALES = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)


def gaussian_energy(y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (y / SCALES.to(y)).square().sum(dim=1)


def assert_exact_variance(states: torch.Tensor) -> None:
    z_mean, z_variance = moment_z_scores(states, torch.zeros(3, dtype=torch.float64), SCALES.square())
    threshold = bonferroni_threshold(6)
    assert z_mean.max() < threshold and z_variance.max() < threshold, (z_mean, z_variance)


def test_exact_where_ula_is_biased(generator):
    """At eta = 0.2 ULA's variance on the 0.5-scale coordinate is s^2 / (1 - eta / (2 s^2)) = 1.67 s^2;
    the MH correction must remove that bias."""
    y0 = torch.zeros(64, 3, dtype=torch.float64)
    trace = MALA(0.2, adapt_step_size=False).run(gaussian_energy, y0, num_steps=600, warmup=100, generator=generator)
    assert_exact_variance(trace.states)


def test_clamped_drift_stays_exact(generator):
    """ClampGradient changes the proposal; the MH ratio uses it in both directions, so MALA stays exact."""
    y0 = torch.zeros(64, 3, dtype=torch.float64)
    sampler = MALA(0.2, adapt_step_size=False, transforms=[ClampGradient(0.5)])
    trace = sampler.run(gaussian_energy, y0, num_steps=600, warmup=100, generator=generator)
    assert_exact_variance(trace.states)


def test_log_acceptance_ratio_matches_an_independent_computation():
    """-log a = E(y') - E(y) + |y' - y + eta g(y)|^2 / (4 eta) - |y - y' + eta g(y')|^2 / (4 eta), here with a
    per-element step size and a non-quadratic energy."""
    energy_fn = lambda y: (y.pow(4) / 4 + y).sum(dim=1)  # noqa: E731
    grad_fn = lambda y: y.pow(3) + 1  # noqa: E731
    y = torch.tensor([[0.3, -0.7], [1.1, 0.2]], dtype=torch.float64)
    eta = torch.tensor([0.05, 0.2], dtype=torch.float64)
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    proposal = y - eta * grad_fn(y) + (2 * eta).sqrt() * noise
    forward = ((proposal - y + eta * grad_fn(y)).square() / (4 * eta)).sum(dim=1)
    reverse = ((y - proposal + eta * grad_fn(proposal)).square() / (4 * eta)).sum(dim=1)
    expected = energy_fn(proposal) - energy_fn(y) + reverse - forward
    _, info = step(init(y, energy_fn), energy_fn, step_size=eta, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(info.energy_error, expected)


def test_per_chain_step_sizes_are_per_chain(generator):
    step_size = torch.tensor([1e-4, 20.0] * 4, dtype=torch.float64)
    trace = MALA(step_size, adapt_step_size=False).run(gaussian_energy, torch.zeros(8, 3, dtype=torch.float64),
                                                       num_steps=100, generator=generator)
    rate = trace.acceptance_rate()
    assert (rate[0::2] > 0.99).all() and (rate[1::2] < 0.05).all()
    torch.testing.assert_close(trace.info["step_size"], step_size.expand(100, 8))


def test_divergent_proposal_is_rejected_per_chain(generator):
    def energy_fn(y):  # NaN energy and gradient beyond y = 1
        return 0.5 * y.square().sum(dim=1) - torch.sqrt(1.0 - y[:, 0])

    step_size = torch.tensor([1e-3, 1.0], dtype=torch.float64)
    y0 = torch.tensor([[-3.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # chain 0: tiny steps, far from the wall
    trace = MALA(step_size, adapt_step_size=False).run(energy_fn, y0, num_steps=200, generator=generator)
    divergent = trace.info["divergent"]
    assert divergent[:, 1].sum() > 5 and not divergent[:, 0].any()
    assert torch.isfinite(trace.states).all() and not trace.info["accepted"][divergent].any()
    assert torch.isfinite(trace.energies).all()
