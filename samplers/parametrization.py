"""Parametrized descents: the energy reads ``u = map(y)``, not the state ``y`` itself.

A text EBT's state is logits ``y [C, S, V]`` while its energy reads a distribution ``p = softmax(y)``. Where the
descent takes its gradient, and what it updates, is a modelling choice that decides how fast a model trains:

- ``descent_space="state"``: differentiate through the map and update the state,
  ``y <- y - a * grad_y E(map(y))``. For softmax the step is ``a * p * (g - <p, g>)`` (``g = grad_p E``): near
  the uniform distribution about ``1/V`` of the other rule's at the same ``a``, and gated by ``p``.
- ``descent_space="image"``: differentiate at the image point and step from it, discarding the old state,
  ``y <- u - a * grad_u E(u)``, ``u = map(y)``; the result is a state again (read through ``map`` by the next
  step and by a loss). With softmax this is the rule of the EBT paper's reference code: ``a`` is a step in
  probability space, and the next logits are ``p - a * grad_p E``.

Either way the energy function given to a sampler takes the image point ``u`` and the energy of a state ``y``
is ``E(map(y))``. ``Sampler.run(..., parametrization=...)`` and ``ThinkingConfig.parametrization`` apply it;
``"image"`` works through the ``transform_input`` hook (``MapInput``, after every other transform, so a
``Detach`` cuts the graph at the state and the gradient is still taken at ``u``), ``"state"`` composes the
energy with the map. Both keep the differentiable mode's second-order graph through the map.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from samplers.energy import EnergyFn
from samplers.transforms import Transform

DescentSpace = Literal["state", "image"]
DESCENT_SPACES = ("state", "image")


class Parametrization:
    """``map: y [C, *event] -> u`` (same shape) and the space the descent takes its gradient in (see the module
    docstring). Subclasses override ``map``."""

    def __init__(self, descent_space: DescentSpace) -> None:
        if descent_space not in DESCENT_SPACES:
            raise ValueError(f"descent_space must be 'state' (gradient through the map, update the state) or 'image' "
                             f"(gradient at u = map(y), step from u), got {descent_space!r}")
        self.descent_space = descent_space

    def map(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def state_energy(self, energy_fn: EnergyFn) -> EnergyFn:
        """The energy of a state: ``y -> energy_fn(map(y))``."""
        return lambda y: energy_fn(self.map(y))

    def descent_energy(self, energy_fn: EnergyFn) -> EnergyFn:
        """What the descent differentiates: the energy of a state (``"state"``), or ``energy_fn`` itself at the
        image point that ``transforms()`` hands it (``"image"``)."""
        return self.state_energy(energy_fn) if self.descent_space == "state" else energy_fn

    def transforms(self) -> tuple[Transform, ...]:
        """To append after a sampler's own transforms: ``MapInput`` for ``"image"``, nothing for ``"state"``."""
        return (MapInput(self.map),) if self.descent_space == "image" else ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(descent_space={self.descent_space!r})"


class MapInput(Transform):
    """``transform_input(y) = map(y)``: every step is taken from, and its gradient evaluated at, ``map(y)``."""

    def __init__(self, map_fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.map_fn = map_fn

    def transform_input(self, y: Tensor) -> Tensor:
        return self.map_fn(y)


class SoftmaxParametrization(Parametrization):
    """``u = softmax(y)`` over the last axis; ``descent_space`` named for text: ``"logits"`` (= ``"state"``: today's
    logit-space rule) or ``"probabilities"`` (= ``"image"``: the EBT reference's rule); ``"state"`` and
    ``"image"`` are accepted too."""

    NAMES = {"logits": "state", "probabilities": "image"}

    def __init__(self, descent_space: str = "probabilities") -> None:
        if descent_space not in (*self.NAMES, *DESCENT_SPACES):
            raise ValueError(f"descent_space must be 'probabilities' (the EBT paper's rule: gradient w.r.t. "
                             f"p = softmax(y), next state p - a * dE/dp) or 'logits' (gradient through the softmax, "
                             f"next state y - a * dE/dy), got {descent_space!r}")
        super().__init__(self.NAMES.get(descent_space, descent_space))
        self.name = {v: k for k, v in self.NAMES.items()}[self.descent_space]

    def map(self, y: Tensor) -> Tensor:
        return torch.softmax(y, dim=-1)

    def __repr__(self) -> str:
        return f"SoftmaxParametrization(descent_space={self.name!r})"
