"""The shared trainer: exact resume, NaN guard, accumulation, clipping, parameter groups, checkpoints, logs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from energyflow.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from energyflow.distributed import resolve_device
from energyflow.tasks import LanguageModelTask
from energyflow.trainer import TrainingDiverged


def _losses(result):
    return [entry["loss"] for entry in result.history]


class _CrashAt(LanguageModelTask):
    """The real task, made to fail at a chosen step: a crash (exception) or a NaN loss."""

    def __init__(self, model, *, step, nan):
        super().__init__(model)
        self.fail_step, self.nan = step, nan

    def loss(self, batch, *, step, generator):
        loss, metrics = super().loss(batch, step=step, generator=generator)
        if step == self.fail_step and not self.nan:
            raise KeyboardInterrupt("simulated preemption")
        if step == self.fail_step:
            loss = loss * float("nan")
            metrics = {"loss": loss.detach()}
        return loss, metrics


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, make_task, make_trainer, tiny_data):
    reference = make_trainer().fit(make_task(), tiny_data, tmp_path / "full")
    interrupted = _CrashAt(make_task().model, step=5, nan=False)  # dies in step 6, after logging 4 and 5
    with pytest.raises(KeyboardInterrupt):
        make_trainer().fit(interrupted, tiny_data, tmp_path / "cut")
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step_00000003.pt"]
    with open(tmp_path / "cut" / "history.jsonl", "a") as handle:
        handle.write('{"step": 6.0, "lo')  # a line cut short by the crash
    resumed = make_trainer().fit(make_task(seed=5), tiny_data, tmp_path / "cut")  # weights come from the checkpoint
    assert [e["step"] for e in resumed.history] == [4.0, 5.0, 6.0]
    assert _losses(resumed) == _losses(reference)[3:]  # exact equality, not allclose
    assert resumed.validation == reference.validation
    logged = [json.loads(line)["step"] for line in (tmp_path / "cut" / "history.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]  # what the crashed run logged after its checkpoint was dropped
    for name, value in reference.task.state_dict().items():
        assert torch.equal(value, resumed.task.state_dict()[name]), name


def test_nan_guard_names_step_and_metric_and_keeps_the_last_good_checkpoint(tmp_path, make_task, make_trainer,
                                                                           tiny_data):
    task = _CrashAt(make_task().model, step=4, nan=True)
    with pytest.raises(TrainingDiverged, match=r"step 5: metric 'loss' is nan") as caught:
        make_trainer(checkpoint_every=2).fit(task, tiny_data, tmp_path)
    good = tmp_path / "checkpoints" / "step_00000004.pt"
    assert caught.value.last_checkpoint == good and str(good) in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["step_00000002.pt", "step_00000004.pt"]
    payload = load_checkpoint(good)
    assert payload["step"] == 4 and all(torch.isfinite(v).all() for v in payload["task"].values())
    # The NaN step's update was not applied: the live weights are still the checkpointed ones.
    for name, value in task.state_dict().items():
        assert torch.equal(value, payload["task"][name]), name


def test_gradient_accumulation_matches_one_big_batch(tmp_path, make_task, make_trainer, tiny_data):
    whole = make_trainer(num_steps=3).fit(make_task(), tiny_data, tmp_path / "a")
    split = make_trainer(num_steps=3, accumulation_steps=2).fit(make_task(), tiny_data, tmp_path / "b")
    # same global batch; only the summation order differs (float32 rounding)
    assert _losses(split) == pytest.approx(_losses(whole), rel=1e-5)


def test_grad_clip_rescales_the_gradient_adam_sees(tmp_path, make_task, make_trainer, tiny_data):
    def first_step(clip):
        out = tmp_path / str(clip)
        result = make_trainer(num_steps=1, grad_clip=clip).fit(make_task(), tiny_data, out)
        state = load_checkpoint(out / "checkpoints" / "step_00000001.pt")["optimizer"]["state"].values()
        # after one step Adam's second moment is (1 - beta2) * g^2, so it reveals the applied gradient's norm
        applied = math.sqrt(sum(s["exp_avg_sq"].sum().item() for s in state) / (1 - 0.999))
        return applied, result.history[0]["grad_norm"]

    applied, norm = first_step(0.5)
    unclipped, same_norm = first_step(None)
    assert norm == pytest.approx(same_norm) and norm > 1.0  # the logged norm is the one before clipping
    assert applied == pytest.approx(0.5, rel=1e-4) and unclipped == pytest.approx(norm, rel=1e-4)


def test_lr_multipliers_and_schedule_reach_the_optimizer(tmp_path, make_task, make_trainer, tiny_data):
    trainer = make_trainer(num_steps=4, warmup_steps=2, lr_multipliers={"*embed*": 10.0}, min_lr_ratio=0.5)
    result = trainer.fit(make_task(), tiny_data, tmp_path)
    assert [e["learning_rate"] for e in result.history] == pytest.approx([1.5e-3, 3e-3, 2.25e-3, 1.5e-3])
    optimizer = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])["optimizer"]
    multipliers = {g["name"]: g["lr_multiplier"] for g in optimizer["param_groups"]}
    assert multipliers == {"lr_x10": 10.0, "lr_x1": 1.0, "lr_x1_no_decay": 1.0}


def test_checkpoints_cadence_keep_and_resume_flag(tmp_path, make_task, make_trainer, tiny_data):
    make_trainer(checkpoint_every=2, keep_checkpoints=2).fit(make_task(), tiny_data, tmp_path, config="a = 1\n")
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000004.pt", "step_00000006.pt"]
    payload = load_checkpoint(tmp_path / "checkpoints" / "step_00000006.pt")
    assert payload["config"] == "a = 1\n" and payload["data"]["position"] == 6 * 4
    with pytest.raises(CheckpointError, match="resume is False"):
        make_trainer(resume=False).fit(make_task(), tiny_data, tmp_path)
    with pytest.raises(Exception, match="different model"):
        make_trainer().fit(make_task(dim=64), tiny_data, tmp_path)


def test_history_tensorboard_and_eval_every(tmp_path, make_task, make_trainer, tiny_data):
    result = make_trainer(eval_every=2).fit(make_task(), tiny_data, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert set(lines[0]) >= {"loss", "perplexity", "grad_norm", "learning_rate", "objective"}
    assert lines[0]["perplexity"] == pytest.approx(math.exp(lines[0]["loss"]))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/perplexity", "train/grad_norm", "learning_rate/lr_x1"} <= tags
    assert [e.step for e in events.Scalars("validation/loss")] == [2, 4, 6]  # eval_every=2 plus the end
    assert result.validation["perplexity"] == pytest.approx(math.exp(result.validation["loss"]))


def test_progress_bar_and_end_table(tmp_path, make_task, make_trainer, tiny_data, capsys):
    make_trainer(num_steps=2, progress=True).fit(make_task(), tiny_data, tmp_path / "on")
    shown = capsys.readouterr().out
    make_trainer(num_steps=2, progress=False).fit(make_task(), tiny_data, tmp_path / "off")
    quiet = capsys.readouterr().out
    assert "end of run" in shown and "end of run" in quiet and "validation" in quiet
    assert "2/2" in shown and "2/2" not in quiet


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="'auto', 'cpu' or 'cuda'"):
        resolve_device("tpu")


def test_optimizer_settings_seed_and_eval_batches_take_effect(tmp_path, make_task, make_trainer, tiny_data):
    trainer = make_trainer(num_steps=2, betas=(0.8, 0.95), weight_decay=0.1, eval_batch_size=3, eval_batches=5)
    result = trainer.fit(make_task(), tiny_data, tmp_path / "a")
    groups = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000002.pt")["optimizer"]["param_groups"]
    assert {tuple(g["betas"]) for g in groups} == {(0.8, 0.95)}
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]
    assert [w.shape[0] for w in result.validation_windows] == [3] * 5
    other_seed = make_trainer(num_steps=2, seed=1).fit(make_task(), tiny_data, tmp_path / "b")
    same_seed = make_trainer(num_steps=2).fit(make_task(), tiny_data, tmp_path / "c")
    assert _losses(other_seed)[0] != _losses(same_seed)[0]  # the seed orders the data


def test_batch_size_must_split_over_processes_and_accumulation(make_trainer):
    with pytest.raises(ValueError, match="not divisible by world_size \\* accumulation_steps"):
        make_trainer(batch_size=6, accumulation_steps=4).micro_batch(world_size=1)
    assert make_trainer(batch_size=8, accumulation_steps=2).micro_batch(world_size=2) == 2


class _Counting(LanguageModelTask):
    """A task with non-parameter state (as an EBT's replay buffer): sequences seen so far."""

    def __init__(self, model):
        super().__init__(model)
        self.seen = 0

    def loss(self, batch, *, step, generator):
        self.seen += batch["tokens"].shape[0]
        return super().loss(batch, step=step, generator=generator)

    def get_extra_state(self):
        return {"seen": torch.tensor(self.seen)}

    def set_extra_state(self, state):
        self.seen = int(state["seen"])


def test_task_extra_state_is_checkpointed_and_restored(tmp_path, make_task, make_trainer, tiny_data):
    make_trainer(num_steps=3).fit(_Counting(make_task().model), tiny_data, tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "step_00000003.pt")["task"]["_extra_state"]["seen"] == 12
    resumed = _Counting(make_task().model)
    make_trainer(num_steps=5).fit(resumed, tiny_data, tmp_path)
    assert resumed.seen == 5 * 4


class _ThreadsSeen(LanguageModelTask):
    """The real task, recording how many intra-op threads each training step runs with."""

    def __init__(self, model):
        super().__init__(model)
        self.threads_seen = []

    def loss(self, batch, *, step, generator):
        self.threads_seen.append(torch.get_num_threads())
        return super().loss(batch, step=step, generator=generator)


def test_num_threads_is_applied_when_training_starts(tmp_path, make_task, make_trainer, tiny_data):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        task = _ThreadsSeen(make_task().model)
        make_trainer(num_steps=2, num_threads=1).fit(task, tiny_data, tmp_path / "one")
        assert task.threads_seen == [1, 1]
        torch.set_num_threads(2)
        task = _ThreadsSeen(make_task().model)
        make_trainer(num_steps=2).fit(task, tiny_data, tmp_path / "default")  # None leaves torch's setting
        assert task.threads_seen == [2, 2]
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="num_threads"):
        make_trainer(num_threads=0)


def _denormals_survive() -> bool:
    """True if this thread keeps denormal floats (1e-39 * 1 stays 1e-39), False if it flushes them to zero."""
    return float(torch.tensor([1e-39]) * 1.0) != 0.0


def test_a_cpu_run_retains_freed_memory_and_hands_it_back_when_fit_returns(tmp_path, make_task, make_trainer,
                                                                          tiny_data, monkeypatch):
    from energyflow import host_memory

    calls = []
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: calls.append("retain") or True)
    monkeypatch.setattr(host_memory, "release_freed_memory", lambda: calls.append("release") or True)
    first = make_trainer(num_steps=2).fit(make_task(), tiny_data, tmp_path / "default")
    assert calls == ["retain", "release"]
    calls.clear()
    second = make_trainer(num_steps=2, retain_freed_memory=False).fit(make_task(), tiny_data, tmp_path / "off")
    assert calls == []
    assert _losses(first) == _losses(second)  # where memory comes from changes no number


class _DenormalsSeen(LanguageModelTask):
    def __init__(self, model):
        super().__init__(model)
        self.denormals_seen = []

    def loss(self, batch, *, step, generator):
        self.denormals_seen.append(_denormals_survive())
        return super().loss(batch, step=step, generator=generator)


def test_denormals_are_flushed_while_training_and_restored_after(tmp_path, make_task, make_trainer, tiny_data):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero mode (torch.set_flush_denormal is x86/SSE3 only)")
    assert _denormals_survive()
    task = _DenormalsSeen(make_task().model)
    make_trainer(num_steps=2).fit(task, tiny_data, tmp_path / "default")
    assert task.denormals_seen == [False, False]  # flushed during every step ...
    assert _denormals_survive()  # ... and the process is left as it was found
    task = _DenormalsSeen(make_task().model)
    make_trainer(num_steps=2, flush_denormal=False).fit(task, tiny_data, tmp_path / "off")
    assert task.denormals_seen == [True, True]
