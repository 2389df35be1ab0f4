"""Trajectory-length adaptation of HMC (samplers.chees): ChEES and the quarter-turn rule.

The moments of both are checked in the shared target table (tests/samplers/test_targets.py); here, that each
rule lands where theory puts it, and the plumbing (jittered lengths, frozen values, errors).
"""
import math

import pytest
import torch

from samplers import HMC
from samplers.chees import halton, jitter_factor, largest_eigenvalue
from samplers.zoo import Gaussian


def test_halton_points_are_the_base_2_van_der_corput_sequence():
    assert [halton(i) for i in range(1, 8)] == [0.5, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875]
    factors = [jitter_factor(i) for i in range(1023)]
    assert min(factors) > 0.0 and max(factors) <= 1.0
    # Low discrepancy: the first 2^10 - 1 factors are exactly the multiples of 1/1024 in (0, 1), each once.
    assert sorted(round(1024 * f) for f in factors) == list(range(1, 1024))
    assert all(abs(1024 * f - round(1024 * f)) < 1e-9 for f in factors)


def test_largest_eigenvalue_matches_the_exact_solver_on_every_branch():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(400, 1100, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 2.0, 1100,
                                                                                          dtype=torch.float64)
    exact = float(torch.linalg.eigvalsh(torch.cov(rows.T))[-1])
    assert largest_eigenvalue(rows) == pytest.approx(exact, rel=1e-9)  # N < d: the Gram-matrix branch
    wide = torch.randn(2100, 2100, generator=generator, dtype=torch.float64)
    wide[:, 0] *= 3.0  # a clear top eigenvalue, so power iteration converges fast
    exact = float(torch.linalg.eigvalsh(torch.cov(wide.T))[-1])
    assert largest_eigenvalue(wide) == pytest.approx(exact, rel=1e-6)  # both > 2048: power iteration
    assert largest_eigenvalue(rows[:, :50]) == pytest.approx(float(torch.linalg.eigvalsh(torch.cov(rows[:, :50].T))[-1]))


@pytest.mark.parametrize("jitter, low, high", [(1.0, 1.8, 2.8), (0.5, 1.75, 2.35)])
def test_chees_finds_the_optimal_jittered_length_on_a_standard_gaussian(jitter, low, high):
    # For N(0, I_d) the exact flow is y(t) = y cos t + p sin t, and the ChEES criterion of one transition is
    # E[(|y(t)|^2 - |y|^2)^2] / 4 = d sin^2(t); with t = u T, u uniform in (0, 1] (the paper's jitter), its
    # mean is d (1/2 - sin(2T) / (4T)), maximal where tan(2T) = 2T: T* = 2.2467. The criterion is flat there
    # (within 3% of its maximum over [1.8, 2.8]). With u in (0.5, 1] (the default) the mean is
    # d (1/2 - (sin 2T - sin T) / (2T)), maximal at T* = 2.015 and within 3% of it over [1.78, 2.3].
    # The adapted value is an average of noisy iterates, so the band is
    # wide -- but a wrong-signed or mis-scaled gradient ends at the floor (one step) or the cap instead. A small
    # fixed step keeps the leapfrog close to the exact flow and the rounding up of L = ceil(u T / eps) small (it
    # lengthens every trajectory by eps / 2 on average: with an adapted eps ~ 0.9 the optimum moved to ~1.7).
    dim = 20
    target = Gaussian(torch.zeros(dim), torch.eye(dim))
    generator = torch.Generator().manual_seed(0)
    trace = HMC(0.1, adapt_step_size=False, adapt_mass=False, trajectory="chees", trajectory_jitter=jitter).run(
        target, target.initial_state(512, generator), num_steps=20, warmup=400, generator=generator)
    length = float(trace.adapted["trajectory_length"])
    assert low < length < high, length
    # Sampling uses the frozen T / eps with the Halton factors: every count is in [1, ceil(T / eps)].
    steps = trace.info["num_leapfrog_steps"][:, 0]
    ceiling = math.ceil(length / float(trace.adapted["step_size"][0]))
    assert steps.min() >= 1 and steps.max() <= ceiling and len(set(steps.tolist())) > 5
    assert (trace.info["num_leapfrog_steps"] == steps[:, None]).all()  # the same for every chain of a step


def test_chees_with_per_chain_step_sizes():
    # Without shared_step_size each chain adapts its own eps; L comes from their geometric mean.
    target = Gaussian.ill_conditioned(dim=6, condition_number=10.0, rotate=False)
    generator = torch.Generator().manual_seed(1)
    trace = HMC(0.2, pooled_mass=True).run(target, target.initial_state(64, generator), num_steps=50, warmup=200,
                                           generator=generator)
    assert trace.adapted["step_size"].std() > 0 and float(trace.adapted["trajectory_length"]) > 0
    assert torch.isfinite(trace.states).all()


def test_quarter_turn_rule_sets_L_from_the_widest_direction():
    # With the identity mass kept (adapt_mass=False) the whitened covariance is the target's own, whose largest
    # eigenvalue is 1 here, so L = ceil((pi / 2) / eps). lambda_max comes from ~8000 pooled draws of 8
    # coordinates: its relative error is ~sqrt(2 / n_eff) (a few %), hence the 10% band.
    scales = torch.tensor([1.0, 0.7, 0.5, 0.3, 0.2, 0.2, 0.1, 0.1])
    target = Gaussian(torch.zeros(8), torch.diag(scales.square()))
    generator = torch.Generator().manual_seed(2)
    trace = HMC(0.05, trajectory="quarter_turn", adapt_mass=False, pooled_mass=True, shared_step_size=True).run(
        target, target.initial_state(256, generator), num_steps=20, warmup=300, generator=generator)
    step_size = float(trace.adapted["step_size"][0])
    expected = math.ceil(0.5 * math.pi / step_size)
    steps = int(trace.adapted["num_leapfrog_steps"])
    assert abs(steps - expected) <= 0.1 * expected + 1, (steps, expected)
    assert (trace.info["num_leapfrog_steps"] == steps).all()
    assert (trace.warmup_info["num_leapfrog_steps"] == 8).all()  # the pilot length during warmup
    assert trace.info["step_size"].std() > 0  # sampled with step-size jitter (0.3 by default)


def test_defaults_pick_the_trajectory_rule():
    target = Gaussian(torch.zeros(2), torch.eye(2))
    generator = torch.Generator().manual_seed(3)
    y0 = target.initial_state(16, generator)
    adaptive = HMC(pooled_mass=True, shared_step_size=True).run(target, y0, num_steps=3, warmup=100,
                                                                 generator=generator)
    assert "trajectory_length" in adaptive.adapted
    fixed = HMC(0.1, 7).run(target, y0, num_steps=3, warmup=100, generator=generator)
    assert (fixed.info["num_leapfrog_steps"] == 7).all() and "trajectory_length" not in fixed.adapted
    no_warmup = HMC(0.1).run(target, y0, num_steps=3, generator=generator)
    assert (no_warmup.info["num_leapfrog_steps"] == 10).all()


@pytest.mark.parametrize("make, match", [
    (lambda: HMC(trajectory="nuts"), "trajectory must be one of"),
    (lambda: HMC(step_size_statistic="median"), "step_size_statistic"),
    (lambda: HMC(max_leapfrog_steps=0), "max_leapfrog_steps"),
    (lambda: HMC(num_leapfrog_steps=2.5), "num_leapfrog_steps"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("rule", ["chees", "quarter_turn"])
def test_adaptive_trajectories_need_a_warmup(rule):
    target = Gaussian(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="pass warmup > 0"):
        HMC(trajectory=rule).run(target, torch.zeros(4, 2), num_steps=3)
