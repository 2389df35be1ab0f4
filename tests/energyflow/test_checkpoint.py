"""Checkpoints: atomic, weights_only-loadable, refused when from another model or truncated; per-rank state
saved for every rank, restored to each, refused under another number of processes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from energyflow.checkpoint import (CheckpointError, check_fingerprint, check_rank_states, checkpoint_path, checksum_path,
                                   fingerprint,
                                   list_checkpoints, load_checkpoint, per_rank_modules, prune_checkpoints, rank_state,
                                   restore_rank_state, save_checkpoint)
from energyflow.objectives import ContrastiveDivergence, PersistentChains, ReplayBuffer
from energyflow.tasks import LanguageModelTask
from samplers import Langevin


def _payload(task):
    return {"step": 3, "fingerprint": fingerprint(task), "task": task.state_dict(), "config": "x = 1\n"}


def test_round_trip_with_weights_only_and_no_temporary_left(tmp_path, make_task):
    task = make_task()
    path = save_checkpoint(checkpoint_path(tmp_path, 3), _payload(task))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003.pt", "step_00000003.pt.sha256"]
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
    with pytest.raises(CheckpointError, match="corrupt: its SHA-256 differs"):  # caught by its checksum
        load_checkpoint(path)
    checksum_path(path).unlink()  # a checkpoint from before checksums: torch's own reading still refuses it
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


def _per_rank_owner(seed):
    """A module holding both per-rank kinds (a replay buffer and persistent chains), filled from ``seed``."""
    owner = nn.ModuleDict({"buffer": ReplayBuffer(capacity=4, fraction=0.5),
                           "cd": ContrastiveDivergence(Langevin(0.05), chains=PersistentChains(capacity=3)),
                           "plain": nn.Linear(2, 2)})
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(256, (2, 3, 5), generator=generator)
    owner["buffer"].push(tokens[0], tokens[1], torch.randn(3, 5, 7, generator=generator))
    owner["cd"].chains.draw(torch.zeros(2, 2), generator)
    return owner


def test_per_rank_state_is_found_by_marker_saved_per_rank_and_restored_to_each(tmp_path):
    ranks = [_per_rank_owner(seed) for seed in (0, 1)]
    assert list(per_rank_modules(ranks[0])) == ["buffer", "cd.chains"]  # the Linear and the module dict: not
    assert per_rank_modules(nn.Linear(2, 2)) == {}
    path = save_checkpoint(checkpoint_path(tmp_path, 3), {"task": ranks[0].state_dict(),
                                                          "rank_states": [rank_state(m) for m in ranks]})
    payload = torch.load(path, weights_only=True)  # plain tensors, ints and containers only
    for rank in (0, 1):
        fresh = _per_rank_owner(seed=7)
        fresh.load_state_dict(payload["task"])  # what the trainer does first: everyone gets rank 0's
        assert restore_rank_state(fresh, payload, rank=rank, world_size=2, path=path)
        expected = ranks[rank]
        assert fresh["buffer"].size == expected["buffer"].size == 3 and fresh["buffer"].position == 3
        for mine, theirs in zip(fresh["buffer"]._fields, expected["buffer"]._fields):
            assert torch.equal(mine, theirs)
        assert torch.equal(fresh["cd"].chains.chains, expected["cd"].chains.chains)
    assert not torch.equal(ranks[0]["cd"].chains.chains, ranks[1]["cd"].chains.chains)  # the test can tell them apart


def test_per_rank_state_from_another_number_of_processes_is_refused_before_anything_changes(tmp_path):
    payload = {"rank_states": [rank_state(_per_rank_owner(seed)) for seed in (0, 1)]}
    module = _per_rank_owner(seed=5)
    before = module["cd"].chains.chains.clone()
    with pytest.raises(CheckpointError, match=r"\(buffer, cd.chains\) written by 2 process\(es\), but this run has 1"
                                              r".*resume with the same number of processes \(torchrun "
                                              r"--nproc_per_node=2"):
        restore_rank_state(module, payload, rank=0, world_size=1, path="ckpt.pt")
    with pytest.raises(CheckpointError, match="written by 2 process.*this run has 4"):
        check_rank_states(module, payload, world_size=4, path="ckpt.pt")
    assert torch.equal(module["cd"].chains.chains, before)
    # fine: a module with no per-rank state (any number of processes), a checkpoint from before rank_states
    assert not check_rank_states(nn.Linear(2, 2), payload, world_size=1, path="ckpt.pt")
    assert not restore_rank_state(module, {"task": {}}, rank=1, world_size=2, path="ckpt.pt")
    assert torch.equal(module["cd"].chains.chains, before)
    payload["rank_states"][1].pop("cd.chains")
    with pytest.raises(CheckpointError, match=r"no per-rank state of rank 1 for \['cd.chains'\]"):
        check_rank_states(module, payload, world_size=2, path="ckpt.pt")


class _Tally(nn.Module):
    """Per-rank state by the protocol: the number of sequences this process has trained on."""

    per_rank_state = True

    def __init__(self):
        super().__init__()
        self.seen = 0

    def get_extra_state(self):
        return {"seen": self.seen}

    def set_extra_state(self, state):
        self.seen = int(state["seen"])


class _TallyTask(LanguageModelTask):
    def __init__(self, model):
        super().__init__(model)
        self.tally = _Tally()

    def loss(self, batch, *, step, generator):
        self.tally.seen += batch["tokens"].shape[0]
        return super().loss(batch, step=step, generator=generator)


def test_trainer_saves_rank_states_and_refuses_a_checkpoint_of_another_world_size_intact(tmp_path, make_task,
                                                                                        make_trainer, tiny_data):
    make_trainer(num_steps=3).fit(_TallyTask(make_task().model), tiny_data, tmp_path)
    path = tmp_path / "checkpoints" / "step_00000003.pt"
    payload = load_checkpoint(path)
    assert payload["rank_states"] == [{"tally": {"seen": 12}}]  # one process: one entry
    # an old checkpoint (no rank_states) still resumes: the task's own extra state is used
    del payload["rank_states"]
    save_checkpoint(path, {k: v for k, v in payload.items() if k != "format"})
    resumed = _TallyTask(make_task().model)
    make_trainer(num_steps=4).fit(resumed, tiny_data, tmp_path)
    assert resumed.tally.seen == 16
    # a checkpoint written by two processes is refused by one, and left as it was
    path = tmp_path / "checkpoints" / "step_00000004.pt"
    payload = load_checkpoint(path)
    payload["rank_states"] = [{"tally": {"seen": 8}}, {"tally": {"seen": 8}}]
    save_checkpoint(path, {k: v for k, v in payload.items() if k != "format"})
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}  # checkpoints, logs: all of it
    with pytest.raises(CheckpointError, match=r"\(tally\) written by 2 process\(es\), but this run has 1.*"
                                              r"--nproc_per_node=2"):
        make_trainer(num_steps=6).fit(_TallyTask(make_task().model), tiny_data, tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    # a task without per-rank state does not care how many processes wrote the checkpoint
    plain = tmp_path / "plain"
    make_trainer(num_steps=3).fit(make_task(), tiny_data, plain)
    path = plain / "checkpoints" / "step_00000003.pt"
    payload = load_checkpoint(path)
    assert payload["rank_states"] == [{}]
    save_checkpoint(path, {**{k: v for k, v in payload.items() if k != "format"}, "rank_states": [{}, {}]})
    assert [e["step"] for e in make_trainer(num_steps=4).fit(make_task(), tiny_data, plain).history] == [4.0]
