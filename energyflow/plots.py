"""PNG plots of thinking results (matplotlib, the optional ``plot`` extra, imported only when a plot is drawn).

Every function takes plain numbers and a path, writes the figure atomically and returns the path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

PathLike = Union[str, Path]


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'energyflow[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(path: PathLike, x: Sequence[float], series: Mapping[str, Sequence[float]], *, xlabel: str,
              ylabel: str, title: str, reference: Optional[tuple[str, float]] = None, log_x: bool = False) -> Path:
    """One line per entry of ``series`` (each as long as ``x``); ``reference`` adds a dashed horizontal line."""
    for name, values in series.items():
        if len(values) != len(x):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(x)} x positions")
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    for name, values in series.items():
        axes.plot(list(x), list(values), marker="o", label=name)
    if reference is not None:
        axes.axhline(reference[1], color="black", linestyle="--", label=reference[0])
    if log_x:
        axes.set_xscale("log", base=2)
        axes.set_xticks(list(x), [f"{v:g}" for v in x])  # 1, 2, 4 rather than 2^0, 2^1, 2^2
        axes.minorticks_off()
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return _save(figure, plt, path)


def _save(figure, plt, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + ".tmp.png")
    try:
        figure.savefig(temporary)
    finally:
        plt.close(figure)
    os.replace(temporary, path)
    return path


def loss_vs_steps(path: PathLike, steps: Sequence[int], loss: Mapping[int, Sequence[float]],
                  baseline_loss: Optional[float] = None, *, title: str = "EBT loss vs thinking steps") -> Path:
    """``loss[n][k]`` for k in ``steps``, one line per number of samples ``n``; the Transformer++ as reference."""
    series = {f"EBT, {n} sample{'s' if n > 1 else ''}": [values[k] for k in steps] for n, values in loss.items()}
    reference = ("Transformer++", baseline_loss) if baseline_loss is not None else None
    return line_plot(path, steps, series, xlabel="thinking steps", ylabel="loss (nats / byte)", title=title,
                     reference=reference, log_x=True)


def verification_gain(path: PathLike, samples: Sequence[int], gain: Mapping[int, Sequence[float]], *,
                      title: str = "self-verification gain") -> Path:
    """``gain[k][i]``: loss reduction of ``samples[i]`` candidates over one, after ``k`` steps."""
    series = {f"{k} steps": list(values) for k, values in gain.items()}
    return line_plot(path, samples, series, xlabel="samples (candidates per input)",
                     ylabel="loss reduction vs 1 sample (nats)", title=title, log_x=True)


def energy_vs_step(path: PathLike, energy: Mapping[int, Sequence[float]], *,
                   title: str = "energy of the chosen prediction vs step") -> Path:
    """``energy[n]``: mean energy after 0..K steps, one line per number of samples."""
    lengths = {len(values) for values in energy.values()}
    if len(lengths) != 1:
        raise ValueError(f"every energy curve must cover the same steps, got lengths {sorted(lengths)}")
    x = list(range(lengths.pop()))
    series = {f"{n} sample{'s' if n > 1 else ''}": list(values) for n, values in energy.items()}
    return line_plot(path, x, series, xlabel="step", ylabel="mean energy", title=title)


def image_grid(path: PathLike, columns: Mapping[str, "object"], *, title: str = "",
               reference: Optional[str] = "clean") -> Path:
    """A grid of images: one column per entry of ``columns`` (title -> tensor ``[rows, C, H, W]`` in [-1, 1]),
    one row per image; every cell but the ``reference`` column's is labelled with its PSNR against it (dB, on
    [0, 1] images)."""
    import torch

    tensors = {name: values.detach().double().cpu() for name, values in columns.items()}
    rows = {values.shape[0] for values in tensors.values()}
    if len(rows) != 1 or not rows or 0 in rows:
        raise ValueError(f"every column needs the same, non-zero number of images, got {sorted(rows)}")
    count = rows.pop()
    plt = _pyplot()
    figure, axes = plt.subplots(count, len(tensors), figsize=(1.6 * len(tensors), 1.7 * count + 0.4), dpi=120,
                                squeeze=False)
    clean = tensors.get(reference) if reference is not None else None
    for j, (name, values) in enumerate(tensors.items()):
        unit = ((values + 1.0) / 2.0).clamp(0.0, 1.0)
        for i in range(count):
            ax = axes[i][j]
            picture = unit[i].permute(1, 2, 0).numpy()
            if picture.shape[-1] == 1:
                ax.imshow(picture[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
            if clean is not None and name != reference:
                target = ((clean[i] + 1.0) / 2.0).clamp(0.0, 1.0)
                mse = float(torch.mean((unit[i] - target) ** 2))
                ax.set_xlabel(f"{10.0 * torch.log10(torch.tensor(1.0 / max(mse, 1e-10))):.1f} dB", fontsize=6)
    if title:
        figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    return _save(figure, plt, path)
