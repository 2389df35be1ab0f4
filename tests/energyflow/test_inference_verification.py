"""Self-verification: best-of-n by lowest final energy, per input and position."""
import torch

from energyflow.inference import (
    ThinkingConfig,
    best_of_n_trace,
    lowest_energy_index,
    self_verify,
    take_candidates,
    think_tokens,
)
from test_inference import tiny_text_ebm


def tilted_double_well(y: torch.Tensor) -> torch.Tensor:
    """[C, S, 1] -> [C, S]: (y^2 - 1)^2 + 0.3 y; the global minimum is near y = -1.04, a local one near +0.96."""
    y = y.squeeze(-1)
    return (y.pow(2) - 1).pow(2) + 0.3 * y


def test_selection_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    batch, n, positions = 3, 5, 4
    energies = torch.randn(batch * n, positions, generator=generator)
    states = torch.randn(batch * n, positions, 7, generator=generator)
    index = lowest_energy_index(energies, n)
    chosen = take_candidates(states, index, n)
    for b in range(batch):
        for s in range(positions):
            rows = energies[b * n:(b + 1) * n, s]
            best = int(rows.argmin())
            assert int(index[b, s]) == best
            torch.testing.assert_close(chosen[b, s], states[b * n + best, s])


def test_a_diverged_candidate_is_never_chosen():
    energies = torch.tensor([[float("nan")], [2.0], [1.0], [float("nan")]])
    assert lowest_energy_index(energies, 2).tolist() == [[1], [0]]


def test_best_of_n_finds_the_global_minimum_of_a_known_energy():
    generator = torch.Generator().manual_seed(0)
    batch, n, positions = 4, 8, 16
    config = ThinkingConfig(num_steps=200, step_size=0.05)
    y0 = 2.0 * torch.randn(batch * n, positions, 1, generator=generator)
    verified = self_verify(tilted_double_well, y0, config, n)
    single = verified.thinking.state.view(batch, n, positions)[:, 0]  # what one start per input reaches
    assert bool((single > 0).any()), "some single starts must end in the local minimum for the test to bite"
    # The global minimum of (y^2-1)^2 + 0.3y, from its derivative 4y^3 - 4y + 0.3 = 0.
    roots = torch.tensor([4.0, 0.0, -4.0, 0.3]).numpy()
    import numpy as np

    global_min = float(min(r.real for r in np.roots(roots) if abs(r.imag) < 1e-12))
    torch.testing.assert_close(verified.state.squeeze(-1), torch.full((batch, positions), global_min),
                               atol=1e-4, rtol=0)


def test_trace_selection_at_the_last_step_equals_self_verify():
    model = tiny_text_ebm()
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    config = ThinkingConfig(num_steps=3, step_size=100.0)
    verified = think_tokens(model, tokens, config, num_candidates=4, targets=tokens,
                            generator=torch.Generator().manual_seed(2))
    energies, losses = best_of_n_trace(verified.thinking, 4)
    assert energies.shape == (4, 2, 6) and losses.shape == (4, 2, 6)
    torch.testing.assert_close(energies[-1], verified.energies)
    # Selection can only lower the mean energy relative to the candidates' average.
    assert float(energies[-1].mean()) <= float(verified.thinking.energies.mean())


def test_self_verification_refuses_identical_candidates_from_a_deterministic_start():
    import pytest

    from energyflow.objectives.components import Zeros

    model = tiny_text_ebm()
    tokens = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="identical"):
        think_tokens(model, tokens, ThinkingConfig(num_steps=1, step_size=1.0), num_candidates=2,
                     initial_state=Zeros())
    # One candidate, or noise that makes the candidates differ, is fine.
    think_tokens(model, tokens, ThinkingConfig(num_steps=1, step_size=1.0), initial_state=Zeros())
    noisy = think_tokens(model, tokens, ThinkingConfig(num_steps=1, step_size=1.0, noise_scale=0.5),
                         num_candidates=2, initial_state=Zeros(), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(noisy.thinking.state[0], noisy.thinking.state[1])
