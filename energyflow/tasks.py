"""Trainable tasks: the one interface between a model and the shared, task-agnostic trainer.

A task is a ``torch.nn.Module`` that owns its model and every other trainable part (for example a
sampler whose step size is a learnable ``nn.Parameter``). The trainer wraps the task itself in
``DistributedDataParallel`` and calls it, so ``forward`` is ``loss``. Implement:

``loss(batch, *, step, generator) -> (loss, metrics)``
    ``batch``: ``{"tokens": [B, S] int64, "targets": [B, S] int64}`` on the task's device (see
    ``energyflow.data``). ``loss``: a scalar to minimize (the trainer scales it for gradient accumulation).
    ``metrics``: ``dict[str, Tensor]`` of detached scalar *means over the batch*; the trainer averages them
    over micro-batches and processes, logs every one to TensorBoard and checks them for NaN/Inf.
    ``step``: the 0-based optimizer step being taken (for warm-ups and schedules inside the task).
    ``generator``: a ``torch.Generator`` on the task's device, reseeded by the trainer from
    (seed, step, micro-batch, rank). Draw *all* randomness from it: that is what makes resume bit-exact.

``evaluate(batch, *, num_steps=None) -> metrics``
    Validation metrics (scalar means) for one batch. ``num_steps`` is the number of optimization steps
    for iterative tasks (EBTs: 1, 2, 4, ... at ``energyflow eval``); others ignore it. The trainer does not
    wrap it in ``torch.no_grad`` (an EBT needs gradients w.r.t. its candidate): a task that needs no
    gradient disables them itself. The trainer puts the task in ``eval()`` mode around it.

Class attributes and hooks (defaults below):

- ``has_optimization_steps``: True when ``evaluate``'s ``num_steps`` changes the prediction.
- ``cross_entropy_metrics``: glob patterns naming metrics that are mean token cross-entropies in nats.
  The trainer and the evaluator derive a perplexity for each as exp(mean loss), never a mean of
  perplexities: ``loss`` -> ``perplexity``, ``loss_step_2`` -> ``perplexity_step_2``.
- ``lr_multipliers()``: ``{parameter-name glob: learning-rate multiplier}``, e.g. an EBT's
  ``{"*step_size*": 1500.0}``; merged with (and overridden by) ``Trainer.lr_multipliers``.
- ``no_weight_decay()``: parameter-name globs exempt from weight decay. Parameters with fewer than two
  dimensions (norm scales, biases, scalar step sizes) are always exempt.
- State: parameters and buffers are checkpointed through ``state_dict()``; other state (e.g. a replay
  buffer) goes through ``nn.Module.get_extra_state``/``set_extra_state`` and must hold only tensors and
  primitive containers so that checkpoints load with ``torch.load(weights_only=True)``. Parameter
  names and shapes form the architecture fingerprint that refuses a checkpoint from another model.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from energyflow.data import Batch

Metrics = dict[str, Tensor]


class Task(nn.Module):
    """Base class: see the module docstring for the contract."""

    has_optimization_steps: ClassVar[bool] = False
    cross_entropy_metrics: ClassVar[tuple[str, ...]] = ("loss",)

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

    def describe(self) -> dict[str, str]:
        """How this task computes its numbers, for reports (e.g. an EBT's descent rule): name -> value."""
        return {}


def check_batch(batch: Batch) -> None:
    """Clear error unless ``batch`` has int64 ``tokens`` and ``targets`` of the same ``[B, S]`` shape."""
    if not {"tokens", "targets"} <= set(batch):
        raise KeyError(f"a batch needs 'tokens' and 'targets', got keys {sorted(batch)}")
    tokens, targets = batch["tokens"], batch["targets"]
    if tokens.dim() != 2 or tokens.shape != targets.shape or tokens.dtype != torch.long:
        raise ValueError(f"tokens and targets must be int64 [B, S] of the same shape, got {tuple(tokens.shape)} "
                         f"{tokens.dtype} and {tuple(targets.shape)} {targets.dtype}")


class LanguageModelTask(Task):
    """Next-token cross-entropy for a causal LM such as ``architectures.TransformerPP``.

    ``model(tokens [B, S]) -> logits [B, S, V]``. Metrics: ``loss`` (mean cross-entropy in nats per
    token); the trainer derives ``perplexity = exp(mean loss)``.
    """

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

    def evaluate(self, batch: Batch, *, num_steps: Optional[int] = None) -> Metrics:
        with torch.no_grad():
            return {"loss": self._cross_entropy(batch)}
