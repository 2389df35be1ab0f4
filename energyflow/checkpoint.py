"""Checkpoints: atomic writes, ``weights_only`` loading, architecture fingerprints, clear refusals.

A checkpoint is a dict of tensors and primitive containers only (so ``torch.load(weights_only=True)``
reads it): ``format``, ``step``, ``fingerprint`` ([[name, shape], ...] of the task's parameters),
``task`` (its ``state_dict``), ``optimizer``, ``data`` (the batch stream's position), ``config`` and
``operative_config`` (gin text), ``scope`` (the gin scope of the run) and ``metrics`` (last step's).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

FORMAT = "energyflow-checkpoint-v1"
_NAME = re.compile(r"step_(\d{8})\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, or from another model."""


def fingerprint(module: nn.Module) -> list[list]:
    """``[[parameter name, [shape...]], ...]``: what must match for a checkpoint to load into ``module``."""
    return [[name, list(parameter.shape)] for name, parameter in module.named_parameters()]


def checkpoint_path(directory: Union[str, Path], step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def save_checkpoint(path: Union[str, Path], payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically: a temporary file in the same directory, fsync, then ``os.replace``.

    A crash mid-write leaves at worst a stray ``*.tmp`` file, never a truncated checkpoint under the
    final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save({"format": FORMAT, **payload}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; a missing, corrupt or foreign file is a ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated/corrupt archives
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {error}); "
                              "delete it to resume from the previous checkpoint") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an energyflow checkpoint (expected format {FORMAT!r})")
    return payload


def check_fingerprint(payload: dict[str, Any], module: nn.Module, path: Union[str, Path]) -> None:
    """Refuse a checkpoint whose parameter names or shapes differ from ``module``'s, naming the first
    differences."""
    saved = {name: shape for name, shape in payload["fingerprint"]}
    current = {name: shape for name, shape in fingerprint(module)}
    if saved == current:
        return
    missing = sorted(set(current) - set(saved))[:3]
    unexpected = sorted(set(saved) - set(current))[:3]
    reshaped = [f"{n}: {saved[n]} vs {current[n]}" for n in sorted(set(saved) & set(current))
                if saved[n] != current[n]][:3]
    raise CheckpointError(
        f"checkpoint {path} was written by a different model: parameters missing from it {missing}, "
        f"not in this model {unexpected}, shapes differ (checkpoint vs model) {reshaped}. Load it with the "
        "run's own operative_config.gin, or start a new run directory.")


def list_checkpoints(directory: Union[str, Path]) -> list[Path]:
    """Checkpoints in ``directory`` sorted by step (temporary files ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.fullmatch(p.name))


def latest_checkpoint(directory: Union[str, Path]) -> Optional[Path]:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: Union[str, Path], keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for path in list_checkpoints(directory)[:-keep]:
        path.unlink()
