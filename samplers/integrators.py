"""Hamiltonian pieces shared by HMC and NUTS: Gaussian momenta under a mass matrix and the leapfrog.

The mass matrix is given by its inverse ``inverse_mass``: ``None`` (the identity), a diagonal tensor
[C, *event] (or anything that broadcasts to the state), or a dense / low-rank ``samplers.mass.MassMatrix``
shared by all chains. Momenta p ~ N(0, M), kinetic energy p^T M^-1 p / 2. Each function dispatches once on
the type; the tensor code is the original diagonal path, untouched.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from samplers.energy import CompiledEnergy, EnergyAndGrad, EnergyFn, energy_and_grad
from samplers.mass import InverseMass, MassMatrix
from samplers.transforms import Transform, apply_grad


def sample_momentum(
    y: Tensor, inverse_mass: Optional[InverseMass], generator: Optional[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """(momentum [C, *event] ~ N(0, M) with M = 1 / inverse_mass, its kinetic energy [C]).

    p = sqrt(M) xi with xi ~ N(0, I), so p^T M^-1 p / 2 = |xi|^2 / 2: no pass over the mass needed.
    """
    if isinstance(inverse_mass, MassMatrix):
        return inverse_mass.sample_momentum(y, generator)
    noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    kinetic = 0.5 * noise.square().flatten(1).sum(dim=1)
    return (noise if inverse_mass is None else noise.mul_(torch.rsqrt(inverse_mass))), kinetic


def kinetic_energy(momentum: Tensor, inverse_mass: Optional[InverseMass]) -> Tensor:
    """[C] p^T M^-1 p / 2 per chain."""
    if isinstance(inverse_mass, MassMatrix):
        return inverse_mass.kinetic_energy(momentum)
    squared = momentum.square() if inverse_mass is None else momentum.square().mul_(inverse_mass)
    return 0.5 * squared.flatten(1).sum(dim=1)


def velocity(momentum: Tensor, inverse_mass: Optional[InverseMass]) -> Tensor:
    """[C, *event] M^-1 p: the drift direction of the leapfrog and the vector the U-turn criterion uses."""
    if isinstance(inverse_mass, MassMatrix):
        return inverse_mass.velocity(momentum)
    return momentum if inverse_mass is None else momentum * inverse_mass


def leapfrog(
    y: Tensor,
    momentum: Tensor,
    grad: Tensor,
    energy_fn: EnergyFn,
    *,
    step_size: Tensor,
    num_steps: int,
    inverse_mass: Optional[InverseMass] = None,
    transforms: Sequence[Transform] = (),
) -> tuple[Tensor, Tensor, EnergyAndGrad]:
    """``num_steps`` leapfrog steps from (y, momentum) with ``grad`` = grad E(y) already known.

    Costs ``num_steps`` energy+gradient evaluations (half kicks are fused between steps). The force is
    passed through ``transform_grad`` (e.g. ``ClampGradient``): any position-dependent force keeps the
    map volume preserving and reversible, so the Metropolis test on the true Hamiltonian stays exact.
    Returns (y [C, *event], momentum [C, *event], energy and *raw* gradient at the final y). Never
    modifies its inputs; without a graph (Metropolis samplers) it updates its own copies in place.
    """
    if isinstance(inverse_mass, MassMatrix):
        return _leapfrog_with_mass(y, momentum, grad, energy_fn, step_size, num_steps, inverse_mass, transforms)
    half_step = 0.5 * step_size
    # The drift y += eps M^-1 p uses eps M^-1 [C or 1, *event], formed once rather than once per step.
    drift_scale = step_size if inverse_mass is None else step_size * inverse_mass
    # addcmul fuses each "x + a * b" into one pass over the [C, *event] tensors; the first update of each
    # makes the copy that the later in-place updates own.
    momentum = torch.addcmul(momentum, half_step, apply_grad(transforms, grad, step_size), value=-1.0)
    if isinstance(energy_fn, CompiledEnergy) and not transforms and num_steps > 0:
        # The whole trajectory in compiled segments (the same steps; transforms and graphs stay eager).
        compiled = energy_fn.leapfrog(y, momentum, drift_scale, step_size, num_steps)
        if compiled is not None:
            return compiled
    evaluated = None
    for index in range(num_steps):
        y = torch.addcmul(y, drift_scale, momentum) if index == 0 else y.addcmul_(drift_scale, momentum)
        evaluated = energy_and_grad(energy_fn, y)
        kick = step_size if index < num_steps - 1 else half_step
        momentum.addcmul_(kick, apply_grad(transforms, evaluated.grad, step_size), value=-1.0)
    return y, momentum, evaluated


def _leapfrog_with_mass(
    y: Tensor,
    momentum: Tensor,
    grad: Tensor,
    energy_fn: EnergyFn,
    step_size: Tensor,
    num_steps: int,
    inverse_mass: MassMatrix,
    transforms: Sequence[Transform],
) -> tuple[Tensor, Tensor, EnergyAndGrad]:
    """``leapfrog`` under a dense or low-rank mass: the drift is eps Sigma p, one velocity per step."""
    half_step = 0.5 * step_size
    momentum = torch.addcmul(momentum, half_step, apply_grad(transforms, grad, step_size), value=-1.0)
    evaluated = None
    for index in range(num_steps):
        drift = inverse_mass.velocity(momentum)
        y = torch.addcmul(y, step_size, drift) if index == 0 else y.addcmul_(step_size, drift)
        evaluated = energy_and_grad(energy_fn, y)
        kick = step_size if index < num_steps - 1 else half_step
        momentum.addcmul_(kick, apply_grad(transforms, evaluated.grad, step_size), value=-1.0)
    return y, momentum, evaluated
