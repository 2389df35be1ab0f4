"""Persistent contrastive divergence (PCD) with any sampler from ``samplers``.

The maximum-likelihood gradient of an EBM is E_data[grad_theta E] - E_model[grad_theta E]. PCD estimates
the second expectation with samples from chains that persist across training steps (a buffer of states,
a fraction re-initialized from noise each step so the buffer keeps exploring), each advanced a few sampler
steps per training step against the current energy.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from energyflow.objectives.components import RandomNoise
from energyflow.objectives.unrolled import ObjectiveOutput


class PersistentChains(nn.Module):
    """``capacity`` persistent sampler states ``[N, *event]``; checkpointed as extra state.

    Under ``torchrun`` each process advances its own chains: they are per-rank state (``per_rank_state``),
    checkpointed for every rank and restored to each rank on resume (``energyflow.checkpoint``).
    """

    per_rank_state = True

    def __init__(self, capacity: int = 10000, reinit_fraction: float = 0.05, initial_state=None):
        super().__init__()
        if capacity < 1 or not 0.0 <= reinit_fraction <= 1.0:
            raise ValueError(f"PersistentChains needs capacity >= 1 and reinit_fraction in [0, 1], got "
                             f"{capacity}, {reinit_fraction}")
        self.capacity, self.reinit_fraction = int(capacity), float(reinit_fraction)
        self.initial_state = initial_state if initial_state is not None else RandomNoise(1.0)
        self.chains: Optional[Tensor] = None  # allocated from the first batch's event shape

    def draw(self, like: Tensor, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        """Return (indices [B], states [B, *event]) for a batch shaped like ``like``."""
        batch, event = like.shape[0], like.shape[1:]
        if self.chains is None:
            self.chains = self.initial_state((self.capacity, *event), device=like.device, dtype=like.dtype,
                                             generator=generator)
        if tuple(self.chains.shape[1:]) != tuple(event):
            raise ValueError(f"persistent chains hold states of shape {tuple(self.chains.shape[1:])}, the data "
                             f"has {tuple(event)}")
        device = generator.device if generator is not None else like.device
        indices = torch.randint(self.capacity, (batch,), generator=generator, device=device).to(like.device)
        fresh = self.initial_state(like.shape, device=like.device, dtype=like.dtype, generator=generator)
        restart = torch.rand(batch, generator=generator, device=device).to(like.device) < self.reinit_fraction
        restart = restart.view(batch, *([1] * len(event)))
        return indices, torch.where(restart, fresh, self.chains[indices])

    @torch.no_grad()
    def update(self, indices: Tensor, states: Tensor) -> None:
        self.chains[indices] = states.detach()

    def get_extra_state(self) -> dict:
        return {"chains": self.chains}

    def set_extra_state(self, state: dict) -> None:
        self.chains = state["chains"]


class ContrastiveDivergence(nn.Module):
    """PCD loss ``mean E(data) - mean E(negatives) + regularization * mean(E_data^2 + E_neg^2)``.

    ``sampler``: any sampler (``Langevin``, ``MALA``, ``HMC``, ``GradientDescent``, ...); it runs
    ``num_steps`` non-differentiable steps from the persistent chains. The energy regularizer keeps the
    energy's overall level from drifting (the loss is invariant to adding a constant to E).
    """

    def __init__(self, sampler: nn.Module, *, num_steps: int = 20, chains: Optional[PersistentChains] = None,
                 regularization: float = 0.0):
        super().__init__()
        if num_steps < 1 or regularization < 0:
            raise ValueError(f"ContrastiveDivergence needs num_steps >= 1 and regularization >= 0, got "
                             f"{num_steps}, {regularization}")
        self.sampler, self.num_steps, self.regularization = sampler, int(num_steps), float(regularization)
        self.chains = chains if chains is not None else PersistentChains()

    def forward(self, energy_fn: Callable[[Tensor], Tensor], data: Tensor, *,
                generator: Optional[torch.Generator] = None) -> ObjectiveOutput:
        """``energy_fn(y [C, *event]) -> [C]``; ``data [B, *event]``."""
        indices, start = self.chains.draw(data, generator)
        trajectory = self.sampler.run(energy_fn, start, num_steps=self.num_steps, generator=generator)
        negatives = trajectory.final_state.detach()
        self.chains.update(indices, negatives)
        positive, negative = energy_fn(data), energy_fn(negatives)
        gap = positive.mean() - negative.mean()
        loss = gap + self.regularization * (positive.pow(2).mean() + negative.pow(2).mean())
        metrics = {"energy_gap": gap.detach(), "data_energy": positive.detach().mean(),
                   "sample_energy": negative.detach().mean(),
                   "acceptance_rate": trajectory.info["acceptance_prob"].float().mean()}
        return ObjectiveOutput(loss, metrics, negatives)
