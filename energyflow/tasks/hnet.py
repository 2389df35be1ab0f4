"""Tasks for models with an H-Net inside: they add the H-Net's ratio loss and report its routing per stage.

``HNetLanguageModelTask``: the byte-level LM task (``LanguageModelTask``) for ``architectures.hnet.HNetLM``.
``HNetEBTLanguageModelTask``: the EBT text task (``EBTLanguageModelTask``) for a ``TextEBM`` whose backbone
is ``architectures.hnet_ebt.HNetContextEBT``.

Both run their parent's loss unchanged while a ``RoutingRecorder`` collects the routing statistics that the
model's H-Net returns from its one forward pass per batch (the EBT encodes its context once per batch, so
more than one pass is an error, not a silent average). The loss becomes
``parent loss + ratio_loss_weight * sum over stages of the ratio loss``; metrics gain, per stage ``i``,
``boundary_fraction_stage{i}``, ``mean_probability_stage{i}``, ``ratio_loss_stage{i}`` and
``compression_stage{i}`` (positions per chunk, ``1 / boundary_fraction``), which the trainer logs to
TensorBoard like every metric. ``loss`` stays the parent's (so its perplexity stays a perplexity).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from architectures.hnet import HNet
from architectures.hnet_ops import RoutingStats
from energyflow.data import Batch
from energyflow.models import TextEBM
from energyflow.objectives.unrolled import EBTObjective
from energyflow.tasks.base import Metrics
from energyflow.tasks.text import EBTLanguageModelTask, LanguageModelTask


class RoutingRecorder:
    """While entered, keeps the ``RoutingStats`` list of every forward pass of the H-Net inside ``model``."""

    def __init__(self, model: nn.Module) -> None:
        hnets = [module for module in model.modules() if isinstance(module, HNet)]
        if len(hnets) != 1:
            raise ValueError(f"an H-Net task needs a model with exactly one H-Net inside, found {len(hnets)}; "
                             "use LanguageModelTask / EBTLanguageModelTask for other models")
        self.hnet, self.passes = hnets[0], []

    def __enter__(self) -> "RoutingRecorder":
        self.passes = []
        self._handle = self.hnet.register_forward_hook(lambda module, args, output: self.passes.append(output[1]))
        return self

    def __exit__(self, *exc_info) -> None:
        self._handle.remove()

    def routing(self) -> list[RoutingStats]:
        """The statistics of the batch's single H-Net pass."""
        if len(self.passes) != 1:
            raise RuntimeError(f"the H-Net ran {len(self.passes)} times for one batch; the context must be "
                               "encoded exactly once per batch (encode once, reuse the cache)")
        return self.passes[0]


def ratio_loss_term(routing: Sequence[RoutingStats], weight: float) -> Tensor:
    """``weight * sum_i ratio_loss_i`` (in the graph)."""
    return weight * torch.stack([stats.ratio_loss for stats in routing]).sum()


def routing_metrics(routing: Sequence[RoutingStats]) -> Metrics:
    """Detached per-stage scalars for TensorBoard."""
    metrics = {}
    for index, stats in enumerate(routing):
        fraction = stats.boundary_fraction.detach()
        metrics[f"boundary_fraction_stage{index}"] = fraction
        metrics[f"mean_probability_stage{index}"] = stats.mean_probability.detach()
        metrics[f"ratio_loss_stage{index}"] = stats.ratio_loss.detach()
        metrics[f"compression_stage{index}"] = 1.0 / fraction
    return metrics


def _check_weight(weight: float) -> float:
    if weight < 0:
        raise ValueError(f"ratio_loss_weight must be >= 0 (the paper uses 0.03), got {weight}")
    return float(weight)


class _RatioLoss:
    """Mixin: run the parent task's ``loss``/``evaluate`` under the recorder and add the H-Net's terms."""

    ratio_loss_weight: float
    recorder: RoutingRecorder

    def loss(self, batch: Batch, *, step: int, generator: torch.Generator) -> tuple[Tensor, Metrics]:
        with self.recorder:
            loss, metrics = super().loss(batch, step=step, generator=generator)
        routing = self.recorder.routing()
        return loss + ratio_loss_term(routing, self.ratio_loss_weight), {**metrics, **routing_metrics(routing)}

    def evaluate(self, batch: Batch, *, num_steps: Optional[int] = None) -> Metrics:
        with self.recorder:
            metrics = super().evaluate(batch, num_steps=num_steps)
        return {**metrics, **routing_metrics(self.recorder.routing())}


class HNetLanguageModelTask(_RatioLoss, LanguageModelTask):
    """Next-byte cross-entropy of an ``HNetLM`` plus ``ratio_loss_weight`` times its ratio losses."""

    def __init__(self, model: nn.Module, *, ratio_loss_weight: float = 0.03) -> None:
        super().__init__(model)
        self.ratio_loss_weight = _check_weight(ratio_loss_weight)
        self.recorder = RoutingRecorder(model)


class HNetEBTLanguageModelTask(_RatioLoss, EBTLanguageModelTask):
    """The EBT text task for an H-Net context stream; see ``EBTLanguageModelTask`` for the other arguments."""

    def __init__(self, model: TextEBM, objective: EBTObjective, *, ratio_loss_weight: float = 0.03,
                 step_size_lr_multiplier: float = 1500.0, noise_lr_multiplier: float = 1.0,
                 min_step_size: Optional[float] = None, eval_seed: int = 1234) -> None:
        super().__init__(model, objective, step_size_lr_multiplier=step_size_lr_multiplier,
                         noise_lr_multiplier=noise_lr_multiplier, min_step_size=min_step_size, eval_seed=eval_seed)
        self.ratio_loss_weight = _check_weight(ratio_loss_weight)
        self.recorder = RoutingRecorder(model)
