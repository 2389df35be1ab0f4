"""The ``generate`` and ``think`` subcommands of ``energyflow`` (their parsers are in ``energyflow.cli``).

    energyflow generate runs/ebt --prompt "The list" --max-new 48 [--samples 4] [--html out.html]
    energyflow think runs/ebt --baseline runs/tpp --steps 1,2,4,8,16 --samples 1,4,16 [--data FILE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import Tensor

from energyflow.data import pack, text_files
from energyflow.monitor import progress_bar
from energyflow.runs import load_run
from energyflow.inference.generation import Decoding, Generation, generate_baseline, generate_ebt
from energyflow.inference.sweep import SweepResult, baseline_loss, spread_batches, thinking_sweep
from energyflow.inference.optimize import ThinkingConfig
from energyflow.inference.text import thinking_config
from energyflow.models import TextEBM
from energyflow.objectives.components import resolve_num_steps
from energyflow.tasks.image import DiffusionDenoisingTask, ImageDenoisingTask
from energyflow.tasks.video import NextFrameEBTTask, NextFrameRegressionTask


def _config(task, args: argparse.Namespace, num_steps: int) -> ThinkingConfig:
    adaptive = args.energy_tolerance is not None or args.grad_tolerance is not None
    config = thinking_config(task.objective, num_steps=num_steps, step_size=args.step_size, noise_scale=args.noise,
                             accept_if_lower=args.accept_if_lower, energy_tolerance=args.energy_tolerance,
                             grad_tolerance=args.grad_tolerance, check_every=args.check_every if adaptive else None)
    return replace(config, compile=bool(getattr(args, "compile", False)))


def _step_index_mode(task) -> str:
    """How the run's objective indexed the steps of a step-conditioned model (``per_step`` before the option)."""
    return getattr(task.objective, "step_index_mode", "per_step")


def _encode_prompt(text: str, device: torch.device) -> Tensor:
    data = text.encode("utf-8")
    if not data:
        raise ValueError("--prompt is empty; give at least one character to continue")
    return torch.tensor([list(data)], dtype=torch.long, device=device)


def _check_room(model, prompt: Tensor, max_new: int) -> None:
    config = model.backbone.config if isinstance(model, TextEBM) else model.config
    needed = prompt.shape[1] + max_new - 1
    if needed > config.max_seq_len:
        raise ValueError(f"prompt ({prompt.shape[1]} bytes) + --max-new {max_new} needs {needed} positions but the "
                         f"model has max_seq_len={config.max_seq_len}; shorten the prompt or lower --max-new")


def run_generate(args: argparse.Namespace, console: Console) -> int:
    result, _, step = load_run(args.run_dir, device=args.device)
    for note in result.notes:
        console.print(f"[yellow]{note}[/]")
    task, device = result.task.eval(), result.device
    prompt = _encode_prompt(args.prompt, device)
    _check_room(task.model, prompt, args.max_new)
    is_ebt = isinstance(task.model, TextEBM)
    _check_generate_options(args, is_ebt)
    decoding = Decoding(args.strategy, args.temperature, args.top_p)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    if is_ebt:
        num_steps = args.steps or resolve_num_steps(task.objective.num_steps, 0, training=False)
        out = generate_ebt(task.model, prompt, args.max_new, _config(task, args, num_steps), decoding,
                           num_candidates=args.samples, generator=generator,
                           initial_state=task.objective.initial_state, step_index_mode=_step_index_mode(task))
    else:
        rows = prompt.expand(args.candidates, -1)
        out = generate_baseline(task.model, rows, args.max_new, decoding, generator=generator)
    seconds = time.perf_counter() - start
    if args.rerank_with:
        _rerank(args, console, prompt[0], out.tokens)
    else:
        _print_generation(args, console, out)
    count = out.tokens.numel()
    rule = f", descent rule {task.describe()['descent']}" if is_ebt else ""
    console.print(f"[dim]{count} tokens in {seconds:.2f} s ({count / seconds:.1f} tokens/s), checkpoint step "
                  f"{step}{rule}[/]")
    return 0


def _check_generate_options(args: argparse.Namespace, is_ebt: bool) -> None:
    if args.candidates > 1 and (is_ebt or not args.rerank_with or args.strategy != "sample"):
        raise ValueError("--candidates > 1 samples several continuations from a Transformer++ run to rank with an "
                         "EBT: give --strategy sample and --rerank-with EBT_RUN_DIR (an EBT self-verifies with "
                         "--samples instead)")
    if not is_ebt and (args.samples != 1 or args.steps is not None or args.html):
        raise ValueError("--samples, --steps and --html apply to EBT runs; this run is a Transformer++")


def _decode(tokens: Tensor) -> str:
    return bytes(tokens.tolist()).decode("utf-8", errors="replace")


def _rerank(args: argparse.Namespace, console: Console, prompt: Tensor, continuations: Tensor) -> None:
    """Rank a Transformer++'s sampled continuations ``[K, N]`` by an EBT's mean energy and print them."""
    from energyflow.verifier import score_continuations

    verifier, _, _ = load_run(args.rerank_with, device=args.device)
    model = verifier.task.eval().model
    if not isinstance(model, TextEBM):
        raise ValueError(f"--rerank-with {args.rerank_with} is not an EBT run; the verifier must be an EBT")
    _check_room(model, prompt[None], continuations.shape[1])
    scores = score_continuations(model, prompt.to(verifier.device), list(continuations.to(verifier.device)),
                                 step_index_mode=_step_index_mode(verifier.task))
    table = Table(title=f"{len(continuations)} continuations of {args.prompt!r}, ranked by EBT energy (lower first)")
    for column in ("rank", "mean energy", "continuation"):
        table.add_column(column, justify="left" if column == "continuation" else "right")
    for rank, index in enumerate(scores.order.tolist(), start=1):
        table.add_row(str(rank), f"{float(scores.mean_energy[index]):.4f}", repr(_decode(continuations[index])))
    console.print(table)


def _print_generation(args: argparse.Namespace, console: Console, out: Generation) -> None:
    """The prompt, then the continuation: coloured by energy (and exported with ``--html``) for the EBT."""
    from energyflow.verifier import byte_pieces, to_rich, write_html

    console.print(Text(args.prompt, style="bold"), end="")
    if out.energies is None:
        console.print(_decode(out.tokens[0]))
        return
    pieces = byte_pieces(out.tokens[0].tolist(), out.energies[0].tolist())
    console.print(to_rich(pieces))
    if args.html:
        console.print(f"[dim]wrote {write_html(args.html, pieces, title='EBT continuation, coloured by energy')}[/]")


def _windows(args: argparse.Namespace, validation: list[Tensor]) -> list[Tensor]:
    """``--batches`` batches of ``--batch-size`` windows spread through ``--data`` or the validation split."""
    seq_len = validation[0].shape[1] - 1
    if args.data:
        windows = pack(torch.frombuffer(bytearray(text_files(args.data)), dtype=torch.uint8), seq_len)
    else:
        windows = torch.cat(validation)
    return spread_batches(windows, args.batches, args.batch_size)


def run_think(args: argparse.Namespace, console: Console) -> int:
    result, _, _ = load_run(args.run_dir, device=args.device)
    for note in result.notes:
        console.print(f"[yellow]{note}[/]")
    task = result.task.eval()
    if isinstance(task, ImageDenoisingTask):
        return run_think_images(args, console, result)
    if isinstance(task, NextFrameEBTTask):
        return run_think_video(args, console, result)
    if not isinstance(task.model, TextEBM):
        raise ValueError(f"{args.run_dir} is not an EBT run (its model is {type(task.model).__name__}); "
                         "`think` needs an EBT, pass the Transformer++ run as --baseline")
    windows = _windows(args, result.validation_windows)
    config = _config(task, args, max(args.steps))
    total = len(windows) * (len(args.samples) + (1 if config.adaptive else 0))
    with progress_bar("think", total, console=console, enabled=not args.no_progress) as advance:
        run = partial(thinking_sweep, task.model, windows, steps=args.steps, device=result.device, seed=args.seed,
                      initial_state=task.objective.initial_state, step_index_mode=_step_index_mode(task),
                      advance=advance)
        sweep = run(config, samples=args.samples)
        if config.adaptive:  # the same run without tolerances: the fixed step budget it is compared against
            fixed = run(replace(config, energy_tolerance=None, grad_tolerance=None), samples=args.samples[:1])
            sweep.fixed_budget_loss = fixed.loss_at(args.samples[0], args.steps[-1])
    if args.baseline:
        baseline, _, _ = load_run(args.baseline, device=args.device)
        sweep.baseline_loss = baseline_loss(baseline.task.eval().model, windows, baseline.device)
    console.print(sweep_table(sweep))
    console.print(f"descent rule: {task.describe()['descent']} (the rule this run trained with)")
    if sweep.fixed_budget_loss is not None:
        n, k = args.samples[0], args.steps[-1]
        console.print(f"adaptive compute ({n} sample{'s' if n > 1 else ''}): {sweep.mean_steps[n]:.2f} steps per "
                      f"position on average, loss {sweep.loss_at(n, k):.4f}; fixed budget of {k} steps: loss "
                      f"{sweep.fixed_budget_loss:.4f}")
    out = Path(args.out) if args.out else Path(args.run_dir) / "think"
    for path in write_sweep(sweep, out):
        console.print(f"[dim]wrote {path}[/]")
    return 0


def run_think_images(args: argparse.Namespace, console: Console, result) -> int:
    """``think`` on an image EBT: PSNR vs steps and samples at each evaluation noise level, the energy as
    uncertainty, a DiT run (``--baseline``) as the reference; PNG grids and plots."""
    from energyflow.data.images import ImageData
    from energyflow.inference.images import image_thinking, write_image_thinking

    _check_continuous_options(args, "image")
    task = result.task
    validation = torch.cat([result.data.to_batch(raw, result.device)[ImageData.batch_key]
                            for raw in result.validation_windows])
    clean = validation[torch.linspace(0, len(validation) - 1, min(args.images, len(validation))).long()]
    baseline = _baseline_task(args, DiffusionDenoisingTask, "a DiT run")
    thinking, pictures = image_thinking(task, clean, steps=args.steps, samples=args.samples, jitter=args.jitter,
                                        seed=args.seed, step_size=args.step_size, baseline=baseline,
                                        show=min(args.show, len(clean)))
    console.print(image_think_table(thinking))
    if thinking.baseline_psnr:
        console.print(baseline_psnr_table(thinking))
    for level in thinking.levels:
        name = f"{level:g}"
        console.print(f"noise level {name}: Spearman correlation of final energy and MSE over {thinking.num_images} "
                      f"images {thinking.uncertainty[name]:+.3f} (energy as uncertainty: positive = higher energy, "
                      "worse denoising)")
    out = Path(args.out) if args.out else Path(args.run_dir) / "think"
    for path in write_image_thinking(thinking, pictures, out):
        console.print(f"[dim]wrote {path}[/]")
    return 0


def _check_continuous_options(args: argparse.Namespace, what: str) -> None:
    if args.data:
        raise ValueError(f"--data reads text files; an {what} EBT thinks on its run's held-out data")
    if args.noise or args.accept_if_lower or args.energy_tolerance is not None or args.grad_tolerance is not None:
        raise ValueError(f"--noise, --accept-if-lower and the tolerances apply to text thinking; an {what} EBT takes "
                         "--steps, --samples, --jitter, --step-size, --images and --show")
    if args.images < 1 or args.show < 0:
        raise ValueError(f"--images must be >= 1 and --show >= 0, got {args.images} and {args.show}")


def _baseline_task(args: argparse.Namespace, expected: type, what: str):
    """The ``--baseline`` run's task in eval mode (``None`` without one); a clear error if it is not ``expected``."""
    if not args.baseline:
        return None
    loaded, _, _ = load_run(args.baseline, device=args.device)
    task = loaded.task.eval()
    if not isinstance(task, expected):
        raise ValueError(f"--baseline {args.baseline} is not {what} (its task is {type(task).__name__}); give the run "
                         f"trained with {expected.__name__}")
    return task


def run_think_video(args: argparse.Namespace, console: Console, result) -> int:
    """``think`` on a video EBT: rollout PSNR per horizon vs steps and samples, energy vs error and on collisions
    and bounces, a Transformer++ run (``--baseline``) as the reference; a strip image and a GIF."""
    from energyflow.inference.video import video_thinking, write_video_thinking

    _check_continuous_options(args, "autoregressive video")
    data, task = result.data, result.task
    index = torch.linspace(0, len(data.validation) - 1, min(args.images, len(data.validation))).long()
    pick = lambda flags: None if flags is None else flags[index]  # noqa: E731
    baseline = _baseline_task(args, NextFrameRegressionTask, "a Transformer++ video run")
    thinking, drawn = video_thinking(task, data.validation[index].to(result.device), steps=args.steps,
                                     samples=args.samples, jitter=args.jitter, seed=args.seed,
                                     step_size=args.step_size, baseline=baseline,
                                     collisions=pick(data.validation_collisions), bounces=pick(data.validation_bounces))
    console.print(video_think_table(thinking))
    for k in thinking.steps:
        by_event = ", ".join(f"{name} {value:.4f}" for name, value in thinking.energy_events.get(k, {}).items()
                             if value is not None)
        console.print(f"{k} step{'s' if k > 1 else ''}: Spearman(energy, MSE) over rolled-out frames "
                      f"{thinking.spearman[k]:+.3f}" + (f"; mean energy by true frame: {by_event}" if by_event else ""))
    out = Path(args.out) if args.out else Path(args.run_dir) / "think"
    for path in write_video_thinking(thinking, drawn, out, show=args.show):
        console.print(f"[dim]wrote {path}[/]")
    return 0


def video_think_table(thinking) -> Table:
    """Rollout PSNR (dB) per horizon, one row per (steps, samples), then copy-last and the Transformer++."""
    table = Table(title=f"thinking on video: rollout PSNR (dB) of {thinking.num_clips} held-out clips from "
                        f"{thinking.context_frames} context frames")
    table.add_column("predictor")
    table.add_column("samples", justify="right")
    horizons = range(1, thinking.rollout_frames + 1)
    for h in horizons:
        table.add_column(f"+{h}", justify="right")
    for k in thinking.steps:
        for n in thinking.samples:
            table.add_row(f"EBT {k} step{'s' if k > 1 else ''}", str(n), *(f"{v:.3f}" for v in thinking.psnr[k][n]))
    table.add_row("copy last frame", "-", *(f"{v:.3f}" for v in thinking.copy_psnr))
    if thinking.baseline_psnr is not None:
        table.add_row("Transformer++", "-", *(f"{v:.3f}" for v in thinking.baseline_psnr))
    return table


def image_think_table(thinking) -> Table:
    """PSNR (dB) after 0 (the start), 1, 2, ... steps, one row per (noise level, samples)."""
    table = Table(title=f"thinking on images: PSNR (dB) of {thinking.num_images} held-out images vs descent steps")
    table.add_column("noise level", justify="right")
    table.add_column("samples", justify="right")
    table.add_column("start", justify="right")
    for k in thinking.steps:
        table.add_column(f"{k} step{'s' if k > 1 else ''}", justify="right")
    for level in thinking.levels:
        name = f"{level:g}"
        for n in thinking.samples:
            values = thinking.psnr[name][n]
            table.add_row(name, str(n), f"{values[0]:.3f}", *(f"{values[k]:.3f}" for k in thinking.steps))
    return table


def baseline_psnr_table(thinking) -> Table:
    """The DiT's PSNR (dB) on the same images and noise, one row per noise level, a column per DDIM pass count."""
    passes = sorted({p for values in thinking.baseline_psnr.values() for p in values})
    table = Table(title="DiT baseline: PSNR (dB) vs DDIM passes")
    table.add_column("noise level", justify="right")
    for count in passes:
        table.add_column(str(count), justify="right")
    for level in thinking.levels:
        values = thinking.baseline_psnr.get(f"{level:g}", {})
        table.add_row(f"{level:g}", *(f"{values[p]:.3f}" if p in values else "-" for p in passes))
    return table


def _gain(sweep: SweepResult, first: tuple[int, int], second: tuple[int, int]) -> str:
    """``loss(first) - loss(second)`` ± its standard error over windows (paired), or ``-``."""
    if first == second or first[0] not in sweep.window_loss or second[0] not in sweep.window_loss:
        return "-"
    mean, error = sweep.paired_difference(first, second)
    return f"{mean:+.4f}" + ("" if error != error else f" ± {error:.4f}")


def sweep_table(sweep: SweepResult) -> Table:
    """Loss after each number of steps, one row per number of samples, plus the reference row; each gain (more
    steps, more samples) with its standard error over windows, paired by window (positive = better)."""
    first, last = sweep.steps[0], sweep.steps[-1]
    table = Table(title="thinking: loss (nats/byte) vs steps and self-verification samples")
    table.add_column("samples", justify="right")
    for k in sweep.steps:
        table.add_column(f"{k} step{'s' if k > 1 else ''}", justify="right")
    table.add_column(f"gain {first} -> {last} steps", justify="right")
    table.add_column(f"gain vs 1 sample @{last}", justify="right")
    table.add_column("mean steps used", justify="right")
    for n in sweep.samples:
        table.add_row(str(n), *(f"{sweep.loss_at(n, k):.4f}" for k in sweep.steps), _gain(sweep, (n, first), (n, last)),
                      "-" if n == 1 or 1 not in sweep.samples else _gain(sweep, (1, last), (n, last)),
                      f"{sweep.mean_steps[n]:.2f}")
    if sweep.baseline_loss is not None:
        table.add_row("Transformer++", *([f"{sweep.baseline_loss:.4f}"] * len(sweep.steps)), "-", "-", "-")
    table.caption = (f"gains ± standard error over the {len(next(iter(sweep.window_loss.values()))[0])} windows "
                     "(paired by window)") if sweep.window_loss else None
    return table


def write_sweep(sweep: SweepResult, out: Path) -> list[Path]:
    """``think.json`` and the three PNG plots into ``out``."""
    from energyflow import plots

    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "think.json"
    temporary = out / "think.json.tmp"
    temporary.write_text(json.dumps(sweep.__dict__, indent=2))
    os.replace(temporary, json_path)
    gains = {k: [sweep.verification_gain(n, k) for n in sweep.samples] for k in sweep.steps}
    return [json_path,
            plots.loss_vs_steps(out / "loss_vs_steps.png", sweep.steps, sweep.loss, sweep.baseline_loss),
            plots.verification_gain(out / "verification_gain.png", sweep.samples, gains),
            plots.energy_vs_step(out / "energy_vs_step.png", sweep.energy)]
