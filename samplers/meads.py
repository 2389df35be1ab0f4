"""MEADS: generalized HMC tuned from the spread of the other chains (Hoffman & Sountsov, 2022).

**The transition** (generalized HMC, GHMC; Horowitz 1991): one leapfrog step per transition, with the momentum
kept between transitions and only partly refreshed, plus Neal's (2020) persistent accept test:

1. momentum   p <- a p + sqrt(1 - a^2) xi,  xi ~ N(0, I),  a = exp(-step_size * damping)
   (the paper writes the refreshed fraction of the variance, 1 - a^2 = 1 - exp(-2 eps gamma)). ``damping`` is per
   unit of simulated time, so the momentum forgets itself over ~1 / damping time units whatever the step size.
2. slice      u <- (u + 1 + delta) mod 2 - 1 with delta = (1 - a^2) / 2 (the paper's delta = alpha / 2): u in
   [-1, 1) drifts deterministically instead of being drawn afresh, and |u| plays the uniform of the accept test.
3. proposal   one leapfrog step (y, p) -> (y', p'), then accept iff |u| < exp(-dH) (dH: the Hamiltonian's change).
   Accepted: u <- u exp(dH), so that the "height" |u| pi(y, p) of the slice stays put; rejected: p <- -p.

Why it is exact: on (y, p, u) the target is pi(y) N(p; 0, I) U(u; -1, 1). Steps 1 and 2 each keep it (a partial
refresh keeps N(0, I) for any a; a rotation of the circle keeps U(-1, 1) for any delta); step 3 is an involution
(leapfrog then negate p) accepted on the event {|u| pi(y, p) < pi(y', p')}, which in the coordinates (y, p, s =
|u| pi(y, p)) maps the region under the density onto itself with unit Jacobian, followed by a negation of p that
keeps N(0, I). Why the slice persists: with a near 1 the chain moves coherently for ~1 / (1 - a) steps and a
rejection reverses it, so rejections should be rare and clustered; a fresh uniform every step rejects at random
moments, a slowly drifting u rejects in runs and then accepts in runs (Neal 2020; the MEADS paper, section 3).

**Whitened momentum.** The diagonal scale changes at every warmup iteration, so the state keeps the *whitened*
momentum p~ = M^-1/2 p ~ N(0, I), whose law does not depend on the scale; each transition converts it to the
leapfrog's momentum under that iteration's mass M = diag(1 / sigma^2). Keeping p itself would carry a momentum
drawn under the old mass into a kernel that expects the new one (a wrong stationary law while adapting).

**MEADS adaptation** (warmup only). The C chains are split into K folds (chain c in fold c mod K). At warmup
iteration t fold h = t mod K is *held* (not updated, not evaluated), and fold h + j (j = 1 .. K-1, mod K) is updated
with parameters computed from the folds h, h+1, ..., h+j-1 only: their current positions and gradients.

- Why folds: a chain whose tuning reads its own state is no longer a Markov chain that keeps pi (its kernel depends
  on where it is). Tuning each fold from *other* folds, held fixed while it moves, is a Gibbs-like update of one
  block given the others, which keeps the product pi x ... x pi invariant at every iteration.
- Why one fold is held and the sources run from it: updating every fold at once from each other's pre-step states
  has a cycle (A reads B, B reads A) and is not a composition of valid kernels. With fold h + j reading only the
  folds h .. h+j-1, the simultaneous update equals the sequential scan j = K-1, K-2, ..., 1, in which every fold
  reads folds that have not moved yet (or never move this iteration): a composition of valid kernels, hence exact.
  The paper reads fold k - 1 alone; these are the largest source sets with the same argument (1 to K-1 folds
  rather than 1), at the cost of (K - 1) / K of the chains moving per warmup iteration, as in the paper.
- Diagonal scale: sigma^2 = the per-coordinate variance of the source folds' positions (inverse mass M^-1).
- Step size: eps = 0.5 / sqrt(lambda_max), lambda_max of the covariance of the scaled gradients sigma * grad E.
  For a Gaussian, Cov(grad E) = Sigma^-1 is the Hessian, so this is the preconditioned Hessian's largest
  eigenvalue; leapfrog is stable for eps < 2 / sqrt(lambda_max) and 0.5 leaves a factor 4. The gradients are not
  centred: their mean is 0 under the target, and away from it the larger uncentred moment gives smaller steps.
- Damping: gamma = 1 / sqrt(lambda_max) of the covariance of the standardized positions (y - mean) / sigma, the
  frequency of the slowest direction: the momentum is kept for about one period of the slowest mode. The damping
  per step, eps * gamma, is floored at 1 / (t + 1) (the paper's early-warmup rule as I recall it): far from the
  typical set a persistent momentum would make the chains overshoot, so early iterations refresh more.
- lambda_max without eigen-decompositions or power iterations: tr(S^2) / tr(S) of the second-moment matrix S of
  the rows x_i (the paper's estimate), with tr(S) = mean |x_i|^2 and tr(S^2) = mean over i != j of (x_i . x_j)^2
  (unbiased: the i = j terms would add ~ tr(S)^2 / n, a bias that grows with the dimension). The ratio lies
  between the mean and the largest eigenvalue and is exact when one eigenvalue dominates or all are equal; for a
  spectrum with one large eigenvalue over a broad bulk it can underestimate lambda_max by up to ~sqrt(d) / 2, and
  eps then comes out larger than the rule intends (conservative only up to that factor; more rejections, never
  bias). Neither eps nor gamma is capped beyond that: an unbounded eps shows up as rejections.

After warmup every fold keeps the parameters computed once more from all *other* folds at the end of warmup, and
all chains move at every step: a plain Markov chain with fixed parameters, whose draws are exact (the warmup
draws are not kept). Without a warmup (or with ``adapt=False``) the given ``step_size``, ``damping`` and
``inverse_mass`` are used as they are.

**All chains must sample one target.** The folds' statistics stand in for the target's, so chains with different
targets (an EBT batch, chain c conditioned on example c) would tune each other wrongly; there is no way to check
this, as with ``pooled_mass`` in ``samplers.adaptation``. For the same reason the held fold is left out of the
energy call during warmup: the energy must accept any number of chains, as the energy of a shared target does.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from samplers.base import (
    Sampler,
    StepContext,
    StepSize,
    as_step_size,
    chain_mean,
    check_positive,
    copy_as_tensor,
    evaluate,
    finite_chains,
    per_chain,
)
from samplers.energy import EnergyFn
from samplers.integrators import kinetic_energy, leapfrog, sample_momentum
from samplers.metropolis import select
from samplers.transforms import Transform, check_detailed_balance


class MEADSState(NamedTuple):
    y: Tensor  # [C, *event]
    energy: Tensor  # [C] potential energy at y
    grad: Tensor  # [C, *event] raw gradient of the energy at y
    momentum: Optional[Tensor]  # [C, *event] whitened momentum M^-1/2 p ~ N(0, I); None until the first step
    slice: Optional[Tensor]  # [C] the persistent uniform u in [-1, 1); None until the first step


class MEADSInfo(NamedTuple):
    """Per-chain information of one step (every field [C]). A fold held during a warmup iteration records NaN
    in its float fields and False in its bool fields."""

    acceptance_prob: Tensor  # min(1, exp(-dH)); 0 if divergent
    accepted: Tensor
    divergent: Tensor
    step_size: Tensor
    energy_error: Tensor  # dH; +inf if divergent
    damping: Tensor  # per unit time; the momentum persistence per step is exp(-step_size * damping)


def init(y: Tensor, energy_fn: EnergyFn) -> MEADSState:
    """The state at ``y`` [C, *event]; the momentum and the slice variable are drawn by the first ``step``."""
    evaluated = evaluate(energy_fn, y, (), create_graph=False, validate=True)
    return MEADSState(y.detach(), evaluated.energy, evaluated.grad, None, None)


def with_auxiliary(state: MEADSState, generator: Optional[torch.Generator]) -> MEADSState:
    """Draw the stationary momentum N(0, I) and slice U(-1, 1) of a state fresh from ``init`` (else unchanged)."""
    if state.momentum is not None:
        return state
    y = state.y
    momentum = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    uniform = torch.rand((y.shape[0],), generator=generator, device=y.device, dtype=y.dtype)
    return state._replace(momentum=momentum, slice=2.0 * uniform - 1.0)


def whiten(momentum: Tensor, inverse_mass: Optional[Tensor]) -> Tensor:
    """M^-1/2 p for a diagonal ``inverse_mass``: the momentum in units where it is N(0, I)."""
    return momentum if inverse_mass is None else momentum * inverse_mass.sqrt()


def unwhiten(whitened: Tensor, inverse_mass: Optional[Tensor]) -> Tensor:
    """M^1/2 p~: the leapfrog's momentum under the mass M = 1 / ``inverse_mass`` (inverse of ``whiten``)."""
    return whitened if inverse_mass is None else whitened * torch.rsqrt(inverse_mass)


def step(
    state: MEADSState,
    energy_fn: EnergyFn,
    *,
    step_size: Tensor,
    damping: Tensor,
    generator: Optional[torch.Generator] = None,
    inverse_mass: Optional[Tensor] = None,
    transforms: Sequence[Transform] = (),
    max_energy_error: float = 1000.0,
) -> tuple[MEADSState, MEADSInfo]:
    """One GHMC transition with the persistent accept test (see the module docstring). ``step_size``, ``damping``
    and the diagonal ``inverse_mass`` broadcast against the state (per chain or per element)."""
    state = with_auxiliary(state, generator)
    persistence = torch.exp(-step_size * damping)
    refreshed = 1.0 - persistence.square()
    noise, _ = sample_momentum(state.y, inverse_mass, generator)  # M^1/2 xi
    momentum = persistence * unwhiten(state.momentum, inverse_mass)
    momentum = momentum + refreshed.sqrt() * noise  # M^1/2 (a p~ + sqrt(1 - a^2) xi)
    initial_kinetic = kinetic_energy(momentum, inverse_mass)
    y_new, momentum_new, evaluated = leapfrog(state.y, momentum, state.grad, energy_fn, step_size=step_size,
                                              num_steps=1, inverse_mass=inverse_mass, transforms=transforms)
    energy_error = (evaluated.energy - state.energy) + (kinetic_energy(momentum_new, inverse_mass) - initial_kinetic)
    divergent = ~finite_chains(energy_error, evaluated.grad if transforms else None) | (energy_error > max_energy_error)
    energy_error = torch.where(divergent, torch.full_like(energy_error, float("inf")), energy_error)
    acceptance_prob = torch.exp(torch.clamp(-energy_error, max=0.0))
    drifted = torch.remainder(state.slice + 1.0 + 0.5 * chain_mean(refreshed, state.y), 2.0) - 1.0
    accepted = drifted.abs() < acceptance_prob  # never for a divergent chain (acceptance_prob 0)
    # exp(dH) is inf/NaN only where dH is, i.e. on divergent chains, which this select never takes.
    new_slice = torch.where(accepted, drifted * torch.exp(energy_error), drifted)
    new_momentum = select(accepted, whiten(momentum_new, inverse_mass), -whiten(momentum, inverse_mass))
    new_state = MEADSState(select(accepted, y_new, state.y), torch.where(accepted, evaluated.energy, state.energy),
                           select(accepted, evaluated.grad, state.grad), new_momentum, new_slice)
    info = MEADSInfo(acceptance_prob, accepted, divergent, chain_mean(step_size, state.y), energy_error,
                     chain_mean(damping, state.y))
    return new_state, info


def max_eigenvalue(x: Tensor) -> Tensor:
    """Scalar estimate tr(S^2) / tr(S) of the largest eigenvalue of the second-moment matrix S = E[x x^T] of the
    rows of ``x`` [n, d] (n >= 2), with tr(S^2) unbiased (off-diagonal pairs only; see the module docstring)."""
    n, d = x.shape
    squared_norms = x.square().sum(dim=1)  # [n]
    gram = x.T @ x if d < n else x @ x.T  # same Frobenius norm, the smaller of [d, d] and [n, n]
    off_diagonal = gram.square().sum() - squared_norms.square().sum()  # sum over i != j of (x_i . x_j)^2
    tiny = torch.finfo(x.dtype).tiny
    return (off_diagonal / (n * (n - 1))).clamp_min(tiny) / squared_norms.mean().clamp_min(tiny)


def fold_parameters(y: Tensor, grad: Tensor, step_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """MEADS's (inverse_mass [*event], step_size [], damping []) from the source chains' ``y`` and ``grad``
    [n, *event] at warmup iteration ``step_index`` (0-based; it sets the damping floor)."""
    flat_y, flat_grad = y.flatten(1), grad.flatten(1)
    centered = flat_y - flat_y.mean(dim=0)
    variance = centered.square().sum(dim=0).div(flat_y.shape[0] - 1).clamp_min(torch.finfo(y.dtype).tiny)  # [d]
    scale = variance.sqrt()
    step_size = 0.5 * torch.rsqrt(max_eigenvalue(flat_grad * scale))
    damping_per_step = step_size * torch.rsqrt(max_eigenvalue(centered / scale))
    damping_per_step = damping_per_step.clamp_min(1.0 / (step_index + 1))
    return variance.view(y.shape[1:]), step_size, damping_per_step / step_size


class FoldSchedule:
    """Chain c is in fold c mod K. For every held fold h: the chains that move ([C (K-1)/K] indices) and, per moving
    fold, its members and its source chains (folds h .. h+j-1 for fold h+j); and for the freeze at the end of
    warmup, every fold with all other folds as its source. Index tensors built once, on the host, at entry."""

    def __init__(self, num_chains: int, num_folds: int, device: torch.device) -> None:
        def indices(folds: Sequence[int]) -> Tensor:
            members = [c for c in range(num_chains) if c % num_folds in folds]
            return torch.tensor(members, dtype=torch.long, device=device)

        self.num_folds = num_folds
        self.moving, self.sources = [], []
        for held in range(num_folds):
            order = [(held + j) % num_folds for j in range(num_folds)]  # held first, then the moving folds
            self.moving.append(indices(order[1:]))
            self.sources.append([(indices([fold]), indices(order[:j])) for j, fold in enumerate(order) if j > 0])
        self.freeze = [(indices([fold]), indices([k for k in range(num_folds) if k != fold]))
                       for fold in range(num_folds)]

    def parameters(self, state: MEADSState, pairs: Sequence[tuple[Tensor, Tensor]], step_index: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-chain (step_size [C], damping [C], inverse_mass [C, *event]) for each (members, source) pair,
        computed from the source rows only; rows of chains in no pair are NaN (they must not be used)."""
        y = state.y
        step_size, damping = y.new_full(y.shape[:1], math.nan), y.new_full(y.shape[:1], math.nan)
        inverse_mass = torch.full_like(y, math.nan)
        for members, source in pairs:
            fold_inverse_mass, step_size[members], damping[members] = fold_parameters(
                y[source], state.grad[source], step_index)
            inverse_mass[members] = fold_inverse_mass
        return step_size, damping, inverse_mass


class MEADSTuning(NamedTuple):
    step_size: Tensor  # broadcasts to the state
    damping: Tensor  # broadcasts to the state
    inverse_mass: Optional[Tensor]  # broadcasts to the state; None is the identity
    schedule: Optional[FoldSchedule]  # set while adapting; None once frozen (or if never adapting)


def take(values: Sequence[Tensor], index: Tensor) -> list[Tensor]:
    return [value.index_select(0, index) for value in values]


class MEADS(Sampler):
    """Batched generalized HMC (one leapfrog step per transition, partial momentum refreshment, persistent accept
    test) whose warmup tunes a diagonal scale, the step size and the damping from the other folds of chains.

    ``step_size``, ``damping`` (per unit time, > 0: the momentum keeps a fraction exp(-step_size * damping) per
    step) and ``inverse_mass`` (diagonal, default identity) are used as given without a warmup or with
    ``adapt=False``; with a warmup MEADS computes its own and ignores them. ``num_folds`` >= 2 (the paper's K = 4):
    each fold is tuned from other folds, and one fold rests per warmup iteration (so 1 / K of the warmup's chain
    steps are skipped); more folds waste less of the warmup, fewer give each fold more chains to learn from.
    Needs at least 2 chains per fold, all sampling one target (see the module docstring).
    """

    supports_differentiable = False  # accept/reject is discrete
    warns_on_divergence = True  # after a run with a warmup (see samplers.base.warn_if_divergent)
    divergence_remedy = "more chains per fold (steadier step-size estimates) or a reparametrisation of the target"

    def __init__(
        self,
        step_size: StepSize = 0.1,
        damping: StepSize = 1.0,
        *,
        num_folds: int = 4,
        inverse_mass: Optional[Tensor] = None,
        adapt: bool = True,
        max_energy_error: float = 1000.0,
        transforms: Sequence[Transform] = (),
    ) -> None:
        super().__init__(transforms)
        check_detailed_balance(transforms, "MEADS")
        if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
            raise ValueError(f"num_folds must be an int >= 2 (each fold is tuned from the others), got {num_folds!r}")
        if not max_energy_error > 0:
            raise ValueError(f"max_energy_error must be positive, got {max_energy_error}")
        self.register_buffer("step_size", copy_as_tensor(step_size))
        self.register_buffer("damping", copy_as_tensor(damping))
        self.register_buffer("inverse_mass", None if inverse_mass is None else copy_as_tensor(inverse_mass))
        check_positive(self.step_size, "MEADS step_size")
        check_positive(self.damping, "MEADS damping (per unit time; the momentum keeps exp(-step_size * damping))")
        self.num_folds, self.adapt, self.max_energy_error = num_folds, adapt, max_energy_error

    def _begin(self, y0: Tensor, warmup: int) -> MEADSTuning:
        step_size, damping = as_step_size(self.step_size, y0), as_step_size(self.damping, y0, name="damping")
        inverse_mass = None if self.inverse_mass is None else as_step_size(self.inverse_mass, y0, name="inverse_mass")
        if inverse_mass is not None:
            check_positive(inverse_mass, "inverse_mass")
        if warmup == 0 or not self.adapt:
            return MEADSTuning(step_size, damping, inverse_mass, None)
        num_chains = y0.shape[0]
        if num_chains < 2 * self.num_folds:
            raise ValueError(f"MEADS with num_folds={self.num_folds} needs at least {2 * self.num_folds} chains (2 per "
                             f"fold, to estimate a spread), got {num_chains}; pass more chains or fewer folds")
        spread = y0.detach().flatten(1).std(dim=0)
        if not bool((spread > 0).all()):
            raise ValueError("MEADS tunes from the spread of the chains, but some coordinate of y0 is the same in "
                             "every chain; start the chains at different points (e.g. target.initial_state or y0 + "
                             "noise)")
        return MEADSTuning(step_size, damping, inverse_mass, FoldSchedule(num_chains, self.num_folds, y0.device))

    def _init(self, y0: Tensor, energy_fn: EnergyFn, transforms: Sequence[Transform], create_graph: bool) -> MEADSState:
        return init(y0, energy_fn)

    def _step(self, state: MEADSState, energy_fn: EnergyFn, transforms: Sequence[Transform], step_size: Tensor,
              damping: Tensor, inverse_mass: Optional[Tensor], generator: Optional[torch.Generator]):
        return step(state, energy_fn, step_size=step_size, damping=damping, generator=generator,
                    inverse_mass=inverse_mass, transforms=transforms, max_energy_error=self.max_energy_error)

    def _transition(self, state: MEADSState, energy_fn: EnergyFn, transforms: Sequence[Transform],
                    tuning: MEADSTuning, ctx: StepContext) -> tuple[MEADSState, MEADSInfo]:
        schedule = tuning.schedule
        if schedule is None:
            return self._step(state, energy_fn, transforms, tuning.step_size, tuning.damping, tuning.inverse_mass,
                              ctx.generator)
        state = with_auxiliary(state, ctx.generator)
        held = ctx.index % schedule.num_folds
        step_size, damping, inverse_mass = schedule.parameters(state, schedule.sources[held], ctx.index)
        moving = schedule.moving[held]
        step_size, damping, inverse_mass = take([step_size, damping, inverse_mass], moving)
        part, part_info = self._step(MEADSState(*take(state, moving)), energy_fn, transforms,
                                     per_chain(step_size, state.y), per_chain(damping, state.y), inverse_mass,
                                     ctx.generator)
        new_state = MEADSState(*(whole.index_copy(0, moving, moved) for whole, moved in zip(state, part)))
        resting = [torch.full_like(state.energy, math.nan) if value.is_floating_point() else
                   torch.zeros_like(state.energy, dtype=value.dtype) for value in part_info]
        info = MEADSInfo(*(whole.index_copy(0, moving, moved) for whole, moved in zip(resting, part_info)))
        return new_state, info

    def _adapt(self, tuning: MEADSTuning, step_index: int, warmup: int, state: MEADSState, info) -> MEADSTuning:
        if tuning.schedule is None or step_index < warmup - 1:
            return tuning
        # Freeze: every fold from all the other folds' final warmup states; fixed from here on.
        step_size, damping, inverse_mass = tuning.schedule.parameters(state, tuning.schedule.freeze, warmup)
        return MEADSTuning(per_chain(step_size, state.y), per_chain(damping, state.y), inverse_mass, None)

    def _adapted(self, tuning: MEADSTuning, y0: Tensor) -> dict[str, Tensor]:
        adapted = {"step_size": chain_mean(tuning.step_size, y0), "damping": chain_mean(tuning.damping, y0)}
        if tuning.inverse_mass is not None:
            adapted["inverse_mass"] = tuning.inverse_mass.expand_as(y0)
        return adapted

    def extra_repr(self) -> str:
        return f"num_folds={self.num_folds}, adapt={self.adapt}, max_energy_error={self.max_energy_error}"
