"""MEADS (generalized HMC, persistent accept test, fold-wise adaptation): exactness of the transition with fixed
parameters, the fold scheme's independence from a fold's own states, the adapted parameters, bad input.

Moment checks are z-scores in Monte Carlo standard errors (ESS-based for a run, iid for independent chains) against
a Bonferroni threshold over every z-score of a test, so a correct sampler fails one with probability below 1e-3 (and
the seeds are fixed); each such test also shows that the same threshold rejects a 10% error in the variance.
"""
import math

import pytest
import torch

from samplers import MEADS, LangevinNoise
from samplers.diagnostics import bonferroni_threshold, moment_z_scores
from samplers.meads import FoldSchedule, MEADSState, init, max_eigenvalue, step
from samplers.zoo import Gaussian

MEAN, SD = 1.0, 2.0


def gaussian_1d(y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((y[:, 0] - MEAN) / SD) ** 2


@pytest.mark.parametrize("inverse_mass, step_size", [(None, 1.5), (torch.tensor([SD**2]), 1.2)])
def test_fixed_parameters_sample_the_target(inverse_mass, step_size):
    """A large step (eps / sd = 0.75, or 1.2 in whitened units) rejects often, so the persistent slice variable and
    the momentum flip decide many transitions; the kept draws must still have the exact mean and variance."""
    generator = torch.Generator().manual_seed(0)
    y0 = torch.randn(512, 1, generator=generator, dtype=torch.float64)
    sampler = MEADS(step_size, damping=0.3, inverse_mass=inverse_mass, adapt=False)
    trace = sampler.run(gaussian_1d, y0, num_steps=700, warmup=50, generator=generator)
    assert 0.5 < float(trace.acceptance_rate().mean()) < 0.97  # rejections happen: the slice test matters
    truth_mean, truth_variance = torch.tensor([MEAN]), torch.tensor([SD**2])
    threshold = bonferroni_threshold(2)
    z_mean, z_variance = moment_z_scores(trace.states, truth_mean, truth_variance)
    assert z_mean.max() < threshold and z_variance.max() < threshold, (z_mean, z_variance)
    _, z_wrong = moment_z_scores(trace.states, truth_mean, 1.1 * truth_variance)  # power: a 10% error fails
    assert z_wrong.min() > threshold, z_wrong
    assert not trace.warmup_info["step_size"].isnan().any()  # adapt=False: every chain moves in the warmup too


def gumbel(y: torch.Tensor) -> torch.Tensor:
    """E = exp(y) - y: y = log X for X ~ Exp(1), a skewed target (mean -0.5772, variance pi^2 / 6)."""
    return torch.exp(y[:, 0]) - y[:, 0]


def test_the_transition_keeps_the_joint_distribution():
    """Start 200,000 independent chains exactly at the stationary joint pi(y) N(p; 0, 1) U(u; -1, 1) of a skewed
    target and take 20 fixed-parameter steps (a quarter of them rejected): position, whitened momentum and slice
    must keep their laws (iid z-scores). Measured power of this check (400,000 chains): a slice not rescaled on
    acceptance gave z = 10.6 on the mean of y, a momentum not flipped on rejection z = 111; the correct step 0.9."""
    generator = torch.Generator().manual_seed(1)
    chains = 200_000
    y = torch.log(-torch.log(torch.rand(chains, 1, generator=generator, dtype=torch.float64)))
    state = init(y, gumbel)
    state = state._replace(momentum=torch.randn(chains, 1, generator=generator, dtype=torch.float64),
                           slice=2 * torch.rand(chains, generator=generator, dtype=torch.float64) - 1)
    accepted = 0.0
    for _ in range(20):
        state, info = step(state, gumbel, step_size=torch.tensor(1.5), damping=torch.tensor(0.3), generator=generator)
        accepted += float(info.accepted.double().mean()) / 20
    assert 0.6 < accepted < 0.9, accepted
    draws = torch.cat([state.y, state.momentum, state.slice[:, None]], dim=1).view(2, chains // 2, 3)  # iid: any split
    mean = torch.tensor([-0.5772156649, 0.0, 0.0], dtype=torch.float64)
    variance = torch.tensor([math.pi**2 / 6, 1.0, 1.0 / 3.0], dtype=torch.float64)
    z_mean, z_variance = moment_z_scores(draws, mean, variance, iid=True)
    threshold = bonferroni_threshold(6)
    assert z_mean.max() < threshold and z_variance.max() < threshold, (z_mean, z_variance)
    _, z_wrong = moment_z_scores(draws, mean, 1.1 * variance, iid=True)
    assert z_wrong.min() > threshold, z_wrong


def test_fold_sources_never_include_the_fold_itself():
    """By construction: for every held fold h, fold h+j reads folds h .. h+j-1 only (never itself, never a fold
    that moves before it in the equivalent sequential scan), the held fold does not move, every other fold does."""
    num_chains, num_folds = 22, 4  # uneven folds: chains 0, 4, 8, ... are fold 0
    schedule = FoldSchedule(num_chains, num_folds, torch.device("cpu"))
    fold_of = lambda index: {c % num_folds for c in index.tolist()}  # noqa: E731
    for held in range(num_folds):
        assert fold_of(schedule.moving[held]) == set(range(num_folds)) - {held}
        for j, (members, source) in enumerate(schedule.sources[held], start=1):
            assert fold_of(members) == {(held + j) % num_folds}
            assert fold_of(source) == {(held + i) % num_folds for i in range(j)}
    for fold, (members, source) in enumerate(schedule.freeze):
        assert fold_of(members) == {fold} and fold_of(source) == set(range(num_folds)) - {fold}


def test_a_folds_parameters_do_not_read_its_own_states():
    """Instrumented: scaling one fold's positions and gradients by 10 leaves that fold's step size, damping and
    scale unchanged, and changes those of the folds that read it (so the check can fail)."""
    generator = torch.Generator().manual_seed(2)
    y = torch.randn(32, 3, generator=generator, dtype=torch.float64)
    grad = torch.randn(32, 3, generator=generator, dtype=torch.float64)
    schedule = FoldSchedule(32, 4, torch.device("cpu"))
    state = MEADSState(y, y.new_zeros(32), grad, None, None)
    for held in range(4):
        for pairs in (schedule.sources[held], schedule.freeze):
            before = schedule.parameters(state, pairs, step_index=50)
            for members, _ in pairs:
                y_changed, grad_changed = y.clone(), grad.clone()
                y_changed[members] *= 10
                grad_changed[members] *= 10
                after = schedule.parameters(MEADSState(y_changed, y.new_zeros(32), grad_changed, None, None), pairs, 50)
                for old, new in zip(before, after):
                    torch.testing.assert_close(new[members], old[members], equal_nan=True)
                readers = torch.cat([m for m, source in pairs if bool(torch.isin(members, source).any())] or
                                    [members.new_empty(0)])
                if readers.numel():
                    assert not torch.allclose(after[0][readers], before[0][readers])


def test_the_held_fold_rests_during_warmup():
    generator = torch.Generator().manual_seed(3)
    trace = MEADS().run(gaussian_1d, torch.randn(16, 1, generator=generator), num_steps=5, warmup=8,
                        generator=generator)
    fold = torch.arange(16) % 4
    for index in range(8):
        resting = fold == index % 4
        assert trace.warmup_info["acceptance_prob"][index, resting].isnan().all()
        assert not trace.warmup_info["accepted"][index, resting].any()
        assert torch.isfinite(trace.warmup_info["acceptance_prob"][index, ~resting]).all()
    assert torch.isfinite(trace.info["step_size"]).all()  # after warmup every chain moves


def test_adapted_parameters_follow_the_rules():
    """On a diagonal Gaussian with sds 0.1 .. 1, the frozen scale is the variance of the other folds' draws, the
    step size 0.5 / sqrt(lambda) with lambda ~ 1 (the preconditioned Hessian is ~I) and the damping ~1."""
    target = Gaussian.ill_conditioned(dim=6, condition_number=100.0, rotate=False)
    generator = torch.Generator().manual_seed(4)
    trace = MEADS().run(target, target.initial_state(256, generator, dtype=torch.float64), num_steps=10, warmup=300,
                        generator=generator)
    ratio = trace.adapted["inverse_mass"] / target.variance
    # 192 source chains: the sampling sd of a variance is sqrt(2 / 192) = 10%; [0.6, 1.5] is >4 sd (the states
    # also carry some warmup transient); finite-sample noise raises lambda above 1, lowering eps below 0.5.
    assert ((ratio > 0.6) & (ratio < 1.5)).all(), ratio
    assert ((trace.adapted["step_size"] > 0.35) & (trace.adapted["step_size"] < 0.55)).all()
    assert ((trace.adapted["damping"] > 0.7) & (trace.adapted["damping"] < 1.4)).all()
    assert float(trace.acceptance_rate().mean()) > 0.9


def test_max_eigenvalue_estimate():
    """tr(S^2) / tr(S) from off-diagonal pairs: exact for a dominant eigenvalue, unbiased in high dimension (with
    the diagonal pairs 20 rows in 200-d would give ~1 + d / n = 11 for the identity)."""
    generator = torch.Generator().manual_seed(5)
    isotropic = torch.randn(20, 200, generator=generator, dtype=torch.float64)
    assert 0.7 < float(max_eigenvalue(isotropic)) < 1.3
    dominant = torch.randn(2000, 3, generator=generator, dtype=torch.float64) * torch.tensor([10.0, 0.1, 0.1])
    assert 90 < float(max_eigenvalue(dominant)) < 110  # lambda_max = 100; sampling error ~3%


@pytest.mark.parametrize("make, chains, match", [
    (lambda: MEADS(num_folds=1), 8, "num_folds must be an int >= 2"),
    (lambda: MEADS(num_folds=2.0), 8, "num_folds must be an int >= 2"),
    (lambda: MEADS(num_folds=4), 7, "needs at least 8 chains"),
    (lambda: MEADS(damping=0.0), 8, "damping .* must be finite and positive"),
    (lambda: MEADS(damping=float("nan")), 8, "damping .* must be finite and positive"),
    (lambda: MEADS(step_size=-0.1), 8, "step_size must be finite and positive"),
    (lambda: MEADS(max_energy_error=0.0), 8, "max_energy_error must be positive"),
    (lambda: MEADS(transforms=[LangevinNoise(0.1)]), 8, "breaks detailed balance"),
    (lambda: MEADS(inverse_mass=torch.tensor([1.0, -1.0, 1.0])), 8, "inverse_mass must be finite and positive"),
])
def test_bad_input(make, chains, match):
    with pytest.raises(ValueError, match=match):
        make().run(gaussian_1d, torch.randn(chains, 3), num_steps=2, warmup=2)


def test_identical_starts_and_differentiable_mode_are_refused():
    with pytest.raises(ValueError, match="start the chains at different points"):
        MEADS().run(gaussian_1d, torch.zeros(8, 2), num_steps=2, warmup=2)
    MEADS(adapt=False).run(gaussian_1d, torch.zeros(8, 2), num_steps=2, warmup=2)  # fixed parameters: fine
    with pytest.raises(ValueError, match="not differentiable"):
        MEADS().run(gaussian_1d, torch.randn(8, 2), num_steps=2, differentiable=True)
