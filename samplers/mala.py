"""Metropolis-adjusted Langevin (MALA): a Langevin proposal with a per-chain Metropolis-Hastings test.

Proposal (temperature 1): y' = y - eta * g(y) + sqrt(2 eta) * xi, i.e. q(y' | y) = N(y - eta g(y), 2 eta I),
where g is the energy gradient after ``transform_grad`` (e.g. ``ClampGradient``). The log acceptance ratio

    log a = -(E(y') - E(y)) + log q(y | y') - log q(y' | y)

uses the same transformed g in both directions, so the chain is exact for any such g. The Gaussian
normalizers cancel because eta does not depend on the state (it may differ per chain or per element).
Non-finite proposals (energy or gradient) and energy errors above ``max_energy_error`` are divergent:
rejected for that chain only.

Preconditioned (``inverse_mass`` Sigma: a diagonal tensor or a dense / low-rank ``samplers.mass`` matrix):
y' = y - eta Sigma g(y) + sqrt(2 eta) Sigma^{1/2} xi, i.e. q(y' | y) = N(y - eta Sigma g(y), 2 eta Sigma) (with
eta = eps^2 / 2 this is y - eps^2/2 Sigma g + eps Sigma^{1/2} xi), and the MH ratio uses that asymmetric
density in both directions, each through ``samplers.mass.proposal_log_density``. Without a mass (``None``)
the identity path above is unchanged. During warmup ``MALA(adapt_mass=True)`` adapts a diagonal, dense or
low-rank Sigma in Stan's windows, exactly as HMC does (``samplers.adaptation``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from samplers.base import StepContext, StepSize, chain_mean, evaluate
from samplers.energy import EnergyFn, energy_and_grad
from samplers.mass import InverseMass, preconditioned_drift, proposal_log_density, propose
from samplers.metropolis import MetropolisInfo, MetropolisSampler, Tuning, metropolis_accept, select
from samplers.transforms import Transform, apply_grad


class MALAState(NamedTuple):
    y: Tensor  # [C, *event]
    energy: Tensor  # [C]
    grad: Tensor  # [C, *event] raw gradient at y


def init(y: Tensor, energy_fn: EnergyFn) -> MALAState:
    evaluated = evaluate(energy_fn, y, (), create_graph=False, validate=True)
    return MALAState(y.detach(), evaluated.energy, evaluated.grad)


def _sum_event(x: Tensor) -> Tensor:
    return x.flatten(1).sum(dim=1)


def step(
    state: MALAState,
    energy_fn: EnergyFn,
    *,
    step_size: Tensor,
    generator: Optional[torch.Generator] = None,
    transforms: Sequence[Transform] = (),
    max_energy_error: float = 1000.0,
    inverse_mass: Optional[InverseMass] = None,
) -> tuple[MALAState, MetropolisInfo]:
    """One MALA transition; ``step_size`` broadcasts against the state (per chain only with a dense or
    low-rank ``inverse_mass``, whose density needs eta to commute with Sigma)."""
    y = state.y
    drift = apply_grad(transforms, state.grad, step_size)
    noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    if inverse_mass is None:
        proposal = y - step_size * drift + torch.sqrt(2.0 * step_size) * noise
        evaluated = energy_and_grad(energy_fn, proposal)
        reverse_drift = apply_grad(transforms, evaluated.grad, step_size)
        # log q(y'|y) = -|y' - y + eta g(y)|^2 / (4 eta) = -|xi|^2 / 2 (same constant in both directions).
        log_forward = -0.5 * _sum_event(noise.square())
        log_reverse = -_sum_event((y - proposal + step_size * reverse_drift).square() / (4.0 * step_size))
    else:
        drift = preconditioned_drift(drift, inverse_mass)  # Sigma g(y)
        proposal = propose(y, drift, step_size, noise, inverse_mass)
        evaluated = energy_and_grad(energy_fn, proposal)
        reverse_drift = preconditioned_drift(apply_grad(transforms, evaluated.grad, step_size), inverse_mass)
        log_forward = proposal_log_density(proposal, y, drift, step_size, inverse_mass)
        log_reverse = proposal_log_density(y, proposal, reverse_drift, step_size, inverse_mass)
    energy_error = evaluated.energy - state.energy - log_reverse + log_forward  # = -log a
    acceptance_prob, accepted, divergent, energy_error = metropolis_accept(
        energy_error, evaluated.grad, generator, max_energy_error
    )
    new_state = MALAState(
        select(accepted, proposal, y),
        torch.where(accepted, evaluated.energy, state.energy),
        select(accepted, evaluated.grad, state.grad),
    )
    return new_state, MetropolisInfo(acceptance_prob, accepted, divergent, chain_mean(step_size, y), energy_error)


class MALA(MetropolisSampler):
    """Batched MALA; during ``warmup`` the step size adapts per chain towards ``target_accept``
    (0.574, optimal for MALA in high dimension), then stays fixed.

    ``inverse_mass`` (default identity) preconditions the proposal: a diagonal tensor broadcasting to the
    state, or a ``samplers.mass.DenseMass`` / ``LowRankMass``. ``adapt_mass=True`` (default off, so that
    ``MALA(eps)`` stays the plain sampler) adapts it during warmup like ``HMC``: ``mass="diagonal"`` per
    chain (or pooled with ``pooled_mass=True``), ``"dense"`` or ``"low_rank"`` (``mass_rank=k``) pooled over
    chains, which requires ``pooled_mass=True`` (every chain samples the same target)."""

    def __init__(
        self,
        step_size: StepSize,
        *,
        adapt_step_size: bool = True,
        target_accept: float = 0.574,
        max_energy_error: float = 1000.0,
        transforms: Sequence[Transform] = (),
        inverse_mass: Optional[InverseMass] = None,
        adapt_mass: bool = False,
        mass: str = "diagonal",
        mass_rank: Optional[int] = None,
        pooled_mass: bool = False,
        shared_step_size: bool = False,
    ) -> None:
        super().__init__(
            step_size,
            inverse_mass=inverse_mass,
            adapt_step_size=adapt_step_size,
            adapt_mass=adapt_mass,
            target_accept=target_accept,
            max_energy_error=max_energy_error,
            transforms=transforms,
            pooled_mass=pooled_mass,
            shared_step_size=shared_step_size,
            mass=mass,
            mass_rank=mass_rank,
        )

    def _init(self, y0: Tensor, energy_fn: EnergyFn, transforms: Sequence[Transform], create_graph: bool) -> MALAState:
        return init(y0, energy_fn)

    def _transition(
        self, state: MALAState, energy_fn: EnergyFn, transforms: Sequence[Transform], tuning: Tuning, ctx: StepContext
    ) -> tuple[MALAState, MetropolisInfo]:
        return step(
            state,
            energy_fn,
            step_size=tuning.step_size,
            generator=ctx.generator,
            transforms=transforms,
            max_energy_error=self.max_energy_error,
            inverse_mass=tuning.inverse_mass,
        )

    def extra_repr(self) -> str:
        return (f"adapt_step_size={self.adapt_step_size}, target_accept={self.target_accept}, "
                f"adapt_mass={self.adapt_mass}, mass={self.mass!r}, mass_rank={self.mass_rank}, "
                f"pooled_mass={self.pooled_mass}, shared_step_size={self.shared_step_size}")
