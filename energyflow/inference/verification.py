"""Self-verification: think from several random starts per input and keep, per position, the candidate
with the lowest final energy (the energy is the model's own verifier).

Candidates follow ``ContextCache.expand(n)``'s layout: rows ``b*n .. b*n+n-1`` are input ``b``'s ``n``
candidates, so a context is encoded once and only its rows are repeated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from energyflow.inference.optimize import Record, ThinkingConfig, ThinkingResult, think
from samplers.energy import EnergyFn


def lowest_energy_index(energies: Tensor, num_candidates: int) -> Tensor:
    """``energies [B*n, *P]`` -> ``[B, *P]`` the index (in ``0..n-1``) of each input's lowest-energy candidate."""
    if num_candidates < 1 or energies.shape[0] % num_candidates:
        raise ValueError(f"{energies.shape[0]} rows do not split into groups of num_candidates={num_candidates}; "
                         "lay candidates out as ContextCache.expand(n) does (n consecutive rows per input)")
    grouped = energies.view(energies.shape[0] // num_candidates, num_candidates, *energies.shape[1:])
    # A NaN energy (a diverged candidate) must never win: treat it as +inf.
    return torch.nan_to_num(grouped, nan=float("inf")).argmin(dim=1)


def take_candidates(values: Tensor, index: Tensor, num_candidates: int) -> Tensor:
    """Pick ``values [B*n, *P, *rest]`` at ``index [B, *P]`` -> ``[B, *P, *rest]`` (per input and position)."""
    grouped = values.view(values.shape[0] // num_candidates, num_candidates, *values.shape[1:])
    rest = values.dim() - index.dim()  # trailing event axes after the positions
    gather_index = index.unsqueeze(1).view(*index.shape[:1], 1, *index.shape[1:], *([1] * rest))
    gather_index = gather_index.expand(grouped.shape[0], 1, *grouped.shape[2:])
    return grouped.gather(1, gather_index).squeeze(1)


@dataclass
class Verified:
    """Best-of-n outcome: ``state [B, *event]``, ``energies [B, *P]``, ``index [B, *P]`` (which candidate),
    and the full ``thinking`` result over all ``B*n`` candidates."""

    state: Tensor
    energies: Tensor
    index: Tensor
    thinking: ThinkingResult


def self_verify(energy_fn: EnergyFn, y0: Tensor, config: ThinkingConfig, num_candidates: int, *,
                generator: Optional[torch.Generator] = None, record: Optional[Record] = None) -> Verified:
    """Think from every start ``y0 [B*n, *event]`` (n per input, consecutive rows), then keep per position
    the lowest-energy candidate."""
    result = think(energy_fn, y0, config, generator=generator, record=record)
    index = lowest_energy_index(result.energies, num_candidates)
    return Verified(take_candidates(result.state, index, num_candidates),
                    take_candidates(result.energies, index, num_candidates), index, result)


def best_of_n_trace(result: ThinkingResult, num_candidates: int) -> tuple[Tensor, Optional[Tensor]]:
    """Self-verification after every step at once: ``energy_trace [T+1, B*n, *P]`` -> the selected energies
    ``[T+1, B, *P]`` and, if the run recorded something, the records of the selected candidates."""
    energies, records = [], []
    for step, step_energies in enumerate(result.energy_trace):
        index = lowest_energy_index(step_energies, num_candidates)
        energies.append(take_candidates(step_energies, index, num_candidates))
        if result.records is not None:
            records.append(take_candidates(result.records[step], index, num_candidates))
    return torch.stack(energies), (torch.stack(records) if records else None)
