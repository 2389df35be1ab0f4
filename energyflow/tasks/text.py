"""Text tasks: ``LanguageModelTask`` (the Transformer++ baseline: next-byte cross-entropy) and
``EBTLanguageModelTask``, the trainer's interface around a ``TextEBM`` and an ``EBTObjective``.

Training: ``loss`` runs the unrolled objective (context encoded once per batch, K differentiable descent
steps, every trick the objective is configured with). Validation: ``evaluate(batch, num_steps=k)`` runs
k non-differentiable descent steps from the same fixed-seed initial state and reports the cross-entropy
of the final prediction (``loss``) and of every step on the way (``loss_step_i``).
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from energyflow.data import Batch
from energyflow.models import TextEBM
from energyflow.objectives.unrolled import EBTObjective
from energyflow.tasks.base import Metrics, Task, check_batch, descent_lr_multipliers


class LanguageModelTask(Task):
    """Next-token cross-entropy for a causal LM such as ``architectures.TransformerPP``.

    ``model(tokens [B, S]) -> logits [B, S, V]``. Metrics: ``loss`` (mean cross-entropy in nats per
    token); the trainer derives ``perplexity = exp(mean loss)``.
    """

    table_metrics: ClassVar[tuple[str, ...]] = ("loss", "perplexity")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def _cross_entropy(self, batch: Batch) -> Tensor:
        check_batch(batch)
        logits = self.model(batch["tokens"])  # [B, S, V]
        # At least float32 log-softmax: under bf16 autocast the logits arrive in bf16 (a float64 run keeps float64).
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

    def loss(self, batch: Batch, *, step: int, generator: torch.Generator) -> tuple[Tensor, Metrics]:
        loss = self._cross_entropy(batch)
        return loss, {"loss": loss.detach()}

    def train_flops_per_token(self, context: int) -> Optional[float]:
        from energyflow import flops

        shape = flops.shape_of(self.model, context)
        return None if shape is None else flops.transformer_train_per_token(shape)

    def evaluate(self, batch: Batch, *, num_steps: Optional[int] = None) -> Metrics:
        with torch.no_grad():
            return {"loss": self._cross_entropy(batch)}


class EBTLanguageModelTask(Task):
    """Next-token prediction by energy descent over vocabulary distributions.

    ``step_size_lr_multiplier``: learning-rate multiplier of a learnable step size (the paper: 1500x).
    ``noise_lr_multiplier``: the same for a learnable Langevin noise scale.
    ``min_step_size``: kept for runs recorded before the sampler had its own floor (their operative configs
    bind it): handed once, at construction, to a sampler without a floor as ``GradientDescent.min_step_size``
    (the recipes now set that directly). The task never edits the step size.
    ``eval_seed``: seed of the initial states at validation (the same noise for every validation batch).
    """

    has_optimization_steps: ClassVar[bool] = True
    cross_entropy_metrics: ClassVar[tuple[str, ...]] = ("loss", "loss_step_*", "initial_loss", "final_loss")
    table_metrics: ClassVar[tuple[str, ...]] = ("loss", "perplexity")

    def __init__(self, model: TextEBM, objective: EBTObjective, *, step_size_lr_multiplier: float = 1500.0,
                 noise_lr_multiplier: float = 1.0, min_step_size: Optional[float] = None,
                 eval_seed: int = 1234) -> None:
        super().__init__()
        self.model, self.objective = model, objective
        self.step_size_lr_multiplier, self.noise_lr_multiplier = step_size_lr_multiplier, noise_lr_multiplier
        self.eval_seed = eval_seed
        if min_step_size is not None:
            hand_floor_to_samplers(objective, min_step_size)

    def loss(self, batch: Batch, *, step: int, generator: torch.Generator) -> tuple[Tensor, Metrics]:
        check_batch(batch)
        out = self.objective(self.model, batch["tokens"], batch["targets"], generator=generator, step=step)
        return out.loss, {"loss": out.loss.detach(), **out.metrics}

    def evaluate(self, batch: Batch, *, num_steps: Optional[int] = None) -> Metrics:
        check_batch(batch)
        tokens = batch["tokens"]
        generator = torch.Generator(device=tokens.device).manual_seed(self.eval_seed)
        out = self.objective(self.model, tokens, batch["targets"], generator=generator, num_steps=num_steps)
        metrics = {name: value for name, value in out.metrics.items() if name != "replayed_fraction"}
        return {"loss": metrics["final_loss"], **metrics}

    def describe(self) -> dict[str, str]:
        """The descent rule the model trained and is evaluated with (``EBTObjective.descent_space``; unset is the
        logit-space rule through the model's own softmax)."""
        return {"descent": self.objective.descent_space or "logits"}

    def lr_multipliers(self) -> dict[str, float]:
        return descent_lr_multipliers(self.objective, self.step_size_lr_multiplier, self.noise_lr_multiplier)

    def train_flops_per_token(self, context: int) -> Optional[float]:
        """The EBT's training count at its mean number of training steps (``energyflow.flops``)."""
        from energyflow import flops

        shape = flops.shape_of(self.model, context)
        if shape is None:
            return None
        steps = self.objective.num_steps
        mean_steps = steps if isinstance(steps, int) else (steps.low + steps.high) / 2
        return flops.ebt_train_per_token(shape, mean_steps)

def hand_floor_to_samplers(objective: nn.Module, min_step_size: float) -> None:
    """An old run's task-level ``min_step_size``, given to the objective's samplers that have no floor of their own
    (``GradientDescent.min_step_size``)."""
    if not min_step_size > 0:
        raise ValueError(f"min_step_size must be > 0, got {min_step_size}")
    for sampler in (objective.sampler, getattr(objective, "eval_sampler", None)):
        if callable(getattr(sampler, "floor_step_size", None)):
            sampler.floor_step_size(min_step_size)
