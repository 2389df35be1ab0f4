"""Checkpoints: atomic, weights_only-loadable, refused when from another model or truncated."""
from __future__ import annotations

import pytest
import torch

from energyflow.checkpoint import (CheckpointError, check_fingerprint, checkpoint_path, fingerprint, list_checkpoints,
                                   load_checkpoint, prune_checkpoints, save_checkpoint)


def _payload(task):
    return {"step": 3, "fingerprint": fingerprint(task), "task": task.state_dict(), "config": "x = 1\n"}


def test_round_trip_with_weights_only_and_no_temporary_left(tmp_path, make_task):
    task = make_task()
    path = save_checkpoint(checkpoint_path(tmp_path, 3), _payload(task))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003.pt"]
    raw = torch.load(path, weights_only=True)  # what any user can do, with no pickle of code
    assert raw["config"] == "x = 1\n"
    payload = load_checkpoint(path)
    check_fingerprint(payload, make_task(seed=1), path)  # same architecture, other weights: accepted
    assert torch.equal(payload["task"]["model.embed.weight"], task.state_dict()["model.embed.weight"])


def test_checkpoint_from_another_model_is_refused(tmp_path, make_task):
    path = save_checkpoint(checkpoint_path(tmp_path, 3), _payload(make_task()))
    with pytest.raises(CheckpointError, match="different model.*shapes differ"):
        check_fingerprint(load_checkpoint(path), make_task(dim=64), path)


def test_truncated_or_foreign_checkpoint_is_refused(tmp_path, make_task):
    path = save_checkpoint(checkpoint_path(tmp_path, 3), _payload(make_task()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not an energyflow checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_prune_keeps_the_newest(tmp_path, make_task):
    for step in (1, 2, 3):
        save_checkpoint(checkpoint_path(tmp_path, step), _payload(make_task()))
    (tmp_path / "step_00000009.pt.tmp").write_bytes(b"partial")  # an interrupted write is ignored
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000003.pt"]
