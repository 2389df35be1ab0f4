"""Video next-frame prediction, EBT vs Transformer++: training step time and peak memory at the same size and
clip length, and rollout frames per second, in one run.

Training: one optimizer step of each (the EBT: System 1, two descent steps with the second-order graph; the
Transformer++: one regression step), their calls interleaved round by round (a change in machine load hits both
alike), median over rounds, and the ratio EBT / Transformer++. Peak memory: the peak RSS growth of two steps of
each, measured in a fresh subprocess per model. Rollout: frames per second of an autoregressive rollout from the
context (the EBT descends each new frame against its extended context cache; the Transformer++ uses its KV cache).

    python benchmarks/video.py                      # 4xs, 16 frames of 32x32, batch 16
Writes benchmarks/results/video.json and .md.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from energyflow import bench  # noqa: E402
from architectures import EBT, ContinuousTransformerPP, TransformerConfig  # noqa: E402
from energyflow.models import VectorSequenceEBM  # noqa: E402
from energyflow.objectives import EBTObjective, InputState, SmoothL1  # noqa: E402
from energyflow.tasks import NextFrameEBTTask, NextFrameRegressionTask  # noqa: E402
from samplers import GradientDescent  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("ebt", "transformer")


def build(name: str, size: str, frames: int, features: int, context: int, rollout: int):
    torch.manual_seed(0)
    config = TransformerConfig.from_preset(size, max_seq_len=frames)
    if name == "ebt":
        objective = EBTObjective(GradientDescent(1.0, learnable=True, min_step_size=1e-4), num_steps=2,
                                 initial_state=InputState(), loss=SmoothL1())
        return NextFrameEBTTask(VectorSequenceEBM(EBT(config), features), objective, context_frames=context,
                                rollout_frames=rollout)
    return NextFrameRegressionTask(ContinuousTransformerPP(config, features, attention_backend="fused"),
                                   context_frames=context, rollout_frames=rollout)


def clips(batch: int, frames: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, frames, 1, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def step_fn(task):
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def step(batch) -> None:
        loss, _ = task.loss(batch, step=0, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def memory_child(args) -> None:
    """(subprocess) Print the peak RSS growth of two optimizer steps of one model, in bytes."""
    task = build(args.memory_of, args.size, args.frames, args.side ** 2, args.context, args.rollout)
    step, batch = step_fn(task), {"frames": clips(args.batch, args.frames, args.side)}
    print(bench.peak_memory(lambda: [step(batch) for _ in range(2)], "cpu"))


def peak_memory(name: str, args) -> int:
    command = [sys.executable, __file__, "--memory-of", name, "--size", args.size, "--frames", str(args.frames),
               "--side", str(args.side), "--batch", str(args.batch), "--context", str(args.context), "--rollout",
               str(args.rollout)]
    return int(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def report(args) -> dict:
    tasks = {name: build(name, args.size, args.frames, args.side ** 2, args.context, args.rollout) for name in MODELS}
    steps = {name: step_fn(task) for name, task in tasks.items()}
    batch = {"frames": clips(args.batch, args.frames, args.side)}
    times = bench.interleaved({name: (lambda n=name: steps[n](batch)) for name in MODELS}, rounds=args.rounds,
                              warmup=args.warmup, alternate=False)
    medians = bench.medians(times)
    context = batch["frames"][:, :args.context].flatten(2)
    rollout_seconds = {}
    for name, task in tasks.items():
        task.eval()
        run = (lambda t=task: t.rollout(context, args.rollout, 2)) if name == "ebt" else \
            (lambda t=task: t.rollout(context, args.rollout))
        rollout_seconds[name] = statistics.median(bench.timed(run) for _ in range(args.rounds))
    frames_per_second = {name: args.batch * args.rollout / seconds for name, seconds in rollout_seconds.items()}
    return {"median_step_seconds": medians, "step_seconds": times,
            "ratio_step_ebt_to_transformer": medians["ebt"] / medians["transformer"],
            "peak_memory_growth_bytes": {name: peak_memory(name, args) for name in MODELS},
            "rollout_seconds": rollout_seconds, "rollout_frames_per_second": frames_per_second,
            "ratio_rollout_fps_transformer_to_ebt": frames_per_second["transformer"] / frames_per_second["ebt"]}


def markdown(result: dict, settings: dict) -> str:
    memory = result["peak_memory_growth_bytes"]
    lines = [f"# Video next-frame: EBT vs Transformer++ ({settings['size']}, {settings['frames']} frames of "
             f"{settings['side']}x{settings['side']}, batch {settings['batch']}, {settings['threads']} CPU threads)", "",
             "| model | train step (s) | x Transformer++ | peak memory growth (MiB) | rollout frames / s |",
             "|---|---:|---:|---:|---:|"]
    base = result["median_step_seconds"]["transformer"]
    for name, label in (("ebt", "EBT (System 1, 2 descent steps)"), ("transformer", "Transformer++")):
        seconds = result["median_step_seconds"][name]
        lines.append(f"| {label} | {seconds:.4f} | {seconds / base:.2f} | {memory[name] / 2**20:.1f} | "
                     f"{result['rollout_frames_per_second'][name]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4xs")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=8)
    parser.add_argument("--rollout", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-of", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.memory_of:
        memory_child(args)
        return 0
    settings = {"size": args.size, "frames": args.frames, "side": args.side, "batch": args.batch,
                "context": args.context, "rollout": args.rollout, "rounds": args.rounds,
                "threads": torch.get_num_threads(), "torch": torch.__version__}
    result = report(args)
    table = markdown(result, settings)
    bench.write(args.out, "video", {"settings": settings, "report": result}, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
