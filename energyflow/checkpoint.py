"""Checkpoints: atomic writes, ``weights_only`` loading, architecture fingerprints, clear refusals.

A checkpoint is a dict of tensors and primitive containers only (so ``torch.load(weights_only=True)``
reads it): ``format``, ``step``, ``fingerprint`` ([[name, shape], ...] of the task's parameters),
``task`` (its ``state_dict``), ``optimizer``, ``data`` (the batch stream's position), ``config`` and
``operative_config`` (gin text), ``scope`` (the gin scope of the run), ``metrics`` (last step's) and
``rank_states`` (below).

Per-rank state. Under ``torchrun`` every process holds the same parameters but some modules hold state of
their own that differs between processes: a replay buffer or persistent sampler chains fill from each
rank's own share of the batch. Such a module says so with the class attribute ``per_rank_state = True``
(see ``ReplayBuffer`` and ``PersistentChains``) and keeps that state in ``get_extra_state`` /
``set_extra_state`` (tensors, ints, floats, strings, ``None``, lists and dicts only). ``task`` holds rank 0's
copy (what ``energyflow eval`` and single-process tools use); ``rank_states`` holds every rank's:
``rank_states[r] = {module name in the task: that module's extra state on rank r}``, one entry per process
that wrote the checkpoint (one for a single process). On resume each rank restores its own entry, and a
checkpoint with per-rank state is refused by a run with another number of processes. A checkpoint written
before ``rank_states`` existed resumes as before: every rank starts from rank 0's copy in ``task``.

Integrity. Every checkpoint ``step_N.pt`` has a sidecar ``step_N.pt.sha256`` (``sha256sum`` format: the
SHA-256 of the file's bytes, then its name), written and fsynced before the checkpoint takes its final name.
``load_checkpoint`` verifies it, so a flipped byte anywhere in the file is refused instead of loading silently;
``load_newest_verified`` falls back to the newest checkpoint that verifies, saying which were skipped, and
refuses when none does; ``newest_verified`` is what the NaN guard names as the last good checkpoint. A
checkpoint also records ``history_sha256``: the digest of the run's ``history.jsonl`` as it stood when the
checkpoint was written (``verify_history`` checks it on resume). A checkpoint written before checksums existed
(no sidecar) loads as before.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from energyflow.distributed import to_cpu

FORMAT = "energyflow-checkpoint-v1"
_NAME = re.compile(r"step_(\d{8})\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, corrupt (its checksum differs), or from another
    model."""


class RunDirectoryError(CheckpointError):
    """A run directory that cannot be trained into as asked: a file, another recipe's run, or a run whose
    checkpoints and history disagree. Nothing was written."""


def file_digest(path: Union[str, Path]) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: Union[str, Path]) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def recorded_digest(path: Union[str, Path]) -> Optional[str]:
    """The digest the sidecar of ``path`` records, or ``None`` if it has none (written before checksums)."""
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return None
    fields = sidecar.read_text().split()
    return fields[0] if fields else ""


def verify_checkpoint(path: Union[str, Path]) -> Optional[bool]:
    """``True`` if ``path`` matches its recorded checksum, ``False`` if not, ``None`` if it records none."""
    expected = recorded_digest(path)
    if expected is None:
        return None
    return Path(path).is_file() and file_digest(path) == expected


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
    # The checksum first: a crash between the two renames leaves a sidecar without its checkpoint (ignored),
    # never a checkpoint that verifies against nothing.
    _write_atomically(checksum_path(path), f"{file_digest(temporary)}  {path.name}\n".encode())
    os.replace(temporary, path)
    return path


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; a missing, corrupt or foreign file is a ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if verify_checkpoint(path) is False:
        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 differs from the one recorded in "
                              f"{checksum_path(path).name} when it was written")
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


def per_rank_modules(module: nn.Module) -> dict[str, nn.Module]:
    """``{name: submodule}`` for every submodule of ``module`` (itself included, as ``""``) whose class sets
    ``per_rank_state = True``, in ``named_modules`` order."""
    return {name: sub for name, sub in module.named_modules() if getattr(sub, "per_rank_state", False)}


def rank_state(module: nn.Module) -> dict[str, Any]:
    """This process's per-rank state: ``{name: extra state}`` of ``per_rank_modules(module)``, with every
    tensor on the CPU (so that it can be gathered from CUDA ranks and saved from rank 0)."""
    return {name: to_cpu(sub.get_extra_state()) for name, sub in per_rank_modules(module).items()}


def check_rank_states(module: nn.Module, payload: dict[str, Any], *, world_size: int,
                      path: Union[str, Path]) -> bool:
    """Whether ``payload`` holds per-rank state for ``module`` that a run of ``world_size`` processes can restore.

    False when there is nothing to restore: ``module`` has no per-rank state, or the checkpoint predates
    ``rank_states`` (the modules then keep what ``task`` held: rank 0's state). Raises a ``CheckpointError``
    when the checkpoint was written by a different number of processes, or lacks one of the modules.
    """
    modules = per_rank_modules(module)
    saved = payload.get("rank_states")
    if not modules or saved is None:
        return False
    if len(saved) != world_size:
        raise CheckpointError(
            f"checkpoint {path} holds per-rank state ({', '.join(m or '<task>' for m in modules)}) written by "
            f"{len(saved)} process(es), but this run has {world_size}: each process resumes its own state, so "
            f"resume with the same number of processes (torchrun --nproc_per_node={len(saved)}, or a plain "
            "single process if that is 1), or start a new run directory. The checkpoint is left unchanged.")
    for rank, entry in enumerate(saved):
        missing = sorted(set(modules) - set(entry))
        if missing:
            raise CheckpointError(f"checkpoint {path} has no per-rank state of rank {rank} for {missing} (it has "
                                  f"{sorted(entry)}); load it with the run's own operative_config.gin, or start a "
                                  "new run directory")
    return True


def restore_rank_state(module: nn.Module, payload: dict[str, Any], *, rank: int, world_size: int,
                       path: Union[str, Path]) -> bool:
    """Give each per-rank module of ``module`` rank ``rank``'s state from ``payload["rank_states"]``.

    Checks first (``check_rank_states``), so a refused checkpoint changes no module; returns whether anything
    was restored. Call it after ``module.load_state_dict(payload["task"])``, which gives every rank rank 0's.
    """
    if not check_rank_states(module, payload, world_size=world_size, path=path):
        return False
    entry = payload["rank_states"][rank]
    for name, sub in per_rank_modules(module).items():
        sub.set_extra_state(entry[name])
    return True


def list_checkpoints(directory: Union[str, Path]) -> list[Path]:
    """Checkpoints in ``directory`` sorted by step (temporary files ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.fullmatch(p.name))


def latest_checkpoint(directory: Union[str, Path]) -> Optional[Path]:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def newest_verified(directory: Union[str, Path]) -> Optional[Path]:
    """The newest checkpoint that matches its checksum (or records none), without loading it."""
    for path in reversed(list_checkpoints(directory)):
        if verify_checkpoint(path) is not False:
            return path
    return None


def load_newest_verified(directory: Union[str, Path], map_location: Union[str, torch.device] = "cpu",
                         ) -> tuple[Optional[Path], Optional[dict[str, Any]], list[str]]:
    """``(path, payload, notes)`` of the newest checkpoint in ``directory`` that verifies and loads; ``notes``
    name each newer one skipped and why. ``(None, None, [])`` when there are none; a ``CheckpointError`` naming
    every failure when none of them loads (nothing is deleted)."""
    found = list_checkpoints(directory)
    failures = []
    for path in reversed(found):
        try:
            payload = load_checkpoint(path, map_location=map_location)
        except CheckpointError as error:
            failures.append(str(error))
            continue
        notes = [f"skipped: {failure}" for failure in failures]
        if failures:
            notes.append(f"falling back to {path.name}, the newest checkpoint that verifies")
        return path, payload, notes
    if not found:
        return None, None, []
    raise CheckpointError(f"no checkpoint in {directory} verifies ({len(found)} tried: {'; '.join(failures)}). "
                          "They are left as they are; start over in a new --out (or with --fresh, which moves "
                          "this run aside)")


def prune_checkpoints(directory: Union[str, Path], keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (and their checksums)."""
    for path in list_checkpoints(directory)[:-keep]:
        path.unlink()
        checksum_path(path).unlink(missing_ok=True)


def history_lines(path: Union[str, Path], step: int) -> list[str]:
    """The lines of a ``history.jsonl`` for steps ``<= step`` (a line a crash cut short is dropped)."""
    path = Path(path)
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if float(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    return kept


def history_digest(lines: list[str]) -> str:
    return hashlib.sha256("".join(line + "\n" for line in lines).encode()).hexdigest()


def verify_history(path: Union[str, Path], step: int, expected: Optional[str]) -> Optional[str]:
    """Check a run's ``history.jsonl`` up to ``step`` against the digest its checkpoint recorded. On a mismatch
    the file is kept aside as ``history.jsonl.unverified`` (nothing is lost) and a note saying so is returned;
    ``None`` when it verifies or the checkpoint recorded no digest."""
    path = Path(path)
    if expected is None or history_digest(history_lines(path, step)) == expected:
        return None
    aside = path.with_name(path.name + ".unverified")
    if path.is_file():
        os.replace(path, aside)
    return (f"{path.name} does not match the checksum recorded at step {step} (edited or corrupt): kept as "
            f"{aside.name}; the history restarts at step {step}")
