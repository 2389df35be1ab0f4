"""Batched NUTS (many chains in lockstep) against the pyro adapter (one chain), on a rotated 10-d Gaussian.

    OMP_NUM_THREADS=1 python -m benchmarks.nuts_speed [--chains 256] [--warmup 200] [--draws 300]

Both adapt the step size and a diagonal mass matrix in their warmup; the clock covers the whole run,
warmup included, on one intra-op thread. ESS is the minimum over coordinates, of the draws and of their
squared deviations from the true mean ("squares"). Gradients: "used" counts the leapfrog steps of the
trees themselves (what a sequential NUTS pays); the batched sampler also pays "evaluated", every chain's
step of every lockstep doubling while any chain still builds (C x (2^max depth - 1) per transition).
Prints one markdown row per sampler and the 1-minute load average (the CPU is shared).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from samplers import NUTS, PyroNUTS
from samplers.diagnostics import effective_sample_size
from samplers.zoo import Gaussian


def _row(name: str, trajectory, seconds: float, target: Gaussian, lockstep: bool) -> str:
    states = trajectory.states.double()
    ess = float(effective_sample_size(states).min())
    ess_squares = float(effective_sample_size((states - target.mean) ** 2).min())
    infos = [trajectory.warmup_info, trajectory.info]
    used = sum(float(info["num_leapfrog_steps"].sum()) for info in infos)
    evaluated = used
    if lockstep:
        evaluated = sum(float(((2 ** info["tree_depth"].max(dim=1).values - 1) * info["tree_depth"].shape[1]).sum())
                        for info in infos)
    return (f"| {name} | {states.shape[1]} x {states.shape[0]} | {seconds:.1f} | {ess:.0f} | {ess / seconds:.1f} | "
            f"{ess_squares:.0f} | {ess_squares / seconds:.1f} | {1000 * ess / used:.2f} | {1000 * ess_squares / used:.2f} | "
            f"{1000 * ess / evaluated:.2f} | {1000 * ess_squares / evaluated:.2f} | "
            f"{float(trajectory.info['tree_depth'].mean()):.2f} | {os.getloadavg()[0]:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chains", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--draws", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    target = Gaussian.ill_conditioned(dim=10, condition_number=10.0, seed=0)  # rotated: sds 1 to 0.32
    print("| sampler | chains x kept draws | seconds | ESS min | ESS/s | ESS min (squares) | ESS/s (squares) | "
          "ESS per 1k used gradients | squares per 1k used | ESS per 1k evaluated | squares per 1k evaluated | "
          "mean tree depth | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    batched = NUTS(pooled_mass=True, shared_step_size=True).run(
        target, target.initial_state(args.chains, generator), num_steps=args.draws, warmup=args.warmup,
        generator=generator)
    print(_row("batched NUTS", batched, time.perf_counter() - start, target, lockstep=True), flush=True)
    start = time.perf_counter()
    reference = PyroNUTS().run(target, target.initial_state(1, generator), num_steps=900, warmup=300,
                               generator=generator)
    print(_row("PyroNUTS", reference, time.perf_counter() - start, target, lockstep=False), flush=True)


if __name__ == "__main__":
    main()
