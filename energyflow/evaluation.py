"""Validation of a task on held-out batches, at one or several numbers of optimization steps."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from energyflow.data import Batch
from energyflow.distributed import DistContext, all_reduce_sum
from energyflow.metrics import mean_metrics, with_perplexities
from energyflow.tasks import Task


def step_counts(max_steps: int) -> list[int]:
    """1, 2, 4, ... up to and including ``max_steps`` (``max_steps`` itself is added if not a power of 2)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    counts, count = [], 1
    while count <= max_steps:
        counts.append(count)
        count *= 2
    return counts if counts[-1] == max_steps else counts + [max_steps]


def evaluate_task(task: Task, batches: Sequence[Any], to_batch: Callable[[Any, torch.device], Batch], *,
                  device: torch.device, num_steps: Optional[int] = None,
                  context: Optional[DistContext] = None,
                  advance: Optional[Callable[[int], None]] = None) -> dict[str, float]:
    """Mean of ``task.evaluate`` over the validation ``batches`` (raw; ``to_batch``, the data source's, makes
    each the task's batch on ``device``), plus perplexities. ``advance(1)`` is called after each batch (a
    progress bar's, ``energyflow.monitor.progress_bar``).

    With a ``context`` of several processes, batch ``i`` is evaluated by rank ``i % world_size`` and the
    sums are all-reduced, so every rank returns the same numbers as a single process would.
    """
    rank, world = (context.rank, context.world_size) if context is not None else (0, 1)
    if len(batches) < world:
        raise ValueError(f"{len(batches)} validation batches cannot be shared by {world} processes; "
                         "raise eval_batches or lower the evaluation batch size")
    was_training = task.training
    task.eval()
    try:
        parts = []
        for windows in batches[rank::world]:
            parts.append(task.evaluate(to_batch(windows, device), num_steps=num_steps))
            if advance is not None:
                advance(1)
    finally:
        task.train(was_training)
    means = mean_metrics(parts)
    # Sums and counts, so that ranks holding different numbers of batches weigh every batch equally.
    totals = torch.cat([torch.stack(list(means.values())).to(device) * len(parts),
                        torch.tensor([float(len(parts))], device=device)])
    if context is not None:
        totals = all_reduce_sum(totals, context)
    values = (totals[:-1] / totals[-1]).tolist()
    return with_perplexities(dict(zip(means, values)), task.cross_entropy_metrics)
