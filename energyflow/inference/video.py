"""Thinking on video: a video EBT (``NextFrameEBTTask``) rolling held-out clips out with more descent steps than it
trained with and best-of-N (re-drawn starts around the copied frame), its energy per predicted frame as
uncertainty -- against the error, and on the frames where digits collide or bounce off a wall -- with a
Transformer++ run (``NextFrameRegressionTask``) as the reference. ``energyflow think RUN_DIR`` on a video EBT
calls this; it writes ``think.json``, a strip image (context | truth | EBT | Transformer++) and an animated GIF.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from energyflow.tasks.image import unit_range_errors
from energyflow.metrics import spearman
from energyflow.tasks.video import NextFrameEBTTask, NextFrameRegressionTask


@dataclass
class VideoThinking:
    """Means over the clips: ``psnr[k][n]`` / ``mse[k][n]`` per horizon (1..m) after ``k`` steps with ``n`` samples;
    ``energy[k][n]`` of the chosen frames per horizon; ``spearman[k]``: energy vs MSE over every rolled-out frame
    (1 sample); ``energy_events[k]``: mean energy (1 sample) of rolled-out frames by what the true frame shows
    (``collision``, ``bounce``, ``neither``); ``copy_psnr`` / ``baseline_psnr`` per horizon."""

    steps: list[int]
    samples: list[int]
    context_frames: int
    rollout_frames: int
    num_clips: int
    jitter: float
    psnr: dict[int, dict[int, list[float]]] = field(default_factory=dict)
    mse: dict[int, dict[int, list[float]]] = field(default_factory=dict)
    energy: dict[int, dict[int, list[float]]] = field(default_factory=dict)
    spearman: dict[int, float] = field(default_factory=dict)
    energy_events: dict[int, dict[str, Optional[float]]] = field(default_factory=dict)
    copy_psnr: list[float] = field(default_factory=list)
    baseline_psnr: Optional[list[float]] = None


def _per_horizon(prediction: Tensor, truth: Tensor) -> tuple[list[float], list[float], Tensor]:
    """``[B, m, F]`` each -> mean MSE and PSNR per horizon, and the per-frame MSE ``[B, m]``."""
    mse, psnr = unit_range_errors(prediction.flatten(0, 1), truth.flatten(0, 1))
    mse, psnr = mse.view(prediction.shape[:2]), psnr.view(prediction.shape[:2])
    return mse.mean(0).tolist(), psnr.mean(0).tolist(), mse


def video_thinking(task: NextFrameEBTTask, clips: Tensor, *, steps: Sequence[int], samples: Sequence[int],
                   jitter: float = 0.05, seed: int = 0, step_size: Optional[float] = None,
                   baseline: Optional[NextFrameRegressionTask] = None, collisions: Optional[Tensor] = None,
                   bounces: Optional[Tensor] = None) -> tuple[VideoThinking, dict[str, Tensor]]:
    """Roll ``clips [B, T, C, H, W]`` out from their first ``task.context_frames`` frames (see the module); returns
    the numbers and the frames to draw (``truth``, ``ebt``, ``transformer`` ``[B, T, C, H, W]``: context then rollout,
    the EBT at ``max(steps)`` steps with one sample)."""
    if jitter < 0:
        raise ValueError(f"--jitter must be >= 0, got {jitter}")
    if max(samples) > 1 and jitter == 0:
        raise ValueError("best-of-N needs different starts: give --jitter > 0 (or --samples 1)")
    n, m = task.context_frames, task.rollout_frames
    if clips.shape[1] < n + m:
        raise ValueError(f"clips of {clips.shape[1]} frames cannot hold {n} context and {m} rolled-out frames")
    dtype = next(task.parameters()).dtype
    vectors, pixels = task.to_work(clips), clips.flatten(2).to(dtype)  # the models' space (latents?) and pixels
    context, truth = vectors[:, :n], pixels[:, n:n + m]
    out = VideoThinking(list(steps), list(samples), n, m, clips.shape[0], float(jitter))
    out.copy_psnr = _per_horizon(pixels[:, n - 1:n].expand(-1, m, -1), truth)[1]
    drawn: dict[str, Tensor] = {"truth": clips[:, :n + m]}
    events = {"collision": collisions, "bounce": bounces}
    for k in steps:
        config = task.thinking(k, step_size=step_size)
        out.psnr[k], out.mse[k], out.energy[k] = {}, {}, {}
        for count in samples:
            generator = torch.Generator(device=vectors.device).manual_seed(seed + 7919 * k + count)
            frames, energies = task.rollout(context, m, k, config=config, num_candidates=count, jitter=jitter,
                                            generator=generator)
            frames = task.to_pixels(frames)
            mse, psnr, per_frame = _per_horizon(frames, truth)
            out.mse[k][count], out.psnr[k][count] = mse, psnr
            out.energy[k][count] = energies.double().mean(0).tolist()
            if count == samples[0]:
                out.spearman[k] = float(spearman(energies.flatten(), per_frame.flatten()))
                out.energy_events[k] = _energy_by_event(energies, events, n, m)
                if k == max(steps):
                    drawn["ebt"] = torch.cat((clips[:, :n], frames.view(-1, m, *clips.shape[2:]).to(clips.dtype)), 1)
    if baseline is not None:
        base_context = baseline.to_work(clips)[:, :n]
        rolled = baseline.to_pixels(baseline.rollout(base_context, m)).to(dtype)
        out.baseline_psnr = _per_horizon(rolled, truth)[1]
        drawn["transformer"] = torch.cat((clips[:, :n], rolled.view(-1, m, *clips.shape[2:]).to(clips.dtype)), 1)
    return out, drawn


def _energy_by_event(energies: Tensor, events: dict[str, Optional[Tensor]], n: int, m: int) -> dict[str, Optional[float]]:
    """Mean energy of the rolled-out frames ``[B, m]`` whose true frame shows each event (None where none does)."""
    flags = {name: value[:, n:n + m].to(energies.device) for name, value in events.items() if value is not None}
    if not flags:
        return {}
    neither = torch.ones_like(energies, dtype=torch.bool)
    for value in flags.values():
        neither &= ~value
    flags["neither"] = neither
    return {name: (float(energies[mask].double().mean()) if mask.any() else None) for name, mask in flags.items()}


def write_video_thinking(result: VideoThinking, drawn: dict[str, Tensor], out: Path, *, show: int = 4) -> list[Path]:
    """``think.json``, ``psnr_vs_horizon.png``, ``strip.png`` (per clip: the last context frames, then truth, EBT
    and Transformer++ per horizon) and ``rollout.gif`` (truth | EBT | Transformer++ side by side over time)."""
    from energyflow import plots

    out.mkdir(parents=True, exist_ok=True)
    json_path, temporary = out / "think.json", out / "think.json.tmp"
    temporary.write_text(json.dumps(asdict(result), indent=2))
    os.replace(temporary, json_path)
    horizons = list(range(1, result.rollout_frames + 1))
    first = result.samples[0]
    series = {f"EBT, {k} step{'s' if k > 1 else ''}": result.psnr[k][first] for k in result.steps}
    series["copy last frame"] = result.copy_psnr
    if result.baseline_psnr is not None:
        series["Transformer++"] = result.baseline_psnr
    written = [json_path, plots.line_plot(out / "psnr_vs_horizon.png", horizons, series, xlabel="frames ahead",
                                          ylabel="PSNR (dB)", title="rollout from held-out context")]
    n, rows = result.context_frames, min(show, result.num_clips)
    columns = {f"context t-{i}": drawn["truth"][:rows, n - 1 - i] for i in (1, 0)}
    for name in ("truth", "ebt", "transformer"):
        if name in drawn:
            label = {"truth": "truth", "ebt": "EBT", "transformer": "Transformer++"}[name]
            columns.update({f"{label} +{h}": drawn[name][:rows, n - 1 + h] for h in horizons})
    written.append(plots.image_grid(out / "strip.png", columns, title="next frames from held-out context",
                                    reference=None))
    written.append(write_gif(out / "rollout.gif", [drawn[k][:rows] for k in ("truth", "ebt", "transformer")
                                                   if k in drawn]))
    return written


def write_gif(path: Path, videos: list[Tensor], *, scale: int = 4, milliseconds: int = 300) -> Path:
    """An animated GIF: the ``videos`` (each ``[rows, T, C, H, W]`` in [-1, 1]) side by side, rows stacked, one GIF
    frame per time step (Pillow, the ``images`` extra)."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("the GIF needs Pillow: pip install 'energyflow[images]'") from error
    frames = []
    for t in range(videos[0].shape[1]):
        rows = [torch.cat([v[r, t] for v in videos], dim=-1) for r in range(videos[0].shape[0])]  # [C, H, W*k]
        picture = torch.cat(rows, dim=-2)
        unit = ((picture.double() + 1) / 2).clamp(0, 1)
        array = (unit.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        frames.append(image.resize((image.width * scale, image.height * scale), Image.NEAREST))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + ".tmp.gif")
    frames[0].save(temporary, save_all=True, append_images=frames[1:], duration=milliseconds, loop=0)
    os.replace(temporary, path)
    return path
