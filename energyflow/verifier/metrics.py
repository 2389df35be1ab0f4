"""Rank statistics for the verifier: AUROC (out-of-distribution detection) and Spearman correlation
(calibration of energy against loss). Written from ranks with ties averaged, so no extra dependency.
"""
from __future__ import annotations

import torch
from torch import Tensor


def average_ranks(values: Tensor) -> Tensor:
    """``values [N]`` -> ranks ``[N]`` (float64, 1 = smallest); tied values share the mean of their ranks."""
    values = _as_vector(values, "values")
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    # Group ids of runs of equal values in sorted order; a run spanning positions i..j gets rank (i+j)/2 + 1.
    new_group = torch.ones_like(sorted_values, dtype=torch.bool)
    new_group[1:] = sorted_values[1:] != sorted_values[:-1]
    group = torch.cumsum(new_group.long(), dim=0) - 1
    positions = torch.arange(1, len(values) + 1, dtype=torch.float64, device=values.device)
    count = torch.zeros(int(group[-1]) + 1, dtype=torch.float64, device=values.device)
    total = torch.zeros_like(count)
    count.index_add_(0, group, torch.ones_like(positions))
    total.index_add_(0, group, positions)
    ranks = torch.empty_like(positions)
    ranks[order] = (total / count)[group]
    return ranks


def auroc(negative_scores: Tensor, positive_scores: Tensor) -> float:
    """Area under the ROC curve for telling positives (e.g. out-of-distribution) from negatives by score
    (higher score = more positive): P(score_pos > score_neg) + 1/2 P(score_pos = score_neg).

    Computed as the Mann-Whitney U statistic from average ranks, so ties count one half.
    """
    negative = _as_vector(negative_scores, "negative_scores")
    positive = _as_vector(positive_scores, "positive_scores")
    ranks = average_ranks(torch.cat((negative.double(), positive.double())))
    num_pos, num_neg = len(positive), len(negative)
    u_statistic = ranks[num_neg:].sum() - num_pos * (num_pos + 1) / 2.0
    return float(u_statistic / (num_pos * num_neg))


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation of paired samples ``x [N]``, ``y [N]`` (Pearson correlation of average ranks)."""
    x, y = _as_vector(x, "x"), _as_vector(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"spearman needs paired samples of one length, got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) < 2:
        raise ValueError("spearman needs at least two pairs")
    rank_x, rank_y = average_ranks(x), average_ranks(y)
    rank_x, rank_y = rank_x - rank_x.mean(), rank_y - rank_y.mean()
    denominator = torch.sqrt((rank_x ** 2).sum() * (rank_y ** 2).sum())
    if float(denominator) == 0.0:
        raise ValueError("spearman is undefined when x or y is constant (every rank tied)")
    return float((rank_x * rank_y).sum() / denominator)


def _as_vector(values: Tensor, name: str) -> Tensor:
    values = torch.as_tensor(values)
    if values.dim() != 1 or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of scores, got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values.double()).all()):
        raise ValueError(f"{name} contains NaN or Inf; drop or fix those scores first")
    return values.detach()
