"""The ``energyflow`` command: ``train``, ``eval``, ``recipes``, ``generate``, ``think``, ``sweep``, ``report``.

    energyflow train recipes/experiments/transformer_pp_debug.gin --bind "SIZE = '3xs'" --out runs/tpp
    energyflow eval runs/tpp
    energyflow recipes
    energyflow generate runs/ebt --prompt "The list" --max-new 48       # see docs/inference.md
    energyflow think runs/ebt --baseline runs/tpp --steps 1,2,4,8,16 --samples 1,4,16
    energyflow sweep experiments/ebt_system1_debug.gin --axis "GradientDescent.step_size = [10.0, 50.0]" --out s
    energyflow report s

Only the argument parsers live here, and they import nothing heavy: each command's handler (a
``"module:function"`` name) is imported when the command runs, so ``energyflow --help`` and ``energyflow
recipes`` never import torch. Every error a user can cause ends as one line, ``error: ...``, with exit status 1
(2 for a malformed command line, as argparse does); ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

ENGINES = ("local", "ray")


def _positive_ints(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (sorted, unique), for --steps / --samples / --eval-steps."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,2,4; got {text!r}")
    return values


def _train(args: argparse.Namespace, console) -> int:
    import gin

    from energyflow.config import RecipeError, check_macros, parse_bindings
    from energyflow.configurables import parse_recipe

    gin.clear_config()
    path = parse_recipe(args.recipe)
    out = Path(args.out or Path("runs") / path.stem)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out} is an existing file, not a run directory; choose another --out")
    # --out and --bind come after the recipe so they override it (and fill its %gin.REQUIRED macros).
    gin.parse_config([f"OUT_DIR = {str(out)!r}"])
    parse_bindings(args.bind)
    check_macros()
    if args.fresh and out.exists():
        aside = out.with_name(f"{out.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        console.print(f"--fresh: moved the previous {out} to {aside}")
    console.print(f"[bold]energyflow train[/] {path} -> {out}")
    gin.get_configurable("launch")()
    return 0


def _eval(args: argparse.Namespace, console) -> int:
    from energyflow.config import RecipeError

    if args.json is not None:  # before the evaluation, so a bad path costs nothing
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RecipeError(f"cannot write --json {args.json}: {error.strerror}; choose a writable path") from error
    if args.max_steps < 1:
        raise RecipeError(f"--max-steps must be >= 1, got {args.max_steps}")
    from energyflow.evaluation import step_counts
    from energyflow.experiment import comparison_table, evaluate_steps, write_metrics_json
    from energyflow.runs import load_run

    result, _, step = load_run(args.run_dir, device=args.device, bindings=args.bind)
    for note in result.notes:
        console.print(f"[yellow]{note}[/]")
    counts = step_counts(args.max_steps)
    name = f"{Path(args.run_dir).name} (step {step})"
    results = {name: evaluate_steps(result, counts, progress=not args.no_progress)}
    details = {name: result.task.describe()}
    console.print(comparison_table(results, details, {name: result.task.table_metrics},
                                   {name: result.task.steps_label}))
    if args.json is not None:
        console.print(f"metrics -> {write_metrics_json(args.json, results, details)}")
    return 0


def _recipes(args: argparse.Namespace, console) -> int:
    from rich.table import Table

    from energyflow.config import list_recipes

    table = Table(title="recipes")
    table.add_column("recipe")
    table.add_column("description")
    for name, description in list_recipes():
        table.add_row(name, description)
    console.print(table)
    return 0


def _add_thinking_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--step-size", type=float, help="override the run's (learned) step size")
    parser.add_argument("--noise", type=float, default=0.0, help="Langevin noise scale per step (default 0)")
    parser.add_argument("--accept-if-lower", action="store_true", help="keep a step only where it lowers the energy")
    parser.add_argument("--energy-tolerance", type=float, help="freeze a position once |dE| falls below this")
    parser.add_argument("--grad-tolerance", type=float, help="freeze a position once ||grad E|| falls below this")
    parser.add_argument("--check-every", type=int, default=4, help="with a tolerance: every that many steps, stop "
                        "once every position has frozen (one host sync per check; default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initial states and noise")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--compile", action="store_true", help="run thinking's energy-and-gradient through "
                        "torch.compile (a one-off compile, then faster steps; falls back to eager with a warning)")


def _add_generate(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="continue a prompt with a trained run", description=(
        "Continue a prompt with a run's newest checkpoint: an EBT thinks (against its cached context) for every "
        "new token, a Transformer++ decodes with its KV cache. Greedy by default."))
    generate.add_argument("run_dir", help="a run directory written by `energyflow train`")
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--max-new", type=int, default=32, help="number of new tokens (bytes) (default 32)")
    generate.add_argument("--strategy", choices=("greedy", "sample"), default="greedy")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (strategy sample)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to sample from (strategy sample)")
    generate.add_argument("--steps", type=int, help="EBT thinking steps per token (default: the run's eval steps)")
    generate.add_argument("--samples", type=int, default=1, help="EBT candidates per token, best by energy")
    generate.add_argument("--html", help="EBT: write the continuation coloured by energy to this HTML file")
    generate.add_argument("--candidates", type=int, default=1, help="Transformer++: continuations to sample (rank "
                          "them with --rerank-with)")
    generate.add_argument("--rerank-with", metavar="EBT_RUN_DIR", help="Transformer++: rank the sampled "
                          "continuations by this EBT's energy")
    _add_thinking_options(generate)
    generate.set_defaults(handler="energyflow.inference.commands:run_generate")


def _add_think(commands: argparse._SubParsersAction) -> None:
    think = commands.add_parser("think", help="measure thinking: loss vs steps and samples", description=(
        "Loss of an EBT run after 1, 2, 4, ... thinking steps and with 1, 4, ... self-verification samples, "
        "against a Transformer++ run on the same text, each gain with its standard error over windows; prints a "
        "table and writes PNG plots and think.json. On an image EBT: PSNR vs steps and samples at its noise levels, "
        "the energy as uncertainty, a DiT run as --baseline, and PNG grids (clean / noisy / EBT steps / DiT). On a "
        "video EBT: rollout PSNR per horizon, energy vs error and on collisions and bounces, a Transformer++ run as "
        "--baseline, a strip PNG and a GIF."))
    think.add_argument("run_dir", help="an EBT run directory")
    think.add_argument("--steps", type=_positive_ints, default=[1, 2, 4, 8, 16],
                       help="thinking steps (default 1,2,4,8,16)")
    think.add_argument("--samples", type=_positive_ints, default=[1, 4], help="candidates per input (default 1,4)")
    think.add_argument("--baseline", help="a Transformer++ run directory (a DiT run for an image EBT): the "
                       "reference line")
    think.add_argument("--data", nargs="+", help="text files to evaluate on (default: the run's validation split)")
    think.add_argument("--batches", type=int, default=4, help="number of batches of windows (default 4)")
    think.add_argument("--batch-size", type=int, default=8, help="windows per batch (default 8: 32 windows in all; "
                       "the table prints each gain's standard error, so raise these until the gain you read is resolved)")
    think.add_argument("--out", help="where plots and think.json go (default RUN_DIR/think)")
    think.add_argument("--images", type=int, default=64, help="image/video EBT: held-out images (clips) to think "
                       "on (default 64)")
    think.add_argument("--show", type=int, default=6, help="image/video EBT: images (clips) drawn in the PNGs "
                       "(default 6)")
    think.add_argument("--jitter", type=float, default=0.05, help="image/video EBT: sd of the re-drawn starts of "
                       "samples 2..N around the noisy image or the copied frame (default 0.05)")
    think.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_thinking_options(think)
    think.set_defaults(handler="energyflow.inference.commands:run_think")


def _add_sweeps(commands: argparse._SubParsersAction) -> None:
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
    sweep.add_argument("--eval-steps", type=_positive_ints, default=[1, 2, 4, 8],
                       help="step counts EBT trials are evaluated at (default 1,2,4,8)")
    sweep.add_argument("--metric", action="append", default=[], help="metrics of the closing report (repeatable)")
    sweep.set_defaults(handler="energyflow.sweeps.commands:run_sweep_command")
    report = commands.add_parser("report", help="mean ± standard error over seeds of a sweep", description=(
        "Per combination of axis values: mean ± standard error over seeds of the chosen validation metrics (default "
        "the tasks' own), per run and step count; writes report.json, report.md and plots/."))
    report.add_argument("sweep_dir", help="a directory written by `energyflow sweep`")
    report.add_argument("--metric", action="append", default=[], help="a metric to report (repeatable)")
    report.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    report.set_defaults(handler="energyflow.sweeps.commands:run_report_command")


def _add_text_at_scale(commands: argparse._SubParsersAction) -> None:
    tokenizer = commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer on local text", description=(
        "Tokenizers for text at scale: `tokenizer train` fits a byte-level BPE (Hugging Face tokenizers, the hf "
        "extra) on local files and saves a tokenizer.json; any tokenizer.json you have (e.g. GPT-NeoX's) works too."))
    actions = tokenizer.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="fit a byte-level BPE on local text files")
    train.add_argument("files", nargs="+", help="text files")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special token included")
    train.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair (default 2)")
    train.add_argument("--out", required=True, help="the tokenizer.json to write")
    train.set_defaults(handler="energyflow.data.commands:run_tokenizer_train")
    prepare = commands.add_parser("prepare", help="tokenize a corpus into memory-mapped shards", description=(
        "Tokenize documents into uint16/uint32 token shards plus meta.json, with a deterministic validation split "
        "by document; resumable (rerun the same command after a crash). SOURCE: text files (split into documents "
        "at blank lines), JSONL files (--field), or hf:DATASET (a Hugging Face dataset, read streaming)."))
    prepare.add_argument("source", nargs="+", help="text or JSONL files, or hf:DATASET")
    prepare.add_argument("--tokenizer", required=True, help="a tokenizer.json")
    prepare.add_argument("--out", required=True, help="the corpus directory")
    prepare.add_argument("--format", choices=("auto", "text", "jsonl"), default="auto",
                         help="how to read files (default: jsonl for .jsonl/.json, else text)")
    prepare.add_argument("--field", default="text", help="JSONL / dataset field holding the text (default text)")
    prepare.add_argument("--split", default="train", help="hf: the dataset split (default train)")
    prepare.add_argument("--config", help="hf: the dataset configuration name")
    prepare.add_argument("--data-files", nargs="+", help="hf: local data files (e.g. hf:json --data-files x.jsonl)")
    prepare.add_argument("--validation-fraction", type=float, default=0.01,
                         help="share of documents in the validation split (default 0.01)")
    prepare.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard (default 16M)")
    prepare.add_argument("--no-progress", action="store_true", help="no progress display")
    prepare.set_defaults(handler="energyflow.data.commands:run_prepare")


def _add_evaluate_task(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("evaluate-task", help="downstream accuracy on a local JSONL set", description=(
        "Downstream evaluation on a local JSONL file: lambada (last-word accuracy: {\"text\": ...}) or choice "
        "(multiple choice: {\"context\": ..., \"choices\": [...], \"answer\": i}); the EBT ranks choices by "
        "energy (or, --score thinking, by its likelihood after thinking), the Transformer++ by likelihood; give "
        "--baseline for the two side by side."))
    evaluate.add_argument("run_dir", help="a text EBT or Transformer++ run directory")
    evaluate.add_argument("--task", choices=("lambada", "choice"), required=True)
    evaluate.add_argument("--data", required=True, help="the JSONL file")
    evaluate.add_argument("--baseline", help="a second run scored on the same examples (e.g. the Transformer++)")
    evaluate.add_argument("--score", choices=("energy", "thinking"), default="energy",
                          help="choice, EBT: rank by the choices' mean energy (default) or by their likelihood "
                          "under its predictions after thinking")
    evaluate.add_argument("--steps", type=int, help="EBT thinking steps (default: the run's trained count)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    evaluate.add_argument("--json", help="also write the scores to this JSON file")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(handler="energyflow.inference.downstream:run_evaluate_task")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="energyflow", description="Energy-based modeling: train, evaluate and "
                                     "list gin recipes.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train a recipe", description="Train the runs a gin recipe defines.")
    train.add_argument("recipe", help="a .gin file: a path, or a path under recipes/ (e.g. experiments/x.gin)")
    train.add_argument("--bind", action="append", default=[], metavar="BINDING",
                       help="a gin binding applied after the recipe, e.g. --bind \"SIZE = 'xs'\" (repeatable)")
    train.add_argument("--out", help="run directory (default: runs/<recipe name>); an existing one is resumed")
    train.add_argument("--fresh", action="store_true", help="start over: move an existing --out aside (to "
                       "OUT.previous-<time>, nothing is deleted) instead of resuming it")
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
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(handler=_eval)
    recipes = commands.add_parser("recipes", help="list the recipes", description=(
        "List every recipe under the recipes root with the first comment line of the file."))
    recipes.set_defaults(handler=_recipes)
    _add_generate(commands)
    _add_think(commands)
    _add_sweeps(commands)
    _add_text_at_scale(commands)
    _add_evaluate_task(commands)
    return parser


def _handler(target) -> Callable:
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


_USER_ERRORS = ("RecipeError", "CheckpointError", "RunDirectoryError", "TrainingDiverged", "SweepError")


def _is_user_error(error: BaseException) -> bool:
    if isinstance(error, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                          PermissionError, ValueError, TypeError)):
        return True
    return any(cls.__name__ in _USER_ERRORS for cls in type(error).__mro__)


def one_line(error: BaseException) -> str:
    """An error as one line: its first line, then where gin says it happened (file and line, or the binding) and
    the innermost configurable it was raised in."""
    text = str(error) or type(error).__name__
    first = text.splitlines()[0].strip()
    where = []
    location = re.search(r'In file "([^"]+)", line (\d+)', text)
    if location and location.group(1) not in first:
        where.append(f"{location.group(1)}, line {location.group(2)}")
    binding = re.search(r"In bindings string line \d+\n\s*(.+)", text)
    if binding:
        where.append(f"binding {binding.group(1).strip()!r}")
    calls = re.findall(r"In call to configurable '([^']+)'", text)
    if calls:
        where.append(f"in configurable {calls[0]!r}")
    return first + (f" ({'; '.join(where)})" if where else "")


def main(argv: Optional[Sequence[str]] = None, console=None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    from rich.console import Console
    from rich.text import Text

    console = console or Console()

    def report(message: str) -> None:
        console.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)

    try:
        return _handler(args.handler)(args, console)
    except KeyboardInterrupt:
        if args.debug:
            raise
        report("interrupted; the checkpoints written so far are intact: rerun the same command to resume")
        return 130
    except Exception as error:  # noqa: BLE001 - every error becomes one line; --debug shows the traceback
        if args.debug:
            raise
        if _is_user_error(error):
            report(one_line(error))
        else:
            report(f"unexpected {type(error).__name__}: {one_line(error)}. This looks like a bug in energyflow: "
                   "rerun with --debug for the traceback and report it")
        return 1
    finally:
        distributed = sys.modules.get("torch.distributed")
        if distributed is not None and distributed.is_available() and distributed.is_initialized():
            distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
