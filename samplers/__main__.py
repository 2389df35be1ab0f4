"""``python -m samplers``: a short demo that samples zoo targets and prints diagnostics tables.

Batched HMC (256 chains, step size and diagonal mass adapted during warmup) on a correlated 20-d
Gaussian and on a two-mode mixture, then the batched NUTS (128 chains) on a banana; each table is followed by
the largest error of the estimated means against the known truth, in Monte Carlo standard errors.
Takes ~20-40 s on two CPU cores.
"""
from __future__ import annotations

import time

import torch
from rich.console import Console

from samplers.diagnostics import moment_z_scores, summary_table
from samplers.hmc import HMC
from samplers.nuts import NUTS
from samplers.zoo import Banana, Gaussian, GaussianMixture, Target


def _demo(console: Console, name: str, sampler: torch.nn.Module, target: Target, num_chains: int, warmup: int,
          num_steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    y0 = target.initial_state(num_chains, generator)
    start = time.perf_counter()
    trajectory = sampler.run(target, y0, num_steps=num_steps, warmup=warmup, generator=generator)
    seconds = time.perf_counter() - start
    summary_table(trajectory, title=f"{name} on {target.name} ({seconds:.1f} s, warmup {warmup} + {num_steps} steps)")
    z_mean, z_variance = moment_z_scores(trajectory.states, target.mean, target.variance)
    console.print(f"  largest |error| against the known truth: mean {float(z_mean.max()):.2f} MCSE, "
                  f"variance {float(z_variance.max()):.2f} MCSE\n")


def main() -> None:
    torch.set_num_threads(1)  # small batched tensors: threads only contend on a shared CPU
    console = Console()
    console.print("[bold]samplers demo[/bold]: batched HMC with warmup adaptation, then batched NUTS\n")
    _demo(console, "HMC x256", HMC(step_size=0.1, num_leapfrog_steps=10),
          Gaussian.ill_conditioned(dim=20, condition_number=30.0), 256, 200, 300, seed=0)
    _demo(console, "HMC x256", HMC(step_size=0.1, num_leapfrog_steps=10), GaussianMixture.two_modes(dim=2),
          256, 200, 300, seed=1)
    _demo(console, "NUTS x128", NUTS(pooled_mass=True, shared_step_size=True), Banana(curvature=0.25), 128, 150,
          250, seed=2)


if __name__ == "__main__":
    main()
