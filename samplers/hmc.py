"""Hamiltonian Monte Carlo: leapfrog with a diagonal mass matrix, per-chain accept/reject.

Functional core ``init`` / ``step``; the ``HMC`` module on top adds warmup adaptation (dual averaging of
the step size, windowed diagonal mass, per chain or pooled over chains; see ``samplers.adaptation``) and
optional per-chain step-size jitter. Every chain has its own momentum and accept test (and, unless
pooled, its own step size and mass matrix), all as batched tensor ops. A transition whose Hamiltonian
error is non-finite or above ``max_energy_error``, or whose final gradient is non-finite, is divergent:
that chain is rejected (keeps its state), the others are unaffected.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from samplers.base import StepContext, StepSize, chain_mean, evaluate, finite_chains, per_chain
from samplers.chees import ChEESAdaptation, QuarterTurn, jitter_factor, mean_step_size, steps_for
from samplers.energy import EnergyFn
from samplers.integrators import kinetic_energy, leapfrog, sample_momentum, velocity
from samplers.metropolis import MetropolisInfo, MetropolisSampler, Tuning, metropolis_accept, select
from samplers.transforms import Transform


class HMCState(NamedTuple):
    y: Tensor  # [C, *event]
    energy: Tensor  # [C] potential energy at y
    grad: Tensor  # [C, *event] raw gradient of the energy at y


def init(y: Tensor, energy_fn: EnergyFn) -> HMCState:
    evaluated = evaluate(energy_fn, y, (), create_graph=False, validate=True)
    return HMCState(y.detach(), evaluated.energy, evaluated.grad)


def jittered_step_size(step_size: Tensor, y: Tensor, jitter: float, generator: Optional[torch.Generator]) -> Tensor:
    """``step_size`` times a per-chain factor uniform in [1 - jitter, 1 + jitter] (drawn afresh each call).

    A fixed eps * L can resonate with the target: on a Gaussian whose whitened scale makes eps * L close to
    a multiple of pi every trajectory ends where it started (or at its mirror image), and the chain barely
    decorrelates. A random trajectory length breaks that; jittering eps does it at no extra gradient cost
    and keeps the map reversible (the factor is drawn independently of the state). Shape: [C, 1, ...] if
    the step size is global or per chain, else the step size's own (per-element) shape broadcast with it.
    """
    if jitter == 0.0:
        return step_size
    uniform = torch.rand((y.shape[0],) + (1,) * (y.dim() - 1), generator=generator, device=y.device, dtype=y.dtype)
    return step_size * (1.0 + jitter * (2.0 * uniform - 1.0))


def step(
    state: HMCState,
    energy_fn: EnergyFn,
    *,
    step_size: Tensor,
    generator: Optional[torch.Generator] = None,
    num_leapfrog_steps: int = 10,
    inverse_mass: Optional[Tensor] = None,
    transforms: Sequence[Transform] = (),
    max_energy_error: float = 1000.0,
    step_size_jitter: float = 0.0,
) -> tuple[HMCState, MetropolisInfo]:
    """One HMC transition. ``step_size`` / ``inverse_mass`` broadcast against the state (per chain or
    per element); ``step_size_jitter`` in [0, 1) scales the step size per chain (see
    ``jittered_step_size``), and the info reports the step size actually used."""
    new_state, info, _ = transition(state, energy_fn, step_size=step_size, generator=generator,
                                    num_leapfrog_steps=num_leapfrog_steps, inverse_mass=inverse_mass,
                                    transforms=transforms, max_energy_error=max_energy_error,
                                    step_size_jitter=step_size_jitter)
    return new_state, info


class Proposal(NamedTuple):
    """The end of one transition's trajectory, before the accept test (what ChEES adapts from)."""

    y: Tensor  # [C, *event]
    momentum: Tensor  # [C, *event] p at the end (velocity M^-1 p computed only where needed)
    step_size: Tensor  # the (jittered) step size used, broadcast against the state
    extra_gradients: Optional[Tensor] = None  # [C] delayed rejection's second-stage evaluations, if any


def transition(
    state: HMCState,
    energy_fn: EnergyFn,
    *,
    step_size: Tensor,
    generator: Optional[torch.Generator] = None,
    num_leapfrog_steps: int = 10,
    inverse_mass: Optional[Tensor] = None,
    transforms: Sequence[Transform] = (),
    max_energy_error: float = 1000.0,
    step_size_jitter: float = 0.0,
    delayed_rejection: Optional["DelayedRejection"] = None,
) -> tuple[HMCState, MetropolisInfo, Proposal]:
    """``step`` that also returns the proposal (its state, final velocity and step size)."""
    step_size = jittered_step_size(step_size, state.y, step_size_jitter, generator)
    momentum, initial_kinetic = sample_momentum(state.y, inverse_mass, generator)
    y_new, momentum_new, evaluated = leapfrog(
        state.y,
        momentum,
        state.grad,
        energy_fn,
        step_size=step_size,
        num_steps=num_leapfrog_steps,
        inverse_mass=inverse_mass,
        transforms=transforms,
    )
    energy_error = (evaluated.energy - state.energy) + (kinetic_energy(momentum_new, inverse_mass) - initial_kinetic)
    # Without a force transform the last half kick carries a non-finite final gradient into the momentum,
    # hence into energy_error: checking energy_error alone then suffices, and skips a pass over the gradient.
    grad_to_check = evaluated.grad if transforms else None
    acceptance_prob, accepted, divergent, energy_error = metropolis_accept(
        energy_error, grad_to_check, generator, max_energy_error
    )
    new_state = HMCState(
        select(accepted, y_new, state.y),
        torch.where(accepted, evaluated.energy, state.energy),
        select(accepted, evaluated.grad, state.grad),
    )
    info = MetropolisInfo(acceptance_prob, accepted, divergent, chain_mean(step_size, state.y), energy_error)
    if delayed_rejection is not None:
        new_state, info, extra = _delayed_rejection(
            state, new_state, info, energy_fn, momentum, initial_kinetic, step_size, num_leapfrog_steps,
            delayed_rejection, inverse_mass, transforms, max_energy_error, generator,
        )
        return new_state, info, Proposal(y_new, momentum_new, step_size, extra)
    return new_state, info, Proposal(y_new, momentum_new, step_size)


class DelayedRejection(NamedTuple):
    """The second stage of delayed-rejection HMC: its step size is the first stage's over ``factor``, its
    leapfrog count ``ceil(factor * L)`` (the same trajectory length) or L (``same_length=False``). With
    ``max_factor`` each rejected chain draws its own factor log-uniformly in [factor, max_factor] every
    transition (independently of the state, so each chain's kernel is a mixture of reversible ones), and the
    count is L."""

    factor: float
    same_length: bool = True
    max_factor: Optional[float] = None

    def num_steps(self, num_leapfrog_steps: int) -> int:
        if self.same_length and self.max_factor is None:
            return math.ceil(self.factor * num_leapfrog_steps)
        return num_leapfrog_steps

    def factors(self, like: Tensor, generator: Optional[torch.Generator]) -> Union[float, Tensor]:
        """The factor, or [n, 1, ...] per-chain factors shaped to broadcast against ``like`` [n, *event]."""
        if self.max_factor is None:
            return self.factor
        uniform = torch.rand((like.shape[0],) + (1,) * (like.dim() - 1), generator=generator, device=like.device,
                             dtype=like.dtype)
        low, high = math.log(self.factor), math.log(self.max_factor)
        return torch.exp(low + (high - low) * uniform)


def _rows(x: Optional[Tensor], index: Tensor, num_chains: int):
    """The chains ``index`` of a per-chain tensor; a shared one (leading size 1, a MassMatrix, None) as is."""
    if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == num_chains:
        return x.index_select(0, index)
    return x


def _log_one_minus_acceptance(energy_error: Tensor) -> Tensor:
    """log(1 - min(1, exp(-dH))) from dH (+inf for a divergence: log 1 = 0; dH <= 0: -inf), accurately."""
    return torch.where(energy_error > 0, torch.log(-torch.expm1(-energy_error.clamp_min(1e-30))),
                       torch.full_like(energy_error, float("-inf")))


def _delayed_rejection(
    state: HMCState, new_state: HMCState, info: MetropolisInfo, energy_fn: EnergyFn, momentum: Tensor,
    initial_kinetic: Tensor, step_size: Tensor, num_leapfrog_steps: int, stage: DelayedRejection,
    inverse_mass, transforms: Sequence[Transform], max_energy_error: float, generator: Optional[torch.Generator],
) -> tuple[HMCState, MetropolisInfo, Tensor]:
    """Second stage for the chains the first rejected (Tierney & Mira 1999; Modi, Barnett & Carpenter 2023).

    From the same (y, p) a trajectory with the step size over ``factor`` proposes z2; it is accepted with
    min(1, pi(z2) (1 - a1(z2)) / (pi(z) (1 - a1(z)))), where a1(z) is the first stage's acceptance and
    a1(z2) the acceptance the first stage would have had from z2 (its "ghost" trajectory: L steps at the
    first stage's step size from z2 with the momentum flipped). Detailed balance holds because both stages
    are involutions and that ratio is symmetric in (z, z2). Only the rejected chains are evaluated, and the
    ghost only for those whose uniform is below the ratio's bound without it (two host reads per transition
    for the indices), so the energy must treat chains independently.
    Returns the merged state and info: ``accepted`` either stage, ``acceptance_prob`` / ``energy_error``
    the first stage's (what the step size adapts to), ``divergent`` the last trajectory each chain ran;
    and the extra energy+gradient evaluations per chain [C] (second stage and ghost where run, else 0).
    """
    num_chains = state.y.shape[0]
    index = (~info.accepted).nonzero().squeeze(1)
    if index.numel() == 0:
        return new_state, info, torch.zeros_like(info.acceptance_prob)
    y, grad, energy0 = state.y.index_select(0, index), state.grad.index_select(0, index), state.energy[index]
    p0, kinetic0 = momentum.index_select(0, index), initial_kinetic[index]
    first_step = _rows(step_size, index, num_chains)
    mass = _rows(inverse_mass, index, num_chains)
    second_step = first_step / stage.factors(y, generator)
    y2, p2, evaluated2 = leapfrog(y, p0, grad, energy_fn, step_size=second_step,
                                  num_steps=stage.num_steps(num_leapfrog_steps), inverse_mass=mass,
                                  transforms=transforms)
    hamiltonian2 = evaluated2.energy + kinetic_energy(p2, mass)
    error2 = hamiltonian2 - (energy0 + kinetic0)
    first_error = info.energy_error[index]  # +inf where the first stage diverged
    divergent2 = ~finite_chains(error2, evaluated2.grad if transforms else None) | (error2 > max_energy_error)
    # log of the ratio without the ghost's factor (1 - a1(z2)) <= 1: an upper bound. A chain whose uniform is
    # already above it is rejected whatever the ghost says, so only the others run the ghost.
    bound = -error2 - _log_one_minus_acceptance(first_error)
    bound = torch.where(divergent2, torch.full_like(bound, float("-inf")), bound)
    uniform = torch.rand(bound.shape, generator=generator, device=bound.device, dtype=bound.dtype)
    candidates = uniform < torch.exp(bound.clamp(max=0.0))
    ghost = candidates.nonzero().squeeze(1)  # one more host read
    accepted2 = torch.zeros_like(candidates)
    if ghost.numel() > 0:
        # The ghost: the first stage's map from z2 = (y2, -p2), for the candidates.
        y2g, p2g, grad2g = y2.index_select(0, ghost), p2.index_select(0, ghost), evaluated2.grad.index_select(0, ghost)
        mass_g = _rows(mass, ghost, index.numel())
        y_ghost, p_ghost, evaluated_ghost = leapfrog(y2g, -p2g, grad2g, energy_fn,
                                                     step_size=_rows(first_step, ghost, index.numel()),
                                                     num_steps=num_leapfrog_steps, inverse_mass=mass_g,
                                                     transforms=transforms)
        ghost_error = (evaluated_ghost.energy + kinetic_energy(p_ghost, mass_g)) - hamiltonian2[ghost]
        ghost_error = torch.where(finite_chains(ghost_error, evaluated_ghost.grad if transforms else None)
                                  & (ghost_error <= max_energy_error), ghost_error,
                                  torch.full_like(ghost_error, float("inf")))  # divergent: a1(z2) = 0
        log_ratio = bound[ghost] + _log_one_minus_acceptance(ghost_error)
        accepted2 = accepted2.index_put((ghost,), uniform[ghost] < torch.exp(log_ratio.clamp(max=0.0)))
    accepted = info.accepted.index_put((index,), accepted2)
    divergent = info.divergent.index_put((index,), divergent2)
    moved = per_chain(accepted2, y)
    merged = HMCState(
        new_state.y.index_put((index,), torch.where(moved, y2, y)),
        new_state.energy.index_put((index,), torch.where(accepted2, evaluated2.energy, energy0)),
        new_state.grad.index_put((index,), torch.where(moved, evaluated2.grad, grad)),
    )
    counts = torch.full_like(energy0, float(stage.num_steps(num_leapfrog_steps)))
    if ghost.numel() > 0:
        counts = counts.index_add(0, ghost, torch.full_like(ghost, num_leapfrog_steps, dtype=counts.dtype))
    extra = torch.zeros_like(info.acceptance_prob).index_put((index,), counts)
    return merged, info._replace(accepted=accepted, divergent=divergent), extra


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _second_stage(delayed_rejection, same_length: bool) -> Optional[DelayedRejection]:
    """HMC's ``delayed_rejection``: None, a factor a > 1, or a range (low, high) with 1 < low < high."""
    if delayed_rejection is None:
        return None
    if _is_number(delayed_rejection) and delayed_rejection > 1.0:
        return DelayedRejection(float(delayed_rejection), same_length)
    if (isinstance(delayed_rejection, (tuple, list)) and len(delayed_rejection) == 2
            and all(_is_number(x) for x in delayed_rejection) and 1.0 < delayed_rejection[0] < delayed_rejection[1]):
        return DelayedRejection(float(delayed_rejection[0]), False, float(delayed_rejection[1]))
    raise ValueError(f"delayed_rejection is the second stage's step-size reduction factor, a number > 1 (e.g. 4), "
                     f"or a range (low, high) with 1 < low < high to draw it from log-uniformly, got "
                     f"{delayed_rejection!r}")


TRAJECTORIES = ("auto", "fixed", "chees", "quarter_turn")
DEFAULT_LEAPFROG_STEPS = 10  # the fixed length when none is given and nothing adapts it
PILOT_LEAPFROG_STEPS = 8  # quarter_turn's warmup length when none is given
DEFAULT_TARGET_ACCEPT = 0.8  # target_accept when none is given, except for ChEES without delayed rejection:
CHEES_TARGET_ACCEPT = 0.651  # ChEES's (harmonic-mean) target, as in its paper (measured better, see HMC's docstring)
DEFAULT_CHEES_JITTER = 0.5  # ChEES lengths u T with u in (0.5, 1] (measured better than (0, 1], see HMC)
QUARTER_TURN_JITTER = 0.3  # quarter_turn's default step-size jitter (randomises the faster directions' phases)


class HMCInfo(NamedTuple):
    """``MetropolisInfo`` plus the number of leapfrog steps (energy+gradient evaluations) of the transition."""

    acceptance_prob: Tensor
    accepted: Tensor
    divergent: Tensor
    step_size: Tensor
    energy_error: Tensor
    num_leapfrog_steps: Tensor  # [C], the same for every chain of one transition


class HMCTuning(NamedTuple):
    """What one transition uses: the Metropolis tuning plus the trajectory length."""

    metropolis: Tuning
    trajectory: Optional[Union[ChEESAdaptation, QuarterTurn]]  # adapting it (warmup only), else None
    num_leapfrog_steps: Optional[int]  # a fixed L (fixed, quarter_turn after its warmup)
    length_over_step: Optional[float]  # chees after its warmup: L_n = ceil(u_n * T / eps)

    @property
    def step_size(self) -> Tensor:
        return self.metropolis.step_size

    @property
    def inverse_mass(self) -> Optional[Tensor]:
        return self.metropolis.inverse_mass


class HMC(MetropolisSampler):
    """Batched HMC: every chain its own momentum and accept test, the trajectory length fixed or adapted.

    ``step_size``: float, [C] (per chain) or per element; ``inverse_mass``: diagonal M^-1 broadcastable to
    the state (default identity). During ``warmup`` the step size adapts per chain towards
    ``target_accept`` and the inverse mass to each chain's posterior variances; afterwards both are fixed.

    The trajectory length (``trajectory``, see ``samplers.chees``):
    - ``"fixed"``: ``num_leapfrog_steps`` (default 10) leapfrog steps every transition, the textbook HMC;
    - ``"chees"``: the trajectory length T = eps * L adapted during warmup by ChEES across chains, sampled
      with Halton-jittered lengths ``L_n = ceil(u_n T / eps)``, u_n in (1 - ``trajectory_jitter``, 1]
      (default 0.5: (0.5, 1]; 1 is the paper's (0, 1]) (``num_leapfrog_steps``, if given, sets the initial
      T = eps * L; default 10 steps; ``max_leapfrog_steps`` caps L); ``length_floor=True`` keeps the final T
      at least a quarter turn ``(pi / 2) sqrt(lambda_max)`` of the slowest whitened direction of the last
      warmup draws (measured: no change on the benchmark's Gaussians, where ChEES's T is already longer);
    - ``"quarter_turn"``: warmup with ``num_leapfrog_steps`` (default 8), then L fixed by the quarter-turn
      rule ``ceil((pi / 2) sqrt(lambda_max) / eps)`` from the warmup's last draws, sampled with step-size
      jitter (0.3 unless ``step_size_jitter`` is given);
    - ``"auto"`` (default): ``"fixed"`` when ``num_leapfrog_steps`` is given or there is no warmup, else
      ``"chees"`` (measured the best of the three in ``benchmarks/sampler_speed.py``; see docs/samplers.md).
    ChEES and the quarter-turn rule estimate moments across chains, so they assume (like ``pooled_mass``)
    that every chain samples the same target; with per-chain targets pass ``num_leapfrog_steps``.
    ``step_size_statistic`` (with ``shared_step_size``): the mean over chains of the acceptance probabilities
    that dual averaging steers to ``target_accept`` -- ``"arithmetic"``, or ``"harmonic"`` (a few chains that
    cannot move, as in a funnel's neck, pull the step size down; ChEES-HMC's statistic). ``"auto"``: harmonic
    when the trajectory length adapts, arithmetic for a fixed one (the textbook sampler, and earlier numbers).
    Each transition's leapfrog count is in ``info["num_leapfrog_steps"]``; the adapted ones in
    ``trajectory.adapted`` (``trajectory_length`` for ChEES, ``num_leapfrog_steps`` otherwise).

    When every chain samples the same target, ``pooled_mass=True`` estimates one mass matrix from all
    chains' draws and ``shared_step_size=True`` adapts one step size from the chains' mean acceptance:
    far less noise for the same warmup. Both default off because the energy contract allows a different
    target per chain (an EBT batch), where pooling would be wrong. ``mass="dense"`` or ``"low_rank"`` (with
    ``mass_rank=k``) adapts a dense or low-rank-plus-diagonal mass instead of a diagonal one, always pooled
    (they need ``pooled_mass=True``); ``inverse_mass`` may also be a fixed ``samplers.mass.DenseMass`` /
    ``LowRankMass`` (see ``samplers.mass`` for costs). ``step_size_jitter=j`` multiplies the
    step size of every chain and transition by an independent uniform factor in [1 - j, 1 + j], which
    breaks the resonance of a fixed trajectory length eps * L (worth turning on whenever the mass matrix
    nearly whitens the target; off by default so that ``HMC(eps, L)`` is the textbook sampler).

    ``delayed_rejection=a`` (a > 1) gives every chain the first trajectory rejects a second try from the same
    state and momentum with the step size over ``a`` (and ``ceil(a L)`` steps, the same trajectory length,
    or L with ``delayed_rejection_same_length=False``), accepted by the delayed-rejection ratio that keeps
    detailed balance (Modi, Barnett & Carpenter 2023; see ``_delayed_rejection``): exact on multiscale
    targets such as a funnel, whose neck no single step size fits. Its second stage costs ``ceil(a L)``
    evaluations for the rejected chains only, plus L for its ghost where the second proposal can still be
    accepted (counted per chain in ``info["num_leapfrog_steps"]``), evaluated on those subsets of chains, so
    the energy must treat chains independently (one target for all chains). With
    it the shared step size follows the arithmetic mean of the first stage's acceptance (``"auto"``), since
    the second stage, not a smaller step for everyone, serves the chains that cannot move.

    ``target_accept`` (None: the default) is 0.8 -- Stan's and pyro's default, not the asymptotically optimal
    0.651 of Beskos et al. (2013), which holds for product targets as d -> inf while on curved or
    heavy-tailed targets (funnels, EBT energies) smaller steps buy robustness; on the benchmark's rotated
    100-d Gaussian a fixed-length HMC at 0.65 gave the same ESS of squares per gradient as 0.8 and 15% less
    ESS of the means. ChEES without delayed rejection uses 0.651 of the harmonic mean, as in its paper: there
    it measured better (with the (0.5, 1] jitter, ESS of squares per gradient +2% on the rotated Gaussian,
    +7% unrotated; see docs/samplers.md).
    """

    def __init__(
        self,
        step_size: StepSize = 0.1,
        num_leapfrog_steps: Optional[int] = None,
        *,
        inverse_mass: Optional[Tensor] = None,
        adapt_step_size: bool = True,
        adapt_mass: bool = True,
        target_accept: Optional[float] = None,
        max_energy_error: float = 1000.0,
        transforms: Sequence[Transform] = (),
        pooled_mass: bool = False,
        shared_step_size: bool = False,
        step_size_jitter: Optional[float] = None,
        trajectory: str = "auto",
        max_leapfrog_steps: int = 1000,
        step_size_statistic: str = "auto",
        mass: str = "diagonal",
        mass_rank: Optional[int] = None,
        delayed_rejection: Union[None, float, tuple[float, float]] = None,
        delayed_rejection_same_length: bool = True,
        length_floor: bool = False,
        trajectory_jitter: float = DEFAULT_CHEES_JITTER,
    ) -> None:
        super().__init__(
            step_size,
            inverse_mass=inverse_mass,
            adapt_step_size=adapt_step_size,
            adapt_mass=adapt_mass,
            target_accept=DEFAULT_TARGET_ACCEPT if target_accept is None else target_accept,
            max_energy_error=max_energy_error,
            transforms=transforms,
            pooled_mass=pooled_mass,
            shared_step_size=shared_step_size,
            mass=mass,
            mass_rank=mass_rank,
        )
        if trajectory not in TRAJECTORIES:
            raise ValueError(f"trajectory must be one of {', '.join(TRAJECTORIES)}, got {trajectory!r}")
        if step_size_jitter is not None and not 0.0 <= step_size_jitter < 1.0:
            raise ValueError(f"step_size_jitter must be in [0, 1) (a step size factor in [1 - j, 1 + j]), got "
                             f"{step_size_jitter!r}")
        if num_leapfrog_steps is not None and (not isinstance(num_leapfrog_steps, int) or num_leapfrog_steps < 1):
            raise ValueError(f"num_leapfrog_steps must be a positive int, got {num_leapfrog_steps!r}")
        if not isinstance(max_leapfrog_steps, int) or max_leapfrog_steps < 1:
            raise ValueError(f"max_leapfrog_steps must be a positive int, got {max_leapfrog_steps!r}")
        if step_size_statistic not in ("auto", "arithmetic", "harmonic"):
            raise ValueError(f"step_size_statistic must be 'auto', 'arithmetic' or 'harmonic', got "
                             f"{step_size_statistic!r}")
        self.delayed_rejection = delayed_rejection
        self._second_stage = _second_stage(delayed_rejection, delayed_rejection_same_length)
        self._target_accept_given = target_accept
        self.length_floor = length_floor
        if isinstance(trajectory_jitter, bool) or not isinstance(trajectory_jitter, (int, float)) \
                or not 0.0 < trajectory_jitter <= 1.0:
            raise ValueError(f"trajectory_jitter must be in (0, 1] (ChEES lengths u T with u in (1 - jitter, 1]), "
                             f"got {trajectory_jitter!r}")
        self.trajectory_jitter = float(trajectory_jitter)
        self.step_size_statistic = step_size_statistic
        self.trajectory, self.max_leapfrog_steps = trajectory, max_leapfrog_steps
        self._step_size_jitter = step_size_jitter
        self.num_leapfrog_steps = num_leapfrog_steps

    @property
    def step_size_jitter(self) -> float:
        if self._step_size_jitter is not None:
            return self._step_size_jitter
        return QUARTER_TURN_JITTER if self.trajectory == "quarter_turn" else 0.0

    def _trajectory_rule(self, warmup: int) -> str:
        if self.trajectory != "auto":
            return self.trajectory
        return "fixed" if self.num_leapfrog_steps is not None or warmup == 0 else "chees"

    def _begin(self, y0: Tensor, warmup: int) -> HMCTuning:
        metropolis = super()._begin(y0, warmup)
        rule = self._trajectory_rule(warmup)
        if metropolis.adaptation is not None:
            statistic = self.step_size_statistic
            harmonic = statistic == "harmonic" or (statistic == "auto" and rule != "fixed"
                                                   and self.delayed_rejection is None)
            metropolis.adaptation.harmonic_acceptance = harmonic
            if self._target_accept_given is None and rule == "chees" and self.delayed_rejection is None:
                metropolis.adaptation.target_accept = CHEES_TARGET_ACCEPT
        if rule == "fixed":
            return HMCTuning(metropolis, None, self.num_leapfrog_steps or DEFAULT_LEAPFROG_STEPS, None)
        if warmup == 0:
            raise ValueError(f"trajectory={rule!r} adapts the trajectory length during warmup: pass warmup > 0, "
                             "or trajectory='fixed' with num_leapfrog_steps")
        windows = metropolis.adaptation.windows if metropolis.adaptation is not None else []
        collect_from = windows[-1][1] if windows else warmup // 2
        if rule == "chees":
            initial = (self.num_leapfrog_steps or DEFAULT_LEAPFROG_STEPS) * mean_step_size(metropolis.step_size)
            adapter = ChEESAdaptation(initial, max_leapfrog_steps=self.max_leapfrog_steps,
                                      jitter=self.trajectory_jitter)
            if self.length_floor:
                adapter.floor = QuarterTurn(collect_from, warmup, max_leapfrog_steps=self.max_leapfrog_steps)
            return HMCTuning(metropolis, adapter, None, None)
        return HMCTuning(metropolis, QuarterTurn(collect_from, warmup, max_leapfrog_steps=self.max_leapfrog_steps),
                         self.num_leapfrog_steps or PILOT_LEAPFROG_STEPS, None)

    def _leapfrog_steps(self, tuning: HMCTuning, index: int, mean_step: Optional[float]) -> int:
        if isinstance(tuning.trajectory, ChEESAdaptation):
            return tuning.trajectory.num_steps(index, mean_step)
        if tuning.length_over_step is not None:
            return steps_for(jitter_factor(index, self.trajectory_jitter) * tuning.length_over_step, 1.0,
                             self.max_leapfrog_steps)
        return tuning.num_leapfrog_steps

    def _init(self, y0: Tensor, energy_fn: EnergyFn, transforms: Sequence[Transform], create_graph: bool) -> HMCState:
        return init(y0, energy_fn)

    def _transition(
        self, state: HMCState, energy_fn: EnergyFn, transforms: Sequence[Transform], tuning: HMCTuning,
        ctx: StepContext
    ) -> tuple[HMCState, HMCInfo]:
        adapting = isinstance(tuning.trajectory, ChEESAdaptation)
        mean_step = mean_step_size(tuning.step_size) if adapting else None  # one host read, warmup only
        num_steps = self._leapfrog_steps(tuning, ctx.index, mean_step)
        new_state, info, proposal = transition(
            state,
            energy_fn,
            step_size=tuning.step_size,
            generator=ctx.generator,
            num_leapfrog_steps=num_steps,
            inverse_mass=tuning.inverse_mass,
            transforms=transforms,
            max_energy_error=self.max_energy_error,
            step_size_jitter=self.step_size_jitter,
            delayed_rejection=self._second_stage,
        )
        if adapting:
            tuning.trajectory.update(ctx.index, state.y, proposal.y, velocity(proposal.momentum, tuning.inverse_mass),
                                     info.acceptance_prob, chain_mean(proposal.step_size, state.y), mean_step,
                                     tuning.inverse_mass)
        steps = torch.full_like(info.acceptance_prob, float(num_steps))
        if proposal.extra_gradients is not None:
            steps = steps + proposal.extra_gradients
        return new_state, HMCInfo(*info, steps)

    def _adapt(self, tuning: HMCTuning, step_index: int, warmup: int, state, info: HMCInfo) -> HMCTuning:
        adaptation = tuning.metropolis.adaptation
        window_closed = adaptation is not None and step_index in adaptation._window_ends
        metropolis = super()._adapt(tuning.metropolis, step_index, warmup, state, info)
        trajectory = tuning.trajectory
        if trajectory is None or step_index >= warmup:
            return tuning._replace(metropolis=metropolis)
        if isinstance(trajectory, QuarterTurn):
            trajectory.update(step_index, state.y, metropolis.inverse_mass)
        else:
            if trajectory.floor is not None:
                trajectory.floor.update(step_index, state.y, metropolis.inverse_mass)
            if window_closed:
                trajectory.restart()
        if step_index < warmup - 1:
            return tuning._replace(metropolis=metropolis)
        # End of warmup: freeze the trajectory length with the final step size.
        final_step = mean_step_size(metropolis.step_size)
        if isinstance(trajectory, QuarterTurn):
            return HMCTuning(metropolis, None, trajectory.num_steps(final_step), None)
        length = trajectory.final_length()
        if trajectory.floor is not None:  # at least a quarter turn of the slowest whitened direction
            length = max(length, trajectory.floor.length())
        return HMCTuning(metropolis, None, None, length / final_step)

    def _adapted(self, tuning: HMCTuning, y0: Tensor) -> dict[str, Tensor]:
        adapted = super()._adapted(tuning.metropolis, y0)
        if tuning.length_over_step is not None:
            step = mean_step_size(tuning.step_size)
            adapted["trajectory_length"] = torch.tensor(tuning.length_over_step * step)
        elif tuning.num_leapfrog_steps is not None and self.trajectory == "quarter_turn":
            adapted["num_leapfrog_steps"] = torch.tensor(tuning.num_leapfrog_steps)
        return adapted

    def extra_repr(self) -> str:
        return (
            f"num_leapfrog_steps={self.num_leapfrog_steps}, trajectory={self.trajectory!r}, "
            f"adapt_step_size={self.adapt_step_size}, adapt_mass={self.adapt_mass}, "
            f"target_accept={self.target_accept}, pooled_mass={self.pooled_mass}, "
            f"shared_step_size={self.shared_step_size}, step_size_jitter={self.step_size_jitter}, "
            f"mass={self.mass!r}, mass_rank={self.mass_rank}"
        )
