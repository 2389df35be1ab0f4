"""Image denoising, EBT vs DiT: seconds per network pass and quality against passes, in one run.

Speed: four operations on the same backbone size, image size and batch, timed in one process with their calls
interleaved round by round (a change in machine load hits all alike), median over rounds:
- ``ebt_train_step``: one EBT training step with one descent step (the forward, the backward w.r.t. the image
  with its second-order graph, the smooth-L1 loss and the backward to the weights through that gradient);
- ``ebt_inference_step``: one descent step at inference (one forward and one backward w.r.t. the image);
- ``dit_train_step``: one DDPM training step (forward, eps-MSE, backward to the weights);
- ``dit_sampling_step``: one DDIM pass (one forward without a graph).
Each is reported in seconds and as a ratio to the DiT sampling step (one forward pass).

Quality: PSNR (and MSE) against network passes for both models of a trained ``experiments/image_denoising.gin``
run (``--runs DIR``, the compare root), at every evaluation noise level; with the speed numbers, also against
seconds of inference per image batch.

    python benchmarks/image_denoising.py --runs runs/image_denoising
Writes benchmarks/results/image_denoising.json and .md and, with --plot, docs/images_psnr_vs_passes.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from energyflow import bench  # noqa: E402
from architectures import BidirectionalConfig, BidirectionalTransformer  # noqa: E402
from energyflow.models import ImageEBM  # noqa: E402
from energyflow.objectives import EBTObjective, InputState, SmoothL1  # noqa: E402
from energyflow.tasks import DiffusionDenoisingTask, ImageDenoisingTask  # noqa: E402
from samplers import GradientDescent  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OPERATIONS = ("ebt_train_step", "ebt_inference_step", "dit_train_step", "dit_sampling_step")


def operations(size: str, image_size: int, patch_size: int, batch: int) -> dict[str, Callable[[], None]]:
    """The four timed calls (see the module docstring), on fresh models of the experiment's shape."""
    torch.manual_seed(0)
    config = BidirectionalConfig.from_preset(size, image_size=image_size, patch_size=patch_size, in_channels=3,
                                             mlp_ratio=1.0)
    ebt = ImageDenoisingTask(ImageEBM(BidirectionalTransformer(config)),
                             EBTObjective(GradientDescent(3000.0, learnable=True), num_steps=1,
                                          initial_state=InputState(), loss=SmoothL1()))
    dit = DiffusionDenoisingTask(BidirectionalTransformer(config, mode="denoise"))
    with torch.no_grad():  # off the zero init, so no branch is trivially zero
        for parameter in list(ebt.parameters()) + list(dit.parameters()):
            if parameter.dim() > 1:
                parameter.add_(0.02 * torch.randn_like(parameter))
    clean = torch.rand(batch, 3, image_size, image_size) * 2 - 1
    noisy = ebt.diffusion.noise(clean, 0.1, torch.Generator().manual_seed(0))
    t = torch.full((batch,), 99)
    generator = torch.Generator().manual_seed(0)

    def ebt_train_step() -> None:
        loss, _ = ebt.loss({"images": clean}, step=0, generator=generator)
        loss.backward()

    def ebt_inference_step() -> None:
        y = noisy.detach().requires_grad_()
        (grad,) = torch.autograd.grad(ebt.model.energy(None, y).sum(), y)
        _ = y.detach() - 3000.0 * grad

    def dit_train_step() -> None:
        loss, _ = dit.loss({"images": clean}, step=0, generator=generator)
        loss.backward()

    def dit_sampling_step() -> None:
        with torch.no_grad():
            dit.model(noisy, t)

    return {"ebt_train_step": ebt_train_step, "ebt_inference_step": ebt_inference_step,
            "dit_train_step": dit_train_step, "dit_sampling_step": dit_sampling_step}


def time_operations(calls: dict[str, Callable[[], None]], rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call, the calls interleaved round by round (``energyflow.bench``)."""
    return bench.medians(bench.interleaved(calls, rounds=rounds, warmup=warmup))


def quality(runs: Path) -> dict[str, dict]:
    """PSNR/MSE vs passes of the trained ``dit`` and ``ebt`` runs under ``runs`` (``energyflow eval``'s numbers)."""
    from energyflow.experiment import evaluate_steps
    from energyflow.runs import load_run

    found = {}
    for name in ("dit", "ebt"):
        result, _, step = load_run(runs / name, device="cpu")
        by_steps = evaluate_steps(result, [1, 2, 4, 8])
        found[name] = {"checkpoint_step": step, "steps": {str(k): v for k, v in by_steps.items()},
                       "levels": [f"{level:g}" for level in result.task.eval_levels]}
    return found


def markdown(speed: dict[str, float], quality_numbers: Optional[dict], args: argparse.Namespace) -> str:
    unit = speed["dit_sampling_step"]
    lines = [f"# Image denoising: EBT vs DiT ({args.size}, {args.image_size}x{args.image_size} RGB, patch "
             f"{args.patch_size}, batch {args.batch}, {torch.get_num_threads()} CPU threads)", "",
             "| operation | seconds | x one DiT forward pass |", "|---|---:|---:|"]
    lines += [f"| {name} | {speed[name]:.4f} | {speed[name] / unit:.2f} |" for name in OPERATIONS]
    if quality_numbers:
        levels = quality_numbers["ebt"]["levels"]
        lines += ["", "| model | steps | forward passes | backward passes | inference seconds per batch | "
                  + " | ".join(f"MSE @{lv} | PSNR @{lv}" for lv in levels) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|---:|" * len(levels)]
        for name in ("dit", "ebt"):
            per_step = speed["dit_sampling_step"] if name == "dit" else speed["ebt_inference_step"]
            for steps, values in quality_numbers[name]["steps"].items():
                cells = " | ".join(f"{values[f'mse@{lv}']:.5f} | {values[f'psnr@{lv}']:.2f}" for lv in levels)
                label = "noisy input" if steps == "0" else name.upper()
                lines.append(f"| {label} | {steps} | {values['forward_passes']:.0f} | {values['backward_passes']:.0f} "
                             f"| {int(steps) * per_step:.3f} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(quality_numbers: dict, path: Path) -> Path:
    from energyflow import plots

    plt = plots._pyplot()
    levels = quality_numbers["ebt"]["levels"]
    figure, axes = plt.subplots(1, len(levels), figsize=(5.0 * len(levels), 3.8), dpi=120, squeeze=False)
    for ax, level in zip(axes[0], levels):
        for name, marker in (("dit", "s"), ("ebt", "o")):
            points = [(v["forward_passes"] + v["backward_passes"], v[f"psnr@{level}"])
                      for k, v in quality_numbers[name]["steps"].items() if k != "0"]
            ax.plot(*zip(*points), marker=marker, label=f"{name.upper()} (forward + backward passes)")
        noisy = quality_numbers["ebt"]["steps"]["0"][f"psnr@{level}"]
        ax.axhline(noisy, color="gray", linestyle="--", label="noisy input")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="network passes", ylabel="PSNR (dB)", title=f"noise level {level}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return plots._save(figure, plt, path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4xs")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs", type=Path, help="a trained experiments/image_denoising.gin compare root")
    parser.add_argument("--plot", action="store_true", help="also draw docs/images_psnr_vs_passes.png")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    speed = time_operations(operations(args.size, args.image_size, args.patch_size, args.batch), args.rounds)
    quality_numbers = quality(args.runs) if args.runs else None
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"settings": {"size": args.size, "image_size": args.image_size, "patch_size": args.patch_size,
                           "batch": args.batch, "rounds": args.rounds, "threads": torch.get_num_threads(),
                           "torch": torch.__version__},
              "seconds": speed, "ratio_to_dit_forward": {k: v / speed["dit_sampling_step"] for k, v in speed.items()},
              "quality": quality_numbers}
    table = markdown(speed, quality_numbers, args)
    bench.write(args.out, "image_denoising", record, table)
    print(table)
    if args.plot and quality_numbers:
        print(f"wrote {plot(quality_numbers, ROOT / 'docs' / 'images_psnr_vs_passes.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
