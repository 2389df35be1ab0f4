"""Shared plumbing of the Metropolis-corrected samplers (MALA, HMC): the per-chain accept test and a
``Sampler`` base that refuses the differentiable mode and detailed-balance-breaking transforms, and
adapts the step size (and the mass: diagonal, dense or low rank, see ``samplers.mass``) during warmup only.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from samplers.adaptation import WarmupAdaptation, check_mass_kind
from samplers.base import (
    Sampler,
    StepSize,
    as_step_size,
    chain_mean,
    check_positive,
    copy_as_tensor,
    finite_chains,
    per_chain,
)
from samplers.mass import InverseMass, MassMatrix
from samplers.transforms import Transform, check_detailed_balance


def metropolis_accept(
    energy_error: Tensor, new_grad: Optional[Tensor], generator: Optional[torch.Generator], max_energy_error: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-chain accept test for ``energy_error`` = -log(acceptance ratio) [C].

    Divergent chains (non-finite error or ``new_grad``, if given, or an error above ``max_energy_error``) get
    acceptance probability 0 and are always rejected; the other chains are unaffected. Their energy error
    is recorded as +inf, so ``acceptance_prob == exp(-max(energy_error, 0))`` holds for every transition
    and a thinning block's mean error is +inf (never NaN) when the block holds a divergence.
    Returns (acceptance_prob [C], accepted [C] bool, divergent [C] bool, energy_error [C]).
    """
    divergent = ~finite_chains(energy_error, new_grad) | (energy_error > max_energy_error)
    energy_error = torch.where(divergent, torch.full_like(energy_error, float("inf")), energy_error)
    acceptance_prob = torch.exp(torch.clamp(-energy_error, max=0.0))  # exp(-inf) = 0 for divergent chains
    uniform = torch.rand(energy_error.shape, generator=generator, device=energy_error.device, dtype=energy_error.dtype)
    accepted = uniform < acceptance_prob  # never for divergent chains: uniform >= 0 = acceptance_prob
    return acceptance_prob, accepted, divergent, energy_error


def select(accepted: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Per chain: ``new`` where accepted [C], else ``old``."""
    return torch.where(per_chain(accepted, new), new, old)


class MetropolisInfo(NamedTuple):
    """Per-chain information of one Metropolis step (every field [C])."""

    acceptance_prob: Tensor
    accepted: Tensor
    divergent: Tensor
    step_size: Tensor
    energy_error: Tensor  # -log(acceptance ratio); for HMC the Hamiltonian's error; +inf if divergent


class Tuning(NamedTuple):
    step_size: Tensor  # broadcasts to the state; [C, 1, ...] while adapting
    inverse_mass: Optional[InverseMass]  # a tensor broadcasting to the state, a MassMatrix, or None (identity)
    adaptation: Optional[WarmupAdaptation]  # None once (or if never) adapting


class MetropolisSampler(Sampler):
    """Shared plumbing of MALA and HMC: refuses the differentiable mode and detailed-balance-breaking
    transforms, and adapts step size (and mass) during warmup, never afterwards."""

    # Accept/reject is a discrete choice: no gradient flows through it.
    supports_differentiable = False
    warns_on_divergence = True  # after a run with a warmup (see samplers.base.warn_if_divergent)

    def __init__(
        self,
        step_size: StepSize,
        *,
        inverse_mass: Optional[InverseMass],
        adapt_step_size: bool,
        adapt_mass: bool,
        target_accept: float,
        max_energy_error: float,
        transforms: Sequence[Transform],
        pooled_mass: bool = False,
        shared_step_size: bool = False,
        mass: str = "diagonal",
        mass_rank: Optional[int] = None,
    ) -> None:
        super().__init__(transforms)
        check_mass_kind(mass, mass_rank, adapt_mass=adapt_mass, pooled_mass=pooled_mass)
        check_detailed_balance(transforms, type(self).__name__)
        if not 0.0 < target_accept < 1.0:
            raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")
        if not max_energy_error > 0:
            raise ValueError(f"max_energy_error must be positive, got {max_energy_error}")
        self.register_buffer("step_size", copy_as_tensor(step_size))
        if isinstance(inverse_mass, MassMatrix):
            self.inverse_mass = inverse_mass  # a submodule: moves and saves with the sampler
        else:
            self.register_buffer("inverse_mass", None if inverse_mass is None else copy_as_tensor(inverse_mass))
        self.mass, self.mass_rank = mass, mass_rank
        self.adapt_step_size, self.adapt_mass = adapt_step_size, adapt_mass
        self.target_accept, self.max_energy_error = target_accept, max_energy_error
        self.pooled_mass, self.shared_step_size = pooled_mass, shared_step_size

    def _begin(self, y0: Tensor, warmup: int) -> Tuning:
        step_size = as_step_size(self.step_size, y0)
        check_positive(step_size, f"{type(self).__name__} step_size")
        inverse_mass = self._initial_inverse_mass(y0)
        if warmup == 0 or not (self.adapt_step_size or self.adapt_mass):
            return Tuning(step_size, inverse_mass, None)
        if self.adapt_step_size:
            step_size = _per_chain_step_size(step_size, y0)
        adaptation = WarmupAdaptation(
            warmup,
            step_size.clone(),
            inverse_mass if inverse_mass is None or isinstance(inverse_mass, MassMatrix) else
            inverse_mass.expand_as(y0).clone(),
            target_accept=self.target_accept,
            adapt_step_size=self.adapt_step_size,
            adapt_mass=self.adapt_mass,
            pooled_mass=self.pooled_mass,
            shared_step_size=self.shared_step_size,
            mass=self.mass,
            mass_rank=self.mass_rank,
        )
        return Tuning(adaptation.step_size, adaptation.inverse_mass, adaptation)

    def _initial_inverse_mass(self, y0: Tensor) -> Optional[InverseMass]:
        """The given inverse mass checked against ``y0`` and in its dtype and device (and the rank checked)."""
        event_size = y0[0].numel()
        if self.mass == "low_rank" and self.adapt_mass and self.mass_rank >= event_size:
            raise ValueError(f"mass_rank={self.mass_rank} must be below the event size {event_size}; use "
                             "mass='dense' for a full-rank mass")
        if isinstance(self.inverse_mass, MassMatrix):
            self.inverse_mass.check(y0)
            return self.inverse_mass.cast(y0)
        if self.inverse_mass is None:
            return None
        inverse_mass = as_step_size(self.inverse_mass, y0, name="inverse_mass")
        check_positive(inverse_mass, "inverse_mass")
        return inverse_mass

    def _adapt(self, tuning: Tuning, step_index: int, warmup: int, state, info: MetropolisInfo) -> Tuning:
        adaptation = tuning.adaptation
        if adaptation is None:
            return tuning
        adaptation.update(step_index, state.y, info.acceptance_prob)
        if step_index == warmup - 1:
            return Tuning(*adaptation.final(), None)
        return Tuning(adaptation.step_size, adaptation.inverse_mass, adaptation)

    def _adapted(self, tuning: Tuning, y0: Tensor) -> dict[str, Tensor]:
        adapted = {"step_size": chain_mean(tuning.step_size, y0)}
        if isinstance(tuning.inverse_mass, MassMatrix):
            adapted.update(tuning.inverse_mass.tensors())  # e.g. inverse_mass_matrix [d, d] (samplers.mass)
        elif tuning.inverse_mass is not None:
            adapted["inverse_mass"] = tuning.inverse_mass.expand_as(y0)
        return adapted


def _per_chain_step_size(step_size: Tensor, y0: Tensor) -> Tensor:
    """A scalar or [C] step size as [C, 1, ...] (dual averaging adapts one per chain); per element: error."""
    padded = step_size.reshape((1,) * (y0.dim() - step_size.dim()) + tuple(step_size.shape))
    if any(size != 1 for size in padded.shape[1:]):
        raise ValueError(
            f"a per-element step size (shape {tuple(step_size.shape)}) cannot be adapted: pass a float or "
            "a [C] tensor, or adapt_step_size=False"
        )
    return padded.expand(y0.shape[0], *padded.shape[1:])
