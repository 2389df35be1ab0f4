"""Thinking sweeps: loss and energy against the number of thinking steps and of self-verification samples.

One run of ``max(steps)`` steps per sample count gives every smaller step count too: the state after k
steps of a K-step run is the k-step run's (same generator draws, same order). Self-verification is applied
after every step (``best_of_n_trace``), so ``loss[n][k]`` is the loss of the lowest-energy of ``n``
candidates after ``k`` steps. Every sample count restarts from the same seed: runs with different ``n``
are equally seeded, independent draws.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from energyflow.data import to_batch
from energyflow.inference.optimize import ThinkingConfig
from energyflow.inference.text import InitialState, think_tokens
from energyflow.inference.verification import best_of_n_trace


@dataclass
class SweepResult:
    """``loss[n]``, ``energy[n]``: ``[K+1]`` means over tokens after 0..K steps with ``n`` candidates
    (entry 0 is the random initial state); ``mean_steps[n]``: average steps a position took (< K only with
    adaptive stopping); ``baseline_loss``: the Transformer++ on the same tokens, if given;
    ``fixed_budget_loss``: for an adaptive run, the loss of the same run without tolerances (all ``K`` steps);
    ``window_loss[n]``: ``[K+1][W]`` the loss of each window (for paired standard errors across windows)."""

    steps: list[int]
    samples: list[int]
    loss: dict[int, list[float]] = field(default_factory=dict)
    energy: dict[int, list[float]] = field(default_factory=dict)
    mean_steps: dict[int, float] = field(default_factory=dict)
    baseline_loss: Optional[float] = None
    fixed_budget_loss: Optional[float] = None
    window_loss: dict[int, list[list[float]]] = field(default_factory=dict)

    def loss_at(self, num_samples: int, num_steps: int) -> float:
        return self.loss[num_samples][num_steps]

    def verification_gain(self, num_samples: int, num_steps: int) -> float:
        """Loss reduction of ``num_samples`` candidates over one, at ``num_steps`` steps (positive = better)."""
        return self.loss[1][num_steps] - self.loss[num_samples][num_steps] if 1 in self.loss else float("nan")

    def paired_difference(self, first: tuple[int, int], second: tuple[int, int]) -> tuple[float, float]:
        """Mean and standard error over windows of ``loss(first) - loss(second)``, each ``(samples, steps)``
        (positive = ``second`` is better). Pairing by window removes the windows' own difficulty."""
        differences = (torch.tensor(self.window_loss[first[0]][first[1]])
                       - torch.tensor(self.window_loss[second[0]][second[1]]))
        if len(differences) < 2:
            return float(differences.mean()), float("nan")
        return float(differences.mean()), float(differences.std() / len(differences) ** 0.5)


def check_counts(values: Sequence[int], name: str) -> list[int]:
    counts = sorted(set(int(v) for v in values))
    if not counts or counts[0] < 1:
        raise ValueError(f"{name} must be positive integers, e.g. 1,2,4; got {list(values)}")
    return counts


def spread_batches(windows: Tensor, num_batches: int, batch_size: int) -> list[Tensor]:
    """``num_batches`` batches ``[batch_size, S+1]`` of windows spread evenly through ``windows [N, S+1]``
    (a corpus's first windows are rarely typical of it)."""
    count = num_batches * batch_size
    if num_batches < 1 or batch_size < 1 or len(windows) < count:
        raise ValueError(f"{len(windows)} windows cannot fill {num_batches} batch(es) of {batch_size}; give more "
                         "text or fewer/smaller batches")
    chosen = windows[torch.linspace(0, len(windows) - 1, count).round().long()]
    return list(chosen.split(batch_size))


def _pad(trace: Tensor, length: int) -> Tensor:
    """An early-exited trace ``[T'+1, ...]`` padded to ``[length, ...]`` with its last entry (every position
    had frozen, so later steps would not have changed anything)."""
    if trace.shape[0] == length:
        return trace
    return torch.cat((trace, trace[-1:].expand(length - trace.shape[0], *trace.shape[1:])))


@torch.no_grad()
def baseline_loss(model: nn.Module, windows: Sequence[Tensor], device: torch.device) -> float:
    """Mean next-token cross-entropy (nats) of a causal LM over windows ``[B, S+1]``."""
    total = 0.0
    for window in windows:
        batch = to_batch(window, device)
        logits = model(batch["tokens"])
        total += float(F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten()))
    return total / len(windows)


def thinking_sweep(model: nn.Module, windows: Sequence[Tensor], config: ThinkingConfig, *, steps: Sequence[int],
                   samples: Sequence[int], device: torch.device, seed: int = 0,
                   initial_state: Optional[InitialState] = None, step_index_mode: str = "per_step",
                   advance: Optional[Callable[[int], None]] = None) -> SweepResult:
    """Run ``config`` (its ``num_steps`` replaced by ``max(steps)``) with each sample count over ``windows``
    (a list of ``[B, S+1]`` batches; every window weighs the same in the means); ``step_index_mode``: the
    trained objective's, for a step-conditioned model; ``advance(1)`` after each batch of each sample count."""
    steps, samples = check_counts(steps, "steps"), check_counts(samples, "samples")
    if not windows:
        raise ValueError("thinking_sweep needs at least one batch of windows")
    config = replace(config, num_steps=steps[-1])
    result = SweepResult(steps, samples)
    for num_samples in samples:
        generator = torch.Generator(device=device).manual_seed(seed)
        window_losses, energy_sum, steps_sum = [], 0.0, 0.0
        for window in windows:
            batch = to_batch(window, device)
            verified = think_tokens(model, batch["tokens"], config, num_candidates=num_samples,
                                    targets=batch["targets"], generator=generator, initial_state=initial_state,
                                    step_index_mode=step_index_mode)
            energies, losses = best_of_n_trace(verified.thinking, num_samples)
            window_losses.append(_pad(losses, steps[-1] + 1).mean(dim=2))  # [K+1, B]
            energy_sum = energy_sum + _pad(energies, steps[-1] + 1).mean(dim=(1, 2))
            steps_sum += float(verified.thinking.mean_steps())
            if advance is not None:
                advance(1)
        per_window = torch.cat(window_losses, dim=1)  # [K+1, W]
        result.window_loss[num_samples] = per_window.tolist()
        result.loss[num_samples] = per_window.mean(dim=1).tolist()
        result.energy[num_samples] = (energy_sum / len(windows)).tolist()
        result.mean_steps[num_samples] = steps_sum / len(windows)
    return result
