"""Warmup adaptation for Metropolis samplers: per-chain dual averaging and windowed diagonal Welford.

Both estimators run elementwise on per-chain tensors (pyro's ``DualAveraging`` and ``WelfordCovariance``
only use arithmetic, so a ``[C]`` or ``[C, *event]`` tensor adapts every chain at once, with no Python
loop over chains and no host sync).

Choices:

- Step sizes adapt *per chain* (dual averaging on log step size towards ``target_accept``).
- The diagonal mass matrix is estimated *per chain* (``inverse_mass`` ``[C, *event]``), not pooled. The
  energy contract lets every chain see its own energy (a batch of conditional energies, as in the EBT,
  where chain c is example c), so pooling across chains would mix the scales of different targets.
  The price: each chain's estimate uses only its own warmup draws; Stan's shrinkage towards 1e-3
  (``regularize=True``) keeps short windows sane.
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


class WarmupAdaptation:
    """Adapts a per-chain step size ``[C]`` and, optionally, a per-chain diagonal ``inverse_mass``.

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
    ) -> None:
        self.step_size = step_size  # [C, 1, ...] per chain (or as given, if not adapted)
        self.inverse_mass = inverse_mass  # [C, *event] or None (identity)
        self.target_accept = target_accept
        self.adapt_step_size = adapt_step_size
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
        """y: [C, *event] state after the transition; acceptance_prob: [C]; step_size is [C, 1, ...]."""
        if self.adapt_step_size:
            # step_size is [C, 1, ...] (broadcasting against the state): give the statistic that shape.
            self._dual_averaging.step(self.target_accept - acceptance_prob.reshape(self.step_size.shape))
            self._num_dual_averaging_steps += 1
            log_step_size, _ = self._dual_averaging.get_state()
            self.step_size = torch.exp(log_step_size)
        if self._in_window(step_index):
            self._welford.update(y.detach())
            if step_index in self._window_ends:
                self.inverse_mass = self._welford.get_covariance(regularize=True)
                self._welford.reset()
                # The geometry just changed: restart the step-size search from the current value.
                self._dual_averaging = self._restart_dual_averaging()

    def final(self) -> tuple[Tensor, Optional[Tensor]]:
        """(step_size [C], inverse_mass [C, *event] or None) to sample with after warmup."""
        if self._num_dual_averaging_steps > 0:
            _, log_step_size_avg = self._dual_averaging.get_state()
            return torch.exp(log_step_size_avg), self.inverse_mass
        return self.step_size, self.inverse_mass
