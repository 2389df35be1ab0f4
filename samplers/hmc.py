"""Hamiltonian Monte Carlo: leapfrog with a diagonal mass matrix, per-chain accept/reject.

Functional core ``init`` / ``step``; the ``HMC`` module on top adds warmup adaptation (per-chain dual
averaging of the step size, windowed per-chain diagonal mass; see ``samplers.adaptation``). Every chain
has its own step size, mass matrix, momentum and accept test, all as batched tensor ops. A transition
whose Hamiltonian error is non-finite or above ``max_energy_error``, or whose final gradient is
non-finite, is divergent: that chain is rejected (keeps its state), the others are unaffected.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from samplers.base import StepContext, StepSize, chain_mean, evaluate
from samplers.energy import EnergyFn
from samplers.integrators import kinetic_energy, leapfrog, sample_momentum
from samplers.metropolis import MetropolisInfo, MetropolisSampler, Tuning, metropolis_accept, select
from samplers.transforms import Transform


class HMCState(NamedTuple):
    y: Tensor  # [C, *event]
    energy: Tensor  # [C] potential energy at y
    grad: Tensor  # [C, *event] raw gradient of the energy at y


def init(y: Tensor, energy_fn: EnergyFn) -> HMCState:
    evaluated = evaluate(energy_fn, y, (), create_graph=False, validate=True)
    return HMCState(y.detach(), evaluated.energy, evaluated.grad)


def step(
    state: HMCState,
    energy_fn: EnergyFn,
    *,
    step_size: Tensor,
    generator: Optional[torch.Generator] = None,
    num_leapfrog_steps: int = 10,
    inverse_mass: Optional[Tensor] = None,
    transforms: Sequence[Transform] = (),
    max_energy_error: float = 1000.0,
) -> tuple[HMCState, MetropolisInfo]:
    """One HMC transition. ``step_size`` / ``inverse_mass`` broadcast against the state (per chain or
    per element)."""
    momentum = sample_momentum(state.y, inverse_mass, generator)
    initial_energy = state.energy + kinetic_energy(momentum, inverse_mass)
    y_new, momentum_new, evaluated = leapfrog(
        state.y,
        momentum,
        state.grad,
        energy_fn,
        step_size=step_size,
        num_steps=num_leapfrog_steps,
        inverse_mass=inverse_mass,
        transforms=transforms,
    )
    energy_error = evaluated.energy + kinetic_energy(momentum_new, inverse_mass) - initial_energy
    acceptance_prob, accepted, divergent = metropolis_accept(energy_error, evaluated.grad, generator, max_energy_error)
    new_state = HMCState(
        select(accepted, y_new, state.y),
        torch.where(accepted, evaluated.energy, state.energy),
        select(accepted, evaluated.grad, state.grad),
    )
    info = MetropolisInfo(acceptance_prob, accepted, divergent, chain_mean(step_size, state.y), energy_error)
    return new_state, info


class HMC(MetropolisSampler):
    """Batched HMC with ``num_leapfrog_steps`` leapfrog steps per transition.

    ``step_size``: float, [C] (per chain) or per element; ``inverse_mass``: diagonal M^-1 broadcastable to
    the state (default identity). During ``warmup`` the step size adapts per chain towards
    ``target_accept`` and the inverse mass to each chain's posterior variances; afterwards both are fixed.
    """

    def __init__(
        self,
        step_size: StepSize = 0.1,
        num_leapfrog_steps: int = 10,
        *,
        inverse_mass: Optional[Tensor] = None,
        adapt_step_size: bool = True,
        adapt_mass: bool = True,
        target_accept: float = 0.8,
        max_energy_error: float = 1000.0,
        transforms: Sequence[Transform] = (),
    ) -> None:
        super().__init__(
            step_size,
            inverse_mass=inverse_mass,
            adapt_step_size=adapt_step_size,
            adapt_mass=adapt_mass,
            target_accept=target_accept,
            max_energy_error=max_energy_error,
            transforms=transforms,
        )
        if not isinstance(num_leapfrog_steps, int) or num_leapfrog_steps < 1:
            raise ValueError(f"num_leapfrog_steps must be a positive int, got {num_leapfrog_steps!r}")
        self.num_leapfrog_steps = num_leapfrog_steps

    def _init(self, y0: Tensor, energy_fn: EnergyFn, transforms: Sequence[Transform], create_graph: bool) -> HMCState:
        return init(y0, energy_fn)

    def _transition(
        self, state: HMCState, energy_fn: EnergyFn, transforms: Sequence[Transform], tuning: Tuning, ctx: StepContext
    ) -> tuple[HMCState, MetropolisInfo]:
        return step(
            state,
            energy_fn,
            step_size=tuning.step_size,
            generator=ctx.generator,
            num_leapfrog_steps=self.num_leapfrog_steps,
            inverse_mass=tuning.inverse_mass,
            transforms=transforms,
            max_energy_error=self.max_energy_error,
        )

    def extra_repr(self) -> str:
        return (
            f"num_leapfrog_steps={self.num_leapfrog_steps}, adapt_step_size={self.adapt_step_size}, "
            f"adapt_mass={self.adapt_mass}, target_accept={self.target_accept}"
        )
