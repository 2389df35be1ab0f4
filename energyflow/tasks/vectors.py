"""A classic energy-based model trained on continuous vectors: an energy ``E(y [B, F]) -> [B]`` (e.g.
``energyflow.models.GaussianEnergy``) and one of the classic objectives (``DenoisingScoreMatching``,
``ContrastiveDivergence``), on a ``energyflow.data.VectorData`` source -- the non-text task that exercises the
modality-agnostic trainer."""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from energyflow.data import Batch
from energyflow.tasks.base import Metrics, Task


def check_vector_batch(batch: Batch) -> Tensor:
    data = batch.get("data")
    if data is None or data.dim() != 2 or not data.is_floating_point():
        raise ValueError(f"a vector batch needs 'data': a float tensor [B, F]; got keys {sorted(batch)}"
                         + ("" if data is None else f" and data {tuple(data.shape)} {data.dtype}"))
    return data


class EnergyModelTask(Task):
    """``objective(model, data, generator=...)`` as the loss (its own metrics logged beside it). Validation runs
    the same objective on held-out batches with noise from ``eval_seed`` (the same for every batch)."""

    cross_entropy_metrics: ClassVar[tuple[str, ...]] = ()  # a score-matching or CD loss has no perplexity

    def __init__(self, model: nn.Module, objective: nn.Module, *, eval_seed: int = 1234) -> None:
        super().__init__()
        self.model, self.objective, self.eval_seed = model, objective, eval_seed

    def _data(self, batch: Batch) -> Tensor:
        return check_vector_batch(batch).to(next(self.model.parameters()).dtype)

    def loss(self, batch: Batch, *, step: int, generator: torch.Generator) -> tuple[Tensor, Metrics]:
        out = self.objective(self.model, self._data(batch), generator=generator)
        return out.loss, {"loss": out.loss.detach(), **out.metrics}

    def evaluate(self, batch: Batch, *, num_steps: Optional[int] = None) -> Metrics:
        data = self._data(batch)
        generator = torch.Generator(device=data.device).manual_seed(self.eval_seed)
        out = self.objective(self.model, data, generator=generator)
        return {"loss": out.loss.detach(), **out.metrics}
