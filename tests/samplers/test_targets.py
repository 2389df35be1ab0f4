"""One shared table of zoo targets run through every Metropolis-corrected sampler (HMC, MALA, NUTS, PyroNUTS).

Each (sampler, target) pair checks every coordinate's mean and variance with Monte Carlo standard errors:
z = |estimate - truth| / (sd / sqrt(ESS)) (for the variance: the mean of (y - truth_mean)^2 and the sd and
ESS of that quantity). A correct sampler gives z ~ |N(0, 1)| per moment; with k = 2 * dim moments per
pair, the Bonferroni threshold ndtri(1 - 1e-4 / (2k)) (4.1 to 4.4 here) bounds the chance that a correct
sampler fails a pair below 1e-4, i.e. below 0.2% for the whole table. A biased sampler's z grows like
sqrt(ESS): with thousands of effective draws, a bias of ~5% of an sd already fails. Split R-hat < 1.1
checks that the chains agree. Fixed seeds; HMC, MALA and NUTS run many batched chains, pyro's NUTS few, short ones.
"""
import pytest
import torch

from samplers import HMC, MALA
from samplers.diagnostics import bonferroni_threshold, effective_sample_size, moment_z_scores, split_rhat
from samplers.meads import MEADS
from samplers.nuts import NUTS
from samplers.pyro_nuts import PyroNUTS
from samplers.zoo import Banana, DoubleWell, Funnel, Gaussian, GaussianMixture

TARGETS = {
    "correlated_gaussian": Gaussian.ill_conditioned(dim=4, condition_number=10.0, seed=2),
    "mixture": GaussianMixture.two_modes(dim=2),
    "double_well": DoubleWell(dim=2, barrier=1.0),
    # Curvature 0.25: at 0.5 and above, every sampler here (HMC, MALA and pyro's NUTS alike) visits the
    # banana's tips too rarely at these run lengths and under-covers Var y2 (measured: 5-15% low).
    "banana": Banana(curvature=0.25),
    "funnel": Funnel(dim=3, scale=1.0),  # a mild funnel: Neal's scale 3 needs far longer runs
}

# Pyro's NUTS gets a few hundred effective draws. For the banana and the funnel the squared deviations behind
# the variance check are heavy-tailed (y1^4, exp(v) terms), and at that ESS their sample sd still misses
# the tail, so the variance z-score is not yet normal (measured: z up to 6 on some seeds for a correct
# sampler). There it checks the means; the batched samplers, with thousands of effective draws, check both.
FEW_DRAWS, HEAVY_TAILED_SQUARES = {"pyro_nuts"}, {"banana", "funnel"}

# name -> (constructor, num_chains, warmup, num_steps, minimum ESS the run must reach on every coordinate
# so that its z-scores are not vacuous; the measured minima are at least twice these)
SAMPLERS = {
    "hmc": (lambda: HMC(step_size=0.1, num_leapfrog_steps=8), 128, 200, 200, 2000),
    "mala": (lambda: MALA(step_size=0.1), 256, 300, 400, 1000),
    # The library's default trajectory for one target: ChEES (samplers.chees) adapting T during warmup, then
    # Halton-jittered lengths; and the quarter-turn rule, which fixes L at the end of warmup.
    "hmc_chees": (lambda: HMC(pooled_mass=True, shared_step_size=True), 128, 200, 200, 1500),
    "hmc_quarter_turn": (lambda: HMC(trajectory="quarter_turn", pooled_mass=True, shared_step_size=True),
                         128, 200, 200, 1500),
    # Pooled dense / low-rank masses (samplers.mass); jitter because a whitening mass makes a fixed eps * L
    # resonate (measured without it on the 4-d Gaussian: ESS 343, R-hat 1.24). Measured minima: 5886, 5832, 3504.
    "hmc_dense": (lambda: HMC(step_size=0.1, num_leapfrog_steps=8, mass="dense", pooled_mass=True,
                              step_size_jitter=0.3), 128, 200, 200, 2000),
    "hmc_low_rank": (lambda: HMC(step_size=0.1, num_leapfrog_steps=8, mass="low_rank", mass_rank=1, pooled_mass=True,
                                 step_size_jitter=0.3), 128, 200, 200, 2000),
    "mala_dense": (lambda: MALA(step_size=0.1, adapt_mass=True, mass="dense", pooled_mass=True), 256, 300, 400, 1000),
    # Batched NUTS, pooled (every chain samples the same target): one well-estimated mass matrix and a step
    # size that lands on target_accept keep the lockstep trees shallow (4-11 s per target at one thread under
    # load 6). Per-chain adaptation needed 200 + 200 steps (a warmup of 100 left the double well unmixed,
    # R-hat 1.11) and ran 3-4x longer.
    "nuts": (lambda: NUTS(step_size=0.3, max_tree_depth=6, pooled_mass=True, shared_step_size=True),
             128, 150, 150, 1000),
    "pyro_nuts": (lambda: PyroNUTS(step_size=0.1), 3, 100, 150, 15),
    "meads": (lambda: MEADS(), 128, 200, 800, 1200),  # one gradient per step: more, cheaper steps
}


@pytest.mark.parametrize("target_name", list(TARGETS))
@pytest.mark.parametrize("sampler_name", list(SAMPLERS))
def test_moments_within_monte_carlo_error(sampler_name, target_name):
    target = TARGETS[target_name]
    make_sampler, num_chains, warmup, num_steps, min_ess = SAMPLERS[sampler_name]
    generator = torch.Generator().manual_seed(1234)
    y0 = target.initial_state(num_chains, generator)
    trajectory = make_sampler().run(target, y0, num_steps=num_steps, warmup=warmup, generator=generator)

    z_mean, z_variance = moment_z_scores(trajectory.states, target.mean, target.variance)
    threshold = bonferroni_threshold(2 * target.dim, family_error=1e-4)
    assert z_mean.max() < threshold, f"mean z-scores {z_mean.tolist()} vs threshold {threshold:.2f}"
    if not (sampler_name in FEW_DRAWS and target_name in HEAVY_TAILED_SQUARES):
        assert z_variance.max() < threshold, f"variance z-scores {z_variance.tolist()} vs threshold {threshold:.2f}"
    assert effective_sample_size(trajectory.states).min() > min_ess
    assert split_rhat(trajectory.states).max() < 1.1
    assert torch.isfinite(trajectory.states).all()


def test_the_check_has_power_at_these_run_lengths():
    # The same threshold must reject a 10% error in the variance (and a 0.1 sd error in the mean) at the
    # run length used above; otherwise passing the table would mean little.
    target = TARGETS["correlated_gaussian"]
    make_sampler, num_chains, warmup, num_steps, _ = SAMPLERS["mala"]
    generator = torch.Generator().manual_seed(1234)
    y0 = target.initial_state(num_chains, generator)
    trajectory = make_sampler().run(target, y0, num_steps=num_steps, warmup=warmup, generator=generator)
    threshold = bonferroni_threshold(2 * target.dim, family_error=1e-4)
    shifted_mean = target.mean + 0.1 * target.variance.sqrt()
    z_mean, _ = moment_z_scores(trajectory.states, shifted_mean, target.variance)
    _, z_variance = moment_z_scores(trajectory.states, target.mean, 1.1 * target.variance)
    assert z_mean.min() > threshold and z_variance.min() > threshold
