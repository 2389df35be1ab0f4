"""Step-size (and temperature) schedules: small objects called once per step.

Every schedule is called as ``schedule(base, step_index, num_steps, *, shape, generator) -> Tensor``:
``base`` is the base value as a tensor (a learnable ``nn.Parameter`` keeps its graph: schedules only
multiply it), ``step_index`` counts from 0 to ``num_steps - 1`` over the whole run (warmup included) and
``shape`` is the state's shape ``[C, *event]`` (used by per-element schedules). The returned tensor
broadcasts against the state. The annealing multipliers are Python floats computed from the step index,
so no schedule ever reads a tensor value (no host sync).

The annealing schedules interpolate a *multiplier* of ``base`` from ``start_scale`` (at step 0) to
``end_scale`` (at the last step). For a step size that is usually 1 -> something small; for a
temperature, e.g. ``GeometricAnneal(start_scale=10.0, end_scale=1.0)`` cools from 10 T to T.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


class Schedule:
    """Base class: ``multiplier(step_index, num_steps)`` scales the base value."""

    def multiplier(self, step_index: int, num_steps: int) -> float:
        raise NotImplementedError

    def __call__(
        self,
        base: Tensor,
        step_index: int,
        num_steps: int,
        *,
        shape: torch.Size,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        return base * self.multiplier(step_index, num_steps)


class Constant(Schedule):
    """The base value at every step."""

    def multiplier(self, step_index: int, num_steps: int) -> float:
        return 1.0

    def __repr__(self) -> str:
        return "Constant()"


class _Anneal(Schedule):
    def __init__(self, start_scale: float = 1.0, end_scale: float = 0.1) -> None:
        if start_scale <= 0 or end_scale <= 0:
            raise ValueError(
                f"annealing scales must be positive, got start_scale={start_scale}, end_scale={end_scale}"
            )
        self.start_scale = float(start_scale)
        self.end_scale = float(end_scale)

    @staticmethod
    def progress(step_index: int, num_steps: int) -> float:
        """Fraction of the run done: 0 at the first step, 1 at the last."""
        return step_index / (num_steps - 1) if num_steps > 1 else 1.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(start_scale={self.start_scale}, end_scale={self.end_scale})"


class LinearAnneal(_Anneal):
    """Multiplier moves linearly from ``start_scale`` to ``end_scale``."""

    def multiplier(self, step_index: int, num_steps: int) -> float:
        fraction = self.progress(step_index, num_steps)
        return self.start_scale + (self.end_scale - self.start_scale) * fraction


class GeometricAnneal(_Anneal):
    """Multiplier moves geometrically (linearly in log space) from ``start_scale`` to ``end_scale``."""

    def multiplier(self, step_index: int, num_steps: int) -> float:
        fraction = self.progress(step_index, num_steps)
        return self.start_scale * (self.end_scale / self.start_scale) ** fraction


class CosineAnneal(_Anneal):
    """Half-cosine from ``start_scale`` to ``end_scale`` (flat at both ends)."""

    def multiplier(self, step_index: int, num_steps: int) -> float:
        fraction = self.progress(step_index, num_steps)
        return self.end_scale + (self.start_scale - self.end_scale) * 0.5 * (1.0 + math.cos(math.pi * fraction))


class RandomizedStepSize(Schedule):
    """Per element, a fresh draw from U(base / scale, base * scale) at every step (EBT training trick).

    The draw multiplies ``base``, so a learnable step size still receives gradients. The result has the
    state's full shape ``[C, *event]``.
    """

    def __init__(self, scale: float = 2.0) -> None:
        if scale < 1.0:
            raise ValueError(f"RandomizedStepSize needs scale >= 1 (draws from U(a/s, a*s)), got {scale}")
        self.scale = float(scale)

    def __call__(
        self,
        base: Tensor,
        step_index: int,
        num_steps: int,
        *,
        shape: torch.Size,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        low = 1.0 / self.scale
        uniform = torch.rand(shape, generator=generator, device=base.device, dtype=base.dtype)
        return base * (low + (self.scale - low) * uniform)

    def __repr__(self) -> str:
        return f"RandomizedStepSize(scale={self.scale})"
