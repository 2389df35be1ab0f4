"""DistributedDataParallel: two CPU processes (gloo, launched by torchrun) == one process, same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gin
import pytest
import torch

from energyflow.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
BINDINGS = ["NUM_STEPS = 3", "Trainer.batch_size = 4", "Trainer.progress = False", "SEQ_LEN = 32",
            "Trainer.eval_batches = 2", "Trainer.checkpoint_every = 3"]


def _history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def _validation(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [event.value for event in events.Scalars("validation/loss")]


def test_two_processes_match_one(tmp_path):
    single = tmp_path / "single"
    from energyflow.cli import main

    assert main(["train", "experiments/transformer_pp_debug.gin", "--out", str(single),
                 *(arg for b in BINDINGS for arg in ("--bind", b))]) == 0
    gin.clear_config()
    double = tmp_path / "double"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    logs = tmp_path / "rank_logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--log-dir", str(logs), "--redirects", "3", "-m", "energyflow.cli", "train",
               "experiments/transformer_pp_debug.gin", "--out", str(double),
               *(arg for b in BINDINGS for arg in ("--bind", b))]
    completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    # torchrun exits 0 only if every rank did; its summary names a failed rank's exit code (e.g. -6, SIGABRT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank_errors = {path.parent.name: path.read_text() for path in logs.rglob("stderr.log")}
    assert sorted(rank_errors) == ["0", "1"], rank_errors
    for rank, stderr in rank_errors.items():  # a rank that aborts at exit after training prints this
        for sign in ("terminate called", "Traceback", "Warning:"):  # Warning: e.g. deprecated DDP arguments
            assert sign not in stderr, f"rank {rank}: {stderr[-3000:]}"
    one, two = _history(single), _history(double)
    assert [e["step"] for e in two] == [1, 2, 3]  # only rank 0 writes
    # Same global batch, split 2 + 2 instead of 4: equal up to float32 summation order.
    for key in ("loss", "grad_norm"):
        assert [e[key] for e in two] == pytest.approx([e[key] for e in one], rel=1e-5), key
    # validation batches are shared out over the ranks and all-reduced: the same number as one process
    assert len(_validation(single)) == 1  # the end-of-run evaluation
    assert _validation(double) == pytest.approx(_validation(single), rel=1e-5)
    weights_one = load_checkpoint(single / "checkpoints" / "step_00000003.pt")["task"]
    weights_two = load_checkpoint(double / "checkpoints" / "step_00000003.pt")["task"]
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=1e-5, atol=1e-6, msg=name)
