"""Running a sweep's trials: the local engine (N worker processes on this machine) and the Ray engine (Ray tasks
on an existing cluster, or a local Ray instance), both writing the same layout and resumable the same way.

``DIR/sweep.json`` holds the sweep (recipe, axes, seeds, trials); ``DIR/<trial>/`` is an ordinary run
directory (``energyflow eval/think`` work on it) plus ``trial.json``. A trial whose ``trial.json`` says
``done`` is skipped on a rerun; any other (never started, killed, failed) runs again, and a killed one resumes
from its checkpoints. A failed trial is reported with its error and does not stop the others.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from energyflow.sweeps.spec import Axis, SweepError, Trial
from energyflow.sweeps.trial import is_done, read_record, run_trial, write_record

ENGINES = ("local", "ray")


@dataclass
class SweepOutcome:
    out_dir: Path
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # trial -> error
    skipped: list[str] = field(default_factory=list)  # finished by an earlier invocation


def write_manifest(out_dir: Path, recipe: str, axes: Sequence[Axis], seeds: Sequence[int], trials: Sequence[Trial],
                   paired: bool, fixed: Sequence[str] = ()) -> None:
    """``sweep.json``; a rerun into the same directory must describe the same sweep (or it would mix two)."""
    manifest = {"recipe": recipe, "axes": [{"name": a.name, "values": list(a.values),
                                            **({"variants": {k: list(v) for k, v in a.variants.items()}}
                                               if a.variants is not None else {})} for a in axes],
                "seeds": list(seeds), "paired": paired, "bindings": list(fixed), "trials": [t.name for t in trials]}
    path = out_dir / "sweep.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != manifest:
            raise SweepError(f"{out_dir} holds another sweep ({previous['recipe']}, axes "
                             f"{[a['name'] for a in previous['axes']]}); choose another --out or rerun it as it was")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name("sweep.json.partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, path)


class _View:
    """The rich progress view over trials: done / running / failed, elapsed and ETA."""

    def __init__(self, total: int, console: Console, enabled: bool) -> None:
        self.done = self.failed = self.running = 0
        self.progress = Progress(TextColumn("[bold]sweep[/]"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.description}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=console, disable=not enabled)
        self.task = self.progress.add_task(self._text(), total=total)

    def _text(self) -> str:
        return f"done {self.done} · running {self.running} · failed {self.failed}"

    def update(self, *, started: int = 0, finished: Optional[dict] = None) -> None:
        self.running += started
        if finished is not None:
            self.running -= 1
            if finished.get("status") == "done":
                self.done += 1
            else:
                self.failed += 1
        self.progress.update(self.task, completed=self.done + self.failed, description=self._text())


def run_sweep(trials: Sequence[Trial], out_dir: Path, *, engine: str = "local", workers: int = 1,
              threads_per_trial: Optional[int] = None, eval_steps: Sequence[int] = (1, 2, 4, 8),
              address: Optional[str] = None, cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
              console: Optional[Console] = None, progress: bool = True) -> SweepOutcome:
    """Run every trial not yet done (see the module docstring) with ``engine``; return what happened."""
    if engine not in ENGINES:
        raise SweepError(f"--engine must be one of {ENGINES}, got {engine!r}")
    if workers < 1:
        raise SweepError(f"--workers must be >= 1, got {workers}")
    console = console or Console()
    outcome = SweepOutcome(Path(out_dir))
    pending = []
    for trial in trials:
        (outcome.skipped if is_done(outcome.out_dir / trial.name) else pending).append(trial)
    if threads_per_trial is None:
        threads_per_trial = max(1, (os.cpu_count() or 1) // workers) if engine == "local" else max(1, int(cpus_per_trial))
    view = _View(len(pending), console, progress)
    run = _run_local if engine == "local" else _run_ray
    with view.progress:
        run(pending, outcome, view, workers=workers, threads=threads_per_trial, eval_steps=list(eval_steps),
            address=address, cpus=cpus_per_trial, gpus=gpus_per_trial)
    return outcome


def _collect(outcome: SweepOutcome, view: _View, record: dict) -> None:
    view.update(finished=record)
    if record.get("status") == "done":
        outcome.done.append(record["name"])
    else:
        outcome.failed[record["name"]] = record.get("error") or "unknown error"


def _run_local(pending: Sequence[Trial], outcome: SweepOutcome, view: _View, *, workers: int, threads: int,
               eval_steps: list[int], **_: object) -> None:
    """Each trial in a fresh worker process (spawned: nothing of the parent's gin or torch state leaks in). A
    worker that dies (killed, out of memory) breaks the pool: the trial it ran is recorded as failed, the
    others in flight go back to the queue, and a new pool carries on."""
    if not pending:
        return
    new_pool = lambda: ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),  # noqa: E731
                                           max_tasks_per_child=1)
    executor, futures, queue = new_pool(), {}, list(pending)
    try:
        while queue or futures:
            while queue and len(futures) < workers:
                trial = queue.pop(0)
                futures[executor.submit(run_trial, trial.to_dict(), str(outcome.out_dir), eval_steps=eval_steps,
                                        threads=threads)] = trial
                view.update(started=1)
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            broken = False
            for future in finished:
                trial = futures.pop(future)
                try:
                    record = future.result()
                except BrokenProcessPool as error:
                    if broken:  # lost with the pool, not the cause: run it again
                        queue.insert(0, trial)
                        view.update(started=-1)
                        continue
                    broken, record = True, _died(outcome.out_dir, trial, error)
                _collect(outcome, view, record)
            if broken:
                for trial in futures.values():
                    queue.insert(0, trial)
                    view.update(started=-1)
                futures.clear()
                executor.shutdown(wait=False, cancel_futures=True)
                executor = new_pool()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _died(out_dir: Path, trial: Trial, error: BaseException) -> dict:
    record = {**trial.to_dict(), "status": "failed", "runs": {}, "seconds": None,
              "error": f"the worker process running it died ({type(error).__name__}); rerun the sweep to resume it"}
    previous = read_record(out_dir / trial.name)
    if previous is None or previous.get("status") != "done":
        write_record(out_dir / trial.name, record)
    return record


def _run_ray(pending: Sequence[Trial], outcome: SweepOutcome, view: _View, *, threads: int, eval_steps: list[int],
             address: Optional[str], cpus: float, gpus: float, **_: object) -> None:
    """Each trial as a Ray task with ``cpus``/``gpus`` resources; only strings cross to the workers."""
    try:
        import ray
    except ImportError as error:
        raise SweepError("--engine ray needs the optional extra: pip install 'energyflow[ray]'") from error
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(int(cpus), os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(run_trial)
        refs = {}
        for trial in pending:
            refs[remote.remote(trial.to_dict(), str(outcome.out_dir.resolve()), eval_steps=eval_steps,
                               threads=threads)] = trial
            view.update(started=1)
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                trial = refs.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as error:  # noqa: BLE001 -- a task that died is a failed trial
                    record = _died(outcome.out_dir, trial, error)
                _collect(outcome, view, record)
    finally:
        if started_here:
            ray.shutdown()

