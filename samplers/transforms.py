"""Stability transforms, usable with every sampler.

A transform may act at three points of a step (every hook defaults to the identity):

- ``transform_input(y)``: on the state as it enters a step, before the energy is evaluated there
  (``Detach`` lives here: it cuts the graph between steps while keeping the step's own graph);
- ``transform_grad(grad, step_size)``: on the energy gradient before it is used in an update
  (``ClampGradient``; inside HMC it acts on every leapfrog force evaluation);
- ``transform_state(y, step_size=..., generator=...)``: on the state after the update
  (``ClampState``, ``LangevinNoise``, ``WarmupLangevinNoise``: a learnable scale held fixed for the first
  training steps).

Detailed balance (Metropolis samplers, MALA and HMC):

- ``ClampGradient`` keeps the samplers exact. MALA's proposal uses the clamped gradient and its
  Metropolis-Hastings ratio evaluates the forward *and* reverse proposal densities with the clamped
  gradient, so any proposal is corrected. HMC's leapfrog with a clamped force is still a composition of
  shears (volume preserving) and still reversible under momentum flip, and the accept test uses the
  true Hamiltonian, so the chain stays exact w.r.t. the true energy.
- ``Detach`` has no effect outside the differentiable mode, which Metropolis samplers refuse anyway.
- ``ClampState`` and ``LangevinNoise`` change the state after the proposal without the proposal density
  knowing (clamping maps a set of positive volume onto the boundary; extra noise changes the proposal
  kernel), which breaks detailed balance. They declare ``preserves_detailed_balance = False`` and the
  Metropolis samplers refuse them with a ``ValueError``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn


class Transform(nn.Module):
    """Base class: every hook is the identity."""

    preserves_detailed_balance: bool = True

    def transform_input(self, y: Tensor) -> Tensor:
        return y

    def transform_grad(self, grad: Tensor, step_size: Tensor) -> Tensor:
        return grad

    def transform_state(self, y: Tensor, *, step_size: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        return y


class ClampGradient(Transform):
    """Clamp each gradient element to ``[-max_value, max_value]``.

    With ``relative_to_step_size=True`` the bound is ``max_value / step_size``, so that one update
    ``step_size * grad`` moves no element by more than ``max_value`` (the EBT "max change" clamp).
    """

    def __init__(self, max_value: float, relative_to_step_size: bool = False) -> None:
        super().__init__()
        if not max_value > 0:
            raise ValueError(f"ClampGradient needs max_value > 0, got {max_value}")
        self.max_value = float(max_value)
        self.relative_to_step_size = relative_to_step_size

    def transform_grad(self, grad: Tensor, step_size: Tensor) -> Tensor:
        if not self.relative_to_step_size:
            return grad.clamp(-self.max_value, self.max_value)
        bound = (self.max_value / step_size).expand_as(grad)
        return torch.clamp(grad, min=-bound, max=bound)

    def extra_repr(self) -> str:
        return f"max_value={self.max_value}, relative_to_step_size={self.relative_to_step_size}"


class ClampState(Transform):
    """Clamp the state elementwise into ``[min, max]`` after each update (either bound may be None)."""

    preserves_detailed_balance = False

    def __init__(self, min: Optional[float] = None, max: Optional[float] = None) -> None:  # noqa: A002
        super().__init__()
        if min is None and max is None:
            raise ValueError("ClampState needs at least one of min, max")
        if min is not None and max is not None and min >= max:
            raise ValueError(f"ClampState needs min < max, got min={min}, max={max}")
        self.min, self.max = min, max

    def transform_state(self, y: Tensor, *, step_size: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        return y.clamp(self.min, self.max)

    def extra_repr(self) -> str:
        return f"min={self.min}, max={self.max}"


class LangevinNoise(Transform):
    """Add ``scale * N(0, I)`` to the state after each update (the EBT Langevin-noise trick).

    ``learnable=True`` makes ``scale`` an ``nn.Parameter`` (the raw value is the noise scale; the noise
    is reparameterized, so the differentiable mode trains it).
    """

    preserves_detailed_balance = False

    def __init__(self, scale: float, learnable: bool = False) -> None:
        super().__init__()
        if scale < 0:
            raise ValueError(f"LangevinNoise needs scale >= 0, got {scale}")
        value = torch.tensor(float(scale))
        if learnable:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    def transform_state(self, y: Tensor, *, step_size: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        return y + self.scale.to(y.dtype) * noise


class WarmupLangevinNoise(LangevinNoise):
    """Langevin noise whose (learnable) scale stays fixed until ``learnable_after_step`` training steps.

    Before that the scale enters the graph with a zero gradient (``s * 0 + sg(s) * 1``), rather than not at
    all, so distributed data parallel sees the same parameters used at every step.
    """

    def __init__(self, scale: float, learnable_after_step: int):
        super().__init__(scale, learnable=True)
        if learnable_after_step < 0:
            raise ValueError(f"learnable_after_step must be >= 0, got {learnable_after_step}")
        self.learnable_after_step = int(learnable_after_step)
        self.gate = 0.0 if learnable_after_step > 0 else 1.0

    def set_training_step(self, step: int) -> None:
        self.gate = 1.0 if step >= self.learnable_after_step else 0.0

    def transform_state(self, y: Tensor, *, step_size: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        scale = self.scale * self.gate + self.scale.detach() * (1.0 - self.gate)
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        return y + scale.to(y.dtype) * noise


class Detach(Transform):
    """Cut the graph between steps: each step starts from (and evaluates its gradient at) ``sg(y)``.

    In the differentiable mode this gives y_{k+1} = sg(y_k) - a * grad E(sg(y_k)), where the gradient
    still carries its second-order graph to the energy's parameters and the step size.
    ``run(..., detach_between_steps=True)`` adds this transform.
    """

    def transform_input(self, y: Tensor) -> Tensor:
        return y.detach()


def apply_input(transforms: Sequence[Transform], y: Tensor) -> Tensor:
    for transform in transforms:
        y = transform.transform_input(y)
    return y


def apply_grad(transforms: Sequence[Transform], grad: Tensor, step_size: Tensor) -> Tensor:
    for transform in transforms:
        grad = transform.transform_grad(grad, step_size)
    return grad


def apply_state(
    transforms: Sequence[Transform], y: Tensor, step_size: Tensor, generator: Optional[torch.Generator]
) -> Tensor:
    for transform in transforms:
        y = transform.transform_state(y, step_size=step_size, generator=generator)
    return y


def check_detailed_balance(transforms: Sequence[Transform], sampler_name: str) -> None:
    """Refuse transforms that would silently make a Metropolis sampler target the wrong distribution."""
    bad = [type(t).__name__ for t in transforms if not t.preserves_detailed_balance]
    if bad:
        raise ValueError(
            f"{sampler_name} is a Metropolis-corrected sampler; {bad} modify the state after the proposal, "
            "which breaks detailed balance (the chain would no longer target exp(-energy)). Use them with "
            "GradientDescent or Langevin, or use ClampGradient, which keeps MALA and HMC exact."
        )
