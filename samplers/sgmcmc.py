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
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from samplers.langevin import Langevin

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

    def __call__(self, y: Tensor) -> Tensor:
        chains, total = y.shape[0], self.num_examples
        keys = torch.rand(chains, total, generator=self.generator, device=self.data.device)
        indices = keys.argsort(dim=1)[:, : self.batch_size]  # [C, B]: a sample without replacement per chain
        terms = self.per_example(y, self.data[indices])
        if terms.shape != (chains, self.batch_size):
            raise ValueError(f"per_example(y, x) must return [C, B] = [{chains}, {self.batch_size}] energies, got "
                             f"{tuple(terms.shape)}")
        return self._prior(y) + (total / self.batch_size) * terms.sum(dim=1)

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
