"""What a run shows and records: TensorBoard scalars, ``history.jsonl``, a ``rich`` progress bar, and an
end-of-run table.

Only the main process writes; the other ranks get a ``Monitor`` whose methods do nothing visible.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


def format_metrics(metrics: Mapping[str, float], limit: int = 4) -> str:
    return "  ".join(f"{name} {value:.4g}" for name, value in list(metrics.items())[:limit])


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, console: Optional[Console] = None,
                 enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A ``rich`` progress bar over ``total`` units of work (batches x step counts, ...) for a long command;
    yields ``advance(n=1)``. Disabled (or ``total`` 0) it yields a no-op, so callers need no branches. The bar
    is transient: it clears when the work is done and the command prints its table."""
    if not enabled or total <= 0:
        yield lambda n=1: None
        return
    progress = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=console or Console(), transient=True)
    task = progress.add_task(description, total=total)
    with progress:
        yield lambda n=1: progress.advance(task, n)


class Monitor:
    """TensorBoard writer plus live progress for one run (``active=False`` on non-main ranks)."""

    def __init__(self, out_dir: Path, *, total_steps: int, start_step: int, progress: bool, active: bool,
                 console: Optional[Console] = None) -> None:
        self.active = active
        self.console = console or Console()
        self._writer = None
        self._progress: Optional[Progress] = None
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter  # heavy import; only the main rank pays it

        # A resumed run redoes the steps after its checkpoint: drop what a crashed run logged for them.
        self._writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start_step + 1)
        self._history = out_dir / "history.jsonl"
        if self._history.is_file():
            from energyflow.checkpoint import history_lines  # the lines a checkpoint's history digest covers

            kept = history_lines(self._history, start_step)  # a line a crash cut short is dropped
            self._history.write_text("".join(line + "\n" for line in kept))
        if progress:
            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                                      console=self.console)
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, metrics="")
            self._progress.start()

    def scalars(self, prefix: str, metrics: Mapping[str, float], step: int) -> None:
        """Write ``prefix/name`` for every metric at ``step`` (1-based: steps completed)."""
        if self._writer is not None:
            for name, value in metrics.items():
                self._writer.add_scalar(f"{prefix}/{name}", value, step)

    def record(self, values: Mapping[str, float]) -> None:
        """Append one step's values to ``history.jsonl`` (one JSON object per line, for plots and tests)."""
        if self.active:
            with open(self._history, "a") as handle:
                handle.write(json.dumps(dict(values)) + "\n")

    def advance(self, step: int, metrics: Mapping[str, float], extra: str = "") -> None:
        """Move the bar to ``step`` showing the first metrics and ``extra`` (e.g. throughput and MFU)."""
        if self._progress is not None:
            shown = format_metrics(metrics) + (f"  {extra}" if extra else "")
            # The bar, step count and time take ~45 columns: the metrics get what is left, so that a narrow
            # console shortens them instead of squeezing the step count out.
            room = max(self.console.width - 45, 20)
            if len(shown) > room:
                shown = shown[: room - 1] + "…"
            self._progress.update(self._task, completed=step, metrics=shown)

    def log(self, message: str) -> None:
        if self.active:
            self.console.print(message)

    def close(self, final: Mapping[str, Mapping[str, float]]) -> None:
        """Stop the bar and print one table: a column per section (``train``, ``validation``)."""
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        if self.active and final:
            self.console.print(summary_table(final))


def summary_table(final: Mapping[str, Mapping[str, float]], title: str = "end of run") -> Table:
    """Rows: metric names; columns: sections such as ``train`` and ``validation``."""
    table = Table(title=title)
    table.add_column("metric")
    for section in final:
        table.add_column(section, justify="right")
    names = list(dict.fromkeys(name for values in final.values() for name in values))
    for name in names:
        table.add_row(name, *(f"{values[name]:.4f}" if name in values else "" for values in final.values()))
    return table
