"""The energy contract every sampler relies on, and its validation.

``energy_fn(y: Tensor[C, *event]) -> Tensor[C]`` or ``Tensor[C, S]`` (per-position energies, as in the
autoregressive EBT). Lower is better. A sampler differentiates the *sum* of the returned energies: chains
(and, for ``[C, S]`` energies, positions) are independent, so one backward pass gives every chain its own
gradient.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

EnergyFn = Callable[[Tensor], Tensor]


class EnergyAndGrad(NamedTuple):
    energy: Tensor  # [C] total energy per chain (per-position energies summed)
    per_position: Tensor  # [C] or [C, S] exactly as ``energy_fn`` returned it
    grad: Tensor  # [C, *event] gradient of the energy w.r.t. the state


def log_density(energy: Tensor) -> Tensor:
    """The one place where the sign convention flips: log p(y) = -E(y) (up to a constant)."""
    return -energy


def check_energy_shape(per_position: Tensor, y: Tensor) -> None:
    """Raise a clear error unless ``per_position`` is ``[C]`` or ``[C, S]`` for ``C = y.shape[0]``."""
    num_chains = y.shape[0]
    if not isinstance(per_position, Tensor):
        raise TypeError(f"energy_fn must return a Tensor, got {type(per_position).__name__}")
    if per_position.dim() not in (1, 2) or per_position.shape[0] != num_chains:
        raise ValueError(
            f"energy_fn returned shape {tuple(per_position.shape)} for a state of shape {tuple(y.shape)}; "
            f"expected [C]={[num_chains]} (one energy per chain) or [C, S] (per-position energies). "
            "Chains are the leading dimension of the state: do not reduce over them."
        )
    if not per_position.is_floating_point():
        raise TypeError(f"energy_fn must return a floating-point tensor, got {per_position.dtype}")


def check_state(y: Tensor) -> None:
    if not isinstance(y, Tensor):
        raise TypeError(f"the initial state must be a Tensor [C, *event], got {type(y).__name__}")
    if y.dim() < 2:
        raise ValueError(f"the initial state y0 must be [C, *event]: a leading chain dimension, then at least one "
                         f"event dimension; got shape {tuple(y.shape)}. {_chain_dimension_fix(y)}")
    if y.shape[0] == 0:
        raise ValueError(f"the initial state must have a leading chain dimension C >= 1, got shape {tuple(y.shape)}")
    if not y.is_floating_point():
        raise TypeError(f"the initial state must be floating point, got {y.dtype}")


def _chain_dimension_fix(y: Tensor) -> str:
    """How to give a 0-d or 1-d initial state its chain (and event) dimension."""
    if y.dim() == 0:
        return "For one chain of one value use y0.reshape(1, 1)."
    n = y.shape[0]
    return (f"For one chain of {n} values use y0[None] (shape (1, {n})); for {n} chains of one value each, "
            f"y0[:, None] (shape ({n}, 1)).")


def check_finite_start(energy: Tensor, grad: Tensor) -> None:
    """At initialization (outside any step loop, so the host sync is acceptable) reject non-finite values."""
    bad = ~torch.isfinite(energy)
    if bool(bad.any()):
        chains = bad.nonzero().flatten().tolist()[:10]
        raise ValueError(
            f"energy_fn returned a non-finite energy at the initial state for chains {chains}; "
            "start the chains inside the support of the energy (where it is finite)."
        )
    bad_grad = ~torch.isfinite(grad.flatten(1)).all(dim=1)
    if bool(bad_grad.any()):
        chains = bad_grad.nonzero().flatten().tolist()[:10]
        raise ValueError(f"the gradient of the energy is non-finite at the initial state for chains {chains}.")


def _not_a_function_of_the_state(observed: str) -> str:
    return (f"energy_fn(y) does not depend on the state y through autograd ({observed}), so the sampler has no "
            "gradient to follow. Return a differentiable torch function of the y you are given: no y.detach(), "
            ".item(), .numpy() or torch.no_grad() on the way from y to the energy, and no constant energy.")


def energy_and_grad(
    energy_fn: EnergyFn,
    y: Tensor,
    *,
    create_graph: bool = False,
    validate: bool = False,
) -> EnergyAndGrad:
    """Evaluate the energy and its gradient w.r.t. ``y``.

    ``create_graph=True`` keeps the graph of the gradient itself (second order), which the differentiable
    mode needs so that a loss on a later state reaches the energy's parameters through every step.
    Without it the returned tensors are detached. ``validate`` checks the shape (cheap, no host sync).
    """
    if isinstance(energy_fn, CompiledEnergy) and not create_graph and not validate:
        compiled = energy_fn.energy_and_grad(y)
        if compiled is not None:
            return compiled
    with torch.enable_grad():
        y_in = y if (create_graph and y.requires_grad) else y.detach().requires_grad_(True)
        per_position = energy_fn(y_in)
        if validate:
            check_energy_shape(per_position, y)
        energy = per_position if per_position.dim() == 1 else per_position.sum(dim=1)
        if not energy.requires_grad:  # a Python flag: no host sync
            raise ValueError(_not_a_function_of_the_state("its output has no autograd graph at all"))
        # allow_unused: an energy whose graph never reaches y_in gives None (checked below, no host sync)
        # instead of autograd's "appears to not have been used in the graph" error; same gradient otherwise.
        (grad,) = torch.autograd.grad(energy.sum(), y_in, create_graph=create_graph, allow_unused=True)
        if grad is None:
            raise ValueError(_not_a_function_of_the_state("its graph reaches other tensors (e.g. parameters) "
                                                          "but not y"))
    if not create_graph:
        energy, per_position, grad = energy.detach(), per_position.detach(), grad.detach()
    return EnergyAndGrad(energy, per_position, grad)


def vectorize(energy_fn: Callable[[Tensor], Tensor]) -> EnergyFn:
    """Lift an energy written for **one** unbatched state, ``energy_fn(y [*event]) -> scalar`` (or ``[S]``
    per-position energies), to the batched contract ``[C, *event] -> [C]`` (``[C, S]``) with ``torch.func.vmap``,
    so that a user need not write batched energies. Gradients follow from autograd through the vmapped forward,
    exactly as for a hand-batched energy (``tests/samplers/test_vectorize.py`` checks both against each other).
    The energy must be a pure torch function of its input (no ``.item()``, no Python control flow on values)."""
    batched = torch.func.vmap(energy_fn)

    def lifted(y: Tensor) -> Tensor:
        try:
            out = batched(y)
        except RuntimeError as error:
            message = str(error).splitlines()[0]
            raise ValueError(f"vectorize: energy_fn could not be vmapped over the chains ({message}); write it as a "
                             "pure torch function of one state (no .item(), no if/while on tensor values)") from error
        if out.dim() not in (1, 2) or out.shape[0] != y.shape[0]:
            raise ValueError(f"vectorize: energy_fn(y) of one state must return a scalar (or [S] per-position "
                             f"energies); for {y.shape[0]} chains it gave {tuple(out.shape)}")
        return out

    lifted.__name__ = f"vectorized_{getattr(energy_fn, '__name__', 'energy')}"
    return lifted


def functional_energy_and_grad(energy_fn: EnergyFn, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(energy [C], per-position energies, grad) by ``torch.func.grad`` of the summed energy: the form
    ``torch.compile`` traces (here and in ``energyflow.inference.compiled``)."""

    def total(y: Tensor):
        per_position = energy_fn(y)
        energy = per_position if per_position.dim() == 1 else per_position.sum(dim=1)
        return energy.sum(), (energy, per_position)

    grad, (energy, per_position) = torch.func.grad(total, has_aux=True)(y)
    return energy, per_position, grad


def compile_backend() -> str:
    """The ``torch.compile`` backend of every compiled path here and in ``energyflow.inference.compiled``:
    ``"inductor"`` (generated kernels) unless the environment variable ``ENERGYFLOW_COMPILE_BACKEND`` names another
    of ``torch._dynamo.list_backends()`` -- e.g. ``"aot_eager"``, which traces the same graphs (dynamo, AOT autograd)
    without generating code: seconds instead of a minute to compile, for checking that a path compiles (what
    ``benchmarks/gpu_suite.py --smoke`` uses), not for speed. Read when a path first compiles."""
    return os.environ.get("ENERGYFLOW_COMPILE_BACKEND", "inductor")


SEGMENT_STEPS = 8  # leapfrog steps per compiled call of ``CompiledEnergy.leapfrog`` (see there)


def _leapfrog_step(energy_fn: EnergyFn, y: Tensor, momentum: Tensor, drift_scale: Tensor, step_size: Tensor,
                   last_kick: Tensor):
    """One drift-evaluate-kick step, its kick ``step_size * last_kick`` (``CompiledEnergy.leapfrog`` compiles it)."""
    y = torch.addcmul(y, drift_scale, momentum)
    energy, per_position, grad = functional_energy_and_grad(energy_fn, y)
    return y, torch.addcmul(momentum, step_size * last_kick, grad, value=-1.0), energy, per_position, grad


def _leapfrog_segment(energy_fn: EnergyFn, y: Tensor, momentum: Tensor, drift_scale: Tensor, step_size: Tensor,
                      last_kick: Tensor):
    """``SEGMENT_STEPS`` steps, full kicks but the last (``step_size * last_kick``): its own code object, so that
    ``torch.compile`` caches it apart from the single step."""
    for _ in range(SEGMENT_STEPS - 1):
        y = torch.addcmul(y, drift_scale, momentum)
        grad = functional_energy_and_grad(energy_fn, y)[2]
        momentum = torch.addcmul(momentum, step_size, grad, value=-1.0)
    return _leapfrog_step(energy_fn, y, momentum, drift_scale, step_size, last_kick)


class CompiledEnergy:
    """``compile_energy(energy_fn)``: the same energy, whose energy-and-gradient every sampler evaluates through
    ``torch.compile`` (``torch.func.grad`` of the summed energy, forward and backward fused into one compiled
    graph, shapes dynamic so that subsets of chains -- delayed rejection -- reuse it).

    What it buys is the per-call overhead of eager autograd, which dominates cheap energies: Neal's 10-d funnel
    at 1024 chains, one thread, 614 us eager against 181 us compiled per energy+gradient (after a one-off
    compile of ~8 s). Only first-order, graph-free evaluations are compiled (the Metropolis samplers, NUTS,
    MEADS), and the leapfrog of HMC, MEADS and NUTS without force transforms runs whole segments of
    ``SEGMENT_STEPS`` steps per compiled call (``leapfrog``: measured on the funnel's DR-HMC at 1024 chains, 0.14
    -> 0.06 us per chain-gradient against compiling the energy alone); the differentiable mode
    (``create_graph``, second order) and the initial validation stay eager,
    since ``torch.compile`` has no double backward. If compilation fails (no C++ compiler, an operation
    inductor cannot trace) it warns once and this energy runs eagerly from then on. Calling it evaluates the
    energy eagerly, exactly as ``energy_fn``. Results equal eager autograd to float32 rounding
    (``tests/samplers/test_compile_energy.py``).
    """

    def __init__(self, energy_fn: EnergyFn) -> None:
        if isinstance(energy_fn, CompiledEnergy):
            energy_fn = energy_fn.energy_fn
        if not callable(energy_fn):
            raise TypeError(f"compile_energy needs a callable energy_fn(y) -> [C], got {type(energy_fn).__name__}")
        self.energy_fn = energy_fn
        self._compiled = None
        self._segments: dict[int, Callable] = {}  # the compiled leapfrog segment and single step
        self.disabled: Optional[str] = None  # why compilation was given up, once it was

    def __call__(self, y: Tensor) -> Tensor:
        return self.energy_fn(y)

    def energy_and_grad(self, y: Tensor) -> Optional[EnergyAndGrad]:
        """The compiled evaluation, or None once compilation has failed (the caller then runs eager autograd)."""
        if self.disabled is not None:
            return None
        try:
            with warnings.catch_warnings():  # torch's own notices while it compiles are not the user's concern
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
                if self._compiled is None:
                    energy_fn = self.energy_fn
                    self._compiled = torch.compile(lambda y: functional_energy_and_grad(energy_fn, y), dynamic=True,
                                                   backend=compile_backend())
                with torch.no_grad():
                    energy, per_position, grad = self._compiled(y.detach())
        except Exception as error:  # noqa: BLE001 - any compile failure: eager from now on, said once
            self._give_up(error)
            return None
        return EnergyAndGrad(energy, per_position, grad)

    def leapfrog(self, y: Tensor, momentum: Tensor, drift_scale: Tensor, step_size: Tensor, num_steps: int
                 ) -> Optional[tuple[Tensor, Tensor, EnergyAndGrad]]:
        """The leapfrog's ``num_steps`` drift-evaluate-kick steps after its first half kick (``momentum`` has had
        it), the last kick a half one, in compiled segments of ``SEGMENT_STEPS`` steps (then single steps): each
        segment is one compiled call, so a trajectory pays the per-call overhead of ``torch.compile`` (tens of
        microseconds, most of a cheap energy's cost) once per segment rather than once per step. The arithmetic
        is the eager leapfrog's, step by step (``samplers.integrators.leapfrog``). ``drift_scale`` and
        ``step_size`` are broadcast to the state's shape first, so that only the number of chains varies between
        calls (one dynamic-shape program per segment length). Returns (y, momentum, energy and gradient at the
        final y), or None once compilation has failed (the caller runs eagerly)."""
        if self.disabled is not None:
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
                with torch.no_grad():
                    if not self._segments:
                        backend = compile_backend()
                        self._segments = {SEGMENT_STEPS: torch.compile(_leapfrog_segment, dynamic=True, backend=backend),
                                          1: torch.compile(_leapfrog_step, dynamic=True, backend=backend)}
                    y, momentum = y.detach(), momentum.detach()
                    drift_scale, step_size = (torch.as_tensor(x, dtype=y.dtype, device=y.device).expand(y.shape)
                                              .contiguous() for x in (drift_scale, step_size))
                    full, half = (torch.tensor(kick, dtype=y.dtype, device=y.device) for kick in (1.0, 0.5))
                    remaining = num_steps
                    while remaining > 0:
                        steps = SEGMENT_STEPS if remaining >= SEGMENT_STEPS else 1
                        remaining -= steps
                        # the closing half kick ends the trajectory
                        y, momentum, energy, per_position, grad = self._segments[steps](
                            self.energy_fn, y, momentum, drift_scale, step_size, half if remaining == 0 else full)
        except Exception as error:  # noqa: BLE001 - as in energy_and_grad
            self._give_up(error)
            return None
        return y, momentum, EnergyAndGrad(energy, per_position, grad)

    def _give_up(self, error: Exception) -> None:
        first_line = str(error).splitlines()[0] if str(error) else ""
        self.disabled = f"{type(error).__name__}: {first_line}"
        warnings.warn(f"compile_energy: torch.compile is unavailable for this energy ({self.disabled}); it runs "
                      "eagerly", RuntimeWarning, stacklevel=4)

    def __repr__(self) -> str:
        return f"compile_energy({self.energy_fn!r})"


def compile_energy(energy_fn: EnergyFn) -> CompiledEnergy:
    """``energy_fn`` with its energy-and-gradient compiled for every sampler (see ``CompiledEnergy``)."""
    return CompiledEnergy(energy_fn)
