"""The shared run driver and the helpers every algorithm file reuses.

``Sampler.run`` validates its input once, evaluates the energy at ``y0`` (host syncs: shape and
finiteness checks at entry), then loops warmup + sampling steps through the subclass's functional core.
The loop never reads a tensor value on the host: accept/reject is ``torch.where``, adaptation is
elementwise tensor arithmetic, schedules use Python step indices. After the loop, a Metropolis run with a
warmup reads one value more: its divergence count (``warn_if_divergent``).

Differentiable mode: step ``t`` (0-based, of ``T = warmup + num_steps``) keeps a graph iff
``differentiable`` and ``t >= T - truncate`` (it runs under ``torch.enable_grad``, so an outer ``no_grad``
cannot silently drop the graph); steps outside that window run under ``torch.no_grad``.
Each state caches its energy and gradient, evaluated once when the state is created; it is evaluated with
``create_graph=True`` iff the *next* step keeps a graph, so every step costs exactly one energy forward
and one backward, and the last state (whose gradient no step uses) costs one forward only.
``final_energy`` says what that forward is: ``"graph"`` (the default) builds a graph; ``"value"`` runs it under
``torch.no_grad`` (no saved activations, and the energy model may pick a fused, forward-only attention kernel)
while the last state keeps its graph; ``"skip"`` (samplers without accept/reject, whose last transition needs
no energy) does not run it at all, and ``energies[-1]`` is NaN. A loss on the states alone needs neither.
"""
from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from samplers.energy import (
    EnergyAndGrad,
    EnergyFn,
    check_energy_shape,
    check_finite_start,
    check_state,
    energy_and_grad,
)
from samplers.parametrization import Parametrization
from samplers.trajectory import Trajectory, stack_info
from samplers.transforms import Detach, Transform, apply_input

StepSize = Union[float, Tensor]

# An HMC/MALA run with a warmup warns (``SamplerWarning``) when more than this fraction of its post-warmup
# transitions, pooled over chains, diverged. A divergence is an energy error above ``max_energy_error`` (1000
# by default: acceptance probability e^-1000) or a non-finite one, not a tail event of a tuned sampler: on
# smooth targets adapted HMC/MALA record none, and the worst healthy run in tests/samplers (MALA on a mild
# funnel) 0.19%; a step size adapted into divergence gives 10-100%. One transition in a hundred rejected
# outright already marks a region the chains reach but cannot cross (biased draws; Stan flags even one), while
# pooling over chains keeps one unlucky transition of one chain in a short run from warning.
DIVERGENCE_WARNING_RATE = 0.01


class SamplerWarning(UserWarning):
    """A run finished, but its own diagnostics say its draws should not be trusted as they are."""


class StepInfo(NamedTuple):
    """Per-chain information of one step (every field [C])."""

    acceptance_prob: Tensor
    accepted: Tensor
    divergent: Tensor
    step_size: Tensor


class StepContext(NamedTuple):
    """What the driver tells a step: its index, the run length, where the graph is kept."""

    index: int
    num_steps: int  # warmup + sampling steps of the whole run
    generator: Optional[torch.Generator]
    create_graph: bool  # evaluate the new state with a second-order graph
    need_grad: bool  # False for the run's last state: no later step uses its gradient


def as_step_size(step_size: StepSize, y: Tensor, name: str = "step_size") -> Tensor:
    """A step size (or another per-chain/per-element value, e.g. a temperature) as a tensor that
    broadcasts against ``y`` [C, *event] (same device and dtype).

    A scalar is global, a 1-D tensor of length C is per chain (reshaped to [C, 1, ...]), anything else
    must broadcast to ``y``'s shape (per element). Differentiable: a Parameter keeps its graph.
    """
    value = step_size if isinstance(step_size, Tensor) else torch.tensor(float(step_size))
    value = value.to(device=y.device, dtype=y.dtype)
    if value.dim() == 1 and value.shape[0] == y.shape[0] and y.dim() > 1:
        return value.view(-1, *([1] * (y.dim() - 1)))
    try:
        ok = torch.broadcast_shapes(value.shape, y.shape) == y.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} does not broadcast to the state of shape "
            f"{tuple(y.shape)}; pass a float, a [C]={[y.shape[0]]} tensor (one per chain) or a tensor "
            "broadcastable to the state (one per element)."
        )
    return value


def copy_as_tensor(value: StepSize) -> Tensor:
    """A detached copy of a float or tensor hyperparameter, to register as a buffer (or wrap as a Parameter)."""
    return value.detach().clone() if isinstance(value, Tensor) else torch.tensor(float(value))


def check_positive(value: Tensor, name: str, *, allow_zero: bool = False) -> None:
    """Entry-time validation (a host sync, outside any loop)."""
    too_small = (value < 0) if allow_zero else (value <= 0)
    if not bool(torch.isfinite(value).all()) or bool(too_small.any()):
        qualifier = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be finite and {qualifier} everywhere, got min {value.detach().min()}")


def per_chain(x: Tensor, like: Tensor) -> Tensor:
    """[C] -> [C, 1, ..., 1] broadcasting against ``like`` [C, *event]."""
    return x.view(-1, *([1] * (like.dim() - 1)))


def chain_mean(step_size: Tensor, y: Tensor) -> Tensor:
    """[C] per-chain step size (mean over the event for per-element step sizes), detached.

    Averages the (possibly broadcast) small tensor itself, never the expanded [C, *event] one.
    """
    value = step_size.detach()
    value = value.reshape((1,) * (y.dim() - value.dim()) + tuple(value.shape))
    value = value.flatten(1).mean(dim=1) if value.dim() > 1 else value
    return value.expand(y.shape[0])


def evaluate(
    energy_fn: EnergyFn,
    y: Tensor,
    transforms: Sequence[Transform],
    *,
    create_graph: bool,
    need_grad: bool = True,
    validate: bool = False,
) -> EnergyAndGrad:
    """Energy (and gradient unless ``need_grad=False``, then ``grad=None``) at ``transform_input(y)``.

    ``validate`` checks the energy's shape (what every ``init`` does; shape checks do not sync).
    """
    return evaluate_at(energy_fn, apply_input(transforms, y), create_graph=create_graph, need_grad=need_grad,
                       validate=validate)


def evaluate_at(energy_fn: EnergyFn, point: Tensor, *, create_graph: bool, need_grad: bool = True,
                validate: bool = False) -> EnergyAndGrad:
    """``evaluate`` at a ``point`` already through the transforms' ``transform_input`` (a descent keeps it in its
    state as the origin of its next step, so the input transforms run once per state)."""
    if need_grad:
        return energy_and_grad(energy_fn, point, create_graph=create_graph, validate=validate)
    per_position = energy_fn(point)
    if validate:
        check_energy_shape(per_position, point)
    energy = per_position if per_position.dim() == 1 else per_position.sum(dim=1)
    return EnergyAndGrad(energy, per_position, None)


def finite_chains(energy: Tensor, grad: Optional[Tensor]) -> Tensor:
    """[C] bool: energy and (if given) every gradient element finite."""
    finite = torch.isfinite(energy)
    if grad is not None:
        finite = finite & torch.isfinite(grad.flatten(1)).all(dim=1)
    return finite


def unadjusted_info(new: EnergyAndGrad, step_size: Tensor, y: Tensor) -> StepInfo:
    """Info of a sampler without accept/reject: every step is accepted; non-finite chains are flagged."""
    ones = torch.ones_like(new.energy, dtype=torch.bool)
    divergent = ~finite_chains(new.energy.detach(), None if new.grad is None else new.grad.detach())
    return StepInfo(ones.to(y.dtype), ones, divergent, chain_mean(step_size, y))


class Sampler(nn.Module):
    """Base class: holds the transforms and runs warmup + sampling for every algorithm.

    Subclasses implement ``_init``, ``_transition`` and, if they tune anything, ``_begin`` / ``_adapt`` /
    ``_adapted``.
    """

    supports_differentiable = True
    # Metropolis samplers warn after a run with a warmup whose kept transitions diverged too often
    # (``warn_if_divergent``); for a descent a divergence is a chain gone non-finite, visible in its states.
    warns_on_divergence = False
    divergence_remedy: Optional[str] = None  # the warning's advice, if not a higher target_accept

    def __init__(self, transforms: Sequence[Transform] = ()) -> None:
        super().__init__()
        for transform in transforms:
            if not isinstance(transform, Transform):
                raise TypeError(f"transforms must be samplers.transforms.Transform objects, got {transform!r}")
        self.transforms = nn.ModuleList(transforms)

    def _begin(self, y0: Tensor, warmup: int) -> Any:
        """Validate against ``y0`` and return the tuning the first step uses."""
        return None

    def _init(self, y0: Tensor, energy_fn: EnergyFn, transforms: Sequence[Transform], create_graph: bool):
        raise NotImplementedError

    def _transition(self, state, energy_fn: EnergyFn, transforms: Sequence[Transform], tuning: Any, ctx: StepContext):
        raise NotImplementedError

    def _adapt(self, tuning: Any, step_index: int, warmup: int, state, info) -> Any:
        return tuning

    def _adapted(self, tuning: Any, y0: Tensor) -> dict[str, Tensor]:
        return {}

    def tie_step_size(self, source: "Sampler") -> None:
        """Step with ``source``'s learnable step size from now on: the very same ``Parameter`` (one value, trained
        once, read by both; e.g. an evaluation sampler following the training one), and its floor
        (``min_step_size``) if this sampler has none of its own."""
        shared = getattr(source, "step_size", None)
        if not isinstance(shared, nn.Parameter) or not hasattr(self, "step_size"):
            raise ValueError(f"tie_step_size shares a learnable step size: {type(source).__name__}'s is not an "
                             f"nn.Parameter (learnable=False), or {type(self).__name__} has no step_size")
        self.step_size = shared  # nn.Module moves the name from the buffers to the parameters
        if getattr(self, "min_step_size", 0) is None:
            self.min_step_size = getattr(source, "min_step_size", None)

    def forward(self, *args: Any, **kwargs: Any) -> Trajectory:
        """``sampler(energy_fn, y0, ...)`` is ``run``; this also lets ``torch.func.functional_call`` swap in a
        step-size tensor (e.g. to gradcheck through it)."""
        return self.run(*args, **kwargs)

    def run(
        self,
        energy_fn: EnergyFn,
        y0: Tensor,
        *,
        num_steps: int,
        warmup: int = 0,
        thin: int = 1,
        generator: Optional[torch.Generator] = None,
        differentiable: bool = False,
        truncate: Optional[int] = None,
        detach_between_steps: bool = False,
        final_energy: str = "graph",
        parametrization: Optional[Parametrization] = None,
    ) -> Trajectory:
        """Run ``warmup`` + ``num_steps`` steps from ``y0`` [C, *event]; keep every ``thin``-th sampling state.

        ``differentiable=True`` keeps the graph (states carry it); ``truncate=k`` keeps it only for the last
        k steps; ``detach_between_steps=True`` adds a ``Detach`` transform (see ``samplers.transforms``).
        ``final_energy``: how the last state y_T is scored for ``energies[-1]``. ``"graph"`` (default): like every
        other energy (in differentiable mode, with a graph). ``"value"``: without a graph (differentiable mode
        only; ``energies[-1]`` is then a constant, so a loss that needs E(y_T) must keep ``"graph"``).
        ``"skip"``: not evaluated at all -- ``energies[-1]`` is NaN and the last step's ``divergent`` flag
        checks the state alone; only for samplers without accept/reject (GradientDescent, Langevin). A loss on
        the states alone saves one energy forward per run with ``"value"`` or ``"skip"``.
        ``parametrization`` (``samplers.parametrization``): ``energy_fn`` reads ``u = map(y)`` and the descent takes
        its gradient through the map (``"state"``) or at ``u``, stepping from it (``"image"``: descents only).
        """
        check_final_energy(final_energy, None if self.supports_differentiable else
                           f"{type(self).__name__} needs the energy of its last proposal for the accept/reject test")
        if differentiable and not self.supports_differentiable:
            raise ValueError(
                f"{type(self).__name__} has a Metropolis correction, which is not differentiable (accept/reject "
                "is discrete); use GradientDescent or Langevin for differentiable=True."
            )
        check_run_args(y0, num_steps, warmup, thin, generator, differentiable, truncate, detach_between_steps)
        transforms = list(self.transforms) + ([Detach()] if detach_between_steps else [])
        if parametrization is not None:
            if parametrization.descent_space == "image" and not self.supports_differentiable:
                raise ValueError(f"{type(self).__name__} is Metropolis-corrected: a step from the image point "
                                 "u = map(y) is not a proposal on y it can correct; use descent_space='state' or a "
                                 "descent (GradientDescent, Langevin)")
            energy_fn = parametrization.descent_energy(energy_fn)
            transforms += list(parametrization.transforms())
        total = warmup + num_steps
        first_graph_step = total - truncate if truncate is not None else 0

        def keeps_graph(index: int) -> bool:
            return differentiable and index >= first_graph_step

        tuning = self._begin(y0, warmup)
        state = self._init(y0, energy_fn, transforms, keeps_graph(0))
        check_finite_start(state.energy.detach(), state.grad.detach())
        recorder = Recorder(y0, num_steps, thin, keep_graph=differentiable)
        for index in range(total):
            ctx = StepContext(index, total, generator, keeps_graph(index + 1), index < total - 1)
            # The last transition of GradientDescent/Langevin (the only differentiable samplers) evaluates the
            # energy at y_T alone (need_grad=False), never a gradient: no_grad there drops only E(y_T)'s graph.
            last = not ctx.need_grad
            step_energy_fn = energy_fn
            if last and final_energy == "skip":
                step_energy_fn = not_evaluated
            elif last and final_energy == "value" and differentiable:
                step_energy_fn = without_graph(energy_fn)
            with torch.enable_grad() if keeps_graph(index) else torch.no_grad():
                state, info = self._transition(state, step_energy_fn, transforms, tuning, ctx)
            if last and final_energy == "skip":  # NaN stands for "not evaluated", not for a divergence
                info = info._replace(divergent=~torch.isfinite(state.y.detach()).flatten(1).all(dim=1))
            if index < warmup:
                tuning = self._adapt(tuning, index, warmup, state, info)
                recorder.record_warmup(info)
            else:
                recorder.record(index - warmup, state, info)
        trajectory = recorder.trajectory(self._adapted(tuning, y0))
        if self.warns_on_divergence and warmup > 0:
            warn_if_divergent(recorder.divergent, type(self).__name__, warmup, self.divergence_remedy)
        return trajectory


def warn_if_divergent(divergent: Tensor, sampler: str, warmup: int, remedy: Optional[str] = None) -> None:
    """Warn (``SamplerWarning``) if more than ``DIVERGENCE_WARNING_RATE`` of the post-warmup transitions
    ``divergent`` [num_steps, C] (unthinned) diverged. One host sync, once per run, never inside the loop.

    Only for runs with a warmup: with ``warmup=0`` the step size is the caller's own fixed choice (e.g. a few
    fixed-step MCMC steps per training step, where a warning per step would be noise), and
    ``trajectory.info["divergent"]`` reports it either way.
    """
    if divergent.numel() == 0:
        return
    per_chain_count = divergent.sum(dim=0)
    total, worst, chains = (int(v) for v in torch.stack([
        per_chain_count.sum(), per_chain_count.max(), (per_chain_count > 0).sum()]).tolist())
    num_steps, num_chains = divergent.shape[0], divergent.shape[1]
    rate = total / divergent.numel()
    if rate <= DIVERGENCE_WARNING_RATE:
        return
    warnings.warn(
        f"{sampler}: {total} of {divergent.numel()} post-warmup transitions diverged ({rate:.1%}, above the "
        f"{DIVERGENCE_WARNING_RATE:.0%} this warning allows; {chains} of {num_chains} chains diverged, the worst "
        f"in {worst / num_steps:.0%} of its steps), so the draws are not reliable. Use a longer warmup (this "
        f"run had {warmup}), {remedy or 'a higher target_accept (smaller adapted steps) or a smaller initial step_size'}"
        "; trajectory.info['divergent'] marks each divergent transition.",
        SamplerWarning,
        stacklevel=3,  # the caller's ``run`` line (warn_if_divergent <- run <- caller)
    )


def check_final_energy(final_energy: str, cannot_skip: Optional[str] = None) -> None:
    """Validate ``run``'s ``final_energy``; ``cannot_skip`` (why this sampler needs every energy) refuses "skip"."""
    if final_energy not in ("graph", "value", "skip"):
        raise ValueError(f"final_energy must be 'graph', 'value' or 'skip', got {final_energy!r}")
    if final_energy == "skip" and cannot_skip is not None:
        raise ValueError(f"{cannot_skip}, so final_energy='skip' is not possible; use 'graph' or 'value'")


def not_evaluated(y: Tensor) -> Tensor:
    """Stands in for the energy of a last state that ``final_energy="skip"`` leaves unscored: NaN per chain."""
    return torch.full((y.shape[0],), float("nan"), dtype=y.dtype, device=y.device)


def without_graph(energy_fn: EnergyFn) -> EnergyFn:
    """``energy_fn`` evaluated under ``torch.no_grad`` (for a last state whose energy no loss uses)."""

    def energy_without_graph(y: Tensor) -> Tensor:
        with torch.no_grad():
            return energy_fn(y)

    return energy_without_graph


def check_run_args(
    y0: Tensor,
    num_steps: int,
    warmup: int,
    thin: int,
    generator: Optional[torch.Generator],
    differentiable: bool,
    truncate: Optional[int],
    detach_between_steps: bool,
) -> None:
    """Entry-time validation of ``run``'s arguments (shared with the NUTS adapter, which has its own loop)."""
    check_state(y0)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    if not isinstance(thin, int) or not 1 <= thin <= num_steps:
        raise ValueError(f"thin must be an int in [1, num_steps={num_steps}], got {thin!r}")
    if generator is not None and generator.device.type != y0.device.type:
        raise ValueError(
            f"the generator lives on {generator.device} but y0 on {y0.device}; "
            f"create it with torch.Generator(device={str(y0.device)!r})"
        )
    if (truncate is not None or detach_between_steps) and not differentiable:
        raise ValueError("truncate and detach_between_steps only apply with differentiable=True")
    if truncate is not None and not (isinstance(truncate, int) and 1 <= truncate <= warmup + num_steps):
        raise ValueError(f"truncate must be an int in [1, warmup + num_steps={warmup + num_steps}], got {truncate!r}")


class Recorder:
    """Collects kept states, energies and per-step info.

    Without a graph the kept states go into preallocated buffers (no second copy when stacking).
    Info is recorded for every sampling step and reduced over each thinning block (bool fields: any;
    float fields: mean), so divergences between kept states are never lost (and a Metropolis block's
    mean energy error is +inf when it holds one: divergent transitions record +inf, never NaN).
    """

    def __init__(self, y0: Tensor, num_steps: int, thin: int, *, keep_graph: bool) -> None:
        self.thin, self.keep_graph = thin, keep_graph
        num_kept = num_steps // thin
        self.states: Any = [] if keep_graph else y0.new_empty((num_kept, *y0.shape))
        self.energies: Any = [] if keep_graph else y0.new_empty((num_kept, y0.shape[0]))
        self.infos: list[dict[str, Tensor]] = []
        self.warmup_infos: list[dict[str, Tensor]] = []
        self.divergent: Optional[Tensor] = None  # [num_steps, C] unthinned, set by ``trajectory``

    def record_warmup(self, info: NamedTuple) -> None:
        self.warmup_infos.append({k: v.detach() for k, v in info._asdict().items()})

    def record(self, index: int, state, info: NamedTuple) -> None:
        self.infos.append({k: v.detach() for k, v in info._asdict().items()})
        if (index + 1) % self.thin:
            return
        if self.keep_graph:
            self.states.append(state.y)
            self.energies.append(state.energy)
        else:
            self.states[index // self.thin] = state.y
            self.energies[index // self.thin] = state.energy

    def _thinned_info(self, info: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
        info = stack_info(self.infos) if info is None else info
        num_kept = len(self.infos) // self.thin
        blocks = {k: v[: num_kept * self.thin].view(num_kept, self.thin, *v.shape[1:]) for k, v in info.items()}
        return {k: v.any(dim=1) if v.dtype == torch.bool else v.mean(dim=1) for k, v in blocks.items()}

    def trajectory(self, adapted: dict[str, Tensor]) -> Trajectory:
        with torch.enable_grad():  # stacking keeps the states' graph even under an outer no_grad
            states = torch.stack(self.states) if self.keep_graph else self.states
            energies = torch.stack(self.energies) if self.keep_graph else self.energies
        warmup_info = stack_info(self.warmup_infos) if self.warmup_infos else None
        info = stack_info(self.infos)
        self.divergent = info.get("divergent")  # every sampling transition, before thinning reduces the blocks
        return Trajectory(states, energies, self._thinned_info(info), warmup_info, adapted)
