"""The gin roots: ``train`` (one run), ``compare`` (several gin-scoped runs and a table), ``launch`` (what
``energyflow train`` calls); evaluation at several step counts and the comparison table. (Re-building a
finished run: ``energyflow.runs``.)

A recipe binds ``train.task`` to an *uncalled* task configurable (``@LanguageModelTask``): ``train`` seeds
torch first and then builds the task, so model initialization is reproducible from ``Trainer.seed``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import gin
import torch
from rich.console import Console
from rich.table import Table

from energyflow.config import check_required_macros
from energyflow.data import DataSource
from energyflow.evaluation import evaluate_task
from energyflow.tasks import Task
from energyflow.trainer import RunResult, Trainer


def train(out_dir: Union[str, Path], task: Callable[[], Task], data: DataSource, trainer: Trainer) -> RunResult:
    """Build the task under ``trainer.seed`` and train it into ``out_dir`` (resuming if it has checkpoints)."""
    if isinstance(task, Task) or not callable(task):
        raise TypeError("train.task must be an uncalled task configurable, e.g. `train.task = @LanguageModelTask` "
                        "(no parentheses), so that the model is built after seeding")
    torch.manual_seed(trainer.seed)
    built = task()
    if not isinstance(built, Task):
        raise TypeError(f"train.task built a {type(built).__name__}, not an energyflow.tasks.Task")
    return trainer.fit(built, data, out_dir, config=gin.config_str(), operative_config=gin.operative_config_str,
                       scope=gin.current_scope_str())


def launch(program: Optional[Callable[[], Any]] = None) -> Any:
    """What ``energyflow train`` runs: ``program`` (default: the configured ``train``), e.g. ``@compare``."""
    check_required_macros()
    return (program or gin.get_configurable("train"))()


def evaluate_steps(result: RunResult, eval_steps: Sequence[int]) -> dict[Optional[int], dict[str, float]]:
    """Validation metrics at every count in ``eval_steps`` (one entry, key ``None``, for a one-shot task)."""
    counts: Sequence[Optional[int]] = eval_steps if result.task.has_optimization_steps else [None]
    return {k: evaluate_task(result.task, result.validation_windows, result.data.to_batch, device=result.device,
                             num_steps=k)
            for k in counts}


def comparison_table(results: dict[str, dict[Optional[int], dict[str, float]]],
                     details: Optional[dict[str, dict[str, str]]] = None,
                     metrics: Optional[dict[str, Sequence[str]]] = None) -> Table:
    """One row per (run, number of optimization steps): the metrics each run's task reports
    (``metrics[run]``, its ``Task.table_metrics``; default: loss alone), in first-seen order, then a column per
    ``details`` entry (``Task.describe()``, e.g. an EBT's descent rule). A run without a column shows "-"."""
    details, metrics = details or {}, metrics or {}
    columns = list(dict.fromkeys(name for run in results for name in metrics.get(run, ("loss",))))
    extra = sorted({key for described in details.values() for key in described})
    table = Table(title="validation")
    table.add_column("run")
    table.add_column("optimization steps", justify="right")
    for column in columns:
        table.add_column(column, justify="right")
    for column in extra:
        table.add_column(column)
    for name, by_steps in results.items():
        described = [details.get(name, {}).get(key, "-") for key in extra]
        shown = metrics.get(name, ("loss",))
        for steps, values in by_steps.items():
            cells = [_format(c, values[c]) if c in shown and c in values else "-" for c in columns]
            table.add_row(name, "-" if steps is None else str(steps), *cells, *described)
    return table


def _format(name: str, value: float) -> str:
    """Three decimals for perplexities, four for everything else (losses)."""
    return f"{value:.3f}" if "perplexity" in name else f"{value:.4f}"


def compare(out_dir: Union[str, Path], runs: Sequence[str], eval_steps: Sequence[int] = (1,),
            console: Optional[Console] = None) -> dict[str, dict[Optional[int], dict[str, float]]]:
    """Train every run in ``runs`` inside its gin scope (``baseline/train.task = ...``) into
    ``out_dir/<run>``, then evaluate each (at each of ``eval_steps`` for iterative tasks) and print a table."""
    if not runs:
        raise ValueError("compare.runs is empty; name the gin scopes to train, e.g. ['baseline', 'ebt']")
    configured_train = gin.get_configurable("train")
    results, details, metrics = {}, {}, {}
    for name in runs:
        with gin.config_scope(name):
            result = configured_train(out_dir=Path(out_dir) / name)
        results[name] = evaluate_steps(result, eval_steps)
        details[name], metrics[name] = result.task.describe(), result.task.table_metrics
    if int(os.environ.get("RANK", "0")) == 0:
        (console or Console()).print(comparison_table(results, details, metrics))
    return results
