"""The batched NUTS (``samplers.nuts``): hand-checked trees against a recursive oracle, agreement in
distribution with pyro's NUTS (``PyroNUTS``), the depth cap, per-chain tree sizes, adaptation and bad input.

The oracle below is a plain-float, recursive transcription of the algorithm (Betancourt 2017, Stan's
``base_nuts``), written independently of the batched, iterative implementation: it returns the depth at
which the doubling stops, the number of leapfrog steps, the mean acceptance statistic and the exact
probability with which each point of the trajectory becomes the sample (biased progressive sampling
across doublings, multinomial within a subtree). Given the momentum and the directions, the tree is
deterministic; only the sample choice is random, so many identical chains are many repetitions of it.
"""
import math

import pytest
import torch

from samplers import NUTS, PyroNUTS
from samplers.diagnostics import bonferroni_threshold, effective_sample_size
from samplers.nuts import build_tree, init
from samplers.zoo import Funnel, Gaussian


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _add(a, b, scale=1.0):
    return [x + scale * y for x, y in zip(a, b)]


def _holds(velocity_a, velocity_b, rho):  # identity mass: velocities are the momenta
    return _dot(velocity_a, rho) > 0 and _dot(velocity_b, rho) > 0


def oracle(sigmas, step_size, y0, p0, directions, across=True):
    """NUTS on the Gaussian with standard deviations ``sigmas``; ``across=False`` drops Stan's checks
    across merged subtrees (to show that a test can tell)."""
    grad = lambda y: [v / s**2 for v, s in zip(y, sigmas)]  # noqa: E731
    hamiltonian = lambda y, p: 0.5 * sum((v / s) ** 2 for v, s in zip(y, sigmas)) + 0.5 * _dot(p, p)  # noqa: E731
    h0 = hamiltonian(y0, p0)

    def subtree(y, p, direction, depth):
        if depth == 0:
            eps = direction * step_size
            p = _add(p, grad(y), -0.5 * eps)
            y = _add(y, p, eps)
            p = _add(p, grad(y), -0.5 * eps)
            error = hamiltonian(y, p) - h0
            return dict(leaves=[(tuple(y), error)], rho=p, first=p, last=p, end=(y, p), valid=error <= 1000)
        a = subtree(y, p, direction, depth - 1)
        if not a["valid"]:
            return a
        b = subtree(*a["end"], direction, depth - 1)
        leaves = a["leaves"] + b["leaves"]
        if not b["valid"]:
            return dict(b, leaves=leaves)
        rho = _add(a["rho"], b["rho"])
        valid = _holds(a["first"], b["last"], rho)
        if across:
            valid = (valid and _holds(a["first"], b["first"], _add(a["rho"], b["first"]))
                     and _holds(a["last"], b["last"], _add(b["rho"], a["last"])))
        return dict(leaves=leaves, rho=rho, first=a["first"], last=b["last"], end=b["end"], valid=valid)

    left = right = (y0, p0)
    rho, weight, probabilities, leaves, complete = p0, 1.0, {tuple(y0): 1.0}, [], True
    weights = {tuple(y0): 1.0}  # exp(-(H - H0)) of every point of the (accepted) trajectory
    for depth, direction in enumerate(directions):
        new = subtree(*(right if direction > 0 else left), direction, depth)
        leaves += new["leaves"]
        if not new["valid"]:
            complete = False
            break
        new_weights = {y: math.exp(-error) for y, error in new["leaves"]}
        accept = min(1.0, sum(new_weights.values()) / weight)
        probabilities = {y: q * (1 - accept) for y, q in probabilities.items()}
        probabilities.update({y: accept * w / sum(new_weights.values()) for y, w in new_weights.items()})
        weights.update(new_weights)
        weight += sum(new_weights.values())
        far, near = (left, right) if direction > 0 else (right, left)
        turned = not _holds(far[1], new["last"], _add(rho, new["rho"]))
        if across:
            turned = (turned or not _holds(far[1], new["first"], _add(rho, new["first"]))
                      or not _holds(near[1], new["last"], _add(new["rho"], near[1])))
        rho = _add(rho, new["rho"])
        right, left = (new["end"], left) if direction > 0 else (right, new["end"])
        if turned:
            break
    mean_accept = sum(min(1.0, math.exp(-error)) for _, error in leaves) / len(leaves)
    return dict(depth=depth + 1, num_leaves=len(leaves), probabilities=probabilities, weights=weights,
                accept=mean_accept, complete=complete)


def _gaussian(sigmas):
    scale = torch.tensor(sigmas, dtype=torch.float64)
    return lambda y: 0.5 * (y / scale).square().sum(dim=-1)


def _batched(sigmas, step_size, y0, p0, directions, seed=0):
    """build_tree in float64; y0, p0 [C, d], directions [depth, C]."""
    energy_fn = _gaussian(sigmas)
    return build_tree(init(y0, energy_fn), p0, energy_fn, step_size=torch.tensor(step_size, dtype=torch.float64),
                      directions=directions, generator=torch.Generator().manual_seed(seed))


# (sigmas, step size, y0, p0, directions, what stops the doubling), found by scanning the oracle:
# "top": the merged tree turns after 3 complete doublings (2^3 - 1 = 7 steps);
# "inner": a sub-subtree of the 4th doubling turns, after 9 steps; "across": only Stan's checks across the
# merged subtrees stop it at depth 3 (without them: depth 4, 11 steps).
CASES = {
    "top": ([1.0], 0.39, [0.11], [-1.33], [-1, -1, -1, -1, -1, -1], 3, 7),
    "inner": ([1.0], 0.13, [1.02], [-1.0], [1, 1, -1, -1, 1, 1], 4, 9),
    "across": ([1.0, 0.5], 0.58, [0.6, 0.8], [1.8, 0.7], [-1, 1, 1, 1, 1, 1], 3, 7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hand_checked_tree_stops_where_the_oracle_does_and_samples_its_leaves(case):
    sigmas, step_size, y0, p0, directions, depth, num_leaves = CASES[case]
    expected = oracle(sigmas, step_size, y0, p0, directions)
    assert (expected["depth"], expected["num_leaves"]) == (depth, num_leaves)
    if case == "across":
        assert oracle(sigmas, step_size, y0, p0, directions, across=False)["num_leaves"] == 11
    num_chains = 20000  # identical chains: 20000 repetitions of the same tree's sample choice
    y = torch.tensor(y0, dtype=torch.float64).expand(num_chains, -1)
    p = torch.tensor(p0, dtype=torch.float64).expand(num_chains, -1)
    signs = torch.tensor(directions, dtype=torch.float64)[:, None].expand(-1, num_chains)
    sample, info = _batched(sigmas, step_size, y, p, signs)
    assert (info.tree_depth == depth).all() and (info.num_leapfrog_steps == num_leaves).all()
    torch.testing.assert_close(info.acceptance_prob, torch.full_like(info.acceptance_prob, expected["accept"]))
    assert not info.divergent.any()
    # Every sample is a point of the oracle's trajectory (same leapfrog positions, up to rounding) ...
    points = torch.tensor(list(expected["probabilities"]), dtype=torch.float64)
    distance, index = torch.cdist(sample.y, points).min(dim=1)
    assert distance.max() < 1e-6
    torch.testing.assert_close(sample.energy, _gaussian(sigmas)(sample.y))
    assert (info.accepted == (index != 0)).all()  # point 0 is the start
    # ... chosen with the oracle's probabilities: binomial z-scores per point, Bonferroni over the points.
    counts = torch.bincount(index, minlength=len(points)).double()
    threshold = bonferroni_threshold(len(points), family_error=1e-4)

    def z_scores(probabilities):
        q = torch.tensor(probabilities, dtype=torch.float64)
        return (counts - num_chains * q).abs() / (num_chains * q * (1 - q)).clamp_min(1e-12).sqrt()

    assert z_scores(list(expected["probabilities"].values())).max() < threshold
    # Power: plain multinomial sampling over the final tree (no bias towards the new subtree) is rejected.
    weights = list(expected["weights"].values())
    assert z_scores([w / sum(weights) for w in weights]).max() > threshold


def test_every_chain_builds_its_own_tree_in_lockstep():
    # 64 chains with their own momenta and directions: each stops where the oracle says, although all
    # were integrated together. A chain whose last subtree was complete made exactly 2^depth - 1 steps; one
    # whose last subtree turned or diverged inside made fewer (or as many, if that happened at its last leaf).
    generator = torch.Generator().manual_seed(5)
    sigmas, step_size, num_chains, max_depth = [1.0, 0.3], 0.15, 64, 6
    y0 = torch.randn(num_chains, 2, generator=generator, dtype=torch.float64) * torch.tensor(sigmas, dtype=torch.float64)
    p0 = torch.randn(num_chains, 2, generator=generator, dtype=torch.float64)
    signs = torch.where(torch.rand(max_depth, num_chains, generator=generator) < 0.5, 1.0, -1.0).double()
    _, info = _batched(sigmas, step_size, y0, p0, signs)
    expected = [oracle(sigmas, step_size, y0[c].tolist(), p0[c].tolist(), signs[:, c].tolist()) for c in range(num_chains)]
    assert info.tree_depth.tolist() == [float(e["depth"]) for e in expected]
    assert info.num_leapfrog_steps.tolist() == [float(e["num_leaves"]) for e in expected]
    torch.testing.assert_close(info.acceptance_prob, torch.tensor([e["accept"] for e in expected], dtype=torch.float64))
    complete = torch.tensor([e["complete"] for e in expected])
    full = info.num_leapfrog_steps == 2**info.tree_depth - 1
    assert full[complete].all() and complete.any() and not full[~complete].all()
    assert len(set(info.tree_depth.tolist())) > 1 and len(set(info.num_leapfrog_steps.tolist())) > 3


def test_max_tree_depth_caps_the_doublings():
    target = Gaussian.ill_conditioned(dim=3, condition_number=10.0, rotate=False)
    sampler = NUTS(step_size=0.01, adapt_step_size=False, max_tree_depth=3)  # tiny steps never turn in 7
    trajectory = sampler.run(target, target.initial_state(8, torch.Generator().manual_seed(0)), num_steps=5,
                             generator=torch.Generator().manual_seed(1))
    assert (trajectory.info["tree_depth"] == 3).all() and (trajectory.info["num_leapfrog_steps"] == 7).all()


def _moments_with_errors(states):
    """Means of y and y^2 per coordinate [2, d] and their Monte Carlo standard errors (sd / sqrt(ESS))."""
    values = torch.stack([states, states.square()])  # [2, T, C, d]
    estimates = values.flatten(1, 2).mean(dim=1)
    errors = values.flatten(1, 2).std(dim=1) / torch.stack([effective_sample_size(v) for v in values]).sqrt()
    return estimates, errors


def test_matches_pyros_nuts_in_distribution():
    # A rotated 2-d Gaussian (variances 1 and 0.1). z = difference of the two estimates in units of their
    # combined MCSE, for E y and E y^2 per coordinate; Bonferroni over the 4 moments. Pyro's single chain
    # (1000 draws, ESS ~ 600-1200) sets the error; the batched run's 256 chains add little to it.
    target = Gaussian.ill_conditioned(dim=2, condition_number=10.0, seed=3)
    generator = torch.Generator().manual_seed(11)
    pyro_run = PyroNUTS().run(target, target.initial_state(1, generator), num_steps=1000, warmup=100,
                              generator=generator)
    batched = NUTS(pooled_mass=True, shared_step_size=True).run(
        target, target.initial_state(256, generator), num_steps=100, warmup=100, generator=generator)
    reference, reference_error = _moments_with_errors(pyro_run.states.double())
    estimate, error = _moments_with_errors(batched.states.double())
    combined = (reference_error.square() + error.square()).sqrt()
    threshold = bonferroni_threshold(4, family_error=1e-3)
    assert ((estimate - reference).abs() / combined).max() < threshold
    # Power, whatever the sign of the noise: an error of size delta in a moment fails the assertion above with
    # probability >= 0.999 once delta / combined > threshold + 3.09 (the normal's 0.999 quantile). So a 0.45 sd
    # error in either mean, or a 60% error in either E y^2, would fail (at this seed with ~20% to spare on the
    # tighter coordinate). Pyro's single chain estimates E y^2 to ~7%, so this comparison cannot see smaller
    # errors; test_targets.py checks the batched NUTS's moments against the truth to a few percent. (The earlier
    # form, a 0.3 sd shift added to this realization, had ~1 sd of margin and failed on another CPU's rounding.)
    detectable = threshold + 3.09
    second_moment = target.variance.to(estimate) + target.mean.to(estimate).square()
    assert (0.45 * target.variance.sqrt().to(estimate) / combined[0]).min() > detectable
    assert (0.6 * second_moment / combined[1]).min() > detectable


def test_run_interface_thinning_reproducibility_and_adaptation():
    target = Gaussian.ill_conditioned(dim=3, condition_number=10.0, rotate=False)  # variances 1, 0.32, 0.1
    y0 = target.initial_state(32, torch.Generator().manual_seed(0))

    def run(sampler, seed=1, **kwargs):
        return sampler.run(target, y0, generator=torch.Generator().manual_seed(seed), **kwargs)

    trajectory = run(NUTS(step_size=0.3), num_steps=30, warmup=80, thin=3)
    assert trajectory.states.shape == (10, 32, 3) and trajectory.energies.shape == (10, 32)
    torch.testing.assert_close(trajectory.energies, target.energy(trajectory.states.flatten(0, 1)).view(10, 32))
    for name in ("acceptance_prob", "accepted", "divergent", "step_size", "tree_depth", "num_leapfrog_steps"):
        assert trajectory.info[name].shape == (10, 32) and trajectory.warmup_info[name].shape == (80, 32), name
    assert trajectory.info["accepted"].dtype == torch.bool and trajectory.info["accepted"].float().mean() > 0.9
    assert set(trajectory.adapted) == {"step_size", "inverse_mass"}
    ratio = trajectory.adapted["inverse_mass"].mean(dim=0) / target.variance.float()  # per-chain estimates
    assert ((ratio > 0.7) & (ratio < 1.4)).all(), ratio
    again, other = run(NUTS(), num_steps=5, warmup=5), run(NUTS(), seed=2, num_steps=5, warmup=5)
    torch.testing.assert_close(again.states, run(NUTS(), num_steps=5, warmup=5).states)
    assert not torch.equal(again.states, other.states)
    pooled = run(NUTS(step_size=0.3, pooled_mass=True, shared_step_size=True, target_accept=0.9), num_steps=30,
                 warmup=80)
    assert (pooled.adapted["step_size"] == pooled.adapted["step_size"][0]).all()
    assert (pooled.adapted["inverse_mass"] == pooled.adapted["inverse_mass"][0]).all()
    # The shared step size is adapted from the chains' mean acceptance statistic: it lands near the target.
    assert abs(float(pooled.info["acceptance_prob"].mean()) - 0.9) < 0.05
    fixed = run(NUTS(step_size=0.2, adapt_step_size=False, adapt_mass=False), num_steps=3, warmup=3)
    assert (fixed.info["step_size"] == 0.2).all() and "inverse_mass" not in fixed.adapted


def test_divergences_are_flagged_and_rejected_per_chain():
    funnel = Funnel(dim=10, scale=3.0)  # a large fixed step in Neal's funnel: leapfrog errors explode
    y0 = funnel.initial_state(32, torch.Generator().manual_seed(0))
    trajectory = NUTS(step_size=1.5, adapt_step_size=False).run(funnel, y0, num_steps=10,
                                                               generator=torch.Generator().manual_seed(1))
    assert trajectory.info["divergent"].any() and not trajectory.info["divergent"].all()
    assert torch.isfinite(trajectory.states).all() and torch.isfinite(trajectory.energies).all()


def test_bad_input():
    y0 = torch.zeros(2, 3)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_tree_depth must be a positive int"):
            NUTS(max_tree_depth=bad)
    with pytest.raises(ValueError, match="target_accept must be in"):
        NUTS(target_accept=1.0)
    with pytest.raises(ValueError, match="max_energy_error must be positive"):
        NUTS(max_energy_error=0.0)
    with pytest.raises(ValueError, match="not differentiable"):
        NUTS().run(_gaussian([1.0] * 3), y0.double(), num_steps=2, differentiable=True)
    with pytest.raises(ValueError, match="step_size must be finite and positive"):
        NUTS(step_size=-0.1).run(_gaussian([1.0] * 3), y0.double(), num_steps=2)
    with pytest.raises(ValueError, match="per-element step size"):
        NUTS(step_size=torch.full((2, 3), 0.1)).run(_gaussian([1.0] * 3), y0.double(), num_steps=2, warmup=3)
    message = str(pytest.raises(ValueError, NUTS, max_tree_depth=0).value)
    assert "\n" not in message
