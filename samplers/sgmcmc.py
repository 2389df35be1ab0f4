"""Stochastic-gradient MCMC for energies that are sums over data: minibatch energies and SGLD.

``MinibatchEnergy(per_example, data, batch_size)``: the energy ``U(y) = prior(y) + sum_i e(y, x_i)`` over a
data set of ``N`` examples, estimated at every call from a fresh minibatch per chain, ``prior(y) + (N / B)
sum_{i in batch} e(y, x_i)`` (``B`` examples drawn without replacement, independently for every chain, from the
energy's own generator). Its gradient is an unbiased estimate of ``grad U``. ``full(y)`` is the exact energy.

``SGLD`` (Welling and Teh 2011, constant step): unadjusted Langevin, ``y <- y - eta grad U~(y) + sqrt(2 eta) xi``,
where ``grad U~`` is the minibatch gradient -- ``samplers.Langevin`` run on a ``MinibatchEnergy``, which draws
a new minibatch at every evaluation, i.e. at every step. Like ULA it is biased at a finite step, and the
minibatch noise adds to the bias: for a Gaussian posterior of precision ``L`` its stationary variance is
``(2 eta + eta^2 L^2 v_B) / (1 - (1 - eta L)^2)`` with ``v_B`` the variance of the minibatch mean (tested
exactly in ``tests/samplers/test_sgmcmc.py``), against ``1 / L`` for the posterior.

``SGHMC`` (Chen, Fox and Guestrin 2014): Hamiltonian dynamics with friction ``C`` (scalar, per chain or per
element) and a diagonal inverse mass ``M^-1``,
``p <- p - eta grad U~(y) - eta C M^-1 p + N(0, 2 (C - B_hat) eta);  y <- y + eta M^-1 p``.
A step applies the paper's two updates starting from the momentum kick, at the minibatch gradient of the current
state (evaluated once, when the state was created): the same recursion as the paper's (position first, then the
kick at the new position), read one half-update later. The momentum starts at zero (so the positions match the
paper's from ``p_0 = 0`` shifted by one step); friction brings it to its stationary ``N(0, ~M)``.
The minibatch gradient's noise ``eta * (grad U~ - grad U)`` heats the momentum by ``eta^2 V`` per step, ``V``
its covariance (diagonal here); ``B_hat = eta V_hat / 2`` takes that much out of the injected noise.
``gradient_noise`` is ``V_hat``: ``None`` (no correction, ``B_hat = 0``), a given value (scalar, per chain or
per element), or ``"estimate"``: per chain and element, from the per-example gradients of the state's own
minibatch (``MinibatchEnergy.energy_grad_and_noise``: the ``B`` gradients come from one backward pass through
the minibatch laid out as ``C * B`` one-example rows), ``V_hat = N (N - B) s^2 / B`` with ``s^2`` their sample
variance -- unbiased for the variance of a without-replacement minibatch gradient, so on a linear-Gaussian
posterior the estimated correction is exact in expectation (tested). Chosen over the spread of successive
minibatch gradients, which mixes the noise with the state's own movement. ``noise_smoothing = a`` averages the
estimates over steps, ``V_hat <- a V_hat + (1 - a) V_new`` (still unbiased when ``V`` is constant; fewer
clamps). Where ``B_hat > C`` the injected noise would need a negative variance: it is clamped to zero there,
the chains run hotter than the target, and the run ends with one ``SamplerWarning``. With an exact energy and
``gradient_noise=None`` this is underdamped Langevin dynamics, discretised.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from samplers.base import (
    Sampler,
    SamplerWarning,
    StepContext,
    StepInfo,
    StepSize,
    as_step_size,
    check_positive,
    copy_as_tensor,
    evaluate_at,
    unadjusted_info,
)
from samplers.energy import EnergyAndGrad, EnergyFn
from samplers.langevin import Langevin
from samplers.transforms import Transform, apply_grad, apply_input, apply_state

PerExample = Callable[[Tensor, Tensor], Tensor]  # (y [C, *event], x [C, B, *data]) -> [C, B]


class MinibatchEnergy:
    """See the module docstring. ``per_example(y, x)`` gets each chain's own minibatch ``x [C, B, *data]``."""

    def __init__(self, per_example: PerExample, data: Tensor, batch_size: int, *,
                 prior: Optional[Callable[[Tensor], Tensor]] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        if not isinstance(data, Tensor) or data.dim() < 1 or data.shape[0] < 1:
            raise ValueError(f"data must be a tensor [N, *data] with N >= 1, got {getattr(data, 'shape', data)!r}")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= data.shape[0]:
            raise ValueError(f"batch_size must be an int in [1, N = {data.shape[0]}], got {batch_size!r}")
        self.per_example, self.data, self.batch_size, self.prior = per_example, data, batch_size, prior
        self.generator = generator

    @property
    def num_examples(self) -> int:
        return self.data.shape[0]

    def _prior(self, y: Tensor) -> Tensor:
        return torch.zeros(y.shape[0], dtype=y.dtype, device=y.device) if self.prior is None else self.prior(y)

    def _minibatch(self, chains: int) -> Tensor:
        keys = torch.rand(chains, self.num_examples, generator=self.generator, device=self.data.device)
        return self.data[keys.argsort(dim=1)[:, : self.batch_size]]  # [C, B, *data]: without replacement per chain

    def _terms(self, y: Tensor, x: Tensor) -> Tensor:
        terms = self.per_example(y, x)
        if terms.shape != x.shape[:2]:
            raise ValueError(f"per_example(y, x) must return [C, B] = {list(x.shape[:2])} energies, got "
                             f"{tuple(terms.shape)}")
        return terms

    def __call__(self, y: Tensor) -> Tensor:
        terms = self._terms(y, self._minibatch(y.shape[0]))
        return self._prior(y) + (self.num_examples / self.batch_size) * terms.sum(dim=1)

    def energy_grad_and_noise(self, y: Tensor, *, create_graph: bool = False) -> tuple[EnergyAndGrad, Tensor]:
        """The minibatch energy and gradient at ``y`` [C, *event] (as a sampler evaluates ``self``), and the
        estimated covariance (diagonal) of that gradient, ``V_hat = N (N - B) s^2 / B`` [C, *event] (detached).
        ``per_example`` is called once on the minibatch as ``C * B`` one-example rows."""
        if self.batch_size < 2:
            raise ValueError("estimating the gradient noise needs batch_size >= 2 (a variance of the per-example "
                             f"gradients), got {self.batch_size}; raise batch_size or give the noise explicitly")
        chains, batch, event, total = y.shape[0], self.batch_size, y.shape[1:], self.num_examples
        x = self._minibatch(chains)
        with torch.enable_grad():
            y_in = y if (create_graph and y.requires_grad) else y.detach().requires_grad_(True)
            rows = y_in.unsqueeze(1).expand(chains, batch, *event).reshape(chains * batch, *event)
            terms = self._terms(rows, x.reshape(chains * batch, 1, *x.shape[2:]))  # [C * B, 1]
            energy = self._prior(y_in) + (total / batch) * terms.view(chains, batch).sum(dim=1)
            grad, row_grads = torch.autograd.grad(energy.sum(), (y_in, rows), create_graph=create_graph)
        per_example = row_grads.detach().view(chains, batch, *event) * (batch / total)  # d e(y, x_i) / dy
        noise = per_example.var(dim=1) * (total * (total - batch) / batch)
        if not create_graph:
            energy, grad = energy.detach(), grad.detach()
        return EnergyAndGrad(energy, energy, grad), noise

    def full(self, y: Tensor) -> Tensor:
        """The exact energy over every example, ``[C]``."""
        x = self.data.unsqueeze(0).expand(y.shape[0], *self.data.shape)
        return self._prior(y) + self.per_example(y, x).sum(dim=1)


class SGLD(Langevin):
    """Stochastic gradient Langevin dynamics: ``Langevin`` whose energy is a ``MinibatchEnergy`` (refused
    otherwise: with an exact energy this is plain ULA, use ``Langevin``)."""

    def run(self, energy_fn, y0: Tensor, **kwargs):
        if not isinstance(energy_fn, MinibatchEnergy):
            raise ValueError("SGLD samples a MinibatchEnergy (an energy summed over data, estimated per minibatch); "
                             f"got {type(energy_fn).__name__}. For an exact energy use samplers.Langevin")
        return super().run(energy_fn, y0, **kwargs)


class SGHMCState(NamedTuple):
    y: Tensor  # [C, *event]
    momentum: Tensor  # [C, *event]
    energy: Tensor  # [C]
    grad: Optional[Tensor]  # [C, *event] minibatch gradient at origin; None for a run's last state
    origin: Tensor  # [C, *event] transform_input(y)
    gradient_noise: Optional[Tensor]  # [C, *event] estimated V_hat at origin (smoothed); None unless estimating
    clamped: Tensor  # [C] int64: element-steps so far whose correction B_hat exceeded the friction


def _evaluate(energy_fn: EnergyFn, origin: Tensor, *, estimate: bool, create_graph: bool, need_grad: bool = True,
              validate: bool = False) -> tuple[EnergyAndGrad, Optional[Tensor]]:
    if estimate and need_grad:
        return energy_fn.energy_grad_and_noise(origin, create_graph=create_graph)
    return evaluate_at(energy_fn, origin, create_graph=create_graph, need_grad=need_grad, validate=validate), None


def init(y: Tensor, energy_fn: EnergyFn, *, transforms: Sequence[Transform] = (), create_graph: bool = False,
         estimate_noise: bool = False) -> SGHMCState:
    """Zero momentum; ``estimate_noise`` (``energy_fn`` a ``MinibatchEnergy``) estimates ``V_hat`` at ``y``."""
    origin = apply_input(transforms, y)
    evaluated, noise = _evaluate(energy_fn, origin, estimate=estimate_noise, create_graph=create_graph, validate=True)
    clamped = torch.zeros(y.shape[0], dtype=torch.int64, device=y.device)
    return SGHMCState(y, torch.zeros_like(y), evaluated.energy, evaluated.grad, origin, noise, clamped)


def step(state: SGHMCState, energy_fn: EnergyFn, *, step_size: Tensor, friction: Tensor,
         inverse_mass: Union[Tensor, float] = 1.0, gradient_noise: Optional[Tensor] = None,
         estimate_noise: bool = False, noise_smoothing: float = 0.0, generator: Optional[torch.Generator] = None,
         transforms: Sequence[Transform] = (), create_graph: bool = False,
         need_grad: bool = True) -> tuple[SGHMCState, StepInfo]:
    """One SGHMC step (module docstring). ``gradient_noise`` is a given ``V_hat``; with ``estimate_noise`` the
    state's own estimate is used instead; neither: no correction. All tensors broadcast against the state."""
    y, momentum = state.origin, state.momentum
    noise_estimate = state.gradient_noise if estimate_noise else gradient_noise
    correction = 0.5 * step_size * noise_estimate if noise_estimate is not None else torch.zeros_like(friction)
    clamped = state.clamped + (correction > friction).expand_as(y).flatten(1).sum(dim=1)
    noise_scale = torch.sqrt(2.0 * step_size * (friction - correction).clamp(min=0.0))
    noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    grad = apply_grad(transforms, state.grad, step_size)
    momentum = momentum - step_size * grad - step_size * friction * inverse_mass * momentum + noise_scale * noise
    y_new = apply_state(transforms, y + step_size * inverse_mass * momentum, step_size, generator)
    origin = apply_input(transforms, y_new)
    evaluated, new_noise = _evaluate(energy_fn, origin, estimate=estimate_noise, create_graph=create_graph,
                                     need_grad=need_grad)
    if new_noise is not None and noise_smoothing > 0:
        new_noise = noise_smoothing * state.gradient_noise + (1.0 - noise_smoothing) * new_noise
    new_state = SGHMCState(y_new, momentum, evaluated.energy, evaluated.grad, origin, new_noise, clamped)
    return new_state, unadjusted_info(evaluated, step_size, y_new)


class _ClampRecord:
    """What a run tells its end: the last state's clamp counts (a tensor; read once, after the loop)."""

    def __init__(self) -> None:
        self.clamped: Optional[Tensor] = None


class SGHMC(Sampler):
    """Stochastic gradient HMC (module docstring): ``SGHMC(step_size, friction, inverse_mass=None,
    gradient_noise=None | V_hat | "estimate", noise_smoothing=0.0)``; no accept/reject."""

    def __init__(self, step_size: StepSize, friction: StepSize, *, inverse_mass: Optional[StepSize] = None,
                 gradient_noise: Union[None, str, float, Tensor] = None, noise_smoothing: float = 0.0,
                 transforms: Sequence[Transform] = ()) -> None:
        super().__init__(transforms)
        check_positive(copy_as_tensor(step_size), "SGHMC step_size")
        check_positive(copy_as_tensor(friction), "SGHMC friction")
        if inverse_mass is not None:
            check_positive(copy_as_tensor(inverse_mass), "SGHMC inverse_mass")
        self.estimate_noise = isinstance(gradient_noise, str)
        if self.estimate_noise and gradient_noise != "estimate":
            raise ValueError(f"SGHMC gradient_noise must be None, a non-negative value or 'estimate', got "
                             f"{gradient_noise!r}")
        if gradient_noise is not None and not self.estimate_noise:
            check_positive(copy_as_tensor(gradient_noise), "SGHMC gradient_noise", allow_zero=True)
        if not 0.0 <= noise_smoothing < 1.0 or (noise_smoothing > 0 and not self.estimate_noise):
            raise ValueError(f"SGHMC noise_smoothing must be in [0, 1) and only with gradient_noise='estimate', got "
                             f"{noise_smoothing!r}")
        self.register_buffer("step_size", copy_as_tensor(step_size))
        self.register_buffer("friction", copy_as_tensor(friction))
        self.register_buffer("inverse_mass", None if inverse_mass is None else copy_as_tensor(inverse_mass))
        given = gradient_noise is not None and not self.estimate_noise
        self.register_buffer("gradient_noise", copy_as_tensor(gradient_noise) if given else None)
        self.noise_smoothing = float(noise_smoothing)

    def run(self, energy_fn, y0: Tensor, **kwargs):
        if self.estimate_noise:
            if not isinstance(energy_fn, MinibatchEnergy):
                raise ValueError("SGHMC(gradient_noise='estimate') estimates the noise from a MinibatchEnergy's "
                                 f"per-example gradients; got {type(energy_fn).__name__}. Give gradient_noise a value "
                                 "(or None) for another energy")
            if kwargs.get("parametrization") is not None:
                raise ValueError("SGHMC(gradient_noise='estimate') evaluates the MinibatchEnergy itself: wrap the "
                                 "parametrization into per_example instead of passing parametrization=")
        return super().run(energy_fn, y0, **kwargs)

    def _begin(self, y0: Tensor, warmup: int) -> _ClampRecord:
        for name in ("step_size", "friction", "inverse_mass", "gradient_noise"):
            if getattr(self, name) is not None:
                as_step_size(getattr(self, name), y0, name=f"SGHMC {name}")
        return _ClampRecord()

    def _init(self, y0: Tensor, energy_fn: EnergyFn, transforms: Sequence[Transform], create_graph: bool):
        return init(y0, energy_fn, transforms=transforms, create_graph=create_graph,
                    estimate_noise=self.estimate_noise)

    def _transition(self, state: SGHMCState, energy_fn: EnergyFn, transforms: Sequence[Transform],
                    tuning: _ClampRecord, ctx: StepContext) -> tuple[SGHMCState, StepInfo]:
        y = state.y

        def broadcast(name: str) -> Optional[Tensor]:
            value = getattr(self, name)
            return None if value is None else as_step_size(value, y, name=f"SGHMC {name}")

        inverse_mass = broadcast("inverse_mass")
        state, info = step(state, energy_fn, step_size=broadcast("step_size"), friction=broadcast("friction"),
                           inverse_mass=1.0 if inverse_mass is None else inverse_mass,
                           gradient_noise=broadcast("gradient_noise"), estimate_noise=self.estimate_noise,
                           noise_smoothing=self.noise_smoothing, generator=ctx.generator, transforms=transforms,
                           create_graph=ctx.create_graph, need_grad=ctx.need_grad)
        tuning.clamped = state.clamped
        return state, info

    def _adapted(self, tuning: _ClampRecord, y0: Tensor) -> dict[str, Tensor]:
        """Called once after the loop: the one host sync that says whether the correction was clamped."""
        clamped = int(tuning.clamped.sum()) if tuning.clamped is not None else 0
        if clamped:
            warnings.warn(f"SGHMC: the noise correction B_hat = step_size * V_hat / 2 exceeded the friction in "
                          f"{clamped} element-steps and was clamped to it (no injected noise there), so the chains "
                          "ran hotter than the target; raise friction, lower step_size or the gradient noise (a "
                          "larger batch_size)", SamplerWarning, stacklevel=4)  # the caller of SGHMC.run
        return {}

    def extra_repr(self) -> str:
        noise = "estimate" if self.estimate_noise else ("given" if self.gradient_noise is not None else None)
        return f"gradient_noise={noise}, noise_smoothing={self.noise_smoothing}"
