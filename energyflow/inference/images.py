"""Thinking on images: an image EBT (``ImageDenoisingTask``) denoising with more descent steps than it trained
with, best-of-N self-verification over re-drawn starts, and its energy as a per-image uncertainty; a DiT run
(``DiffusionDenoisingTask``) as the reference. ``energyflow think RUN_DIR`` on an image EBT calls this.

The descent is the samplers' (``energyflow.inference.think`` with the run's learned step size and clamps,
``thinking_config``). Self-verification with ``N`` samples starts candidate 1 at the noisy image and
candidates 2..N at the noisy image plus ``jitter * N(0, I)``, descends all of them and keeps, per image and per
step, the candidate of lowest energy (so 1 sample is the plain descent). The noise is the tasks' evaluation
noise (``eval_seed``), so the numbers line up with ``energyflow eval``'s.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from energyflow.inference.optimize import think
from energyflow.inference.text import thinking_config
from energyflow.inference.verification import best_of_n_trace
from energyflow.metrics import spearman
from energyflow.tasks.image import DiffusionDenoisingTask, ImageDenoisingTask, level_name, unit_range_errors


@dataclass
class ImageThinking:
    """Means over the images, per noise level (keys: ``level_name``): ``psnr[level][n]`` and ``mse[level][n]`` after
    0..K steps with ``n`` samples (index k = k steps; 0 is the noisy input), ``energy[level][n]`` of the chosen
    candidates; ``uncertainty[level]``: Spearman correlation, over images, between the final energy and the
    final MSE (1 sample); ``baseline_psnr[level][passes]`` for the DiT."""

    steps: list[int]
    samples: list[int]
    levels: list[float]
    num_images: int
    jitter: float
    psnr: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    mse: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    energy: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    uncertainty: dict[str, float] = field(default_factory=dict)
    baseline_psnr: dict[str, dict[int, float]] = field(default_factory=dict)

    def psnr_at(self, level: float, samples: int, steps: int) -> float:
        return self.psnr[level_name(level)][samples][steps]


def image_thinking(task: ImageDenoisingTask, clean: Tensor, *, steps: Sequence[int], samples: Sequence[int],
                   jitter: float = 0.05, seed: int = 0, step_size: Optional[float] = None,
                   baseline: Optional[DiffusionDenoisingTask] = None, show: int = 0
                   ) -> tuple[ImageThinking, dict[str, dict[str, Tensor]]]:
    """PSNR/MSE after every step up to ``max(steps)`` with each of ``samples`` candidates per image, at every
    evaluation level of ``task``; returns the numbers and, for the first ``show`` images, the images of the grid
    (``{level: {"clean", "noisy", "ebt_<k>", "dit": [show, C, H, W]}}``)."""
    if jitter < 0:
        raise ValueError(f"--jitter must be >= 0, got {jitter}")
    if max(samples) > 1 and jitter == 0:
        raise ValueError("best-of-N needs different starts: give --jitter > 0 (or --samples 1)")
    dtype = next(task.parameters()).dtype
    clean = clean.to(dtype)
    count = max(steps)
    config = thinking_config(task.objective, num_steps=count, step_size=step_size)
    out = ImageThinking(list(steps), list(samples), list(task.eval_levels), clean.shape[0], float(jitter))
    pictures: dict[str, dict[str, Tensor]] = {}

    def energy_fn(y: Tensor) -> Tensor:
        return task.model.energy(None, y)

    for index, level in enumerate(task.eval_levels):
        name = level_name(level)
        noisy = task._noisy(clean, level, index)
        out.psnr[name], out.mse[name], out.energy[name] = {}, {}, {}
        for n in samples:
            starts = noisy.repeat_interleave(n, dim=0)  # rows b*n .. b*n+n-1: image b's candidates
            if n > 1:
                generator = torch.Generator(device=clean.device).manual_seed(seed + 104729 * index + n)
                jitters = jitter * torch.randn(starts.shape, generator=generator, device=starts.device, dtype=dtype)
                jitters.view(clean.shape[0], n, *clean.shape[1:])[:, 0] = 0.0  # candidate 1: the plain start
                starts = starts + jitters
            targets = clean.repeat_interleave(n, dim=0)
            kept: list[Tensor] = []

            def record(y: Tensor) -> Tensor:
                if n == 1 and show:
                    kept.append(y[:show].detach().clone())
                return unit_range_errors(y, targets)[0].to(y.dtype)

            result = think(energy_fn, starts, config, record=record)
            energies, mse = best_of_n_trace(result, n)  # [K+1, B] each
            psnr = 10.0 * torch.log10(1.0 / mse.double().clamp_min(1e-10))
            out.mse[name][n] = mse.double().mean(dim=1).tolist()
            out.psnr[name][n] = psnr.mean(dim=1).tolist()
            out.energy[name][n] = energies.double().mean(dim=1).tolist()
            if n == 1:
                out.uncertainty[name] = float(spearman(result.energy_trace[-1], result.records[-1]))
                if show:
                    pictures[name] = {"clean": clean[:show], "noisy": noisy[:show],
                                      **{f"ebt_{k}": kept[k] for k in steps}}
        if baseline is not None:
            out.baseline_psnr[name] = {}
            t_start = baseline.diffusion.timestep(level)
            shown: dict[int, Tensor] = {}
            with torch.no_grad():
                for passes in baseline.sampling_steps:
                    if passes > t_start + 1:
                        continue
                    denoised = baseline.diffusion.ddim(baseline.model, noisy.to(next(baseline.parameters()).dtype),
                                                       t_start, passes, clip_denoised=baseline.clip_denoised)
                    out.baseline_psnr[name][passes] = float(unit_range_errors(denoised, clean)[1].mean())
                    shown[passes] = denoised[:show]
            if show and name in pictures and shown:  # the grid shows the DiT at its best pass count
                best = max(shown, key=lambda passes: out.baseline_psnr[name][passes])
                pictures[name]["dit"], pictures[name]["dit_passes"] = shown[best], torch.tensor(best)
    return out, pictures


def write_image_thinking(result: ImageThinking, pictures: dict[str, dict[str, Tensor]], out: Path) -> list[Path]:
    """``think.json``, ``psnr_vs_steps_<level>.png`` per level and ``denoising_<level>.png`` image grids."""
    from energyflow import plots

    out.mkdir(parents=True, exist_ok=True)
    json_path, temporary = out / "think.json", out / "think.json.tmp"
    temporary.write_text(json.dumps(asdict(result), indent=2))
    os.replace(temporary, json_path)
    written = [json_path]
    for level in result.levels:
        name = level_name(level)
        series = {f"EBT, {n} sample{'s' if n > 1 else ''}": [result.psnr[name][n][k] for k in result.steps]
                  for n in result.samples}
        baseline = result.baseline_psnr.get(name)
        reference = None
        if baseline:
            passes = max(baseline, key=lambda p: baseline[p])
            reference = (f"DiT, best ({passes} DDIM passes)", baseline[passes])
        written.append(plots.line_plot(out / f"psnr_vs_steps_{name}.png", result.steps, series,
                                       xlabel="EBT descent steps", ylabel="PSNR (dB)",
                                       title=f"denoising at noise level {name}", reference=reference, log_x=True))
        if name in pictures:
            written.append(plots.image_grid(out / f"denoising_{name}.png", _grid_columns(pictures[name], result.steps),
                                            title=f"noise level {name}: rows are held-out images"))
    return written


def _grid_columns(pictures: dict[str, Tensor], steps: Sequence[int]) -> dict[str, Tensor]:
    """Column title -> ``[rows, C, H, W]`` in [-1, 1]: clean, noisy, the EBT after each step count, the DiT (at its
    best number of DDIM passes on these images)."""
    columns = {"clean": pictures["clean"], "noisy": pictures["noisy"]}
    columns.update({f"EBT {k} step{'s' if k > 1 else ''}": pictures[f"ebt_{k}"] for k in steps})
    if "dit" in pictures:
        columns[f"DiT {int(pictures['dit_passes'])} passes"] = pictures["dit"]
    return columns
