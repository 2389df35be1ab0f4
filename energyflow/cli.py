"""The ``energyflow`` command: ``train``, ``eval``, ``recipes`` (one sub-parser per command, so more join
the same way).

    energyflow train recipes/experiments/transformer_pp_debug.gin --bind "SIZE = '3xs'" --out runs/tpp
    energyflow eval runs/tpp
    energyflow recipes
    energyflow generate runs/ebt --prompt "The list" --max-new 64       # see docs/inference.md
    energyflow think runs/ebt --baseline runs/tpp --steps 1,2,4,8,16 --samples 1,4,16
    energyflow sweep experiments/ebt_system1_debug.gin --axis "GradientDescent.step_size = [10.0, 50.0]" --out s
    energyflow report s
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import gin
from rich.console import Console
from rich.table import Table
from rich.text import Text

from energyflow.checkpoint import CheckpointError
from energyflow.config import RecipeError, list_recipes
from energyflow.configurables import parse_recipe
from energyflow.evaluation import step_counts
from energyflow.experiment import comparison_table, evaluate_steps, write_metrics_json
from energyflow.runs import load_run
from energyflow.inference.commands import add_commands as add_inference_commands
from energyflow.sweeps.commands import add_commands as add_sweep_commands
from energyflow.trainer import TrainingDiverged


def _train(args: argparse.Namespace, console: Console) -> int:
    gin.clear_config()
    path = parse_recipe(args.recipe)
    out = args.out or str(Path("runs") / path.stem)
    # --out and --bind come after the recipe so they override it (and fill its %gin.REQUIRED macros).
    gin.parse_config([f"OUT_DIR = {out!r}"])
    try:
        gin.parse_config(args.bind)
    except (ValueError, SyntaxError) as error:
        raise RecipeError(f"bad --bind: {error}") from error
    console.print(f"[bold]energyflow train[/] {path} -> {out}")
    gin.get_configurable("launch")()
    return 0


def _eval(args: argparse.Namespace, console: Console) -> int:
    if args.json is not None:  # before the evaluation, so a bad path costs nothing
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RecipeError(f"cannot write --json {args.json}: {error.strerror}; choose a writable path") from error
    result, _, step = load_run(args.run_dir, device=args.device, bindings=args.bind)
    counts = step_counts(args.max_steps)
    name = f"{Path(args.run_dir).name} (step {step})"
    results, details = {name: evaluate_steps(result, counts)}, {name: result.task.describe()}
    console.print(comparison_table(results, details, {name: result.task.table_metrics},
                                   {name: result.task.steps_label}))
    if args.json is not None:
        console.print(f"metrics -> {write_metrics_json(args.json, results, details)}")
    return 0


def _recipes(args: argparse.Namespace, console: Console) -> int:
    table = Table(title="recipes")
    table.add_column("recipe")
    table.add_column("description")
    for name, description in list_recipes():
        table.add_row(name, description)
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="energyflow", description="Energy-based modeling: train, evaluate and "
                                     "list gin recipes.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of a bad setting instead of its one-line message")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train a recipe", description="Train the runs a gin recipe defines.")
    train.add_argument("recipe", help="a .gin file: a path, or a path under recipes/ (e.g. experiments/x.gin)")
    train.add_argument("--bind", action="append", default=[], metavar="BINDING",
                       help="a gin binding applied after the recipe, e.g. --bind \"SIZE = 'xs'\" (repeatable)")
    train.add_argument("--out", help="run directory (default: runs/<recipe name>); an existing one is resumed")
    train.set_defaults(handler=_train)
    evaluate = commands.add_parser("eval", help="evaluate a finished run", description=(
        "Validation metrics of a run's newest checkpoint (the task's: loss and perplexity for text, MSE and PSNR "
        "for images): at 1, 2, 4, ... optimization steps for iterative (EBT) tasks, at its own DDIM step counts for "
        "a diffusion baseline, once for the others. Rebuilds the run from its operative_config.gin."))
    evaluate.add_argument("run_dir", help="a run directory written by `energyflow train`")
    evaluate.add_argument("--max-steps", type=int, default=8, help="largest number of optimization steps (default 8)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    evaluate.add_argument("--bind", action="append", default=[], metavar="BINDING",
                          help="a gin binding applied after the run's operative config, e.g. --bind "
                          "\"train.data = @bouncing_shapes()\" to validate on other data (repeatable)")
    evaluate.add_argument("--json", metavar="FILE", help="also write the metrics it prints to FILE as JSON: "
                          "{\"runs\": {run: {\"describe\": {...}, \"steps\": {\"1\": {metric: value}}}}}")
    evaluate.set_defaults(handler=_eval)
    recipes = commands.add_parser("recipes", help="list the recipes", description=(
        "List every recipe under the recipes root with the first comment line of the file."))
    recipes.set_defaults(handler=_recipes)
    add_inference_commands(commands)  # generate, think (energyflow/inference/commands.py)
    add_sweep_commands(commands)  # sweep, report (energyflow/sweeps/commands.py)
    return parser


def _configurable_of(error: BaseException) -> Optional[str]:
    """The innermost gin configurable a ``ValueError``/``TypeError`` was raised in (gin appends
    "In call to configurable 'X'" lines to the message), or ``None`` if it did not come from one."""
    calls = re.findall(r"In call to configurable '([^']+)'", str(error))
    return f"configurable {calls[0]!r}" if calls else None


def main(argv: Optional[Sequence[str]] = None, console: Optional[Console] = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    console = console or Console()
    handler: Callable[[argparse.Namespace, Console], int] = args.handler
    try:
        return handler(args, console)
    except (RecipeError, CheckpointError, TrainingDiverged, FileNotFoundError) as error:
        console.print(Text("error: ", style="bold red") + Text(str(error)))
        return 1
    except (ValueError, TypeError) as error:
        where = _configurable_of(error)
        if args.debug or where is None:  # not a configurable refusing its settings: a bug, show it
            raise
        first = str(error).splitlines()[0]
        console.print(Text("error: ", style="bold red") + Text(f"{first} (in {where}; --debug for the traceback)"))
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
