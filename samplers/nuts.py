"""NUTS: a natively batched No-U-Turn sampler (multinomial, generalized U-turn criterion, as in Stan).

Every chain builds its own trajectory, but all chains build them in lockstep: doubling d integrates 2^d
leapfrog steps for every chain at once (one batched energy+gradient call per step), each chain from its
own end of its own tree, in its own random direction. A chain whose tree has stopped (U-turn, divergence)
keeps being integrated with the others -- the energy contract takes all C rows in one call -- but is
masked with ``torch.where``, so nothing about it changes any more.

One transition (Betancourt 2017, "A conceptual introduction to HMC", appendix A; Stan's ``base_nuts``):

- Momentum p ~ N(0, M); the tree starts as the single point (y, p); H0 = E(y) + K(p).
- Doubling d = 0, 1, ...: a fresh direction per chain; a subtree of 2^d new leaves extends the tree on
  that side. Leaves carry the multinomial weight exp(-(H - H0)). Inside the subtree the candidate sample
  is drawn progressively and *uniformly*: leaf n replaces it with probability w_n / (w_0 + ... + w_n),
  which leaves every leaf chosen with probability w_n / W_subtree. The subtree's candidate then replaces
  the tree's sample with probability min(1, W_subtree / W_tree) (*biased* progressive sampling, which
  favours the far end of the trajectory).
- Generalized U-turn criterion: for a run of leaves with momentum sum rho and velocities M^-1 p at its two
  ends, continue while both velocities have a positive dot product with rho. It is checked for every
  complete sub-subtree as the subtree grows (the sizes 2, 4, ... ending at each leaf), for the merged
  tree after each doubling, and, as Stan does, across each merge: (first half + first leaf of the second
  half) and (last leaf of the first half + second half), which catches U-turns that fall between halves.
- A leaf with H - H0 above ``max_energy_error`` (1000) or non-finite is divergent. A subtree that turns
  or diverges inside is discarded whole (its candidate is never used) and the tree stops; a subtree that
  is complete is merged, and the tree stops if the merged tree turns. ``max_tree_depth`` caps the
  doublings: at most 2^max_tree_depth - 1 leapfrog steps.

Memory: leaves are consumed as they are made. The sub-subtree checks need, per level of the subtree, one
summary of the last complete left half (momentum sum and the momenta and velocities at its two ends),
so a chain holds O(depth) tensors of its state's size, never the trajectory.

Host syncs: none per leapfrog step. After each doubling one ``bool(done.all())`` stops the transition
once every chain's tree has stopped (at most ``max_tree_depth`` syncs per transition); otherwise every
doubling would run to the cap.

Per-step info: ``acceptance_prob`` (mean over the tree's leaves of min(1, exp(-(H - H0))), 0 for a divergent
leaf: the statistic step-size adaptation targets), ``accepted`` (the sample is not the starting point),
``divergent``, ``step_size``, ``tree_depth`` (doublings attempted, the last one included even if it stopped
inside) and ``num_leapfrog_steps`` (leaves integrated until the tree stopped: 2^tree_depth - 1 exactly
when its last subtree was complete).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from samplers.base import StepContext, StepSize, chain_mean, evaluate, per_chain
from samplers.energy import EnergyFn
from samplers.integrators import kinetic_energy, leapfrog, sample_momentum, velocity
from samplers.metropolis import MetropolisSampler, Tuning, select
from samplers.transforms import Transform


class NUTSState(NamedTuple):
    y: Tensor  # [C, *event]
    energy: Tensor  # [C] potential energy at y
    grad: Tensor  # [C, *event] raw gradient of the energy at y


class NUTSInfo(NamedTuple):
    """Per-chain information of one NUTS transition (every field [C]; counts in the state's float dtype)."""

    acceptance_prob: Tensor
    accepted: Tensor
    divergent: Tensor
    step_size: Tensor
    tree_depth: Tensor
    num_leapfrog_steps: Tensor


class _Point(NamedTuple):
    """Where a trajectory end is: enough to take the next leapfrog step from it."""

    y: Tensor
    momentum: Tensor
    grad: Tensor


class _Span(NamedTuple):
    """U-turn summary of consecutive leaves, listed in the order they were built (all [C, *event])."""

    rho: Tensor  # sum of the momenta
    first_momentum: Tensor
    first_velocity: Tensor
    last_momentum: Tensor
    last_velocity: Tensor


class _Subtree(NamedTuple):
    frontier: _Point  # its last leaf (momentum in the direction of travel)
    span: _Span  # in the direction of travel
    log_weight: Tensor  # [C] log sum of its leaves' weights
    sample: NUTSState  # its candidate
    valid: Tensor  # [C] complete: no U-turn or divergence inside (False for chains not building)
    divergent: Tensor
    accept_sum: Tensor  # [C] sum over its leaves of min(1, exp(-(H - H0)))
    num_leaves: Tensor  # [C] leaves integrated before it stopped


def init(y: Tensor, energy_fn: EnergyFn) -> NUTSState:
    evaluated = evaluate(energy_fn, y, (), create_graph=False, validate=True)
    return NUTSState(y.detach(), evaluated.energy, evaluated.grad)


def _join(first: _Span, second: _Span) -> tuple[_Span, Tensor]:
    """Merge two adjacent spans (``second`` continues where ``first`` ends) -> (span, [C] criterion holds).

    The generalized criterion: both end velocities have a positive dot product with the momentum sum rho.
    Besides the merged span, Stan's two checks across the merge: ``first`` extended by the first leaf of
    ``second``, and ``second`` extended by the last leaf of ``first``. The dot products are unchanged when
    every momentum flips sign, so spans built backwards may use momenta of travel. The six dot products
    are one stacked reduction (this runs once per leaf on average)."""
    rho = first.rho + second.rho
    velocities = torch.stack([first.first_velocity, second.last_velocity, first.first_velocity,
                              second.first_velocity, first.last_velocity, second.last_velocity])
    sums = torch.stack([rho, first.rho + second.first_momentum, second.rho + first.last_momentum])
    dots = (velocities.unflatten(0, (3, 2)) * sums.unsqueeze(1)).flatten(3).sum(dim=3)  # [3, 2, C]
    holds = (dots > 0).flatten(0, 1).all(dim=0)
    merged = _Span(rho, first.first_momentum, first.first_velocity, second.last_momentum, second.last_velocity)
    return merged, holds


class _Integrator(NamedTuple):
    """What every leaf of one transition shares."""

    energy_fn: EnergyFn
    step_size: Tensor  # positive; backward steps integrate the negated momentum forwards
    inverse_mass: Optional[Tensor]
    transforms: Sequence[Transform]
    initial_hamiltonian: Tensor  # [C] H0
    max_energy_error: float
    generator: Optional[torch.Generator]


def _leaf(point: _Point, integrator: _Integrator) -> tuple[_Point, Tensor, Tensor, Tensor, Tensor]:
    """One leapfrog step -> (point, energy [C], log weight [C], min(1, e^-dH) [C], divergent [C])."""
    y, momentum, evaluated = leapfrog(point.y, point.momentum, point.grad, integrator.energy_fn,
                                      step_size=integrator.step_size, num_steps=1,
                                      inverse_mass=integrator.inverse_mass, transforms=integrator.transforms)
    energy_error = evaluated.energy + kinetic_energy(momentum, integrator.inverse_mass) - integrator.initial_hamiltonian
    finite = torch.isfinite(energy_error)
    divergent = ~finite | (energy_error > integrator.max_energy_error)
    log_weight = torch.where(finite, -energy_error, torch.full_like(energy_error, float("-inf")))
    accept_prob = torch.exp(torch.clamp(log_weight, max=0.0))  # exp(-inf) = 0
    return _Point(y, momentum, evaluated.grad), evaluated.energy, log_weight, accept_prob, divergent


def _uniform(like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def _build_subtree(start: _Point, depth: int, building: Tensor, integrator: _Integrator) -> _Subtree:
    """2^depth leaves from ``start`` (momentum of travel) for the chains ``building`` [C], in lockstep."""
    zeros = torch.zeros_like(integrator.initial_hamiltonian)
    log_weight, accept_sum, num_leaves = torch.full_like(zeros, float("-inf")), zeros, zeros
    divergent = torch.zeros_like(building)
    frontier, sample, stack = start, NUTSState(start.y, zeros, start.grad), [None] * depth
    for index in range(2**depth):
        point, energy, leaf_log_weight, accept_prob, leaf_divergent = _leaf(frontier, integrator)
        accept_sum = accept_sum + torch.where(building, accept_prob, zeros)
        num_leaves = num_leaves + building.to(zeros.dtype)
        divergent = divergent | (building & leaf_divergent)
        # Uniform progressive sampling: leaf n replaces the candidate with probability w_n / W_{0..n}.
        total = torch.logaddexp(log_weight, leaf_log_weight)
        take = building & ~leaf_divergent & (_uniform(total, integrator.generator) < torch.exp(leaf_log_weight - total))
        take_state = per_chain(take, point.y)
        sample = NUTSState(torch.where(take_state, point.y, sample.y), torch.where(take, energy, sample.energy),
                           torch.where(take_state, point.grad, sample.grad))
        log_weight = torch.where(building, total, log_weight)
        leaf_velocity = velocity(point.momentum, integrator.inverse_mass)
        span = _Span(point.momentum, point.momentum, leaf_velocity, point.momentum, leaf_velocity)
        level, holds = 0, ~leaf_divergent
        while index >> level & 1:  # this leaf completes sub-subtrees of sizes 2, 4, ..., 2^level
            span, joined_holds = _join(stack[level], span)
            holds, level = holds & joined_holds, level + 1
        if level < depth:
            stack[level] = span  # the left half that the coming leaves will complete
        building = building & holds
        # A chain that stopped keeps its last good leaf as the frontier (its next steps are masked anyway,
        # but they then start from finite values).
        keep = per_chain(building, point.y)
        frontier = _Point(*(torch.where(keep, new, old) for new, old in zip(point, frontier)))
    return _Subtree(frontier, span, log_weight, sample, building, divergent, accept_sum, num_leaves)


class _Tree(NamedTuple):
    left: _Point  # the trajectory's ends, with their own (not travel) momenta
    right: _Point
    rho: Tensor  # [C, *event] momentum sum over the whole trajectory
    log_weight: Tensor  # [C]
    sample: NUTSState
    moved: Tensor  # [C] bool: the sample is no longer the starting point
    done: Tensor  # [C] bool: stopped (U-turn, divergence, or the depth cap)
    divergent: Tensor
    accept_sum: Tensor
    num_leaves: Tensor
    depth: Tensor  # [C] doublings attempted


def _double(tree: _Tree, direction: Tensor, depth: int, integrator: _Integrator) -> _Tree:
    """Extend every chain's tree by one subtree of 2^depth leaves on the side ``direction`` [C] (+1 / -1)."""
    forward = per_chain(direction > 0, tree.rho)
    sign = per_chain(direction, tree.rho).to(tree.rho.dtype)
    near = _Point(*(torch.where(forward, right, left) for right, left in zip(tree.right, tree.left)))
    start = near._replace(momentum=sign * near.momentum)  # integrate backwards as forwards with -p
    subtree = _build_subtree(start, depth, ~tree.done, integrator)
    valid = subtree.valid
    # Biased progressive sampling: the subtree's candidate wins with probability min(1, W_subtree / W_tree).
    take = valid & (_uniform(tree.log_weight, integrator.generator)
                    < torch.exp(torch.clamp(subtree.log_weight - tree.log_weight, max=0.0)))
    sample = NUTSState(*(select(take, new, old) for new, old in zip(subtree.sample, tree.sample)))
    # The generalized criterion over the merged tree, in its own momenta (old tree first, listed towards
    # the new side, then the subtree).
    far = _Point(*(torch.where(forward, left, right) for right, left in zip(tree.right, tree.left)))
    inverse_mass = integrator.inverse_mass
    old = _Span(tree.rho, far.momentum, velocity(far.momentum, inverse_mass), near.momentum,
                velocity(near.momentum, inverse_mass))
    new = _Span(*(sign * value for value in subtree.span))
    _, holds = _join(old, new)
    end = subtree.frontier._replace(momentum=sign * subtree.frontier.momentum)
    extend_right, extend_left = per_chain(valid, tree.rho) & forward, per_chain(valid, tree.rho) & ~forward
    return _Tree(
        left=_Point(*(torch.where(extend_left, new_end, old_end) for new_end, old_end in zip(end, tree.left))),
        right=_Point(*(torch.where(extend_right, new_end, old_end) for new_end, old_end in zip(end, tree.right))),
        rho=select(valid, tree.rho + new.rho, tree.rho),
        log_weight=torch.where(valid, torch.logaddexp(tree.log_weight, subtree.log_weight), tree.log_weight),
        sample=sample,
        moved=tree.moved | take,
        done=tree.done | ~valid | ~holds,
        divergent=tree.divergent | subtree.divergent,
        accept_sum=tree.accept_sum + subtree.accept_sum,
        num_leaves=tree.num_leaves + subtree.num_leaves,
        depth=tree.depth + (~tree.done).to(tree.depth.dtype),
    )


def build_tree(
    state: NUTSState,
    momentum: Tensor,
    energy_fn: EnergyFn,
    *,
    step_size: Tensor,
    directions: Tensor,
    generator: Optional[torch.Generator] = None,
    inverse_mass: Optional[Tensor] = None,
    transforms: Sequence[Transform] = (),
    max_energy_error: float = 1000.0,
) -> tuple[NUTSState, NUTSInfo]:
    """The NUTS transition from ``state`` given its ``momentum`` [C, *event] and the side each doubling
    extends, ``directions`` [max_tree_depth, C] of +1 / -1 (the row count is the depth cap); only the
    sample choices draw from ``generator``. ``step`` draws momentum and directions and calls this; fixing
    them makes a tree reproducible leaf by leaf (the hand-checked test does)."""
    step_size = step_size.detach()
    initial_hamiltonian = state.energy + kinetic_energy(momentum, inverse_mass)
    integrator = _Integrator(energy_fn, step_size, inverse_mass, transforms, initial_hamiltonian, max_energy_error,
                             generator)
    start = _Point(state.y, momentum, state.grad)
    no = torch.zeros_like(state.energy, dtype=torch.bool)
    zeros = torch.zeros_like(state.energy)
    tree = _Tree(start, start, momentum, zeros, state, no, no, no, zeros, zeros, zeros)
    for depth in range(directions.shape[0]):
        tree = _double(tree, directions[depth], depth, integrator)
        if bool(tree.done.all()):  # the one host sync per doubling: stop once every chain's tree has stopped
            break
    info = NUTSInfo(tree.accept_sum / tree.num_leaves, tree.moved, tree.divergent, chain_mean(step_size, state.y),
                    tree.depth, tree.num_leaves)
    return tree.sample, info


def step(
    state: NUTSState,
    energy_fn: EnergyFn,
    *,
    step_size: Tensor,
    generator: Optional[torch.Generator] = None,
    inverse_mass: Optional[Tensor] = None,
    transforms: Sequence[Transform] = (),
    max_tree_depth: int = 10,
    max_energy_error: float = 1000.0,
) -> tuple[NUTSState, NUTSInfo]:
    """One NUTS transition for every chain: momentum ~ N(0, M), a fair coin per chain and doubling for its
    direction, then ``build_tree``. ``step_size`` / ``inverse_mass`` broadcast against the state."""
    momentum, _ = sample_momentum(state.y, inverse_mass, generator)
    coins = torch.rand((max_tree_depth, state.y.shape[0]), generator=generator, device=state.y.device)
    directions = torch.where(coins < 0.5, 1.0, -1.0).to(state.y.dtype)
    return build_tree(state, momentum, energy_fn, step_size=step_size, directions=directions, generator=generator,
                      inverse_mass=inverse_mass, transforms=transforms, max_energy_error=max_energy_error)


class NUTS(MetropolisSampler):
    """Batched No-U-Turn sampler: every chain picks its own trajectory length, all chains in lockstep.

    ``step_size``: float, [C] (per chain) or per element; ``inverse_mass``: diagonal M^-1 broadcastable to
    the state (default identity). During ``warmup`` the step size adapts by dual averaging towards
    ``target_accept`` (the statistic: the tree's mean acceptance over its leaves) and the inverse mass in
    Stan's windows, per chain or, with ``pooled_mass`` / ``shared_step_size``, from all chains (see ``HMC``:
    the same ``samplers.adaptation``); afterwards both are fixed. ``max_tree_depth`` caps the doublings.

    Prefer it over ``HMC`` when no good fixed trajectory length exists or is known: NUTS finds one per
    chain and transition. It pays for that with the lockstep: a doubling costs all chains its 2^d steps
    while any chain still builds, and one host sync per doubling.
    """

    def __init__(
        self,
        step_size: StepSize = 0.1,
        *,
        max_tree_depth: int = 10,
        inverse_mass: Optional[Tensor] = None,
        adapt_step_size: bool = True,
        adapt_mass: bool = True,
        target_accept: float = 0.8,
        max_energy_error: float = 1000.0,
        transforms: Sequence[Transform] = (),
        pooled_mass: bool = False,
        shared_step_size: bool = False,
    ) -> None:
        super().__init__(
            step_size,
            inverse_mass=inverse_mass,
            adapt_step_size=adapt_step_size,
            adapt_mass=adapt_mass,
            target_accept=target_accept,
            max_energy_error=max_energy_error,
            transforms=transforms,
            pooled_mass=pooled_mass,
            shared_step_size=shared_step_size,
        )
        if isinstance(max_tree_depth, bool) or not isinstance(max_tree_depth, int) or max_tree_depth < 1:
            raise ValueError(f"max_tree_depth must be a positive int (at most 2^max_tree_depth - 1 leapfrog steps "
                             f"per transition; 10 is Stan's default), got {max_tree_depth!r}")
        self.max_tree_depth = max_tree_depth

    def _init(self, y0: Tensor, energy_fn: EnergyFn, transforms: Sequence[Transform], create_graph: bool) -> NUTSState:
        return init(y0, energy_fn)

    def _transition(
        self, state: NUTSState, energy_fn: EnergyFn, transforms: Sequence[Transform], tuning: Tuning, ctx: StepContext
    ) -> tuple[NUTSState, NUTSInfo]:
        return step(state, energy_fn, step_size=tuning.step_size, generator=ctx.generator,
                    inverse_mass=tuning.inverse_mass, transforms=transforms, max_tree_depth=self.max_tree_depth,
                    max_energy_error=self.max_energy_error)

    def extra_repr(self) -> str:
        return (
            f"max_tree_depth={self.max_tree_depth}, adapt_step_size={self.adapt_step_size}, "
            f"adapt_mass={self.adapt_mass}, target_accept={self.target_accept}, pooled_mass={self.pooled_mass}, "
            f"shared_step_size={self.shared_step_size}"
        )
