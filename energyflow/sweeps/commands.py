"""The ``sweep`` and ``report`` subcommands of ``energyflow`` (registered by ``energyflow.cli``).

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
from energyflow.sweeps.runner import ENGINES, run_sweep, write_manifest
from energyflow.sweeps.spec import SweepError, expand, load_sweep_file, parse_axis, parse_seeds, validate


def _steps(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,2,4,8: {text!r}") from error
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,2,4,8: {text!r}")
    return steps


def add_commands(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser("sweep", help="train a grid of trials (local processes or Ray)", description=(
        "Train every combination of --axis values (a grid, or --zip pairs) once per seed, each an ordinary run "
        "directory OUT/<trial> trained as `energyflow train` would with the trial's bindings; resumable (finished "
        "trials are skipped, killed ones resume); ends with `energyflow report OUT`. RECIPE may be a sweep recipe "
        "(recipes/sweeps/*.gin) naming its base recipe, axes and seeds."))
    sweep.add_argument("recipe", help="a recipe (e.g. experiments/quickstart_debug.gin) or a sweep recipe")
    sweep.add_argument("--axis", action="append", default=[], metavar="'NAME = [v1, v2]'",
                       help="a macro or configurable.parameter and its gin values (repeatable)")
    sweep.add_argument("--bind", action="append", default=[], metavar="BINDING",
                       help="a gin binding for every trial, not an axis (e.g. a shorter NUM_STEPS; repeatable)")
    sweep.add_argument("--zip", action="store_true", help="pair the axes value by value instead of a grid")
    sweep.add_argument("--seeds", help="comma-separated seeds (Trainer.seed), default 0 (or the sweep recipe's)")
    sweep.add_argument("--out", required=True, help="the sweep directory (rerun the same command to resume)")
    sweep.add_argument("--workers", type=int, default=1, help="local engine: trials at once (default 1)")
    sweep.add_argument("--threads-per-trial", type=int, help="torch threads per trial (default: cores / workers "
                       "locally, --cpus-per-trial on Ray)")
    sweep.add_argument("--engine", choices=ENGINES, default="local", help="local processes (default) or Ray")
    sweep.add_argument("--address", help="Ray: the cluster address (e.g. auto, ray://head:10001); default: start a "
                       "local Ray instance")
    sweep.add_argument("--cpus-per-trial", type=float, default=1.0, help="Ray: CPUs per trial (default 1)")
    sweep.add_argument("--gpus-per-trial", type=float, default=0.0, help="Ray: GPUs per trial (default 0)")
    sweep.add_argument("--eval-steps", type=_steps, default=[1, 2, 4, 8],
                       help="step counts EBT trials are evaluated at (default 1,2,4,8)")
    sweep.add_argument("--metric", action="append", default=[], help="metrics of the closing report (repeatable)")
    sweep.set_defaults(handler=_guarded(run_sweep_command))
    report = commands.add_parser("report", help="mean ± standard error over seeds of a sweep", description=(
        "Per combination of axis values: mean ± standard error over seeds of the chosen validation metrics (default "
        "the tasks' own), per run and step count; writes report.json, report.md and plots/."))
    report.add_argument("sweep_dir", help="a directory written by `energyflow sweep`")
    report.add_argument("--metric", action="append", default=[], help="a metric to report (repeatable)")
    report.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    report.set_defaults(handler=_guarded(run_report_command))


def _guarded(handler):
    def run(args: argparse.Namespace, console: Console) -> int:
        try:
            return handler(args, console)
        except SweepError as error:
            console.print(f"[bold red]error:[/] {error}")
            return 1
    return run


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
