"""Averaging task metrics over micro-batches, processes and validation batches; perplexity from loss."""
from __future__ import annotations

import fnmatch
import math
from typing import Mapping, Sequence

import torch
from torch import Tensor


def mean_metrics(parts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Element-wise mean of equally weighted metric dicts (same keys; scalar tensors)."""
    if not parts:
        raise ValueError("mean_metrics needs at least one metric dict")
    keys = list(parts[0])
    for part in parts[1:]:
        if list(part) != keys:
            raise ValueError(f"metric names differ between batches: {keys} vs {list(part)}; a task must "
                             "return the same metrics for every batch of a step")
    for key, value in parts[0].items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"metric {key!r} must be a scalar tensor (a mean over the batch), got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    return {key: torch.stack([_at_least_float32(part[key].detach()).reshape(()) for part in parts]).mean()
            for key in keys}


def _at_least_float32(value: Tensor) -> Tensor:
    """float32 metrics (bf16 under autocast promoted); float64 ones (a float64 run) kept as they are."""
    return value if value.dtype == torch.float64 else value.float()


def perplexity_name(loss_name: str) -> str:
    """``loss`` -> ``perplexity``; ``loss_step_2`` -> ``perplexity_step_2``; ``final_loss`` -> ``final_perplexity``."""
    return loss_name.replace("loss", "perplexity") if "loss" in loss_name else f"{loss_name}_perplexity"


def with_perplexities(metrics: Mapping[str, float], cross_entropy_metrics: Sequence[str]) -> dict[str, float]:
    """Add exp(mean loss) for every metric matching a glob in ``cross_entropy_metrics``.

    The inputs must already be means over all batches: perplexity is never averaged itself, because the
    mean of per-batch perplexities overstates the perplexity of the mean loss (Jensen).
    """
    out = dict(metrics)
    for name, value in metrics.items():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in cross_entropy_metrics):
            out[perplexity_name(name)] = math.exp(value) if value < 709.0 else math.inf  # math.exp overflows
    return out


def spearman(x: Tensor, y: Tensor) -> Tensor:
    """Rank correlation of two tensors read flat (ties broken by order: meant for continuous values), 0-d float64."""
    ranks = [torch.argsort(torch.argsort(v.flatten().double())).double() for v in (x, y)]
    a, b = (r - r.mean() for r in ranks)
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30)
