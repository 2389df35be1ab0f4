"""``samplers.vectorize``: an energy written for one state, lifted to chains, equals the hand-batched energy in
value and gradient and samples like it; an energy that cannot be lifted is named."""
import pytest
import torch

from samplers import HMC, energy_and_grad, vectorize


def single(y):  # one state [3]: a correlated Gaussian plus a quartic bump
    return 0.5 * (y[0] ** 2 + 2.0 * y[1] ** 2 + y[2] ** 2 + y[0] * y[2]) + 0.1 * (y ** 4).sum()


def batched(y):  # the same, written for chains [C, 3]
    return 0.5 * (y[:, 0] ** 2 + 2.0 * y[:, 1] ** 2 + y[:, 2] ** 2 + y[:, 0] * y[:, 2]) + 0.1 * (y ** 4).sum(-1)


def test_vectorized_equals_the_batched_energy_and_samples_alike():
    y = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lifted = energy_and_grad(vectorize(single), y)
    reference = energy_and_grad(batched, y)
    torch.testing.assert_close(lifted.energy, reference.energy)
    torch.testing.assert_close(lifted.grad, reference.grad)
    runs = [HMC(0.2, 5).run(fn, y, num_steps=20, generator=torch.Generator().manual_seed(1))
            for fn in (vectorize(single), batched)]
    torch.testing.assert_close(runs[0].states, runs[1].states)  # same draws, same chains


def test_per_position_energies_and_bad_energies_are_named():
    y = torch.randn(4, 5, 2)
    assert vectorize(lambda state: state.pow(2).sum(-1))(y).shape == (4, 5)  # [S] per state -> [C, S]
    with pytest.raises(ValueError, match="must return a scalar"):
        vectorize(lambda state: state)(y)  # [5, 2] per state
    with pytest.raises(ValueError, match="could not be vmapped"):
        vectorize(lambda state: state.sum() if float(state.sum()) > 0 else -state.sum())(y)
