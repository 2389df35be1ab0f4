"""The report of a sweep directory: per combination of axis values (the seeds pooled), per run and step count, the
mean ± standard error over seeds of the chosen validation metrics (a perplexity as exp of the mean loss, its
error by the delta method, never a mean of perplexities); a ``rich`` table, ``report.json``,
``report.md`` and PNG plots (each metric against each axis, with standard-error bars; the training curves of
every trial overlaid). Standard error = sample standard deviation / sqrt(number of seeds) (none for one seed).
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from rich.table import Table

from energyflow.sweeps.spec import SweepError
from energyflow.sweeps.trial import read_record


@dataclass
class Row:
    axes: dict[str, str]
    run: str
    steps: str
    metric: str
    mean: float
    stderr: Optional[float]
    seeds: int
    values: list[float]


def load_sweep(out_dir: Path) -> tuple[dict, list[dict]]:
    manifest_path = Path(out_dir) / "sweep.json"
    if not manifest_path.is_file():
        raise SweepError(f"{out_dir} is not a sweep directory (no sweep.json); run energyflow sweep --out {out_dir}")
    manifest = json.loads(manifest_path.read_text())
    records = [read_record(Path(out_dir) / name) for name in manifest["trials"]]
    return manifest, [r for r in records if r is not None]


def default_metrics(records: Sequence[dict]) -> list[str]:
    """The tasks' table metrics where the trials recorded them, else loss (and perplexity where present)."""
    chosen: list[str] = []
    for record in records:
        for run in record.get("runs", {}).values():
            names = run.get("table_metrics") or ["loss", "perplexity"]
            present = {name for values in run["steps"].values() for name in values}
            chosen += [name for name in names if name in present and name not in chosen]
    return chosen or ["loss"]


def aggregate(manifest: dict, records: Sequence[dict], metrics: Optional[Sequence[str]] = None) -> list[Row]:
    """Rows in the sweep's order: combination of axis values, run, step count, metric."""
    done = [r for r in records if r.get("status") == "done"]
    metrics = list(metrics) if metrics else default_metrics(done)
    axis_names = [axis["name"] for axis in manifest["axes"]]
    groups: dict[tuple, list[dict]] = {}
    for record in done:
        groups.setdefault(tuple(record["axes"].get(name) for name in axis_names), []).append(record)
    rows = []
    for key, members in groups.items():
        runs = list(dict.fromkeys(run for record in members for run in record["runs"]))
        for run in runs:
            step_keys = list(dict.fromkeys(k for r in members for k in r["runs"].get(run, {}).get("steps", {})))
            for steps in step_keys:
                for metric in metrics:
                    values = [r["runs"][run]["steps"][steps].get(metric) for r in members
                              if steps in r["runs"].get(run, {}).get("steps", {})]
                    values = [v for v in values if v is not None and math.isfinite(v)]
                    if not values:
                        continue
                    mean, stderr = _mean_and_stderr(values)
                    if metric.startswith("perplexity"):  # exp(mean loss), never a mean of perplexities
                        losses = [math.log(v) for v in values]
                        loss_mean, loss_stderr = _mean_and_stderr(losses)
                        mean = math.exp(loss_mean)
                        stderr = None if loss_stderr is None else mean * loss_stderr  # the delta method
                    rows.append(Row(dict(zip(axis_names, key)), run, steps, metric, mean, stderr, len(values), values))
    return rows


def _mean_and_stderr(values: Sequence[float]) -> tuple[float, Optional[float]]:
    stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return statistics.fmean(values), stderr


def _number_text(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3e}"


def _cell(row: Row) -> str:
    return _number_text(row.mean) + (f" ± {_number_text(row.stderr)}" if row.stderr is not None else "")


def report_table(manifest: dict, rows: Sequence[Row]) -> Table:
    """One table row per (axis values, run, steps), a column per metric (mean ± standard error, seeds)."""
    axis_names = [axis["name"] for axis in manifest["axes"]]
    metrics = list(dict.fromkeys(row.metric for row in rows))
    table = Table(title=f"sweep of {manifest['recipe']}: mean ± standard error over seeds {manifest['seeds']}")
    for name in axis_names:
        table.add_column(name)
    for column in ("run", "steps", *metrics, "seeds"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for key, cells in _pivot(rows, axis_names).items():
        values, run, steps = key[:-2], key[-2], key[-1]
        seeds = max(row.seeds for row in cells.values())
        table.add_row(*values, run, steps, *(_cell(cells[m]) if m in cells else "-" for m in metrics), str(seeds))
    return table


def _pivot(rows: Sequence[Row], axis_names: Sequence[str]) -> dict[tuple, dict[str, Row]]:
    pivot: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        pivot.setdefault(tuple(row.axes[n] for n in axis_names) + (row.run, row.steps), {})[row.metric] = row
    return pivot


def markdown(manifest: dict, rows: Sequence[Row], failed: dict[str, str]) -> str:
    axis_names = [axis["name"] for axis in manifest["axes"]]
    metrics = list(dict.fromkeys(row.metric for row in rows))
    header = [*axis_names, "run", "steps", *metrics, "seeds"]
    lines = [f"# Sweep of `{manifest['recipe']}`", "", f"Seeds {manifest['seeds']}; mean ± standard error over seeds.",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, cells in _pivot(rows, axis_names).items():
        seeds = max(row.seeds for row in cells.values())
        lines.append("| " + " | ".join([*key, *(_cell(cells[m]) if m in cells else "-" for m in metrics), str(seeds)])
                     + " |")
    if failed:
        lines += ["", "Failed trials:", ""] + [f"- `{name}`: {error}" for name, error in failed.items()]
    return "\n".join(lines) + "\n"


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def plot_axes(out: Path, manifest: dict, rows: Sequence[Row]) -> list[Path]:
    """``metric_vs_<axis>.png`` per metric and axis with more than one value: one line per (other axes, run,
    steps), standard-error bars."""
    from energyflow import plots

    written = []
    axis_names = [axis["name"] for axis in manifest["axes"]]
    for axis in manifest["axes"]:
        if len(axis["values"]) < 2:
            continue
        positions = {v: (_number(v) if all(_number(x) is not None for x in axis["values"]) else i)
                     for i, v in enumerate(axis["values"])}
        for metric in dict.fromkeys(row.metric for row in rows):
            plt = plots._pyplot()
            figure, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
            series: dict[tuple, list[Row]] = {}
            for row in rows:
                if row.metric == metric:
                    others = tuple(f"{n}={row.axes[n]}" for n in axis_names if n != axis["name"])
                    series.setdefault(others + (row.run, f"steps {row.steps}"), []).append(row)
            for label, members in series.items():
                members = sorted(members, key=lambda r: positions[r.axes[axis["name"]]])
                ax.errorbar([positions[r.axes[axis["name"]]] for r in members], [r.mean for r in members],
                            yerr=[r.stderr or 0.0 for r in members], marker="o", capsize=3,
                            label=", ".join(x for x in label if x != "run"))
            if any(isinstance(p, int) and _number(v) is None for v, p in positions.items()):
                ax.set_xticks(list(positions.values()), list(positions), rotation=25, ha="right")
            ax.set(xlabel=axis["name"], ylabel=metric, title=f"{metric} vs {axis['name']}")
            ax.grid(alpha=0.3)
            if len(series) <= 12:
                ax.legend(fontsize=6)
            figure.tight_layout()
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{metric}_vs_{axis['name']}")
            written.append(plots._save(figure, plt, out / f"{safe}.png"))
    return written


def plot_training_curves(out: Path, sweep_dir: Path, records: Sequence[dict], metric: str = "loss") -> Optional[Path]:
    """Every trial's (every run's) training ``metric`` against the step, overlaid."""
    from energyflow import plots

    curves = {}
    for record in records:
        trial_dir = sweep_dir / record["name"]
        for history in sorted(trial_dir.rglob("history.jsonl")):
            points = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
            points = [(p["step"], p[metric]) for p in points if metric in p]
            if points:
                run = history.parent.relative_to(trial_dir).as_posix()
                curves[record["name"] + ("" if run == "." else f" / {run}")] = points
    if not curves:
        return None
    plt = plots._pyplot()
    figure, ax = plt.subplots(figsize=(7.0, 4.2), dpi=120)
    for label, points in curves.items():
        ax.plot(*zip(*points), linewidth=0.8, label=label)
    ax.set(xlabel="step", ylabel=f"training {metric}", title="training curves")
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=5)
    figure.tight_layout()
    return plots._save(figure, plt, out / "training_curves.png")


def write_report(sweep_dir: Path, metrics: Optional[Sequence[str]] = None, *, plots_too: bool = True
                 ) -> tuple[Table, list[Path], list[Row]]:
    """Aggregate ``sweep_dir`` and write ``report.json``, ``report.md`` (and ``plots/``); return the table too."""
    sweep_dir = Path(sweep_dir)
    manifest, records = load_sweep(sweep_dir)
    rows = aggregate(manifest, records, metrics)
    failed = {r["name"]: r.get("error") or "" for r in records if r.get("status") != "done"}
    missing = [name for name in manifest["trials"] if name not in {r["name"] for r in records}]
    payload = {"recipe": manifest["recipe"], "axes": manifest["axes"], "seeds": manifest["seeds"],
               "rows": [asdict(row) for row in rows], "failed": failed, "not_run": missing}
    written = []
    for name, text in (("report.json", json.dumps(payload, indent=2) + "\n"),
                       ("report.md", markdown(manifest, rows, failed))):
        path, partial = sweep_dir / name, sweep_dir / (name + ".partial")
        partial.write_text(text)
        os.replace(partial, path)
        written.append(path)
    if plots_too and rows:
        written += plot_axes(sweep_dir / "plots", manifest, rows)
        curve = plot_training_curves(sweep_dir / "plots", sweep_dir, [r for r in records if r.get("status") == "done"])
        written += [curve] if curve else []
    return report_table(manifest, rows), written, rows
