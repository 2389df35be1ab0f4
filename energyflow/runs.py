"""Re-building a finished run from its run directory, for ``energyflow eval``, ``think`` and ``generate``:
its operative config (parsed with every configurable registered) and its newest checkpoint."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence, Union

import gin

from energyflow import checkpoint as ckpt
from energyflow.config import RecipeError
from energyflow.configurables import parse_text
from energyflow.distributed import resolve_device
from energyflow.trainer import DTYPES, RunResult, Trainer


def _query(selector: str, scope: str) -> Any:
    """The value bound to ``selector`` in ``scope`` (falling back to the unscoped binding), evaluated."""
    for candidate in ([f"{scope}/{selector}"] if scope else []) + [selector]:
        try:
            reference = gin.query_parameter(candidate)
        except ValueError:
            continue
        with gin.config_scope(scope or None):
            return copy.deepcopy(reference)  # deepcopy evaluates gin references (`@x()`)
    raise ValueError(f"the run's operative config binds no {selector!r}; it was not written by `train`")


def load_run(run_dir: Union[str, Path], device: str = "auto",
             bindings: Sequence[str] = ()) -> tuple[RunResult, Trainer, int]:
    """Rebuild a finished run from its ``operative_config.gin`` and newest checkpoint.

    Returns the result (task with the checkpoint's weights, validation windows), its trainer settings, and
    the checkpoint's step. Clears gin's config first. ``bindings`` (gin lines) are applied after the operative
    config, inside the run's scope too, e.g. ``"train.data = @bouncing_shapes()"`` to validate on other data;
    the checkpoint must still fit the model they build. A run trained from the Python API (``Trainer.fit``
    without a recipe) has an empty operative config and is refused with a ``RecipeError`` naming the fix.
    """
    run_dir = Path(run_dir)
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    operative = run_dir / "operative_config.gin"
    if latest is None:
        raise FileNotFoundError(f"{run_dir} is not a run directory with checkpoints/ and operative_config.gin")
    text = _operative_text(run_dir, operative)
    resolved = resolve_device(device)
    latest, payload, notes = ckpt.load_newest_verified(run_dir / "checkpoints", map_location=resolved)
    gin.clear_config()
    parse_text(text, str(operative))
    scope = payload["scope"]
    if bindings:
        try:
            gin.parse_config("\n".join(_in_scope(bindings, scope)))
        except (ValueError, SyntaxError) as error:
            raise RecipeError(f"bad --bind: {str(error).splitlines()[0]} (bindings: {list(bindings)})") from error
    trainer, data, task_fn = (_query(s, scope) for s in ("train.trainer", "train.data", "train.task"))
    with gin.config_scope(scope or None):
        task = task_fn()
    ckpt.check_fingerprint(payload, task, latest)
    task.to(resolved, DTYPES[trainer.dtype])  # before loading: a float64 run's weights stay float64
    task.load_state_dict(payload["task"])
    result = RunResult(out_dir=run_dir, task=task, data=data, validation_windows=trainer.validation_batches(data),
                       device=resolved, notes=notes)
    return result, trainer, payload["step"]


def _operative_text(run_dir: Path, operative: Path) -> str:
    """The run's operative config; a missing or empty one (``Trainer.fit`` called from Python, without a recipe,
    writes it empty; blank and comment-only lines count as empty) is refused in one line: there is nothing to
    rebuild the task from."""
    text = operative.read_text() if operative.is_file() else ""
    if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
        state = "is empty" if operative.is_file() else "is missing"
        raise RecipeError(f"{run_dir} was not trained from a gin recipe (its operative_config.gin {state}), so it "
                          "cannot be rebuilt: train it with `energyflow train RECIPE`, or load its checkpoint with "
                          "the Python API as docs/training.md shows")
    return text


def _in_scope(bindings: Sequence[str], scope: str) -> list[str]:
    """Each binding as given and, for an unscoped ``configurable.parameter = value`` in a scoped run, once more
    under the run's scope (so that it wins over the run's own scoped binding of the same parameter)."""
    lines = []
    for binding in bindings:
        lines.append(binding)
        name = binding.split("=", 1)[0].strip()
        if scope and "=" in binding and "." in name and "/" not in name:
            lines.append(f"{scope}/{binding.strip()}")
    return lines
