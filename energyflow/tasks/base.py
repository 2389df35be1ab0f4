"""The ``Task`` contract (see ``energyflow.tasks``) and the batch check shared by the text tasks."""
from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn

from energyflow.data import Batch

Metrics = dict[str, Tensor]


class Task(nn.Module):
    """Base class: see the module docstring for the contract."""

    has_optimization_steps: ClassVar[bool] = False
    cross_entropy_metrics: ClassVar[tuple[str, ...]] = ("loss",)
    table_metrics: ClassVar[tuple[str, ...]] = ("loss",)
    steps_label: ClassVar[str] = "optimization steps"

    def loss(self, batch: Batch, *, step: int, generator: torch.Generator) -> tuple[Tensor, Metrics]:
        raise NotImplementedError(f"{type(self).__name__} must implement loss(batch, *, step, generator)")

    def evaluate(self, batch: Batch, *, num_steps: Optional[int] = None) -> Metrics:
        raise NotImplementedError(f"{type(self).__name__} must implement evaluate(batch, *, num_steps=None)")

    def forward(self, batch: Batch, *, step: int, generator: torch.Generator) -> tuple[Tensor, Metrics]:
        # DistributedDataParallel synchronizes gradients only for work done inside ``forward``.
        return self.loss(batch, step=step, generator=generator)

    def lr_multipliers(self) -> dict[str, float]:
        return {}

    def no_weight_decay(self) -> tuple[str, ...]:
        return ()

    def evaluation_counts(self, requested: Sequence[int]) -> list[Optional[int]]:
        """The ``num_steps`` values a report evaluates at, given the ``requested`` ones (``compare.eval_steps``,
        ``eval --max-steps``): those for an iterative task, one ``None`` for a one-shot task. A task with its
        own counts (a diffusion sampler's passes) returns them instead."""
        return list(requested) if self.has_optimization_steps else [None]

    def describe(self) -> dict[str, str]:
        """How this task computes its numbers, for reports (e.g. an EBT's descent rule): name -> value."""
        return {}

    def train_flops_per_token(self, context: int) -> Optional[float]:
        """Model FLOPs of one training token at sequence length ``context`` (``energyflow.flops``), for the
        trainer's throughput and MFU; ``None`` when the task has no analytic count."""
        return None


def descent_lr_multipliers(objective: nn.Module, step_size_multiplier: float,
                           noise_multiplier: float) -> dict[str, float]:
    """Learning-rate multipliers of a descent objective's learnable step size (``*step_size``) and Langevin noise
    scale (``*transforms.*.scale``), for the ones that are learnable."""
    from samplers.transforms import LangevinNoise

    multipliers = {}
    if isinstance(getattr(objective.sampler, "step_size", None), nn.Parameter):
        multipliers["*step_size"] = step_size_multiplier
    if any(isinstance(m, LangevinNoise) and isinstance(m.scale, nn.Parameter) for m in objective.modules()):
        multipliers["*transforms.*.scale"] = noise_multiplier
    return multipliers


def check_batch(batch: Batch) -> None:
    """Clear error unless ``batch`` has int64 ``tokens`` and ``targets`` of the same ``[B, S]`` shape."""
    if not {"tokens", "targets"} <= set(batch):
        raise KeyError(f"a batch needs 'tokens' and 'targets', got keys {sorted(batch)}")
    tokens, targets = batch["tokens"], batch["targets"]
    if tokens.dim() != 2 or tokens.shape != targets.shape or tokens.dtype != torch.long:
        raise ValueError(f"tokens and targets must be int64 [B, S] of the same shape, got {tuple(tokens.shape)} "
                         f"{tokens.dtype} and {tuple(targets.shape)} {targets.dtype}")
