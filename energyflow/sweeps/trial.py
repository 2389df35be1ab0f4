"""Running one trial, in whatever process an engine gives it: parse the recipe with the trial's bindings, train
through ``launch`` (exactly what ``energyflow train`` does; a trial directory with checkpoints resumes), evaluate,
and record the outcome atomically in ``DIR/<trial>/trial.json``.

``trial.json``: the trial (recipe, bindings, axes, seed), ``status`` (``"done"`` or ``"failed"``), ``error``
(one line), ``seconds``, and ``runs``: ``{run: {"table_metrics": [...], "steps": {"1": {metric: value}}}}`` --
one run, ``"run"``, for a ``train`` recipe; every run of a ``compare`` recipe under its name.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

RECORD = "trial.json"


def record_path(trial_dir: Path) -> Path:
    return Path(trial_dir) / RECORD


def read_record(trial_dir: Path) -> Optional[dict]:
    path = record_path(trial_dir)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a record is written atomically; an unreadable one is treated as absent


def is_done(trial_dir: Path) -> bool:
    record = read_record(trial_dir)
    return record is not None and record.get("status") == "done"


def write_record(trial_dir: Path, record: dict) -> Path:
    path = record_path(trial_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(RECORD + ".partial")
    partial.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    os.replace(partial, path)
    return path


def _finite(values: dict) -> dict:
    return {k: (float(v) if math.isfinite(float(v)) else None) for k, v in values.items()}


def run_trial(trial: dict, out_dir: str, *, eval_steps: Sequence[int] = (1, 2, 4, 8),
              threads: Optional[int] = None, extra_bindings: Sequence[str] = (), log: bool = True) -> dict:
    """Train and evaluate ``trial`` (a ``Trial.to_dict()``) into ``out_dir/<name>``; returns its record (also
    written to ``trial.json``). An exception inside the trial is recorded (``status: failed``), not raised.
    ``log``: the trial's own output (the trainer's tables) goes to ``<trial>/train.log``, not the sweep's screen."""
    trial_dir = Path(out_dir) / trial["name"]
    if not log:
        return _run(trial, trial_dir, eval_steps, threads, extra_bindings)
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "train.log", "a") as handle, contextlib.redirect_stdout(handle), \
            contextlib.redirect_stderr(handle):
        return _run(trial, trial_dir, eval_steps, threads, extra_bindings)


def _run(trial: dict, trial_dir: Path, eval_steps: Sequence[int], threads: Optional[int],
         extra_bindings: Sequence[str]) -> dict:
    import gin
    import torch

    start = time.perf_counter()
    record: dict[str, Any] = {**trial, "status": "failed", "error": None, "seconds": None, "runs": {}}
    try:
        from energyflow.configurables import parse_recipe
        from energyflow.experiment import evaluate_steps
        from energyflow.trainer import RunResult

        if threads is not None:
            torch.set_num_threads(threads)
        bindings = [f"OUT_DIR = {str(trial_dir)!r}", "Trainer.progress = False", *trial["bindings"],
                    *([f"Trainer.num_threads = {threads}"] if threads is not None else []), *extra_bindings]
        gin.clear_config()
        parse_recipe(trial["recipe"], bindings)
        outcome = gin.get_configurable("launch")()
        if isinstance(outcome, RunResult):
            runs = {"run": {"table_metrics": list(outcome.task.table_metrics),
                            "steps": {("-" if k is None else str(k)): _finite(v)
                                      for k, v in evaluate_steps(outcome, eval_steps).items()}}}
        elif isinstance(outcome, dict):  # compare: {run: {steps: metrics}}, evaluated at compare.eval_steps
            runs = {name: {"table_metrics": [], "steps": {("-" if k is None else str(k)): _finite(v)
                                                          for k, v in by_steps.items()}}
                    for name, by_steps in outcome.items()}
        else:
            raise TypeError(f"the recipe's launch.program returned {type(outcome).__name__}; a sweep runs recipes "
                            "whose program is train or compare")
        record.update(status="done", runs=runs)
    except Exception as error:  # noqa: BLE001 -- a failed trial is reported, the sweep goes on
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        record["traceback"] = traceback.format_exc(limit=8)
    finally:
        gin.clear_config()
        record["seconds"] = time.perf_counter() - start
    write_record(trial_dir, record)
    return record
