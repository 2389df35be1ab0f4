"""Inference-time energy descent ("thinking"), model-agnostic, with per-position control.

``think(energy_fn, y0, config)`` runs ``y <- y - a * grad E(y)`` (plus optional Langevin noise) like
``samplers.GradientDescent``, and adds what inference needs and a sampler's per-chain contract cannot give:

- **accept only if lower**: a position keeps its proposal only where its own energy went down;
- **adaptive compute**: a position freezes once its energy change or gradient norm falls under a tolerance;
- a **record** of any per-position quantity (e.g. the loss against known targets) at every step.

Per-position control is exact for energies ``[C, S]`` whose position ``s`` depends only on ``y[:, s]``
(the autoregressive EBT: a prediction attends to the context and to itself only), so mixing accepted and
rejected positions in one state leaves every position's energy and gradient as computed. The loop never
reads a tensor on the host; the optional early exit (``check_every``) is the one bounded exception.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from samplers.base import as_step_size, check_positive
from samplers.energy import EnergyFn, check_finite_start, check_state, energy_and_grad
from samplers.parametrization import Parametrization
from samplers.transforms import LangevinNoise, Transform, apply_grad, apply_state

Record = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ThinkingConfig:
    """How to think at inference time.

    ``step_size``: a float, a ``[C]`` tensor or one broadcastable to the state (e.g. the learned one).
    ``noise_scale``: standard deviation of Gaussian noise added to every proposal (Langevin-style
    exploration; the paper's evaluation uses 1 for text).
    ``accept_if_lower``: keep a position's proposal only where its energy is lower than before.
    ``energy_tolerance`` / ``grad_tolerance``: freeze a position once ``|E_before - E_after|`` (after the
    accept test: a rejected step counts as no change) or ``||grad E||`` at its state is below the value.
    ``check_every``: every that many steps, stop the loop if every position is frozen. It costs one host
    sync per check (so at most ``num_steps / check_every`` syncs) and saves the remaining forward and
    backward passes; ``None`` never stops early and never syncs.
    ``transforms``: stability transforms from ``samplers.transforms`` (e.g. the training sampler's
    ``ClampGradient``); a ``LangevinNoise`` here is refused, ``noise_scale`` is the one noise knob.
    ``parametrization``: as in ``Sampler.run`` (``samplers.parametrization``): ``energy_fn`` reads ``u = map(y)``
    and each step is ``y - a * grad_y E(map(y))`` (``"state"``) or ``map(y) - a * grad_u E(u)`` (``"image"``, the
    EBT reference's text rule with softmax); the energy of a state is ``E(map(y))`` either way.
    """

    num_steps: int
    step_size: Union[float, Tensor]
    noise_scale: float = 0.0
    accept_if_lower: bool = False
    energy_tolerance: Optional[float] = None
    grad_tolerance: Optional[float] = None
    check_every: Optional[int] = None
    transforms: Sequence[Transform] = field(default_factory=tuple)
    parametrization: Optional[Parametrization] = None
    compile: bool = False  # the energy-and-gradient through torch.compile (energyflow.inference.compiled)

    def __post_init__(self) -> None:
        if not isinstance(self.num_steps, int) or self.num_steps < 0:
            raise ValueError(f"num_steps must be an int >= 0, got {self.num_steps!r}")
        if self.noise_scale < 0:
            raise ValueError(f"noise_scale must be >= 0, got {self.noise_scale}")
        for name in ("energy_tolerance", "grad_tolerance"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None (off) or > 0, got {value}")
        if self.check_every is not None and (not isinstance(self.check_every, int) or self.check_every < 1):
            raise ValueError(f"check_every must be None or an int >= 1, got {self.check_every!r}")
        for transform in self.transforms:
            if not isinstance(transform, Transform):
                raise TypeError(f"transforms must be samplers.transforms.Transform objects, got {transform!r}")
            if isinstance(transform, LangevinNoise):
                raise ValueError("pass Langevin noise as ThinkingConfig.noise_scale, not as a LangevinNoise transform")
        if self.parametrization is not None and not isinstance(self.parametrization, Parametrization):
            raise TypeError(f"parametrization must be a samplers.parametrization.Parametrization, got "
                            f"{self.parametrization!r}")

    @property
    def adaptive(self) -> bool:
        return self.energy_tolerance is not None or self.grad_tolerance is not None

    def descent(self, energy_fn: EnergyFn) -> tuple[EnergyFn, Callable[[Tensor], Tensor]]:
        """``(what to differentiate, where a step starts from)`` for a state ``y``: ``(energy_fn, identity)``
        without a parametrization; with one, the step starts from ``map(y)`` (``"image"``) or from ``y`` with
        the energy composed with the map (``"state"``)."""
        space = self.parametrization
        if space is None:
            return energy_fn, lambda y: y
        origin = space.map if space.descent_space == "image" else (lambda y: y)
        return space.descent_energy(energy_fn), origin


@dataclass
class ThinkingResult:
    """Outcome of ``think``; ``P`` is the energy's shape after the chain axis (``()`` or ``(S,)``).

    state ``[C, *event]``; energies ``[C, *P]`` at ``state``; energy_trace ``[T+1, C, *P]`` (entry 0 is
    ``y0``); records ``[T+1, C, *P]`` or None; steps_used ``[C, *P]`` (int64) steps each position took
    before it froze; steps_run: loop iterations actually run (``T``; < num_steps only after an early exit).
    """

    state: Tensor
    energies: Tensor
    energy_trace: Tensor
    records: Optional[Tensor]
    steps_used: Tensor
    steps_run: int

    def mean_steps(self) -> Tensor:
        """[] average number of steps per position."""
        return self.steps_used.float().mean()


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    """Per-position ``[C, *P]`` -> broadcastable to the state ``[C, *P, *rest]``."""
    return mask.view(*mask.shape, *([1] * (like.dim() - mask.dim())))


def _grad_norm(grad: Tensor, positions: Tensor) -> Tensor:
    """Euclidean norm of each position's gradient: ``[C, *P, *rest] -> [C, *P]``."""
    return grad.flatten(positions.dim()).norm(dim=-1)


def _check_positions(per_position: Tensor, y: Tensor) -> None:
    if y.shape[: per_position.dim()] != per_position.shape:
        raise ValueError(f"energy_fn returned {tuple(per_position.shape)} for a state {tuple(y.shape)}: per-position "
                         "energies [C, S] must index the state's first two axes (position s of y[:, s])")


class _Position(NamedTuple):
    """The loop's per-position state."""

    y: Tensor  # [C, *P, *rest]
    energies: Tensor  # [C, *P] at y
    grad: Tensor  # [C, *P, *rest] at y
    active: Tensor  # [C, *P] bool: not frozen yet
    steps_used: Tensor  # [C, *P] int64


def think(energy_fn: EnergyFn, y0: Tensor, config: ThinkingConfig, *, generator: Optional[torch.Generator] = None,
          record: Optional[Record] = None) -> ThinkingResult:
    """Descend ``energy_fn`` from ``y0 [C, *event]`` for ``config.num_steps`` steps (see the module docstring).

    ``record(y) -> [C, *P]`` is evaluated (without gradients) on ``y0`` and every state. Nothing keeps a graph.
    """
    check_state(y0)
    step_size = as_step_size(config.step_size, y0)
    check_positive(step_size, "ThinkingConfig.step_size")
    energy_fn, origin = config.descent(energy_fn)
    start = energy_and_grad(energy_fn, origin(y0.detach()), validate=True)
    _check_positions(start.per_position, y0)
    check_finite_start(start.energy, start.grad)
    energies = start.per_position
    state = _Position(y0.detach(), energies, start.grad, torch.ones_like(energies, dtype=torch.bool),
                      torch.zeros_like(energies, dtype=torch.long))
    trace, records, steps_run = [energies], [_record(record, state.y)], 0
    evaluate = energy_and_grad
    if config.compile:
        from energyflow.inference.compiled import compiled_energy_and_grad as evaluate
    for steps_run in range(1, config.num_steps + 1):
        state = _step(state, energy_fn, origin, step_size, config, generator, evaluate)
        trace.append(state.energies)
        records.append(_record(record, state.y))
        if config.check_every is not None and steps_run % config.check_every == 0 and not bool(state.active.any()):
            break  # the documented, bounded host sync: one per check_every steps
    stacked = None if record is None else torch.stack(records)
    return ThinkingResult(state.y, state.energies, torch.stack(trace), stacked, state.steps_used, steps_run)


def _step(state: _Position, energy_fn: EnergyFn, origin: Callable[[Tensor], Tensor], step_size: Tensor,
          config: ThinkingConfig, generator: Optional[torch.Generator],
          evaluate: Callable[..., object] = energy_and_grad) -> _Position:
    """Propose for every position (a step from ``origin(y)``, where ``grad`` was taken), keep the proposal where
    the position is active (and, with ``accept_if_lower``, where its energy fell), then freeze the positions
    that converged. ``evaluate``: the energy-and-gradient (eager, or ``compiled_energy_and_grad``)."""
    proposal = _propose(origin(state.y), state.grad, step_size, config, generator)
    new = evaluate(energy_fn, origin(proposal))
    move = state.active & torch.isfinite(new.per_position)
    if config.accept_if_lower:
        move = move & (new.per_position <= state.energies)
    y = torch.where(_expand(move, state.y), proposal, state.y)
    energies = torch.where(move, new.per_position, state.energies)
    grad = torch.where(_expand(move, state.grad), new.grad, state.grad)
    active = state.active & ~_converged(state.energies, energies, grad, config)
    return _Position(y, energies, grad, active, state.steps_used + state.active.long())


def _propose(y: Tensor, grad: Tensor, step_size: Tensor, config: ThinkingConfig,
             generator: Optional[torch.Generator]) -> Tensor:
    """One gradient step through the stability transforms, plus the optional noise."""
    update = apply_grad(config.transforms, grad, step_size)
    proposal = apply_state(config.transforms, y - step_size * update, step_size, generator)
    if config.noise_scale > 0:
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        proposal = proposal + config.noise_scale * noise
    return proposal


def _converged(previous: Tensor, energies: Tensor, grad: Tensor, config: ThinkingConfig) -> Tensor:
    """[C, *P] positions whose energy change or gradient norm fell under its tolerance."""
    done = torch.zeros_like(energies, dtype=torch.bool)
    if config.energy_tolerance is not None:
        done = done | ((previous - energies).abs() < config.energy_tolerance)
    if config.grad_tolerance is not None:
        done = done | (_grad_norm(grad, energies) < config.grad_tolerance)
    return done


def _record(record: Optional[Record], y: Tensor) -> Optional[Tensor]:
    if record is None:
        return None
    with torch.no_grad():
        return record(y).detach()
