"""Delayed-rejection HMC (``HMC(delayed_rejection=a)``): exact where one step size cannot fit every region.

Moment checks are z-scores in units of the ESS-based Monte Carlo standard error against a Bonferroni threshold
over every z-score of the check (a correct sampler fails with probability < 1e-3; fixed seeds). The funnel
test has power: at the same fixed step size, plain HMC misses the neck and fails the same check.
"""
import pytest
import torch

from samplers import HMC
from samplers.diagnostics import bonferroni_threshold, moment_z_scores
from samplers.zoo import Funnel, Gaussian

# A funnel with v ~ N(0, 1.5^2): at v = -3 the x-coordinates' sd is exp(-1.5) = 0.22, which a step of 0.9
# overshoots (stable leapfrog needs eps < 2 sd), so a single step size under-covers the neck.
FUNNEL = Funnel(dim=3, scale=1.5)


def run_funnel(delayed_rejection, generator):
    y0 = FUNNEL.initial_state(1536, generator)
    sampler = HMC(0.9, 5, adapt_step_size=False, adapt_mass=False, delayed_rejection=delayed_rejection)
    return sampler.run(FUNNEL, y0, num_steps=300, warmup=0, generator=generator)


def funnel_z_scores(trajectory):
    z_mean, z_variance = moment_z_scores(trajectory.states[50:], FUNNEL.mean, FUNNEL.variance)
    return torch.cat([z_mean, z_variance[:1]])  # Var x_i = E exp(v): too heavy-tailed for an MCSE at this ESS


def test_second_stage_makes_a_funnel_exact_where_one_step_size_is_biased():
    threshold = bonferroni_threshold(FUNNEL.dim + 1)
    delayed = funnel_z_scores(run_funnel(4.0, torch.Generator().manual_seed(0)))
    assert delayed.max() < threshold, (delayed, threshold)
    plain = funnel_z_scores(run_funnel(None, torch.Generator().manual_seed(0)))
    assert plain.max() > threshold, plain  # the check has power: the neck is missed without the second stage


def test_gaussian_moments_and_gradient_count(generator):
    target = Gaussian.ill_conditioned(dim=4, condition_number=10.0, seed=2)
    y0 = target.initial_state(256, generator)
    sampler = HMC(0.5, 6, adapt_step_size=False, adapt_mass=False, delayed_rejection=3.0)
    trajectory = sampler.run(target, y0, num_steps=300, warmup=0, generator=generator)
    z_mean, z_variance = moment_z_scores(trajectory.states[30:], target.mean, target.variance)
    threshold = bonferroni_threshold(2 * target.dim)
    assert z_mean.max() < threshold and z_variance.max() < threshold, (z_mean, z_variance)
    # 6 leapfrog steps, plus 18 (second stage, same trajectory length) where the first rejected, plus 6 (its
    # ghost) where the second could still be accepted.
    steps = trajectory.info["num_leapfrog_steps"]
    assert set(steps.unique().tolist()) == {6.0, 24.0, 30.0}
    first_accepted = trajectory.info["acceptance_prob"] > 0.999999
    assert (steps[first_accepted] == 6.0).all()
    # the second stage rescues some of the first stage's rejections
    assert trajectory.info["accepted"].float().mean() > (trajectory.info["acceptance_prob"]).mean() + 0.02


def test_factor_drawn_per_chain_from_a_range_is_exact_too(generator):
    # (low, high): each rejected chain's factor log-uniform in [2, 16], its second stage L steps (shorter).
    y0 = FUNNEL.initial_state(2048, generator)
    sampler = HMC(0.9, 5, adapt_step_size=False, adapt_mass=False, delayed_rejection=(2.0, 16.0))
    trajectory = sampler.run(FUNNEL, y0, num_steps=300, warmup=0, generator=generator)
    assert funnel_z_scores(trajectory).max() < bonferroni_threshold(FUNNEL.dim + 1)
    assert set(trajectory.info["num_leapfrog_steps"].unique().tolist()) <= {5.0, 10.0, 15.0}


def test_with_adaptation_the_step_size_follows_the_first_stage(generator):
    # With a second stage the shared step size adapts to the arithmetic mean of the first stage's acceptance
    # (no harmonic collapse onto the neck): it lands near target_accept.
    y0 = FUNNEL.initial_state(64, generator)
    runs = {}
    for delayed_rejection in (None, 4.0):
        sampler = HMC(pooled_mass=True, shared_step_size=True, delayed_rejection=delayed_rejection,
                      max_leapfrog_steps=20)
        runs[delayed_rejection] = sampler.run(FUNNEL, y0, num_steps=20, warmup=100, generator=generator)
    first_stage = runs[4.0].info["acceptance_prob"].mean()
    assert 0.65 < first_stage < 0.92, first_stage
    # without it, ChEES's harmonic statistic lets the neck's chains pull the step size down
    assert runs[None].adapted["step_size"].mean() < 0.8 * runs[4.0].adapted["step_size"].mean()
    assert all(torch.isfinite(run.states).all() for run in runs.values())


@pytest.mark.parametrize("bad", [1.0, 0.5, -2, True, "4", (1.0, 4.0), (8.0, 4.0), (2.0,), (2.0, "8")])
def test_bad_factor_is_refused(bad):
    with pytest.raises(ValueError, match="delayed_rejection"):
        HMC(delayed_rejection=bad)
