"""Unadjusted Langevin dynamics (ULA): y <- y - eta * grad E(y) + sqrt(2 eta T) * xi, xi ~ N(0, I).

Without a Metropolis correction ULA is biased at any finite step: for E = y^2 / (2 s^2) its stationary
variance is s^2 / (1 - eta / (2 s^2)) at T = 1 (see tests/samplers/test_langevin.py), which vanishes as
eta -> 0. Use MALA for an exact sampler. A chain whose energy or gradient becomes non-finite is flagged
``divergent`` at that step; there is nothing to reject: if its gradient is non-finite the state becomes
NaN and stays flagged from then on. The other chains are unaffected.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from samplers.base import (
    Sampler,
    StepContext,
    StepInfo,
    StepSize,
    as_step_size,
    check_positive,
    copy_as_tensor,
    evaluate_at,
    unadjusted_info,
)
from samplers.energy import EnergyFn
from samplers.schedules import Schedule
from samplers.transforms import Transform, apply_grad, apply_input, apply_state


class LangevinState(NamedTuple):
    y: Tensor  # [C, *event]
    energy: Tensor  # [C]
    grad: Optional[Tensor]  # [C, *event] at origin; None for a run's last state (nothing uses it)
    origin: Tensor  # [C, *event] transform_input(y): where energy and gradient were taken, the next step's start


def init(
    y: Tensor, energy_fn: EnergyFn, *, transforms: Sequence[Transform] = (), create_graph: bool = False
) -> LangevinState:
    origin = apply_input(transforms, y)
    evaluated = evaluate_at(energy_fn, origin, create_graph=create_graph, validate=True)
    return LangevinState(y, evaluated.energy, evaluated.grad, origin)


def step(
    state: LangevinState,
    energy_fn: EnergyFn,
    *,
    step_size: Tensor,
    generator: Optional[torch.Generator] = None,
    temperature: Tensor | float = 1.0,
    transforms: Sequence[Transform] = (),
    create_graph: bool = False,
    need_grad: bool = True,
) -> tuple[LangevinState, StepInfo]:
    """One ULA step; ``step_size`` and ``temperature`` broadcast against the state."""
    y = state.origin  # transform_input(state.y), computed once when the state was evaluated
    grad = apply_grad(transforms, state.grad, step_size)
    noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    noise_scale = torch.sqrt(2.0 * step_size * temperature)
    y_new = apply_state(transforms, y - step_size * grad + noise_scale * noise, step_size, generator)
    origin = apply_input(transforms, y_new)
    evaluated = evaluate_at(energy_fn, origin, create_graph=create_graph, need_grad=need_grad)
    return LangevinState(y_new, evaluated.energy, evaluated.grad, origin), unadjusted_info(evaluated, step_size, y_new)


class Langevin(Sampler):
    """Unadjusted Langevin sampler at temperature ``temperature`` (stationary density ~ exp(-E / T)).

    ``schedule`` anneals the step size and ``temperature_schedule`` the temperature (same classes,
    e.g. ``GeometricAnneal(start_scale=10.0, end_scale=1.0)`` cools from 10 T to T over the run).
    """

    def __init__(
        self,
        step_size: StepSize,
        *,
        temperature: float | Tensor = 1.0,
        schedule: Optional[Schedule] = None,
        temperature_schedule: Optional[Schedule] = None,
        transforms: Sequence[Transform] = (),
    ) -> None:
        super().__init__(transforms)
        self.register_buffer("step_size", copy_as_tensor(step_size))
        self.register_buffer("temperature", copy_as_tensor(temperature))
        self.schedule, self.temperature_schedule = schedule, temperature_schedule

    def _begin(self, y0: Tensor, warmup: int) -> None:
        check_positive(as_step_size(self.step_size, y0), "Langevin step_size")
        check_positive(as_step_size(self.temperature, y0, name="temperature"), "Langevin temperature", allow_zero=True)

    def _init(
        self, y0: Tensor, energy_fn: EnergyFn, transforms: Sequence[Transform], create_graph: bool
    ) -> LangevinState:
        return init(y0, energy_fn, transforms=transforms, create_graph=create_graph)

    def _scheduled(self, schedule: Optional[Schedule], value: Tensor, y: Tensor, ctx: StepContext) -> Tensor:
        if schedule is None:
            return value
        return schedule(value, ctx.index, ctx.num_steps, shape=y.shape, generator=ctx.generator)

    def _transition(
        self, state: LangevinState, energy_fn: EnergyFn, transforms: Sequence[Transform], tuning: None, ctx: StepContext
    ) -> tuple[LangevinState, StepInfo]:
        step_size = self._scheduled(self.schedule, as_step_size(self.step_size, state.y), state.y, ctx)
        temperature = as_step_size(self.temperature, state.y, name="temperature")
        temperature = self._scheduled(self.temperature_schedule, temperature, state.y, ctx)
        return step(
            state,
            energy_fn,
            step_size=step_size,
            generator=ctx.generator,
            temperature=temperature,
            transforms=transforms,
            create_graph=ctx.create_graph,
            need_grad=ctx.need_grad,
        )

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}, temperature_schedule={self.temperature_schedule}"

