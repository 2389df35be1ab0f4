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


def evaluate_steps(result: RunResult, eval_steps: Sequence[int], *,
                   progress: bool = False) -> dict[Optional[int], dict[str, float]]:
    """Validation metrics at every count the task evaluates at for ``eval_steps`` (``Task.evaluation_counts``: the
    counts themselves for an iterative task, one entry with key ``None`` for a one-shot task); ``progress``: a
    ``rich`` bar over batches x counts."""
    from energyflow.monitor import progress_bar

    counts = result.task.evaluation_counts(eval_steps)
    with progress_bar("eval", len(counts) * len(result.validation_windows), enabled=progress) as advance:
        return {k: evaluate_task(result.task, result.validation_windows, result.data.to_batch, device=result.device,
                                 num_steps=k, advance=advance)
                for k in counts}


def comparison_table(results: dict[str, dict[Optional[int], dict[str, float]]],
                     details: Optional[dict[str, dict[str, str]]] = None,
                     metrics: Optional[dict[str, Sequence[str]]] = None,
                     steps_labels: Optional[dict[str, str]] = None) -> Table:
    """One row per (run, number of steps): the metrics each run's task reports
    (``metrics[run]``, its ``Task.table_metrics``; default: loss alone), in first-seen order, then a column per
    ``details`` entry (``Task.describe()``, e.g. an EBT's descent rule). A run without a column shows "-".
    ``steps_labels[run]`` (``Task.steps_label``) names the steps column when every run shares it (else "steps")."""
    details, metrics = details or {}, metrics or {}
    labels = list(dict.fromkeys((steps_labels or {}).get(run, "optimization steps") for run in results))
    steps_header = labels[0] if len(labels) == 1 else "steps"
    columns = list(dict.fromkeys(name for run in results for name in metrics.get(run, ("loss",))))
    extra = sorted({key for described in details.values() for key in described})
    table = Table(title="validation")
    table.add_column("run")
    table.add_column(steps_header, justify="right")
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
    """Counts (``*_passes``) as integers, perplexities and PSNRs with three decimals, the rest (losses, MSEs) four."""
    if name.endswith("_passes"):
        return f"{value:.0f}"
    return f"{value:.3f}" if "perplexity" in name or name.startswith("psnr") else f"{value:.4f}"


def compare(out_dir: Union[str, Path], runs: Sequence[str], eval_steps: Sequence[int] = (1,),
            console: Optional[Console] = None,
            json_path: Optional[Union[str, Path]] = None) -> dict[str, dict[Optional[int], dict[str, float]]]:
    """Train every run in ``runs`` inside its gin scope (``baseline/train.task = ...``) into
    ``out_dir/<run>``, then evaluate each (at each of ``eval_steps`` for iterative tasks) and print a table
    and write its numbers as JSON (``write_metrics_json``) to ``json_path``, by default ``out_dir/compare.json``."""
    if not runs:
        raise ValueError("compare.runs is empty; name the gin scopes to train, e.g. ['baseline', 'ebt']")
    configured_train = gin.get_configurable("train")
    results, details, metrics, labels = {}, {}, {}, {}
    for name in runs:
        with gin.config_scope(name):
            result = configured_train(out_dir=Path(out_dir) / name)
        results[name] = evaluate_steps(result, eval_steps)
        details[name], metrics[name] = result.task.describe(), result.task.table_metrics
        labels[name] = result.task.steps_label
    if int(os.environ.get("RANK", "0")) == 0:
        (console or Console()).print(comparison_table(results, details, metrics, labels))
        write_metrics_json(json_path if json_path is not None else Path(out_dir) / "compare.json", results, details)
    return results


def metrics_json(results: dict[str, dict[Optional[int], dict[str, float]]],
                 details: Optional[dict[str, dict[str, str]]] = None) -> dict[str, Any]:
    """The numbers of a table as plain JSON: ``{"runs": {run: {"describe": {...}, "steps": {"1": {metric: value}}}}}``
    (a one-shot task's single entry has the key ``"-"``; a non-finite value is ``null``)."""
    import math

    details = details or {}
    return {"runs": {run: {"describe": dict(details.get(run, {})),
                           "steps": {"-" if steps is None else str(steps): {k: float(v) if math.isfinite(v) else None
                                                                              for k, v in values.items()}
                                     for steps, values in by_steps.items()}}
                     for run, by_steps in results.items()}}


def write_metrics_json(path: Union[str, Path], results: dict[str, dict[Optional[int], dict[str, float]]],
                       details: Optional[dict[str, dict[str, str]]] = None) -> Path:
    """``metrics_json`` written to ``path`` (its folder created), atomically."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(metrics_json(results, details), indent=2, allow_nan=False) + "\n")
    partial.replace(path)
    return path
