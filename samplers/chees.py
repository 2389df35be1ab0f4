"""How long an HMC trajectory should be: ChEES adaptation for many chains, and the quarter-turn rule.

HMC's cost per transition is its number of leapfrog steps L, and its mixing depends on the trajectory
length T = eps * L far more than on eps: too short and it random-walks, too long (or an exact multiple of a
half period of some direction) and the trajectory comes back near where it started. Two ways to choose it
from the chains themselves, both used by ``HMC(trajectory=...)`` during warmup (and frozen afterwards, so the
kept draws come from a fixed Markov kernel):

``ChEESAdaptation`` (Hoffman, Radul and Sountsov 2021, "An adaptive MCMC scheme for setting trajectory
lengths in Hamiltonian Monte Carlo"). The criterion is the Change in the Estimator of the Expected Square,
``ChEES(T) = E[(|y' - m|^2 - |y - m|^2)^2] / 4`` for a transition y -> y' (the proposal, before the accept
test) and the target mean m: how much one transition changes the estimate of the second moments, which is what
decides the ESS of squared draws. Its derivative in T needs only quantities every chain has at the end of its
trajectory: ``d y'/dT = u * v'`` (u the jitter factor below, v' = M^-1 p' the final velocity), so one
estimate per transition is ``sum_c a_c D_c ((y'_c - m') . v'_c) u / sum_c a_c`` with ``D_c`` the change in
squared distance and ``a_c`` the acceptance probability (proposals that would be rejected say nothing about
what the chain gains). The means are estimated across chains: ``m`` the mean of the current states, ``m'``
the acceptance-weighted mean of the proposals -- so every chain must sample the same target (as for
``pooled_mass``). Choices:

- Distances are measured in the mass matrix's whitened coordinates (``y / sqrt(M^-1)`` for a diagonal mass,
  ``L^-1 y`` for a dense or low-rank ``M^-1 = L L^T``), the metric the leapfrog moves in. Otherwise the widest
  coordinates dominate every squared distance: on Neal's funnel raw distances drove T to ~56 (800 leapfrog
  steps a transition), whitened ones to a few units.
- log T follows the gradient with Adam without momentum (beta1 = 0, beta2 = 0.95, learning rate 0.025, as
  the paper's defaults): the estimate's scale changes by orders of magnitude between targets and during
  warmup, and the second-moment normalisation makes the step in log T a fraction of a unit whatever it is.
- The trajectory length is jittered: ``L_n = ceil(u_n T / eps)`` with ``u_n`` the n-th point of the
  base-2 van der Corput (Halton) sequence in (0, 1], one factor per transition shared by all chains (so all
  chains take the same number of leapfrog steps and stay batched). A random length removes the resonance of
  a fixed T with the target's periods; the low-discrepancy sequence covers (0, 1] evenly in few transitions.
  The mean length is T / 2. The factor is drawn independently of the state, so the kernel stays reversible.
- The value sampled with is the weighted average of the log T iterates (weights ``n^-0.75`` on the n-th, the
  iterate averaging of Nesterov's dual averaging that the step size uses too), restarted with the step size
  whenever a mass-matrix window closes (the geometry changed, so the early iterates no longer apply).
- ``L`` is capped at ``max_leapfrog_steps``; chains with no accepted proposal in a transition contribute
  nothing; a transition where none accepts leaves T unchanged.
- Host syncs: the number of leapfrog steps is a Python int, so every warmup transition reads two values on the
  host (the mean step size, and the gradient estimate with its weight); after warmup none (the frozen T / eps
  is read once, at the end of warmup).

``QuarterTurn``: the rule ``L = ceil((pi / 2) sqrt(lambda_max) / eps)``, lambda_max the largest eigenvalue of
the covariance of the draws in the mass matrix's whitened coordinates (``y / sqrt(M^-1)``, or ``L^-1 y``): the slowest
direction, of standard deviation sqrt(lambda_max), turns by about a quarter of its period per transition
(which decorrelates it), while step-size jitter randomises the phases of the faster ones. It estimates the
covariance from the draws of the warmup's last phase (after the last mass window, pooled over chains: one
target, as above; at most ``max_rows`` rows kept) and sets L once, at the end of warmup; during warmup the
sampler's own ``num_leapfrog_steps`` (a short pilot length) is used.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

ADAM_BETA2 = 0.95
AVERAGING_EXPONENT = 0.75  # the n^-0.75 weights of dual averaging's iterate average


def halton(index: int) -> float:
    """The ``index``-th point (1-based) of the base-2 van der Corput sequence, in (0, 1)."""
    if index < 1:
        raise ValueError(f"halton index must be >= 1, got {index}")
    value, scale = 0.0, 0.5
    while index:
        if index & 1:
            value += scale
        index >>= 1
        scale *= 0.5
    return value


def jitter_factor(index: int, amount: float = 1.0) -> float:
    """The trajectory-length factor of transition ``index`` (0-based): the Halton point, mapped into
    (1 - amount, 1] so that the longest trajectory is the adapted T itself (``amount`` = 1: (0, 1])."""
    return 1.0 - amount * halton(index + 1)


def mean_step_size(step_size: Tensor) -> float:
    """Geometric mean of a global or per-chain step size (one host read)."""
    return float(step_size.detach().log().mean().exp())


class ChEESAdaptation:
    """The trajectory length T of HMC adapted by ChEES during warmup (see the module docstring)."""

    def __init__(self, initial_length: float, *, learning_rate: float = 0.025, max_leapfrog_steps: int = 1000,
                 jitter: float = 1.0) -> None:
        if not initial_length > 0:
            raise ValueError(f"the initial trajectory length must be positive, got {initial_length}")
        if not 0.0 < jitter <= 1.0:
            raise ValueError(f"the trajectory jitter must be in (0, 1] (lengths u T with u in (1 - jitter, 1]), "
                             f"got {jitter!r}")
        self.jitter = jitter
        self.log_length = math.log(initial_length)
        self.learning_rate, self.max_leapfrog_steps = learning_rate, max_leapfrog_steps
        self._second_moment, self._num_updates = 0.0, 0
        self.floor: Optional["QuarterTurn"] = None  # HMC(length_floor=True): T >= a quarter turn at the end
        self.restart()

    def restart(self) -> None:
        """Start the iterate average afresh (after a mass-matrix window: the geometry changed)."""
        self._average, self._num_averaged = self.log_length, 0

    @property
    def length(self) -> float:
        return math.exp(self.log_length)

    def final_length(self) -> float:
        return math.exp(self._average)

    def num_steps(self, index: int, step_size: float) -> int:
        return steps_for(jitter_factor(index, self.jitter) * self.length, step_size, self.max_leapfrog_steps)

    def update(self, index: int, y: Tensor, proposal: Tensor, velocity: Tensor, acceptance_prob: Tensor,
               step_size: Tensor, mean_step: float, inverse_mass: Optional[Tensor] = None) -> None:
        """One gradient step on log T from transition ``index``: start states ``y``, proposals, final velocities
        ``M^-1 p'`` (all [C, *event]), acceptance probabilities [C], the step sizes used (per chain) and the
        diagonal inverse mass (the criterion is computed in its whitened coordinates)."""
        weight = torch.nan_to_num(acceptance_prob.detach(), nan=0.0).to(y.dtype)
        start, end, speed = y.detach(), proposal.detach(), velocity.detach()
        if inverse_mass is not None and not isinstance(inverse_mass, Tensor):
            start, end, speed = inverse_mass.whiten(start), inverse_mass.whiten(end), inverse_mass.whiten(speed)
        elif inverse_mass is not None:
            # The criterion in the mass matrix's whitened coordinates z = y / sqrt(M^-1) (dz/dT = v / sqrt(M^-1)):
            # the metric the sampler moves in. In raw coordinates the widest directions (a funnel's mouth, whose
            # variance is ~90x the neck's) dominate every squared distance and push T far past what the others
            # need (measured: T ~ 56 on Neal's funnel raw, against ~2 whitened).
            scale = inverse_mass.detach().rsqrt()
            start, end, speed = start * scale, end * scale, speed * scale
        start, end, speed = start.flatten(1), end.flatten(1), speed.flatten(1)
        finite = torch.isfinite(end).all(dim=1) & torch.isfinite(speed).all(dim=1)
        weight = torch.where(finite, weight, torch.zeros_like(weight))
        end, speed = torch.where(finite[:, None], end, start), torch.where(finite[:, None], speed, 0.0)
        total = weight.sum()
        start_centred = start - start.mean(dim=0, keepdim=True)
        end_mean = (weight[:, None] * end).sum(dim=0, keepdim=True) / total.clamp_min(1e-30)
        end_centred = end - end_mean
        change = end_centred.square().sum(dim=1) - start_centred.square().sum(dim=1)
        # d y'_c / dT = u * (eps_c / eps_mean) * v'_c: every chain ran L steps of its own step size.
        rate = (step_size.detach().reshape(-1) / mean_step).expand(y.shape[0]) if step_size.numel() > 1 else 1.0
        per_chain = change * (end_centred * speed).sum(dim=1) * rate
        total_value, weighted = torch.stack([total, (weight * per_chain).sum()]).tolist()  # one host read
        gradient = weighted / max(total_value, 1e-30) * jitter_factor(index, self.jitter)
        if not total_value > 0.0 or not math.isfinite(gradient):
            return  # nothing accepted: the transition says nothing about T
        gradient *= self.length  # the derivative in log T
        self._num_updates += 1
        self._second_moment = ADAM_BETA2 * self._second_moment + (1.0 - ADAM_BETA2) * gradient * gradient
        corrected = self._second_moment / (1.0 - ADAM_BETA2 ** self._num_updates)
        self.log_length += self.learning_rate * gradient / (math.sqrt(corrected) + 1e-12)
        # Cap: at most max_leapfrog_steps of the current step size for the longest (u = 1) trajectory.
        self.log_length = min(self.log_length, math.log(self.max_leapfrog_steps * mean_step))
        self._num_averaged += 1
        weight_new = self._num_averaged ** -AVERAGING_EXPONENT
        self._average = (1.0 - weight_new) * self._average + weight_new * self.log_length


def steps_for(length: float, step_size: float, max_leapfrog_steps: int) -> int:
    if not math.isfinite(length / step_size):
        return max_leapfrog_steps
    return int(min(max(1, math.ceil(length / step_size)), max_leapfrog_steps))


def largest_eigenvalue(rows: Tensor, iterations: int = 1000, tolerance: float = 1e-9) -> float:
    """Largest eigenvalue of the sample covariance of ``rows`` [N, d] (float64): an exact symmetric
    eigensolver on the smaller of the d x d covariance and the N x N Gram matrix (the same nonzero
    eigenvalues) while that is at most 2048 wide; beyond, power iteration on the centred data matrix (never
    forming either), until the estimate changes by less than ``tolerance`` (relative)."""
    rows = rows.double()
    centred = rows - rows.mean(dim=0, keepdim=True)
    n, d = centred.shape
    if min(n, d) <= 2048:
        gram = centred.T @ centred if d <= n else centred @ centred.T
        return float(torch.linalg.eigvalsh(gram / (n - 1))[-1])
    vector = torch.ones(d, dtype=torch.float64, device=rows.device) / math.sqrt(d)
    value = 0.0
    for _ in range(iterations):
        product = centred.T @ (centred @ vector) / (n - 1)
        previous, value = value, float(product.norm())
        vector = product / max(value, 1e-300)
        if abs(value - previous) <= tolerance * value:
            break
    return value


class QuarterTurn:
    """L = ceil((pi / 2) sqrt(lambda_max) / eps) from the warmup's last draws (see the module docstring)."""

    def __init__(self, collect_from: int, warmup: int, *, max_rows: int = 8192, max_leapfrog_steps: int = 1000) -> None:
        self.collect_from, self.warmup, self.max_rows = collect_from, warmup, max_rows
        self.max_leapfrog_steps = max_leapfrog_steps
        self._rows: list[Tensor] = []

    def update(self, index: int, y: Tensor, inverse_mass: Optional[Tensor]) -> None:
        """Keep (some chains of) the whitened state ``y / sqrt(M^-1)`` of warmup step ``index``; the mass
        matrix is final from ``collect_from`` on (it starts after the last mass window)."""
        if index < self.collect_from:
            return
        per_step = max(1, math.ceil(self.max_rows / max(1, self.warmup - self.collect_from)))
        rows = y.detach()
        if isinstance(inverse_mass, Tensor):
            rows = rows / inverse_mass.detach().sqrt()
        elif inverse_mass is not None:
            rows = inverse_mass.whiten(rows)  # L^-1 y for a dense or low-rank M^-1 = L L^T
        self._rows.append(rows.flatten(1)[:per_step].clone())

    def length(self) -> float:
        """(pi / 2) sqrt(lambda_max): a quarter period of the slowest whitened direction (0 with < 2 rows)."""
        if not self._rows:
            raise RuntimeError("QuarterTurn saw no warmup draws")
        rows = torch.cat(self._rows)
        if rows.shape[0] < 2:
            return 0.0
        return 0.5 * math.pi * math.sqrt(max(largest_eigenvalue(rows), 0.0))

    def num_steps(self, step_size: float) -> int:
        return steps_for(self.length(), step_size, self.max_leapfrog_steps)
