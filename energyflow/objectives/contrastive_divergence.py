"""Persistent contrastive divergence (PCD) with any sampler from ``samplers``.

The maximum-likelihood gradient of an EBM is E_data[grad_theta E] - E_model[grad_theta E]. PCD estimates
the second expectation with samples from chains that persist across training steps (a buffer of states,
a fraction re-initialized from noise each step so the buffer keeps exploring), each advanced a few sampler
steps per training step against the current energy. The chains live in a ``samplers.buffer.ChainBuffer``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from energyflow.objectives.components import RandomNoise
from energyflow.objectives.replay import run_generator
from energyflow.objectives.unrolled import ObjectiveOutput
from samplers.buffer import ChainBuffer


class PersistentChains(ChainBuffer):
    """``capacity`` persistent sampler states ``[N, *event]`` (a ``samplers.buffer.ChainBuffer`` filled from
    ``initial_state`` on the first draw); checkpointed as extra state ``{"chains": states or None}``.

    Under ``torchrun`` each process advances its own chains: they are per-rank state (``per_rank_state``),
    checkpointed for every rank and restored to each rank on resume (``energyflow.checkpoint``).
    """

    per_rank_state = True

    def __init__(self, capacity: int = 10000, reinit_fraction: float = 0.05, initial_state=None):
        if capacity < 1 or not 0.0 <= reinit_fraction <= 1.0:
            raise ValueError(f"PersistentChains needs capacity >= 1 and reinit_fraction in [0, 1], got "
                             f"{capacity}, {reinit_fraction}")
        super().__init__(int(capacity), init_fn=initial_state if initial_state is not None else RandomNoise(1.0),
                         reinit_fraction=float(reinit_fraction))

    @property
    def initial_state(self):
        return self.init_fn

    @property
    def chains(self) -> Optional[Tensor]:
        """The states ``[capacity, *event]``; None until the first draw allocates them."""
        return self.states

    def draw(self, like: Tensor, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        """Return (indices [B], states [B, *event]) for a batch shaped like ``like``."""
        batch, event = like.shape[0], like.shape[1:]
        generator = run_generator(generator, like.device)
        if self.chains is None:
            self.fill(event, device=like.device, dtype=like.dtype, generator=generator)
        if tuple(self.chains.shape[1:]) != tuple(event):
            raise ValueError(f"persistent chains hold states of shape {tuple(self.chains.shape[1:])}, the data "
                             f"has {tuple(event)}")
        draw = self.sample(batch, generator=generator, device=like.device, dtype=like.dtype)
        return draw.indices, draw.states

    def update(self, indices: Tensor, states: Tensor) -> None:
        self.write(indices, states)

    def get_extra_state(self) -> dict:
        return {"chains": self.chains}

    def set_extra_state(self, state: dict) -> None:
        chains = state["chains"]
        if chains is not None and chains.shape[0] != self.capacity:
            raise ValueError(f"checkpoint persistent chains have capacity {chains.shape[0]}, this run's has "
                             f"{self.capacity}; bind PersistentChains.capacity to the checkpoint's value to resume")
        self.fields = [] if chains is None else [chains]
        self.size, self.position = (0, 0) if chains is None else (self.capacity, 0)


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
