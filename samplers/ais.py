"""Annealed importance sampling (Neal 2001): log-normalizer estimates for an energy, batched over chains.

For a target ``p(y) = exp(-E(y)) / Z`` and a tractable base ``q`` (here ``N(0, scale^2 I)``, whose ``log Z_0``
is known), the geometric path ``E_b(y) = (1 - b) E_0(y) + b E(y)`` for ``0 = b_0 < b_1 < ... < b_K = 1``:
every chain starts from an exact draw of the base, and at each temperature adds ``-(b_k - b_{k-1}) (E - E_0)``
at its current state to its log weight, then moves by any ``samplers`` kernel that leaves ``exp(-E_{b_k})``
invariant (``kernel.run(E_{b_k}, y, num_steps=...)``: HMC, MALA, Langevin as an approximation). Then
``Z / Z_0 = E[w]``, estimated by the mean of the weights:

    log Z = log Z_0 + logsumexp(log w) - log N,    se(log Z) ~ sd(w) / (sqrt(N) mean(w))  (delta method)

and the weights' effective sample size ``(sum w)^2 / sum w^2`` (its ratio to ``N`` says how far the path is from
perfect: 1 when every weight is equal). The estimate of ``Z`` is unbiased; that of ``log Z`` is biased low by about
``se^2 / 2``, negligible when the ESS is large. Everything is batched: ``N`` chains, one kernel call per temperature.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from samplers.energy import EnergyFn, check_state


@dataclass
class AISResult:
    """``log_z`` and its standard error ``log_z_se``; ``log_weights [N]``; ``ess`` of the weights; ``states``
    ``[N, *event]``: the chains at ``b = 1`` (weighted by ``exp(log_weights)``, approximate draws of the target)."""

    log_z: float
    log_z_se: float
    log_weights: Tensor
    ess: float
    states: Tensor

    @property
    def ess_fraction(self) -> float:
        return self.ess / self.log_weights.numel()


def geometric_schedule(num_temperatures: int, power: float = 4.0) -> Tensor:
    """``b_0 = 0 < ... < b_K = 1`` spaced as ``(k / K) ** power`` (dense near the base, where ``E - E_0`` changes
    fastest for a target far narrower or wider than the base)."""
    if not isinstance(num_temperatures, int) or num_temperatures < 1:
        raise ValueError(f"num_temperatures must be an int >= 1, got {num_temperatures!r}")
    return torch.linspace(0.0, 1.0, num_temperatures + 1, dtype=torch.float64) ** power


def annealed_importance_sampling(energy_fn: EnergyFn, kernel, *, num_chains: int, dim: int,
                                 schedule: Optional[Sequence[float]] = None, num_temperatures: int = 200,
                                 steps_per_temperature: int = 1, base_scale: float = 1.0,
                                 dtype: torch.dtype = torch.float64, device: Optional[torch.device] = None,
                                 generator: Optional[torch.Generator] = None) -> AISResult:
    """``log Z`` of ``exp(-energy_fn)`` over ``R^dim`` (see the module docstring). ``kernel``: a ``samplers``
    sampler with a fixed step size (e.g. ``HMC(0.1, 10, adapt_step_size=False, adapt_mass=False)``), run for
    ``steps_per_temperature`` steps at every temperature. ``schedule``: the ``b`` values (default
    ``geometric_schedule(num_temperatures)``)."""
    betas = torch.as_tensor(schedule if schedule is not None else geometric_schedule(num_temperatures),
                            dtype=torch.float64)
    if betas.dim() != 1 or len(betas) < 2 or float(betas[0]) != 0.0 or float(betas[-1]) != 1.0 \
            or bool((betas[1:] <= betas[:-1]).any()):
        raise ValueError("schedule must rise strictly from 0 to 1, e.g. geometric_schedule(200)")
    if not base_scale > 0:
        raise ValueError(f"base_scale must be > 0, got {base_scale}")
    if not isinstance(num_chains, int) or num_chains < 2:
        raise ValueError(f"num_chains must be an int >= 2 (the standard error needs several), got {num_chains!r}")

    def base(y: Tensor) -> Tensor:
        return 0.5 * (y / base_scale).pow(2).flatten(1).sum(dim=1)

    log_z_base = 0.5 * dim * math.log(2.0 * math.pi * base_scale ** 2)
    y = base_scale * torch.randn(num_chains, dim, generator=generator, dtype=dtype, device=device)
    check_state(y)
    log_weights = torch.zeros(num_chains, dtype=torch.float64, device=y.device)
    for previous, current in zip(betas[:-1].tolist(), betas[1:].tolist()):
        with torch.no_grad():
            log_weights -= (current - previous) * (energy_fn(y) - base(y)).double()

        def tempered(x: Tensor, b: float = current) -> Tensor:
            return (1.0 - b) * base(x) + b * energy_fn(x)

        y = kernel.run(tempered, y, num_steps=steps_per_temperature, generator=generator).final_state.detach()
    if not bool(torch.isfinite(log_weights).all()):
        raise ValueError("AIS produced non-finite log weights: the energy is non-finite somewhere the chains went; "
                         "check the energy, or use a smaller kernel step size")
    normalized = torch.softmax(log_weights, dim=0)
    ess = float(1.0 / normalized.pow(2).sum())
    log_mean = float(torch.logsumexp(log_weights, 0)) - math.log(num_chains)
    weights = torch.exp(log_weights - log_weights.max())
    se = float(weights.std() / (math.sqrt(num_chains) * weights.mean()))
    return AISResult(log_z_base + log_mean, se, log_weights, ess, y)
