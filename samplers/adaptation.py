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


class WarmupAdaptation:
    """Adapts a step size (per chain ``[C, 1, ...]`` or shared ``[1, 1, ...]``) and, optionally, a diagonal
    ``inverse_mass`` (per chain ``[C, *event]`` or pooled ``[1, *event]``).

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
    ) -> None:
        if shared_step_size and adapt_step_size:
            # One dual-averaging state for all chains, started from their mean step size.
            step_size = step_size.mean(dim=0, keepdim=True)
        self.step_size = step_size  # [C, 1, ...] per chain, [1, 1, ...] shared (or as given, if not adapted)
        self.inverse_mass = inverse_mass  # [C, *event] ([1, *event] once pooled) or None (identity)
        self.target_accept = target_accept
        self.adapt_step_size, self.pooled_mass, self.shared_step_size = adapt_step_size, pooled_mass, shared_step_size
        self.windows = mass_windows(num_warmup) if adapt_mass else []
        self._window_ends = {end - 1 for _, end in self.windows}
        self._welford = WelfordCovariance(diagonal=True)
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
            statistic = acceptance_prob.mean(dim=0, keepdim=True) if self.shared_step_size else acceptance_prob
            self._dual_averaging.step(self.target_accept - statistic.reshape(self.step_size.shape))
            self._num_dual_averaging_steps += 1
            log_step_size, _ = self._dual_averaging.get_state()
            self.step_size = torch.exp(log_step_size)
        if self._in_window(step_index):
            self._welford.update(y.detach())
            if step_index in self._window_ends:
                pooled = self.pooled_mass
                self.inverse_mass = pooled_variance(self._welford) if pooled else self._welford.get_covariance()
                self._welford.reset()
                # The geometry just changed: restart the step-size search from the current value.
                self._dual_averaging = self._restart_dual_averaging()

    def final(self) -> tuple[Tensor, Optional[Tensor]]:
        """(step_size [C, 1, ...] or [1, 1, ...], inverse_mass [C or 1, *event] or None) to sample with."""
        if self._num_dual_averaging_steps > 0:
            _, log_step_size_avg = self._dual_averaging.get_state()
            return torch.exp(log_step_size_avg), self.inverse_mass
        return self.step_size, self.inverse_mass
