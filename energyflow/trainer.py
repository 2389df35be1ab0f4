"""The one trainer for every task: CPU or CUDA, DDP, accumulation, clipping, schedule, checkpoints, guards.

``Trainer(...).fit(task, data, out_dir)`` trains a ``energyflow.tasks.Task`` on any ``energyflow.data.DataSource``.
Exact resume: the model, optimizer and data position are checkpointed; the learning rate is a pure
function of the step; all randomness is reseeded from (seed, step, micro-batch, rank) at every step; and
every rank's per-rank module state (replay buffers, persistent chains) is checkpointed and given back to
that rank, so a run stopped and resumed, with one process or under ``torchrun``, reproduces the
uninterrupted run bit for bit on CPU.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from energyflow import checkpoint as ckpt
from energyflow import distributed, host_memory
from energyflow.data import DataSource
from energyflow.evaluation import evaluate_task
from energyflow.metrics import mean_metrics, with_perplexities
from energyflow.monitor import Monitor
from energyflow.optim import build_optimizer, param_groups, set_learning_rates, warmup_cosine
from energyflow.tasks import Task


DTYPES = {"float32": torch.float32, "float64": torch.float64}
AUTOCAST = ("auto", "bf16", "off")


class TrainingDiverged(RuntimeError):
    """A training metric became NaN/Inf; the weights were not updated and no checkpoint was written."""

    def __init__(self, step: int, metric: str, value: float, last_checkpoint: Optional[Path]) -> None:
        self.step, self.metric, self.value, self.last_checkpoint = step, metric, value, last_checkpoint
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        super().__init__(f"training diverged at step {step}: metric {metric!r} is {value}. The update was not "
                         f"applied; {where}. Lower the learning rate, tighten grad_clip or check the data.")


@dataclass
class RunResult:
    """What ``fit`` returns: the trained task, the data source, its validation batches (raw, as the source
    keeps them: ``data.to_batch`` makes the task's batch), the per-step history of this process (``step`` =
    steps completed, 1-based), the final validation, and notes (what a command should say about how the run
    was loaded, e.g. a corrupt checkpoint skipped)."""

    out_dir: Path
    task: Task
    data: DataSource
    validation_windows: list[Tensor]
    device: torch.device
    history: list[dict[str, float]] = field(default_factory=list)
    validation: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. checkpoints skipped for a failed checksum


def _seed_for(seed: int, step: int, micro: int, rank: int) -> int:
    """A distinct, reproducible seed per (run seed, step, micro-batch, rank)."""
    return (((seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + rank) % (2**63 - 1)


_INTS = {"num_steps": 1, "batch_size": 1, "eval_batches": 1, "checkpoint_every": 1, "keep_checkpoints": 1,
         "accumulation_steps": 1, "warmup_steps": 0, "eval_every": 0, "seed": None}  # name -> minimum
_OPTIONAL_INTS = {"num_threads": 1, "eval_batch_size": 1}
_BOOLS = ("progress", "resume", "flush_denormal", "retain_freed_memory")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_settings(settings: Mapping[str, object]) -> None:
    """Refuse a setting of the wrong type or range when the trainer is built (one line naming the parameter),
    not at the step where it would first be used."""
    for name, minimum in {**_INTS, **_OPTIONAL_INTS}.items():
        value = settings[name]
        if value is None and name in _OPTIONAL_INTS:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            kind = "None or an integer" if name in _OPTIONAL_INTS else "an integer"
            raise ValueError(f"Trainer.{name} must be {kind}, got {value!r} ({type(value).__name__})")
        if minimum is not None and value < minimum:
            raise ValueError(f"Trainer.{name} must be >= {minimum}, got {value}")
    for name in _BOOLS:
        if not isinstance(settings[name], bool):
            raise ValueError(f"Trainer.{name} must be True or False, got {settings[name]!r}")
    learning_rate, min_lr_ratio, weight_decay = (settings[n] for n in ("learning_rate", "min_lr_ratio",
                                                                     "weight_decay"))
    if not _number(learning_rate) or not learning_rate > 0:
        raise ValueError(f"Trainer.learning_rate must be a number > 0, got {learning_rate!r}")
    if not _number(min_lr_ratio) or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"Trainer.min_lr_ratio must be a number in [0, 1], got {min_lr_ratio!r}")
    if not _number(weight_decay) or weight_decay < 0:
        raise ValueError(f"Trainer.weight_decay must be a number >= 0, got {weight_decay!r}")
    betas = settings["betas"]
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(_number(b) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"Trainer.betas must be a pair of numbers in [0, 1), e.g. (0.9, 0.999), got {betas!r}")
    grad_clip = settings["grad_clip"]
    if grad_clip is not None and (not _number(grad_clip) or not grad_clip > 0):
        raise ValueError(f"Trainer.grad_clip must be a number > 0, or None for no clipping, got {grad_clip!r}")
    if not isinstance(settings["device"], str):
        raise ValueError(f"Trainer.device must be 'auto', 'cpu' or 'cuda' (a string), got {settings['device']!r}")


class Trainer:
    """Training settings; ``fit`` runs them. ``batch_size`` is the *global* batch in sequences per optimizer
    step: ``world_size * accumulation_steps * micro_batch``. ``lr_multipliers`` maps parameter-name globs to
    learning-rate multipliers (merged over the task's own). ``eval_every=0`` validates only at the end.
    ``num_threads``: CPU threads for intra-op parallelism (``torch.set_num_threads``), set when ``fit`` starts
    and left so for the process; ``None`` keeps torch's default. On a loaded, shared CPU fewer threads than
    cores can be faster (each op's threads wait on the slowest).
    ``flush_denormal`` (default on): during ``fit`` the CPU flushes denormal floats to zero
    (``torch.set_flush_denormal``; x86 with SSE3, ignored elsewhere), switched off again when ``fit`` returns.
    The second-order passes of EBT training produce many denormals (tiny gradients of an energy whose head
    starts near zero), and arithmetic on them is ~8x slower on x86: the first EBT step took 13.7 s instead
    of 6.7 s and later ones 2-5% longer without it (benchmarks/train_step.py). Values below ~1e-38 become 0;
    nothing a float32 loss can resolve changes. The mode is per thread: the training thread and intra-op
    worker threads started after it get it.
    ``retain_freed_memory`` (default on): on a CPU run (Linux, glibc), the memory a step frees stays in the
    process for the next step instead of going back to the kernel and being faulted in, zeroed, again
    (``energyflow.host_memory``); when ``fit`` returns, the free part is handed back (``malloc_trim``). The
    EBT's step frees ~3 GiB of second-order graph at xxs: 77,000 minor page faults and 0.63 s of kernel time
    per 6.4 s step without it, 10,500 and 0.15 s per 6.1 s step with it (benchmarks/host_memory.py). The allocator's thresholds stay set for the process
    (glibc cannot restore its adaptive default); the numbers a step computes do not change.
    ``dtype``: the weights' (and so the descent states') precision, ``"float32"`` or ``"float64"``. A float64
    run is ~2x slower but its loss curve is the same on every CPU to ~1e-12: what golden-curve tests record,
    since the EBT's large learned step sizes amplify float32 rounding differences between CPUs and BLAS builds
    (0.3% by the fourth step of the System 1 debug recipe).
    ``autocast``: the loss under ``torch.autocast(bfloat16)``: ``"auto"`` (default) on CUDA only, ``"bf16"`` on
    any device (CPU too: ``recipes/experiments/ebt_system1_bf16_debug.gin``), ``"off"``. The weights, the
    optimizer and the descent states stay in ``dtype``; the EBT's loss and states are float32 (the objective
    keeps them there), matrix multiplies run in bf16. A bf16 run of a float64 ``dtype`` is refused."""

    def __init__(self, *, num_steps: int, batch_size: int, learning_rate: float, accumulation_steps: int = 1,
                 warmup_steps: int = 0, min_lr_ratio: float = 0.1, weight_decay: float = 0.01,
                 betas: Sequence[float] = (0.9, 0.999), grad_clip: Optional[float] = 1.0,
                 lr_multipliers: Optional[Mapping[str, float]] = None, checkpoint_every: int = 1000,
                 keep_checkpoints: int = 3, eval_every: int = 0, eval_batches: int = 8,
                 eval_batch_size: Optional[int] = None, seed: int = 0, device: str = "auto",
                 progress: bool = True, resume: bool = True, num_threads: Optional[int] = None,
                 flush_denormal: bool = True, retain_freed_memory: bool = True, dtype: str = "float32",
                 autocast: str = "auto") -> None:
        _check_settings(locals())
        if autocast not in AUTOCAST:
            raise ValueError(f"Trainer.autocast must be one of {AUTOCAST}, got {autocast!r}")
        if autocast == "bf16" and dtype == "float64":
            raise ValueError("Trainer.autocast = 'bf16' with dtype = 'float64' would compute a float64 run in bf16; "
                             "use dtype = 'float32' for bf16 autocast, or autocast = 'off' for float64")
        if dtype not in DTYPES:
            raise ValueError(f"Trainer.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.num_steps, self.batch_size, self.learning_rate = num_steps, batch_size, learning_rate
        self.accumulation_steps, self.warmup_steps, self.min_lr_ratio = accumulation_steps, warmup_steps, min_lr_ratio
        self.weight_decay, self.betas, self.grad_clip = weight_decay, tuple(betas), grad_clip
        self.lr_multipliers = dict(lr_multipliers or {})
        self.checkpoint_every, self.keep_checkpoints = checkpoint_every, keep_checkpoints
        self.eval_every, self.eval_batches, self.eval_batch_size = eval_every, eval_batches, eval_batch_size
        self.seed, self.device, self.progress, self.resume = seed, device, progress, resume
        self.num_threads, self.flush_denormal, self.dtype = num_threads, flush_denormal, dtype
        self.autocast, self.retain_freed_memory = autocast, retain_freed_memory

    def autocast_enabled(self, device: torch.device) -> bool:
        """Whether the loss runs under bf16 autocast on ``device``: ``"auto"`` on CUDA only, ``"bf16"`` on any
        device (CPU included), ``"off"`` never."""
        return self.autocast == "bf16" or (self.autocast == "auto" and device.type == "cuda")

    def micro_batch(self, world_size: int) -> int:
        per_step = world_size * self.accumulation_steps
        if self.batch_size % per_step:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by world_size * accumulation_steps = "
                             f"{world_size} * {self.accumulation_steps}; pick a multiple of {per_step}")
        return self.batch_size // per_step

    def validation_batches(self, data: DataSource) -> list[Tensor]:
        """The validation windows every evaluation of this run uses: ``eval_batches`` batches of
        ``eval_batch_size`` (default ``batch_size // accumulation_steps``, independent of the number of
        processes, so a validation number means the same thing under any ``torchrun`` layout)."""
        return data.validation_batches(self.eval_batch_size or self.batch_size // self.accumulation_steps,
                                       self.eval_batches)

    def learning_rate_at(self, step: int) -> float:
        return self.learning_rate * warmup_cosine(step, warmup_steps=self.warmup_steps, total_steps=self.num_steps,
                                                  min_lr_ratio=self.min_lr_ratio)

    def fit(self, task: Task, data: DataSource, out_dir: Union[str, Path], *, config: str = "",
            operative_config: Callable[[], str] = str, scope: str = "") -> RunResult:
        """Train ``task`` for ``num_steps`` optimizer steps, resuming from ``out_dir`` if it has checkpoints.

        ``config`` is written to ``config.gin`` now; ``operative_config()`` to ``operative_config.gin`` after
        the first step; both go into every checkpoint along with the gin ``scope`` of this run.
        """
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        flushing = self.flush_denormal and torch.set_flush_denormal(True)  # False where unsupported
        try:
            return self._fit(task, data, Path(out_dir), config, operative_config, scope)
        finally:
            if flushing:
                torch.set_flush_denormal(False)

    def _fit(self, task: Task, data: DataSource, out_dir: Path, config: str, operative_config: Callable[[], str],
             scope: str) -> RunResult:
        run = _Run(self, task, data, out_dir, config, operative_config, scope)
        retaining = (self.retain_freed_memory and run.context.device.type == "cpu"
                     and host_memory.retain_freed_memory())
        completed = False
        try:
            result = run.execute()
            completed = True
            return result
        finally:
            run.monitor.close(run.final)
            run.model = task  # release DDP (its reducer holds the process group) before the group goes
            distributed.shutdown(run.context, synchronize=completed)
            if retaining:
                host_memory.release_freed_memory()


# What a resume may change: how long to train, where and how it shows, how often it checkpoints and validates.
RESUMABLE = frozenset({"Trainer.num_steps", "Trainer.progress", "Trainer.device", "Trainer.num_threads",
                       "Trainer.checkpoint_every", "Trainer.keep_checkpoints", "Trainer.eval_every",
                       "Trainer.eval_batches", "Trainer.eval_batch_size", "Trainer.resume", "Trainer.flush_denormal",
                       "Trainer.retain_freed_memory", "compare.eval_steps"})
_BINDING = re.compile(r"^([A-Za-z_][\w./]*)\s*=\s*(.*)$")


def config_bindings(text: str) -> dict[str, str]:
    """``selector -> value text`` of a gin config string (``gin.config_str()``), macros substituted into the
    values and dropped as entries; continuation lines joined."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _BINDING.match(line)
        if match and not line[0].isspace():
            current = match.group(1)
            entries[current] = match.group(2).strip()
        elif current is not None:
            entries[current] += " " + line.strip()
    macros = {name: value for name, value in entries.items() if "." not in name.split("/")[-1]}
    reference = re.compile(r"%([A-Za-z_][\w.]*)")
    resolved = {}
    for name, value in entries.items():
        if name in macros:
            continue
        for _ in range(8):  # macros of macros
            value = reference.sub(lambda m: macros.get(m.group(1), m.group(0)), value)
        resolved[name] = value
    return resolved


def _resumable(selector: str) -> bool:
    name = selector.split("/")[-1]
    return name in RESUMABLE or name.endswith(".out_dir") or name.endswith(".program")


def config_differences(old: str, new: str) -> list[str]:
    """``"selector: old -> new"`` for every binding that differs between two config strings, except those a
    resume may change (``RESUMABLE``, output paths)."""
    before, after = config_bindings(old), config_bindings(new)
    changed = []
    for selector in sorted(set(before) | set(after)):
        if _resumable(selector) or before.get(selector) == after.get(selector):
            continue
        changed.append(f"{selector}: {before.get(selector, '(unset)')} -> {after.get(selector, '(unset)')}")
    return changed


def check_run_directory(out_dir: Path, config: str) -> None:
    """Refuse, before anything is written, an ``out_dir`` that is a file, or that holds the run of another
    recipe (its ``config.gin`` differs in more than what a resume may change)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ckpt.RunDirectoryError(f"the run directory {out_dir} is an existing file, not a directory; choose "
                                     "another --out")
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ckpt.RunDirectoryError(f"cannot make the run directory {out_dir}: {parent} is a file; choose "
                                             "another --out")
            break
    previous = out_dir / "config.gin"
    if not config or not previous.is_file() or not previous.read_text().strip():
        return
    changed = config_differences(previous.read_text(), config)
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ckpt.RunDirectoryError(
            f"{out_dir} holds a run of a different recipe or settings ({len(changed)} binding(s) differ from its "
            f"config.gin: {shown}). Resume it with the same recipe and bindings, start over with `energyflow train "
            "... --fresh` (moves the old run aside) or choose a new --out")


def _wrap_ddp(task: Task, device: torch.device) -> DistributedDataParallel:
    """DDP that never re-syncs buffers in forward: state such as a replay buffer is per-rank (all ranks start
    from the same seed; a resumed rank from its own entry of the checkpoint's ``rank_states``). torch >= 2.13
    names this ``forward_sync_buffers`` and deprecates ``broadcast_buffers``."""
    device_ids = [device] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DistributedDataParallel(task, device_ids=device_ids, forward_sync_buffers=False)
    return DistributedDataParallel(task, device_ids=device_ids, broadcast_buffers=False)


class _Run:
    """The mutable state of one ``fit`` call, split into short steps."""

    def __init__(self, trainer: Trainer, task: Task, data: DataSource, out_dir: Path, config: str,
                 operative_config: Callable[[], str], scope: str) -> None:
        self.t, self.task, self.out_dir = trainer, task, out_dir
        self.config, self.operative_config, self.scope = config, operative_config, scope
        self.context = distributed.setup(trainer.device)
        task.to(self.context.device, DTYPES[trainer.dtype])
        merged = {**task.lr_multipliers(), **trainer.lr_multipliers}
        groups = param_groups(task.named_parameters(), weight_decay=trainer.weight_decay, lr_multipliers=merged,
                              no_weight_decay=task.no_weight_decay())
        self.optimizer = build_optimizer(groups, learning_rate=trainer.learning_rate, betas=trainer.betas)
        self.data = data
        self.stream = data.train_stream(micro_batch=trainer.micro_batch(self.context.world_size),
                                        accumulation_steps=trainer.accumulation_steps, seed=trainer.seed,
                                        rank=self.context.rank, world_size=self.context.world_size)
        self.generator = torch.Generator(device=self.context.device)
        self.checkpoints = out_dir / "checkpoints"
        self._peak: Optional[float] = None  # FLOP/s the MFU is measured against, found at the first step
        self.notes: list[str] = []  # shown once the monitor exists
        try:
            check_run_directory(out_dir, config)  # before anything is written
            self.start_step = self._resume()
        except BaseException:  # a refused checkpoint: leave the process group as ``fit`` would
            distributed.shutdown(self.context, synchronize=False)
            raise
        self.model = task if not self.context.is_distributed else _wrap_ddp(task, self.context.device)
        self.result = RunResult(out_dir=out_dir, task=task, data=data,
                                validation_windows=trainer.validation_batches(data), device=self.context.device)
        self.final: dict[str, dict[str, float]] = {}
        if self.context.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        self.monitor = Monitor(out_dir, total_steps=trainer.num_steps, start_step=self.start_step,
                               progress=trainer.progress, active=self.context.is_main)

    def _resume(self) -> int:
        """Load the newest checkpoint in the run directory that verifies, if any; return the step to start from."""
        history = self.out_dir / "history.jsonl"
        if ckpt.latest_checkpoint(self.checkpoints) is None:
            recorded = len(ckpt.history_lines(history, math.inf))
            if recorded:
                raise ckpt.RunDirectoryError(
                    f"{self.out_dir} has a history of {recorded} training steps (history.jsonl) but no checkpoints "
                    f"in {self.checkpoints}: training it would restart from step 0 and overwrite that history. "
                    "Start over with `energyflow train ... --fresh` (moves this run aside) or choose a new --out")
            return 0
        if not self.t.resume:
            raise ckpt.RunDirectoryError(
                f"{self.checkpoints} already holds checkpoints and Trainer.resume is False; resume it (drop the "
                "binding), start over with `energyflow train ... --fresh` (moves this run aside) or choose a new --out")
        latest, payload, skipped = ckpt.load_newest_verified(self.checkpoints, map_location=self.context.device)
        self.notes.extend(skipped)
        ckpt.check_fingerprint(payload, self.task, latest)
        ckpt.check_rank_states(self.task, payload, world_size=self.context.world_size, path=latest)
        self.task.load_state_dict(payload["task"])  # per-rank modules get rank 0's state here ...
        restored = ckpt.restore_rank_state(self.task, payload, rank=self.context.rank,  # ... and their own here
                                           world_size=self.context.world_size, path=latest)
        per_rank = ", ".join(name or "<task>" for name in ckpt.per_rank_modules(self.task))
        if not restored and self.context.is_distributed and per_rank:
            self.notes.append(f"{latest.name} predates per-rank checkpoint state: every rank resumes {per_rank} "
                              "from rank 0's copy, so this resumed run is not bit-exact")
        self.optimizer.load_state_dict(payload["optimizer"])
        self.stream.load_state_dict(payload["data"])
        if payload["step"] > self.t.num_steps:
            raise ckpt.RunDirectoryError(f"{latest} is at step {payload['step']}, beyond Trainer.num_steps="
                                         f"{self.t.num_steps}; give num_steps >= {payload['step']} to resume it")
        if self.context.is_main:
            note = ckpt.verify_history(history, int(payload["step"]), payload.get("history_sha256"))
            if note:
                self.notes.append(note)
        return int(payload["step"])

    def execute(self) -> RunResult:
        if self.context.is_main:
            (self.out_dir / "config.gin").write_text(self.config)
        for note in self.notes:  # before "resuming": what was skipped explains where it resumes from
            self.monitor.log(note)
        if self.start_step:
            self.monitor.log(f"resuming {self.out_dir} from step {self.start_step}")
        for step in range(self.start_step, self.t.num_steps):
            metrics = self._train_step(step)
            self._after_step(step, metrics)
        self.result.validation = self._validate(self.t.num_steps)
        self.final["validation"] = self.result.validation
        return self.result

    def _train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns globally averaged metrics."""
        started = time.perf_counter()
        learning_rate = self.t.learning_rate_at(step)
        set_learning_rates(self.optimizer, learning_rate)
        parts, losses, tokens, context = [], [], 0, None
        micro_batches = self.stream.next_step()
        for micro, windows in enumerate(micro_batches):
            torch.manual_seed(_seed_for(self.t.seed, step, micro, self.context.rank))
            self.generator.manual_seed(_seed_for(self.t.seed, step, micro, self.context.rank))
            last = micro == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.context.is_distributed else self.model.no_sync()
            batch = self.data.to_batch(windows, self.context.device)
            if isinstance(batch, Mapping) and isinstance(batch.get("tokens"), Tensor) and batch["tokens"].dim() == 2:
                tokens, context = tokens + batch["tokens"].numel(), batch["tokens"].shape[1]
            with sync:  # skip DDP's all-reduce on all but the last micro-batch
                with torch.autocast(self.context.device.type, dtype=torch.bfloat16,
                                    enabled=self.t.autocast_enabled(self.context.device)):
                    loss, metrics = self.model(batch, step=step, generator=self.generator)
                (loss / len(micro_batches)).backward()
            parts.append(metrics)
            losses.append({"objective": loss.detach()})
        grad_norm = torch.nn.utils.clip_grad_norm_(self.task.parameters(), self.t.grad_clip or math.inf)
        values = self._global_metrics(parts, losses, grad_norm)
        self._guard(step + 1, values)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        values = with_perplexities(values, self.task.cross_entropy_metrics)
        if self.context.device.type == "cuda":
            torch.cuda.synchronize(self.context.device)
        self._throughput = (time.perf_counter() - started, tokens * self.context.world_size, context)
        return {**values, "learning_rate": learning_rate}

    def _throughput_scalars(self) -> dict[str, float]:
        """Tokens/s, model FLOPs per step and MFU of the step just taken (TensorBoard and the progress bar, not
        the history: they are timings, which a resumed run does not reproduce)."""
        seconds, tokens, context = getattr(self, "_throughput", (0.0, 0, None))
        if not tokens or seconds <= 0:
            return {}
        out = {"tokens_per_second": tokens / seconds}
        per_token = self.task.train_flops_per_token(context)
        if per_token:
            out["model_flops_per_step"] = per_token * tokens
            if self._peak is None:
                from energyflow.flops import device_peak

                self._peak = device_peak(self.context.device) or 0.0
            if self._peak:
                out["mfu"] = per_token * tokens / seconds / (self._peak * self.context.world_size)
        return out

    def _global_metrics(self, parts: list, losses: list, grad_norm: Tensor) -> dict[str, float]:
        """Mean of the task's metrics over micro-batches and processes, then the gradient norm."""
        means = {**mean_metrics(parts), **mean_metrics(losses)}  # task metrics first: the guard names them
        stacked = distributed.all_reduce_mean(torch.stack(list(means.values())), self.context)
        return {**dict(zip(means, stacked.tolist())), "grad_norm": float(grad_norm)}

    def _guard(self, step: int, values: Mapping[str, float]) -> None:
        """Stop before the update if any metric is NaN/Inf (perplexities are derived later, from losses)."""
        for name, value in values.items():
            if not math.isfinite(value):
                raise TrainingDiverged(step, name, value, ckpt.newest_verified(self.checkpoints))

    def _after_step(self, step: int, values: dict[str, float]) -> None:
        done = step + 1
        self.result.history.append({"step": float(done), **values})
        self.monitor.record(self.result.history[-1])
        self.monitor.scalars("train", {k: v for k, v in values.items() if k != "learning_rate"}, done)
        self.monitor.scalars("learning_rate", {g["name"]: g["lr"] for g in self.optimizer.param_groups}, done)
        throughput = self._throughput_scalars() if self.context.is_main else {}
        self.monitor.scalars("throughput", throughput, done)
        shown = f"{throughput['tokens_per_second']:,.0f} tok/s" if "tokens_per_second" in throughput else ""
        shown += f"  MFU {throughput['mfu']:.1%}" if "mfu" in throughput else ""
        self.monitor.advance(done, values, shown)
        self.final["train"] = {k: v for k, v in values.items() if k != "learning_rate"}
        if done == self.start_step + 1 and self.context.is_main:
            (self.out_dir / "operative_config.gin").write_text(self.operative_config())
        if self.t.eval_every and done % self.t.eval_every == 0 and done != self.t.num_steps:
            self._validate(done)
        if done % self.t.checkpoint_every == 0 or done == self.t.num_steps:
            self._save(done, values)

    def _validate(self, step: int) -> dict[str, float]:
        values = evaluate_task(self.task, self.result.validation_windows, self.data.to_batch,
                               device=self.context.device, context=self.context)
        self.monitor.scalars("validation", values, step)
        return values

    def _save(self, step: int, metrics: Mapping[str, float]) -> None:
        """Every rank contributes its per-rank module state (a collective: all ranks call this at the same
        steps); rank 0 writes the checkpoint."""
        local = ckpt.rank_state(self.task)
        rank_states = distributed.all_gather_object(local, self.context)
        rank_states[self.context.rank] = local  # no round trip (on CPU: the tensors of ``task``, saved once)
        if self.context.is_main:
            history = ckpt.history_digest(ckpt.history_lines(self.out_dir / "history.jsonl", step))
            ckpt.save_checkpoint(ckpt.checkpoint_path(self.checkpoints, step), {
                "step": step, "fingerprint": ckpt.fingerprint(self.task), "task": self.task.state_dict(),
                "rank_states": rank_states, "optimizer": self.optimizer.state_dict(),
                "data": self.stream.state_dict(), "config": self.config,
                "operative_config": self.operative_config(), "scope": self.scope, "metrics": dict(metrics),
                "history_sha256": history})
            ckpt.prune_checkpoints(self.checkpoints, self.t.keep_checkpoints)
        distributed.barrier(self.context)
