"""The pyro NUTS adapter (``PyroNUTS``): the run interface, per-step info, every knob, seeds and bad input.

Its moments are checked with the other Metropolis samplers in test_targets.py (as ``pyro_nuts``). Runs here are short (pyro
NUTS costs a few ms per transition, one chain at a time).
"""
import pytest
import torch

from samplers.pyro_nuts import PyroNUTS
from samplers.zoo import Funnel, Gaussian

TARGET = Gaussian.ill_conditioned(dim=3, condition_number=10.0, rotate=False)  # variances 1, 0.32, 0.1


def _run(sampler=None, *, num_chains=2, num_steps=60, warmup=60, seed=0, target=TARGET, **kwargs):
    y0 = target.initial_state(num_chains, torch.Generator().manual_seed(100))
    return (sampler or PyroNUTS()).run(target, y0, num_steps=num_steps, warmup=warmup,
                                   generator=torch.Generator().manual_seed(seed), **kwargs)


def test_trajectory_shapes_info_and_thinning():
    trajectory = _run(num_steps=60, thin=3)
    assert trajectory.states.shape == (20, 2, 3) and trajectory.energies.shape == (20, 2)
    torch.testing.assert_close(trajectory.energies, TARGET.energy(trajectory.states.flatten(0, 1)).view(20, 2))
    for name in ("acceptance_prob", "accepted", "divergent", "step_size", "tree_depth", "num_leapfrog_steps"):
        assert trajectory.info[name].shape == (20, 2), name
        assert trajectory.warmup_info[name].shape == (60, 2), name
    assert trajectory.info["accepted"].dtype == torch.bool
    assert ((trajectory.info["acceptance_prob"] >= 0) & (trajectory.info["acceptance_prob"] <= 1)).all()
    # NUTS samples from the whole trajectory: it moves on (almost) every transition.
    assert trajectory.info["accepted"].float().mean() > 0.9
    # A tree of depth d holds between d and 2^d - 1 leapfrog steps.
    depth, leapfrog = trajectory.warmup_info["tree_depth"], trajectory.warmup_info["num_leapfrog_steps"]
    assert (leapfrog >= depth).all() and (leapfrog <= 2**depth - 1).all()
    assert set(trajectory.adapted) == {"step_size", "inverse_mass"}
    assert trajectory.adapted["inverse_mass"].shape == (2, 3)


def test_recorded_acceptance_matches_pyros_running_average():
    sampler = PyroNUTS()
    potential = sampler._potential(TARGET, TARGET.initial_state(1), 0)
    kernel = sampler._kernel(potential)
    kernel.initial_params = {"y": torch.zeros(3)}
    torch.manual_seed(0)
    kernel.setup(warmup_steps=20)
    params, recorded = kernel.initial_params, []
    for _ in range(50):
        kernel.begin_transition()
        params = kernel.sample(params)
        recorded.append(float(torch.stack(kernel.leaf_accept_probs).mean()))
    assert abs(sum(recorded[20:]) / 30 - kernel._mean_accept_prob) < 1e-6  # float32 leaf probabilities


def test_reproducible_from_the_generator_and_chains_independent():
    first, again, other = (_run(num_steps=20, warmup=20, seed=seed) for seed in (3, 3, 4))
    torch.testing.assert_close(first.states, again.states)
    assert not torch.equal(first.states, other.states)
    assert not torch.equal(first.states[:, 0], first.states[:, 1])
    # The adapter isolates pyro's use of the global RNG: the caller's global stream is untouched.
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    _run(num_steps=5, warmup=0, num_chains=1)
    torch.testing.assert_close(torch.rand(3), expected)


def test_target_accept_and_step_size_adaptation_knobs():
    cautious = _run(PyroNUTS(target_accept=0.95), num_chains=1, num_steps=40, seed=1)
    bold = _run(PyroNUTS(target_accept=0.6), num_chains=1, num_steps=40, seed=1)
    assert (cautious.adapted["step_size"] < bold.adapted["step_size"]).all()
    assert cautious.acceptance_rate().mean() > bold.acceptance_rate().mean()
    fixed = _run(PyroNUTS(step_size=0.05, adapt_step_size=False), num_steps=10, warmup=20)
    assert (fixed.info["step_size"] == 0.05).all() and (fixed.warmup_info["step_size"] == 0.05).all()


def test_mass_adaptation_knob():
    # Warmup long enough for pyro's windows; the diagonal estimate tracks the variances (1, 0.32, 0.1).
    adapted = _run(PyroNUTS(adapt_mass=True), num_chains=1, num_steps=1, warmup=300).adapted["inverse_mass"][0]
    assert adapted[0] > adapted[1] > adapted[2]
    assert 0.4 < float(adapted[0] / adapted[2]) / 10 < 2.5
    fixed = _run(PyroNUTS(adapt_mass=False), num_chains=1, num_steps=1, warmup=60).adapted["inverse_mass"]
    torch.testing.assert_close(fixed, torch.ones(1, 3))


def test_max_tree_depth_caps_the_doublings():
    capped = _run(PyroNUTS(step_size=0.01, adapt_step_size=False, max_tree_depth=2), num_steps=20, warmup=0)
    assert (capped.info["tree_depth"] <= 2).all() and (capped.info["num_leapfrog_steps"] <= 3).all()
    assert (capped.info["tree_depth"] == 2).any()  # tiny steps never U-turn: the cap is what stops them


def test_divergences_are_flagged():
    # Neal's funnel with a large fixed step: the neck makes leapfrog energy errors explode.
    funnel = Funnel(dim=10, scale=3.0)
    trajectory = _run(PyroNUTS(step_size=1.5, adapt_step_size=False), target=funnel, num_steps=40, warmup=0)
    assert trajectory.info["divergent"].any()
    assert torch.isfinite(trajectory.states).all()


def test_per_position_and_per_chain_energies():
    centers = torch.tensor([[-3.0, 0.0], [3.0, 1.0]])  # row c of the energy is centred at centers[c]

    def conditional(y):  # [C, 2] -> [C, 2] per-position energies of N(centers[c], I)
        return 0.5 * (y - centers) ** 2

    y0 = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="per_chain_energy=True"):
        PyroNUTS().run(conditional, y0, num_steps=5)
    trajectory = PyroNUTS(per_chain_energy=True).run(conditional, y0, num_steps=150, warmup=100,
                                                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(trajectory.energies, conditional(trajectory.states).sum(-1))
    # Chain means within 4 sd/sqrt(ESS-ish 50) of their own centres, far from the other chain's.
    assert (trajectory.states.mean(0) - centers).abs().max() < 0.6


def test_bad_input():
    y0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="no differentiable mode"):
        PyroNUTS().run(TARGET, y0, num_steps=5, differentiable=True)
    with pytest.raises(ValueError, match="only apply with differentiable=True"):
        PyroNUTS().run(TARGET, y0, num_steps=5, truncate=2)
    with pytest.raises(ValueError, match="non-finite energy"):
        PyroNUTS().run(lambda y: torch.log(y).sum(-1), -torch.ones(2, 3), num_steps=5)
    with pytest.raises(ValueError, match="step_size"):
        PyroNUTS(step_size=torch.ones(2))
    with pytest.raises(ValueError, match="target_accept"):
        PyroNUTS(target_accept=1.5)
    with pytest.raises(ValueError, match="max_tree_depth"):
        PyroNUTS(max_tree_depth=0)
