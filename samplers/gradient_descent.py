"""Energy descent (EBT "thinking"): y <- y - a * grad E(y), optionally with (Nesterov) momentum.

Functional core: ``init`` / ``step``; the ``GradientDescent`` module on top holds the (optionally
learnable) step size, schedule and transforms. There is no accept/reject: every step is "accepted";
a chain whose energy or gradient becomes non-finite is flagged ``divergent`` at that step (a non-finite
gradient makes its state NaN, flagged from then on), while the other chains carry on unaffected.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

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
from samplers.parametrization import MapInput
from samplers.schedules import Schedule
from samplers.transforms import Transform, apply_grad, apply_input, apply_state


class GDState(NamedTuple):
    y: Tensor  # [C, *event]
    energy: Tensor  # [C] energy at y
    grad: Optional[Tensor]  # [C, *event] gradient at origin (None for a run's last state: nothing uses it)
    velocity: Optional[Tensor]  # [C, *event] momentum buffer, None without momentum
    origin: Tensor  # [C, *event] transform_input(y): where the energy and gradient were taken, the next step's start


def init(
    y: Tensor,
    energy_fn: EnergyFn,
    *,
    momentum: float = 0.0,
    transforms: Sequence[Transform] = (),
    create_graph: bool = False,
) -> GDState:
    origin = apply_input(transforms, y)
    evaluated = evaluate_at(energy_fn, origin, create_graph=create_graph, validate=True)
    velocity = torch.zeros_like(y) if momentum > 0 else None
    return GDState(y, evaluated.energy, evaluated.grad, velocity, origin)


def step(
    state: GDState,
    energy_fn: EnergyFn,
    *,
    step_size: Tensor,
    generator: Optional[torch.Generator] = None,
    momentum: float = 0.0,
    nesterov: bool = False,
    transforms: Sequence[Transform] = (),
    create_graph: bool = False,
    need_grad: bool = True,
) -> tuple[GDState, StepInfo]:
    """One descent step; ``step_size`` broadcasts against the state.

    Momentum follows ``torch.optim.SGD`` (v <- mu v + g; heavy ball steps along v, Nesterov along
    g + mu v), which needs no extra gradient evaluation at a look-ahead point.
    """
    y = state.origin  # transform_input(state.y), computed once when the state was evaluated
    grad = apply_grad(transforms, state.grad, step_size)
    velocity, direction = state.velocity, grad
    if momentum > 0:
        # Only the graph cuts apply to the velocity (a parametrization's map acts on states, not directions).
        velocity = momentum * apply_input([t for t in transforms if not isinstance(t, MapInput)], state.velocity) + grad
        direction = grad + momentum * velocity if nesterov else velocity
    y_new = apply_state(transforms, y - step_size * direction, step_size, generator)
    origin = apply_input(transforms, y_new)
    evaluated = evaluate_at(energy_fn, origin, create_graph=create_graph, need_grad=need_grad)
    state_new = GDState(y_new, evaluated.energy, evaluated.grad, velocity, origin)
    return state_new, unadjusted_info(evaluated, step_size, y_new)


class GradientDescent(Sampler):
    """Gradient descent on the energy, the EBT inner loop.

    ``learnable=True`` registers the step size as an ``nn.Parameter`` holding the step size itself (no
    reparameterization, as in the EBT reference: give it its own, larger learning rate).
    ``min_step_size``: a floor the step actually taken never goes below (``max(step_size, min_step_size)``
    inside every step, as the reference clamps its learned step size in the forward pass): a learnable
    step size that a large learning rate pushes through zero keeps descending at the floor, and the
    parameter itself is never edited. ``None`` (default): no floor, and ``run`` rejects a non-positive value.
    ``step_size`` may be a float, a [C] tensor or a tensor broadcastable to the state.
    """

    def __init__(
        self,
        step_size: StepSize,
        *,
        learnable: bool = False,
        momentum: float = 0.0,
        nesterov: bool = False,
        schedule: Optional[Schedule] = None,
        transforms: Sequence[Transform] = (),
        min_step_size: Optional[float] = None,
    ) -> None:
        super().__init__(transforms)
        if min_step_size is not None and not min_step_size > 0:
            raise ValueError(f"min_step_size must be None or > 0, got {min_step_size}")
        self.min_step_size = None if min_step_size is None else float(min_step_size)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")
        value = copy_as_tensor(step_size)
        if learnable:
            self.step_size = nn.Parameter(value)
        else:
            self.register_buffer("step_size", value)
        self.momentum, self.nesterov, self.schedule = momentum, nesterov, schedule

    def operative_step_size(self, like: Optional[Tensor] = None) -> Tensor:
        """The base step size a step takes (before any schedule): ``step_size``, raised to ``min_step_size`` if
        set; keeps the parameter's graph. ``like``: a state to broadcast against (else the stored shape)."""
        value = self.step_size if like is None else as_step_size(self.step_size, like)
        return value if self.min_step_size is None else value.clamp(min=self.min_step_size)

    def floor_step_size(self, min_step_size: float) -> None:
        """Set the floor ``min_step_size`` unless this sampler already has one (for configurations that name
        the floor elsewhere, e.g. runs recorded before the sampler had one)."""
        if not min_step_size > 0:
            raise ValueError(f"min_step_size must be > 0, got {min_step_size}")
        if self.min_step_size is None:
            self.min_step_size = float(min_step_size)

    def _begin(self, y0: Tensor, warmup: int) -> None:
        check_positive(self.operative_step_size(y0), "GradientDescent step_size")

    def _init(self, y0: Tensor, energy_fn: EnergyFn, transforms: Sequence[Transform], create_graph: bool) -> GDState:
        return init(y0, energy_fn, momentum=self.momentum, transforms=transforms, create_graph=create_graph)

    def _transition(
        self, state: GDState, energy_fn: EnergyFn, transforms: Sequence[Transform], tuning: None, ctx: StepContext
    ) -> tuple[GDState, StepInfo]:
        step_size = self.operative_step_size(state.y)
        if self.schedule is not None:
            step_size = self.schedule(step_size, ctx.index, ctx.num_steps, shape=state.y.shape, generator=ctx.generator)
        return step(
            state,
            energy_fn,
            step_size=step_size,
            generator=ctx.generator,
            momentum=self.momentum,
            nesterov=self.nesterov,
            transforms=transforms,
            create_graph=ctx.create_graph,
            need_grad=ctx.need_grad,
        )

    def extra_repr(self) -> str:
        floor = "" if self.min_step_size is None else f", min_step_size={self.min_step_size}"
        return f"momentum={self.momentum}, nesterov={self.nesterov}, schedule={self.schedule}{floor}"
