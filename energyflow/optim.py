"""AdamW with named parameter groups (learning-rate multipliers, weight-decay exemptions) and the
warmup-cosine learning-rate schedule."""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate factor at 0-based ``step``: linear warm-up reaching 1 at step ``warmup_steps - 1``
    (step 0 gets ``1 / warmup_steps``, never 0), then a cosine down to ``min_lr_ratio`` at ``total_steps - 1``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    peak = max(warmup_steps - 1, 0)
    progress = min((step - peak) / max(total_steps - 1 - peak, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _multiplier(name: str, lr_multipliers: Mapping[str, float]) -> float:
    """The multiplier of the first glob that matches ``name`` (1.0 if none does)."""
    for pattern, multiplier in lr_multipliers.items():
        if fnmatch.fnmatchcase(name, pattern):
            return float(multiplier)
    return 1.0


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], *, weight_decay: float,
                 lr_multipliers: Mapping[str, float], no_weight_decay: Sequence[str]) -> list[dict]:
    """Group trainable parameters by (learning-rate multiplier, weight decay).

    Parameters with fewer than 2 dimensions (norm scales, biases, scalar step sizes) and names matching a
    ``no_weight_decay`` glob get no weight decay. Each group records its ``lr_multiplier`` and a ``name``
    (used for TensorBoard) and lists its parameter names in ``param_names``.
    """
    groups: dict[tuple[float, bool], dict] = {}
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        multiplier = _multiplier(name, lr_multipliers)
        decay = parameter.dim() >= 2 and not any(fnmatch.fnmatchcase(name, p) for p in no_weight_decay)
        group = groups.setdefault((multiplier, decay), {
            "params": [], "param_names": [], "lr_multiplier": multiplier,
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"lr_x{multiplier:g}" + ("" if decay else "_no_decay"),
        })
        group["params"].append(parameter)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("the task has no trainable parameters")
    unused = [p for p in lr_multipliers if not any(fnmatch.fnmatchcase(n, p) for g in groups.values()
                                                     for n in g["param_names"])]
    if unused:
        raise ValueError(f"lr_multipliers pattern(s) {unused} match no trainable parameter; check the names "
                         "with [n for n, _ in task.named_parameters()]")
    return list(groups.values())


def build_optimizer(groups: list[dict], *, learning_rate: float, betas: tuple[float, float],
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``groups``; each group's ``lr`` is ``learning_rate * lr_multiplier`` until scheduled."""
    for group in groups:
        group["lr"] = learning_rate * group["lr_multiplier"]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), eps=eps)


def set_learning_rates(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    """Set every group's learning rate to ``base_lr`` times its multiplier."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group["lr_multiplier"]


# Peak learning rates by model size. 4xs (0.0024), xxs (0.0012) and xl (0.0002) are the paper's values
# (docs/PAPER_SETTINGS); the sizes between are interpolated roughly geometrically in model width.
PAPER_PEAK_LEARNING_RATES: dict[str, float] = {
    "4xs": 0.0024, "3xs": 0.0018, "xxs": 0.0012, "xs": 0.0009,
    "small": 0.0006, "medium": 0.0004, "large": 0.0003, "xl": 0.0002,
}


def paper_learning_rate(size: str) -> float:
    """The peak learning rate the paper's recipes use for model ``size`` (a preset name)."""
    if size not in PAPER_PEAK_LEARNING_RATES:
        raise ValueError(f"no paper learning rate for size {size!r}; choose one of {list(PAPER_PEAK_LEARNING_RATES)}")
    return PAPER_PEAK_LEARNING_RATES[size]
