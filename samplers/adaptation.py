"""Warmup adaptation for Metropolis samplers: per-chain dual averaging and windowed diagonal Welford.

Both estimators run elementwise on per-chain tensors (pyro's ``DualAveraging`` and ``WelfordCovariance``
only use arithmetic, so a ``[C]`` or ``[C, *event]`` tensor adapts every chain at once, with no Python
loop over chains and no host sync).

Choices:

- Step sizes adapt *per chain* by default (dual averaging on log step size towards ``target_accept``);
  ``shared_step_size=True`` adapts one step size for all chains from their *mean* acceptance probability.
- The diagonal mass matrix is estimated *per chain* by default (``inverse_mass`` ``[C, *event]``). The
  energy contract lets every chain see its own energy (a batch of conditional energies, as in the EBT,
  where chain c is example c), so pooling across chains would mix the scales of different targets; a
  per-chain estimate is never wrong, only noisier (each chain uses only its own warmup draws; Stan's
  shrinkage towards 1e-3, ``regularize=True``, keeps short windows sane). When every chain samples the
  same target, ``pooled_mass=True`` estimates one diagonal from the draws of all chains: per-chain
  Welford statistics combined exactly (within-chain plus between-chain sums of squares), so C chains
  give C times the draws and a short warmup suffices. Per-chain stays the default because pooling is
  only correct under that extra assumption, which the sampler cannot check.
- The dual-averaging statistic is the Metropolis acceptance probability min(1, exp(-dH)) of each
  transition (0 if divergent or non-finite). Sampling uses exp(x_avg), the averaged iterate. Per chain the
  statistic is one noisy draw per step, so the iterates scatter widely in log step size; acceptance is
  concave in log step size near the top, so x_avg accepts more often than the iterates did (measured:
  warmup 0.79, sampling 0.91 for target 0.8). That is the estimator's bias, not a wrong statistic; with
  ``shared_step_size`` the statistic is a mean over chains and sampling lands on the target (0.79).
- Stan-style windows: a fast initial buffer (step size only), doubling slow windows that estimate the
  mass matrix (the step size restarts after each), and a fast terminal buffer for the final step size.

Dense and low-rank masses (``mass="dense"`` / ``"low_rank"``, see ``samplers.mass``) are always pooled: one
matrix from the draws of all chains, so every chain must sample the same target (a per-chain d x d
estimate would need C d^2 memory and more draws per chain than coordinates). They use the same windows:

- Dense: the window's scatter matrix about the grand mean of all its C * n draws, combined exactly from
  the draws' scatter about their step's chain average (one [d, C] x [C, d] product per step) plus C times
  the scatter of those step averages (pyro's ``WelfordCovariance(diagonal=False)``, one update per step):
  the law of total covariance with equal groups, so no chain-by-chain loop. Then Stan's regularization
  with the pooled count N = C * n: Sigma = N / (N + 5) Cov + 1e-3 * 5 / (N + 5) I. Memory O(d^2), float64.
- Low rank (``mass_rank=k``): D = the regularized pooled variances, then the k eigenpairs of the
  correlation matrix D^{-1/2} Cov D^{-1/2} whose eigenvalues lie farthest from 1 in log scale, each
  eigenvalue shrunk towards 1 (the diagonal mass) as (N lambda + 5) / (N + 5). The statistics are
  whichever is smaller: the d x d scatter above (then one d x d eigendecomposition), or, when the window
  holds fewer draws than coordinates (N < d), the window's draws themselves (N d memory, and the
  eigenpairs from the N x N Gram matrix of the standardized draws: O(N^2 d), never a d x d matrix).
  Only the draws are used, not the gradients.

This state lives in an object next to the sampler's loop, never in the sampler state: after warmup the
driver reads ``final()`` once (the step size is the dual-averaging average ``x_avg``) and samples with
fixed parameters, a plain Markov chain.
"""
from __future__ import annotations

from typing import Optional

import torch
from pyro.ops.dual_averaging import DualAveraging
from pyro.ops.welford import WelfordCovariance
from torch import Tensor

from samplers.mass import DenseMass, InverseMass, LowRankMass

MASS_KINDS = ("diagonal", "dense", "low_rank")


def mass_windows(
    num_warmup: int, init_buffer: int = 75, term_buffer: int = 50, base_window: int = 25
) -> list[tuple[int, int]]:
    """Stan's slow windows ``[(start, end), ...]`` (end exclusive) for a warmup of ``num_warmup`` steps.

    Too short a warmup (< 20 steps) gets no window. If the default buffers do not fit, they shrink to
    15% / 10% of the warmup and a single window fills the middle. A window whose doubled successor would
    run into the terminal buffer is stretched to reach it.
    """
    if num_warmup < 20:
        return []
    if init_buffer + term_buffer + base_window > num_warmup:
        init_buffer, term_buffer = int(0.15 * num_warmup), int(0.1 * num_warmup)
        base_window = num_warmup - init_buffer - term_buffer
    slow_end = num_warmup - term_buffer
    windows, start, size = [], init_buffer, base_window
    while start < slow_end:
        end = start + size
        if end + 2 * size > slow_end:
            end = slow_end
        windows.append((start, end))
        start, size = end, 2 * size
    return windows


def pooled_variance(welford: WelfordCovariance, regularize: bool = True) -> Tensor:
    """[1, *event] variance of all draws of all chains from per-chain diagonal Welford statistics.

    ``welford`` was fed ``[C, *event]`` states, so it holds per-chain means and sums of squared deviations
    (``_m2``) over n draws each. The sum of squares about the grand mean of all C * n draws is the within
    part sum_c m2_c plus the between part n * sum_c (mean_c - grand_mean)^2 (exact, not approximate).
    ``regularize`` applies Stan's shrinkage with the pooled draw count C * n.
    """
    n = welford.n_samples
    if n < 1:
        raise RuntimeError("pooled_variance needs at least one update")
    # pyro's Welford exposes its running mean and sum of squares only as attributes; both are [C, *event].
    means = welford._mean
    grand_mean = means.mean(dim=0, keepdim=True)
    squares = welford._m2.sum(dim=0, keepdim=True) + n * (means - grand_mean).square().sum(dim=0, keepdim=True)
    total = n * means.shape[0]
    variance = squares / (total - 1)
    if regularize:
        variance = (total / (total + 5.0)) * variance + 1e-3 * (5.0 / (total + 5.0))
    return variance


def check_mass_kind(mass: str, mass_rank: Optional[int], *, adapt_mass: bool, pooled_mass: bool) -> None:
    """Constructor-time validation of a sampler's ``mass`` / ``mass_rank`` / ``pooled_mass`` combination."""
    if mass not in MASS_KINDS:
        raise ValueError(f"unknown mass {mass!r}; pass one of {', '.join(map(repr, MASS_KINDS))}")
    if mass == "low_rank":
        if not isinstance(mass_rank, int) or isinstance(mass_rank, bool) or mass_rank < 1:
            raise ValueError(f"mass='low_rank' needs mass_rank, a positive int below the event size, got {mass_rank!r}")
    elif mass_rank is not None:
        raise ValueError(f"mass_rank={mass_rank!r} is only read with mass='low_rank'; drop it or set mass='low_rank'")
    if mass != "diagonal" and not adapt_mass:
        raise ValueError(f"mass={mass!r} names the structure warmup adapts; with adapt_mass=False pass a fixed "
                         "inverse_mass (a tensor, samplers.mass.DenseMass or LowRankMass) instead")
    if mass != "diagonal" and not pooled_mass:
        raise ValueError(f"mass={mass!r} is estimated from all chains' draws, so every chain must sample the same "
                         "target: pass pooled_mass=True (or use mass='diagonal' for per-chain targets)")


def regularized_covariance(scatter: Tensor, total: int) -> Tensor:
    """[d, d] Stan's shrinkage of the covariance scatter / (total - 1) towards 1e-3 I, with ``total`` draws."""
    covariance = (total / (total + 5.0)) * scatter / (total - 1)
    covariance.diagonal().add_(1e-3 * (5.0 / (total + 5.0)))
    return 0.5 * (covariance + covariance.T)


class PooledScatter:
    """[d, d] scatter of all chains' draws about their grand mean, accumulated one step ([C, *event]) at a time."""

    def __init__(self) -> None:
        self._step_means = WelfordCovariance(diagonal=False)  # the C-chain average of each step
        self._within: Tensor | float = 0.0  # sum over steps of the scatter about that step's average
        self.total = 0

    def update(self, y: Tensor) -> None:
        draws = y.detach().flatten(1).double()  # [C, d]
        step_mean = draws.mean(dim=0)
        centered = draws - step_mean
        self._within = self._within + centered.T @ centered
        self._step_means.update(step_mean)
        self.total += draws.shape[0]

    def covariance(self) -> Tensor:
        """[d, d] float64 regularized pooled covariance (``regularized_covariance``)."""
        num_chains = self.total // self._step_means.n_samples
        return regularized_covariance(self._within + num_chains * self._step_means._m2, self.total)


def low_rank_from_covariance(covariance: Tensor, rank: int, total: int) -> LowRankMass:
    """Low-rank-plus-diagonal mass from a regularized [d, d] covariance of ``total`` draws (float64)."""
    scale = covariance.diagonal().sqrt()
    correlation = covariance / (scale[:, None] * scale[None, :])
    eigenvalues, vectors = torch.linalg.eigh(correlation)
    return _select_eigenpairs(scale, eigenvalues, vectors, rank, total)


def low_rank_from_draws(draws: Tensor, rank: int) -> LowRankMass:
    """Low-rank-plus-diagonal mass from N < d draws [N, d] (float64) through their N x N Gram matrix."""
    total = draws.shape[0]
    mean = draws.mean(dim=0)
    variance = draws.var(dim=0)
    variance = (total / (total + 5.0)) * variance + 1e-3 * (5.0 / (total + 5.0))
    scale = variance.sqrt()
    standardized = (draws - mean) / (scale * (total - 1) ** 0.5)  # Z [N, d] with Z^T Z = the correlation
    eigenvalues, gram_vectors = torch.linalg.eigh(standardized @ standardized.T)  # Z Z^T shares Z^T Z's nonzero ones
    # Centering leaves at most N - 1 nonzero eigenvalues; the others belong to directions the draws never
    # spanned, which keep the diagonal scaling (eigenvalue 1) rather than a spurious 0.
    keep = eigenvalues > 1e-9 * eigenvalues[-1]
    eigenvalues, gram_vectors = eigenvalues[keep], gram_vectors[:, keep]
    vectors = (standardized.T @ gram_vectors) / eigenvalues.sqrt()  # unit eigenvectors of Z^T Z
    return _select_eigenpairs(scale, eigenvalues, vectors, rank, total)


def _select_eigenpairs(scale: Tensor, eigenvalues: Tensor, vectors: Tensor, rank: int, total: int) -> LowRankMass:
    """The (at most) ``rank`` eigenpairs farthest from 1 in log scale, each eigenvalue shrunk towards 1."""
    shrunk = (total * eigenvalues.clamp_min(0.0) + 5.0) / (total + 5.0)
    order = shrunk.log().abs().argsort(descending=True)[:rank]
    return LowRankMass(scale, vectors[:, order], shrunk[order], validate=False)


class PooledWindow:
    """One window's statistics for a dense or low-rank mass, pooled over chains (see the module docstring)."""

    def __init__(self, mass: str, mass_rank: Optional[int], window_length: int) -> None:
        self.mass, self.mass_rank, self.window_length = mass, mass_rank, window_length
        self._scatter: Optional[PooledScatter] = None
        self._draws: Optional[list[Tensor]] = None

    def update(self, y: Tensor) -> None:
        if self._scatter is None and self._draws is None:
            fewer_draws = self.window_length * y.shape[0] < y[0].numel()
            if self.mass == "low_rank" and fewer_draws:
                self._draws = []
            else:
                self._scatter = PooledScatter()
        if self._draws is not None:
            self._draws.append(y.detach().flatten(1).double())
        else:
            self._scatter.update(y)

    def estimate(self, like: Tensor) -> InverseMass:
        """The window's mass, in ``like``'s dtype and device."""
        if self._draws is not None:
            estimate = low_rank_from_draws(torch.cat(self._draws), self.mass_rank)
        elif self.mass == "dense":
            estimate = DenseMass(self._scatter.covariance(), validate=False)
        else:
            estimate = low_rank_from_covariance(self._scatter.covariance(), self.mass_rank, self._scatter.total)
        return estimate.cast(like)


class WarmupAdaptation:
    """Adapts a step size (per chain ``[C, 1, ...]`` or shared ``[1, 1, ...]``) and, optionally, the mass: a
    diagonal ``inverse_mass`` (per chain ``[C, *event]`` or pooled ``[1, *event]``) or, with ``mass="dense"`` /
    ``"low_rank"`` (``mass_rank`` eigenpairs), a pooled ``samplers.mass`` matrix.

    Call ``update(step_index, y, acceptance_prob)`` after every warmup transition and read
    ``step_size`` / ``inverse_mass`` before the next; ``final()`` gives the values to sample with.
    """

    def __init__(
        self,
        num_warmup: int,
        step_size: Tensor,
        inverse_mass: Optional[Tensor],
        *,
        target_accept: float,
        adapt_step_size: bool,
        adapt_mass: bool,
        pooled_mass: bool = False,
        shared_step_size: bool = False,
        mass: str = "diagonal",
        mass_rank: Optional[int] = None,
    ) -> None:
        if shared_step_size and adapt_step_size:
            # One dual-averaging state for all chains, started from their mean step size.
            step_size = step_size.mean(dim=0, keepdim=True)
        self.step_size = step_size  # [C, 1, ...] per chain, [1, 1, ...] shared (or as given, if not adapted)
        # [C, *event] ([1, *event] once pooled), a samplers.mass.MassMatrix (dense, low rank) or None (identity)
        self.inverse_mass = inverse_mass
        self.target_accept = target_accept
        self.adapt_step_size, self.pooled_mass, self.shared_step_size = adapt_step_size, pooled_mass, shared_step_size
        # With shared_step_size: the harmonic (True) or arithmetic (False) mean of the chains' acceptance.
        self.harmonic_acceptance = False
        self.windows = mass_windows(num_warmup) if adapt_mass else []
        self._window_ends = {end - 1 for _, end in self.windows}
        self._welford = WelfordCovariance(diagonal=True)
        self.mass, self.mass_rank = mass, mass_rank
        self._window: Optional[PooledWindow] = None  # dense / low rank: the current window's statistics
        self._dual_averaging = self._restart_dual_averaging()

    def _restart_dual_averaging(self) -> DualAveraging:
        # Hoffman & Gelman: shrink towards log(10 * eps), which favours trying larger steps.
        self._num_dual_averaging_steps = 0
        return DualAveraging(prox_center=torch.log(10.0 * self.step_size))

    def _in_window(self, step_index: int) -> bool:
        return any(start <= step_index < end for start, end in self.windows)

    def update(self, step_index: int, y: Tensor, acceptance_prob: Tensor) -> None:
        """y: [C, *event] state after the transition; acceptance_prob: [C]."""
        if self.adapt_step_size:
            # The statistic is the Metropolis acceptance probability min(1, exp(-dH)) (0 if divergent),
            # shaped like step_size: per chain [C, 1, ...], or its mean over chains [1, 1, ...] if shared.
            if not self.shared_step_size:
                statistic = acceptance_prob
            elif self.harmonic_acceptance:
                # Harmonic mean over chains (floored at 1e-10 per chain): a few chains that cannot move at this
                # step size (a funnel's neck) pull it down, where the arithmetic mean would let the rest outvote
                # them. The step-size statistic of ChEES-HMC.
                statistic = acceptance_prob.clamp_min(1e-10).reciprocal().mean(dim=0, keepdim=True).reciprocal()
            else:
                statistic = acceptance_prob.mean(dim=0, keepdim=True)
            self._dual_averaging.step(self.target_accept - statistic.reshape(self.step_size.shape))
            self._num_dual_averaging_steps += 1
            log_step_size, _ = self._dual_averaging.get_state()
            self.step_size = torch.exp(log_step_size)
        if self._in_window(step_index):
            if self.mass == "diagonal":
                self._welford.update(y.detach())
            else:
                self._update_window(step_index, y)
            if step_index in self._window_ends:
                self.inverse_mass = self._window_estimate(y)
                # The geometry just changed: restart the step-size search from the current value.
                self._dual_averaging = self._restart_dual_averaging()

    def _update_window(self, step_index: int, y: Tensor) -> None:
        if self._window is None:
            end = next(end for start, end in self.windows if start <= step_index < end)
            self._window = PooledWindow(self.mass, self.mass_rank, end - step_index)
        self._window.update(y)

    def _window_estimate(self, y: Tensor) -> InverseMass:
        if self.mass != "diagonal":
            estimate, self._window = self._window.estimate(y), None
            return estimate
        pooled = self.pooled_mass
        estimate = pooled_variance(self._welford) if pooled else self._welford.get_covariance()
        self._welford.reset()
        return estimate

    def final(self) -> tuple[Tensor, Optional[InverseMass]]:
        """(step_size [C, 1, ...] or [1, 1, ...], inverse_mass [C or 1, *event], a MassMatrix or None) to sample with."""
        if self._num_dual_averaging_steps > 0:
            _, log_step_size_avg = self._dual_averaging.get_state()
            return torch.exp(log_step_size_avg), self.inverse_mass
        return self.step_size, self.inverse_mass
