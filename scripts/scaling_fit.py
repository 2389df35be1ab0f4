"""The paper's headline claim, its scaling rate: fit log-log slopes of validation loss against tokens seen,
training FLOPs and wall-clock for the EBT and the Transformer++ of a scaling sweep, with confidence intervals,
and the ratio of the slopes next to the paper's figure (the EBT's data-scaling rate up to 35% higher).

Input: a sweep directory of a ``compare`` recipe with runs ``baseline`` and ``ebt`` (``recipes/sweeps/
scaling_data.gin``: data budgets; ``scaling_size.gin``: model sizes). Each run is rebuilt from its directory
(``energyflow.runs.load_run``) to read what it trained: steps, batch, context, parameters.

FLOPs, counted analytically per training token (N: parameters of the transformer blocks, L layers, width d,
context S; a forward pass costs ``C = 2 N + 2 L S d`` per token -- the matrix multiplies and the attention
scores and values -- and a backward pass twice that):
- Transformer++: forward + backward = ``3 C``.
- EBT with K descent steps: the context stream's forward and backward (``3 C``), then per step the prediction
  stream's forward (``C``) and its backward to the candidate (activation gradients only, ``C``), kept as a graph
  for the second order, and the loss's backward through both at twice their cost: ``3 C + 6 K C`` (``15 C``
  for K = 2, 5x the Transformer++). Embeddings, norms, the vocabulary matrices and the energy head are left out of both (the
  counts are ``energyflow.flops``'s with ``V = 0``; the trainer's MFU includes the vocabulary matrices).
Wall-clock: the span of the run's TensorBoard scalars (first to last logged step).

Slopes: least squares of ``log loss = a + b log x`` over every (seed, budget) point of a model; the standard
error of ``b`` from the residuals, a 95% interval from Student's t with n - 2 degrees of freedom; the ratio of
the EBT's slope to the Transformer++'s with a delta-method interval. A steeper (more negative) slope scales
faster.

    python scripts/scaling_fit.py sweeps/scaling_data --out docs/results_scaling.md
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER_DATA_RATIO = 1.35  # the paper: up to 35% higher scaling rate for data


@dataclass
class Point:
    trial: str
    model: str  # "ebt" or "baseline"
    seed: int
    loss: float
    tokens: float
    flops: float
    seconds: Optional[float]
    parameters: int


@dataclass
class Fit:
    slope: float
    stderr: float
    low: float
    high: float
    points: int


def forward_flops_per_token(parameters: int, layers: int, context: int, width: int) -> float:
    from energyflow import flops

    return flops.forward_per_token(flops.Shape(parameters, layers, width, 0, context))


def training_flops(model: str, tokens: float, parameters: int, layers: int, context: int, width: int,
                   descent_steps: int = 0) -> float:
    """Training FLOPs of ``tokens`` training tokens: ``energyflow.flops``'s counts (the trainer's, for its MFU)
    without the vocabulary matrices (``V = 0``), as the module docstring says."""
    from energyflow import flops

    shape = flops.Shape(parameters, layers, width, 0, context)
    per_token = (flops.transformer_train_per_token(shape) if model == "baseline"
                 else flops.ebt_train_per_token(shape, descent_steps))
    return per_token * tokens


def t_quantile(degrees: int, level: float = 0.975) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(level, degrees))
    except ImportError:  # the dev extra has scipy; without it the normal quantile (slightly narrower)
        return 1.959964


def fit_slope(x: Sequence[float], y: Sequence[float]) -> Fit:
    """Least-squares slope of ``log y`` on ``log x``, its standard error and 95% interval."""
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"a slope with an interval needs at least 3 points, got {len(x)}")
    lx, ly = [math.log(v) for v in x], [math.log(v) for v in y]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((v - mx) ** 2 for v in lx)
    if sxx == 0:
        raise ValueError("every point has the same x: vary the axis to fit a slope")
    slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx
    residual = sum((b - my - slope * (a - mx)) ** 2 for a, b in zip(lx, ly))
    stderr = math.sqrt(residual / (len(x) - 2) / sxx)
    half = t_quantile(len(x) - 2) * stderr
    return Fit(slope, stderr, slope - half, slope + half, len(x))


def slope_ratio(ebt: Fit, baseline: Fit) -> tuple[float, float, float]:
    """``ebt.slope / baseline.slope`` and a delta-method 95% interval (the two fits independent)."""
    ratio = ebt.slope / baseline.slope
    relative = math.sqrt((ebt.stderr / ebt.slope) ** 2 + (baseline.stderr / baseline.slope) ** 2)
    return ratio, ratio * (1 - 1.96 * relative), ratio * (1 + 1.96 * relative)


def _seconds(run_dir: Path) -> Optional[float]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    times = [event.wall_time for tag in accumulator.Tags().get("scalars", []) for event in accumulator.Scalars(tag)]
    return (max(times) - min(times)) if len(times) > 1 else None


def collect(sweep_dir: Path) -> list[Point]:
    import torch

    from energyflow.objectives.components import resolve_num_steps
    from energyflow.runs import load_run
    from energyflow.sweeps import load_sweep

    manifest, records = load_sweep(sweep_dir)
    points = []
    for record in records:
        if record.get("status") != "done":
            continue
        for model in ("baseline", "ebt"):
            run_dir = sweep_dir / record["name"] / model
            result, trainer, _ = load_run(run_dir, device="cpu")
            task = result.task
            network = task.model.backbone if model == "ebt" else task.model
            config = network.config
            blocks = sum(p.numel() for p in network.blocks.parameters())
            context = torch.cat(result.validation_windows).shape[1] - 1
            tokens = float(trainer.num_steps * trainer.batch_size * context)
            steps = resolve_num_steps(task.objective.num_steps, 0, training=False) if model == "ebt" else 0
            metrics = record["runs"][model]["steps"]
            loss = metrics["-"]["loss"] if model == "baseline" else metrics[str(steps)]["loss"]
            points.append(Point(record["name"], model, record["seed"], loss, tokens,
                                training_flops(model, tokens, blocks, config.num_layers, context, config.dim, steps),
                                _seconds(run_dir), blocks))
    return points


def report(points: Sequence[Point], sweep_dir: Path) -> tuple[str, dict]:
    fits = {}
    for measure in ("tokens", "flops", "seconds"):
        for model in ("baseline", "ebt"):
            chosen = [p for p in points if p.model == model and getattr(p, measure)]
            if len({getattr(p, measure) for p in chosen}) > 1 and len(chosen) >= 3:
                fits[(measure, model)] = fit_slope([getattr(p, measure) for p in chosen], [p.loss for p in chosen])
    lines = [f"# Scaling rate: EBT vs Transformer++ (`{sweep_dir}`)", "",
             "Slope of log validation loss against log x (least squares over every seed and budget; 95% interval); "
             "a more negative slope scales faster. Ratio: the EBT's slope over the Transformer++'s (the paper: up "
             f"to {PAPER_DATA_RATIO:.2f} for data).", "",
             "| x | Transformer++ slope | EBT slope | ratio EBT / Transformer++ |", "|---|---:|---:|---:|"]
    payload = {"points": [asdict(p) for p in points], "fits": {}}
    for measure in ("tokens", "flops", "seconds"):
        if (measure, "ebt") not in fits or (measure, "baseline") not in fits:
            continue
        ebt, base = fits[(measure, "ebt")], fits[(measure, "baseline")]
        if base.low <= 0.0 <= base.high:  # a ratio to a slope indistinguishable from zero means nothing
            cell, ratio_values = "undefined: the Transformer++'s slope is not distinguishable from 0", None
        else:
            ratio, low, high = slope_ratio(ebt, base)
            cell, ratio_values = f"{ratio:.2f} [{min(low, high):.2f}, {max(low, high):.2f}]", [ratio, low, high]
        lines.append(f"| {measure} | {base.slope:.4f} [{base.low:.4f}, {base.high:.4f}] | {ebt.slope:.4f} "
                     f"[{ebt.low:.4f}, {ebt.high:.4f}] | {cell} |")
        payload["fits"][measure] = {"baseline": asdict(base), "ebt": asdict(ebt), "ratio": ratio_values}
    lines += ["", "| trial | model | seed | tokens | training FLOPs | seconds | loss |", "|---|---|---:|---:|---:|---:|---:|"]
    for p in sorted(points, key=lambda p: (p.model, p.tokens, p.seed)):
        seconds = f"{p.seconds:.0f}" if p.seconds else "-"
        lines.append(f"| {p.trial} | {p.model} | {p.seed} | {p.tokens:.3g} | {p.flops:.3g} | {seconds} | {p.loss:.4f} |")
    return "\n".join(lines) + "\n", payload


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, help="markdown report (default SWEEP_DIR/scaling.md)")
    args = parser.parse_args(argv)
    text, payload = report(collect(args.sweep_dir), args.sweep_dir)
    out = args.out or args.sweep_dir / "scaling.md"
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
