"""Contrastive divergence (persistent, any sampler) and denoising score matching learn a 2-D Gaussian.

The model is ``GaussianEnergy`` (an exact exponential family), so the fit is read off as a mean and a
covariance and compared with the data's *sample* moments (removing the data's own sampling noise).
Tolerance 0.08 per entry: the single-batch standard error of a covariance entry at batch 500 is about
sqrt(2 / 500) ~ 0.063 and the final parameters average many batches at a small learning rate (measured
errors <= 0.022 over three seeds); a wrong sign, a missing term or a broken sampler misses by > 0.2.
"""
from __future__ import annotations

import pytest
import torch

from energyflow.models import GaussianEnergy
from energyflow.objectives import ContrastiveDivergence, DenoisingScoreMatching, PersistentChains, RandomNoise
from samplers import MALA, Langevin

MEAN = torch.tensor([1.0, -0.5])
COVARIANCE = torch.tensor([[1.0, 0.6], [0.6, 0.8]])
TOLERANCE = 0.08


def gaussian_data(generator: torch.Generator, count: int = 4000) -> torch.Tensor:
    return MEAN + torch.randn(count, 2, generator=generator) @ torch.linalg.cholesky(COVARIANCE).T


def fit(objective, data: torch.Tensor, generator: torch.Generator, iterations: int = 300) -> GaussianEnergy:
    model = GaussianEnergy(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for index in range(iterations):
        batch = data[torch.randint(0, len(data), (500,), generator=generator)]
        out = objective(model, batch, generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:  # linear decay: the last iterations average out batch noise
            group["lr"] = 0.05 * (1 - index / iterations) + 0.002
    return model


def test_persistent_contrastive_divergence_matches_the_data_moments():
    generator = torch.Generator().manual_seed(0)
    data = gaussian_data(generator)
    chains = PersistentChains(capacity=1000, reinit_fraction=0.05, initial_state=RandomNoise(1.0))
    objective = ContrastiveDivergence(MALA(0.3, adapt_step_size=False), num_steps=4, chains=chains)
    model = fit(objective, data, generator)
    assert (model.location.detach() - data.mean(0)).abs().max() < TOLERANCE
    assert (model.covariance() - torch.cov(data.T)).abs().max() < TOLERANCE


def test_denoising_score_matching_fits_the_noised_data_exactly():
    """DSM's minimizer is the energy of the data convolved with N(0, sigma^2 I): covariance + sigma^2 I."""
    generator = torch.Generator().manual_seed(1)
    data = gaussian_data(generator)
    model = fit(DenoisingScoreMatching(sigma=0.5), data, generator)
    assert (model.location.detach() - data.mean(0)).abs().max() < TOLERANCE
    assert (model.covariance() - torch.cov(data.T) - 0.25 * torch.eye(2)).abs().max() < TOLERANCE


def test_chains_persist_restart_and_checkpoint(tmp_path):
    """Advanced states are written back; reinit_fraction=1 restarts every chain from noise; extra state
    round-trips through a weights-only checkpoint. Works with any sampler (here unadjusted Langevin)."""
    generator = torch.Generator().manual_seed(2)
    objective = ContrastiveDivergence(Langevin(0.05), num_steps=3,
                                      chains=PersistentChains(capacity=8, reinit_fraction=0.0))
    model, data = GaussianEnergy(2), gaussian_data(generator, 8)
    assert objective.chains.chains is None  # allocated from the first batch's event shape
    objective.chains.draw(data, generator)
    assert objective.chains.chains.shape == (8, 2)
    out = objective(model, data, generator=generator)
    assert {"energy_gap", "data_energy", "sample_energy", "acceptance_rate"} <= set(out.metrics)
    assert any(torch.equal(row, out.final_state[0]) for row in objective.chains.chains)
    torch.save(objective.state_dict(), tmp_path / "cd.pt")
    restored = ContrastiveDivergence(Langevin(0.05), chains=PersistentChains(capacity=8))
    restored.load_state_dict(torch.load(tmp_path / "cd.pt", weights_only=True))
    torch.testing.assert_close(restored.chains.chains, objective.chains.chains)
    fresh = PersistentChains(capacity=8, reinit_fraction=1.0, initial_state=RandomNoise(0.0))
    fresh.draw(data, generator)
    fresh.chains.fill_(5.0)
    _, states = fresh.draw(data, generator)
    assert torch.equal(states, torch.zeros_like(states))  # all restarted from (zero-scale) noise


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sigma > 0"):
        DenoisingScoreMatching(sigma=0.0)
    with pytest.raises(ValueError, match="reinit_fraction"):
        PersistentChains(reinit_fraction=1.5)
    chains = PersistentChains(capacity=4)
    chains.draw(torch.zeros(2, 3), None)
    with pytest.raises(ValueError, match="shape"):
        chains.draw(torch.zeros(2, 5), None)
