"""ESS, split R-hat, MCSE z-scores and the summary table on chains with known answers."""
import pytest
import torch
from pyro.ops.stats import effective_sample_size as pyro_effective_sample_size

from samplers.diagnostics import (
    bonferroni_threshold,
    chain_statistics,
    effective_sample_size,
    moment_z_scores,
    render_text,
    split_rhat,
    summary_table,
)
from samplers.trajectory import Trajectory


def _ar1(num_draws: int, num_chains: int, num_coordinates: int, rho: float, seed: int) -> torch.Tensor:
    """[T, C, D] stationary AR(1) chains with unit marginal variance and lag-1 correlation rho."""
    noise = torch.randn(num_draws, num_chains, num_coordinates, generator=torch.Generator().manual_seed(seed))
    chain = torch.empty_like(noise)
    chain[0] = noise[0]
    for t in range(1, num_draws):
        chain[t] = rho * chain[t - 1] + (1 - rho**2) ** 0.5 * noise[t]
    return chain


def _trajectory(states: torch.Tensor, **extra_info: torch.Tensor) -> Trajectory:
    num_draws, num_chains = states.shape[:2]
    info = {
        "acceptance_prob": torch.full((num_draws, num_chains), 0.75),
        "accepted": torch.ones(num_draws, num_chains, dtype=torch.bool),
        "divergent": torch.zeros(num_draws, num_chains, dtype=torch.bool),
        "step_size": torch.full((num_draws, num_chains), 0.25),
        **extra_info,
    }
    info["divergent"][3, 1] = True
    return Trajectory(states, states.flatten(2).pow(2).sum(-1), info)


def test_ess_matches_pyro_on_small_inputs():
    draws = torch.randn(301, 3, 4, generator=torch.Generator().manual_seed(0)).double().cumsum(0)
    for num_chains in (1, 3):
        expected = pyro_effective_sample_size(draws[:, :num_chains], chain_dim=1, sample_dim=0)
        torch.testing.assert_close(effective_sample_size(draws[:, :num_chains]), expected)


def test_ess_of_iid_draws_is_the_number_of_draws():
    # Measured: the per-coordinate estimate scatters ~5% around T*C with a ~2% downward bias (Geyer's
    # truncation), so the average over 200 coordinates sits within 5% and every coordinate within 30%.
    draws = torch.randn(1000, 4, 200, generator=torch.Generator().manual_seed(1))
    ess = effective_sample_size(draws)
    assert ess.shape == (200,)
    assert abs(float(ess.mean()) / 4000 - 1) < 0.05
    assert 0.7 < float(ess.min()) / 4000 and float(ess.max()) / 4000 < 1.3


def test_ess_of_ar1_chain_matches_its_known_value():
    # AR(1) with rho = 0.9: integrated autocorrelation time (1 + rho) / (1 - rho) = 19, so ESS =
    # T * C * (1 - rho) / (1 + rho). Same measured scatter as for iid draws (~5% per coordinate): the
    # mean over 100 coordinates within 5%, each coordinate within 30%.
    rho, num_draws, num_chains = 0.9, 10_000, 4
    ess = effective_sample_size(_ar1(num_draws, num_chains, 100, rho, seed=2))
    expected = num_draws * num_chains * (1 - rho) / (1 + rho)
    assert abs(float(ess.mean()) / expected - 1) < 0.05
    assert 0.7 < float(ess.min()) / expected and float(ess.max()) / expected < 1.3


def test_ess_of_antithetic_chains_is_floored_as_in_stan():
    """An alternating chain (lag-1 autocorrelation ~ -1) makes -1 + 2 * sum of autocorrelations negative;
    Stan floors tau at 1 / log10(N), i.e. ESS <= N log10 N for N = C * T draws (here 2 * 500)."""
    signs = torch.tensor([1.0, -1.0]).repeat(250).view(500, 1, 1)
    draws = signs * torch.ones(1, 2, 3) + 1e-3 * torch.randn(500, 2, 3, generator=torch.Generator().manual_seed(0))
    ess = effective_sample_size(draws)
    torch.testing.assert_close(ess, torch.full((3,), 1000 * 3.0, dtype=torch.float64))
    ar1 = _ar1(2000, 2, 5, -0.5, seed=7)  # mildly antithetic: ESS = N * 1.5 / 0.5 = 3N, below the cap
    assert abs(float(effective_sample_size(ar1).mean()) / (3 * 4000) - 1) < 0.1


def test_split_rhat_near_one_for_mixed_chains_and_large_for_stuck_chains():
    mixed = _ar1(2000, 4, 10, 0.5, seed=3)
    assert split_rhat(mixed).max() < 1.01
    stuck = mixed + torch.arange(4.0).view(1, 4, 1)  # each chain around its own mean, 1 sd apart
    assert split_rhat(stuck).min() > 1.5
    drifting = mixed + torch.linspace(0, 3, 2000).view(2000, 1, 1)  # a trend within every chain
    assert split_rhat(drifting).min() > 1.2  # split R-hat catches what plain R-hat would not


def test_moment_z_scores_detect_a_wrong_mean_or_variance():
    draws = _ar1(2000, 8, 3, 0.7, seed=4)
    truth_mean, truth_variance = torch.zeros(3), torch.ones(3)
    z_mean, z_variance = moment_z_scores(draws, truth_mean, truth_variance)
    assert z_mean.max() < bonferroni_threshold(6) and z_variance.max() < bonferroni_threshold(6)
    z_mean, _ = moment_z_scores(draws, truth_mean + 0.2, truth_variance)
    _, z_variance = moment_z_scores(draws, truth_mean, 1.3 * truth_variance)
    assert z_mean.min() > 2 * bonferroni_threshold(6) and z_variance.min() > 2 * bonferroni_threshold(6)


def test_bonferroni_threshold_values():
    assert abs(bonferroni_threshold(1, 0.05) - 1.95996) < 1e-4
    assert bonferroni_threshold(100) > bonferroni_threshold(10) > bonferroni_threshold(1)


def test_summary_table_per_coordinate_renders_and_prints(capsys):
    trajectory = _trajectory(_ar1(200, 4, 3, 0.5, seed=5))
    table = summary_table(trajectory, title="my run")
    printed = " ".join(capsys.readouterr().out.split())  # the caption may wrap
    for text in ("my run", "ESS", "R-hat", "MCSE", "acceptance 0.750", "divergences 1", "step size 0.25"):
        assert text in printed, text
    assert render_text(table).count("\n") >= 8  # title, rules, header, three coordinate rows, caption
    summary_table(trajectory, print_table=False)
    assert capsys.readouterr().out == ""


def test_summary_table_aggregates_many_coordinates_and_shows_tree_depth():
    states = _ar1(100, 2, 20, 0.5, seed=6)
    depth = torch.full((100, 2), 3)
    trajectory = _trajectory(states, tree_depth=depth, num_leapfrog_steps=torch.full((100, 2), 7))
    text = " ".join(render_text(summary_table(trajectory, print_table=False, max_coordinates=8)).split())
    assert "over 20 coordinates" in text and "median" in text
    assert "tree depth 3.00" in text and "leapfrog steps 7.0" in text
    assert chain_statistics(trajectory)["divergences"] == 1.0


def test_bad_states_are_refused():
    with pytest.raises(ValueError, match=r"\[T, C, \*event\]"):
        effective_sample_size(torch.randn(100))
    with pytest.raises(ValueError, match="at least 4 draws"):
        split_rhat(torch.randn(3, 2, 1))


def test_rank_normalized_diagnostics_on_iid_heavy_tailed_and_stuck_chains():
    """Vehtari et al. (2021): on iid draws rank R-hat is ~1 and bulk ESS ~ the number of draws; the ranks make
    them invariant to a monotone transform and usable on a Cauchy; a chain stuck in one mode of a mixture, or
    chains that differ only in scale, are flagged."""
    from samplers import bulk_ess, rank_rhat, tail_ess
    from samplers.diagnostics import rank_normalize

    generator = torch.Generator().manual_seed(0)
    iid = torch.randn(1000, 4, 3, generator=generator, dtype=torch.float64)
    # Ranks and their normal scores: the same for any monotone transform of the draws, ties averaged.
    torch.testing.assert_close(rank_normalize(iid), rank_normalize(iid.exp() * 3 + 1))
    tied = torch.tensor([[1.0], [1.0], [2.0], [0.0]]).reshape(4, 1)
    scores = rank_normalize(tied.reshape(2, 2))
    assert scores[0, 0] == scores[0, 1] and scores[1, 1] < scores[0, 0] < scores[1, 0]
    # iid: R-hat within Monte Carlo noise of 1 (4000 draws: ~0.002), ESS of the draws' count within ~10%
    assert float(rank_rhat(iid).max()) < 1.01
    assert torch.all((bulk_ess(iid) > 3400) & (bulk_ess(iid) < 4600))
    assert torch.all((tail_ess(iid) > 2800) & (tail_ess(iid) < 5200))  # indicator ESS is noisier
    uniform = torch.rand(1000, 4, 3, generator=generator, dtype=torch.float64)
    cauchy = torch.tan(torch.pi * (uniform - 0.5))  # standard Cauchy draws: no mean, no variance
    assert float(rank_rhat(cauchy).max()) < 1.01 and float(bulk_ess(cauchy).min()) > 3400
    # one of four chains in the other mode of a two-component mixture: flagged
    stuck = iid.clone()
    stuck[:, 0] += 6.0
    assert float(rank_rhat(stuck).min()) > 1.2
    # same location, one chain three times wider: invisible to the bulk, caught by the folded R-hat
    wide = iid.clone()
    wide[:, 0] *= 3.0
    assert float(rank_rhat(wide).min()) > 1.05


def test_the_summary_shows_and_warns_on_rank_diagnostics():
    from samplers.trajectory import Trajectory

    generator = torch.Generator().manual_seed(1)
    states = torch.randn(60, 2, 2, generator=generator)
    states[:, 0] += 5.0  # disagreeing chains, and far too few draws
    info = {"acceptance_prob": torch.ones(60, 2), "accepted": torch.ones(60, 2, dtype=torch.bool),
            "divergent": torch.zeros(60, 2, dtype=torch.bool), "step_size": torch.full((60, 2), 0.1)}
    text = " ".join(render_text(summary_table(Trajectory(states, torch.zeros(60, 2), info), print_table=False),
                                width=200).split())
    for column in ("bulk ESS", "tail ESS", "rank R-hat"):
        assert column in text
    assert "WARNING rank R-hat" in text and "WARNING bulk ESS" in text and "WARNING tail ESS" in text
