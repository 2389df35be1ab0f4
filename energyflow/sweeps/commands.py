"""The ``sweep`` and ``report`` subcommands of ``energyflow`` (their parsers are in ``energyflow.cli``).

    energyflow sweep experiments/ebt_system1_debug.gin --axis "GradientDescent.step_size = [10.0, 50.0]" \\
        --seeds 0,1 --out sweeps/step --workers 2
    energyflow sweep sweeps/system1_step_size.gin --out sweeps/s1 --engine ray --address auto
    energyflow report sweeps/step --metric loss
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from energyflow.config import resolve_recipe
from energyflow.sweeps.report import write_report
from energyflow.sweeps.runner import run_sweep, write_manifest
from energyflow.sweeps.spec import SweepError, expand, load_sweep_file, parse_axis, parse_seeds, validate


def run_sweep_command(args: argparse.Namespace, console: Console) -> int:
    path = resolve_recipe(args.recipe)
    if "sweeps" in path.parts:
        if args.axis:
            raise SweepError(f"{args.recipe} is a sweep recipe with its own axes; drop --axis or name its base recipe")
        recipe, axes, seeds, paired, fixed = load_sweep_file(path)
        seeds = parse_seeds(args.seeds) if args.seeds else seeds
        paired, fixed = paired or args.zip, [*fixed, *args.bind]
    else:
        if not args.axis:
            raise SweepError("give at least one --axis 'NAME = [v1, v2]' (or a sweep recipe from recipes/sweeps/)")
        recipe, axes, paired = args.recipe, [parse_axis(text) for text in args.axis], args.zip
        seeds, fixed = parse_seeds(args.seeds or "0"), list(args.bind)
    trials = expand(recipe, axes, seeds, paired=paired, fixed=fixed)
    validate(trials, axes, fixed)
    out = Path(args.out)
    write_manifest(out, recipe, axes, seeds, trials, paired, fixed)
    console.print(f"[bold]energyflow sweep[/] {recipe}: {len(trials)} trials "
                  f"({' x '.join(str(len(a.values)) for a in axes)} values x {len(seeds)} seeds) -> {out}")
    outcome = run_sweep(trials, out, engine=args.engine, workers=args.workers,
                        threads_per_trial=args.threads_per_trial, eval_steps=args.eval_steps, address=args.address,
                        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, console=console)
    console.print(f"{len(outcome.done)} trials trained, {len(outcome.skipped)} already done, "
                  f"{len(outcome.failed)} failed")
    for name, error in outcome.failed.items():
        console.print(f"[red]failed[/] {name}: {error}")
    table, written, _ = write_report(out, args.metric or None)
    console.print(table)
    console.print(f"[dim]wrote {', '.join(str(p) for p in written[:2])} and {max(len(written) - 2, 0)} plots[/]")
    return 1 if outcome.failed else 0


def run_report_command(args: argparse.Namespace, console: Console) -> int:
    table, written, rows = write_report(Path(args.sweep_dir), args.metric or None, plots_too=not args.no_plots)
    console.print(table)
    if not rows:
        console.print("[yellow]no finished trial holds these metrics yet[/]")
    for path in written:
        console.print(f"[dim]wrote {path}[/]")
    return 0
