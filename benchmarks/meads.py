"""MEADS against batched HMC per gradient: minimum ESS per 1k gradients of the draws and of their squares.

    python -m benchmarks.meads            # writes benchmarks/results/meads.{json,md} (a few minutes, one thread)
    python -m benchmarks.meads --quick    # smoke run with tiny settings (numbers meaningless)

Targets: Neal's funnel ``Funnel(dim=10, scale=3.0)`` and the rotated 100-d Gaussian with condition number 100
(``Gaussian.ill_conditioned(dim=100)``). HMC runs as ``docs/samplers.md`` advises when all chains share a target
(pooled mass, shared step size) with the library's quarter-turn rule (``trajectory="quarter_turn"``: an 8-step
warmup, then L from the whitened draws, step-size jitter 0.3), and the funnel at ``target_accept=0.95``. MEADS runs
with its defaults. ``benchmarks/sampler_speed.py`` runs both against every other sampler and the peers.
Both start from the same states; every gradient counts, warmup and pilot included (a gradient: one chain's
energy+gradient). Per gradient, not per second: the CPU is shared, and clocks would measure the load. Also
reported: the sd of the funnel's v against its true 3 (a sampler that cannot enter the neck reports less).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from benchmarks.sampler_speed import _ess
from energyflow import bench
from samplers import HMC, MEADS
from samplers.zoo import Funnel, Gaussian, Target

RESULTS = Path(__file__).parent / "results"


def _row(name: str, states: torch.Tensor, gradients: float, target: Target, **extra) -> dict:
    ess, ess_squares = _ess(states), _ess((states - target.mean.to(states)).square())
    return {"sampler": name, "chains": states.shape[1], "kept_draws_per_chain": states.shape[0],
            "gradients": gradients, "ess_min_per_1k_gradients": 1e3 * float(ess.min()) / gradients,
            "ess_squares_min_per_1k_gradients": 1e3 * float(ess_squares.min()) / gradients,
            "sd_first_coordinate": float(states[..., 0].double().std()),
            "true_sd_first_coordinate": float(target.variance[0].sqrt()), **extra}


def run_hmc(target: Target, y0: torch.Tensor, *, warmup: int, num_steps: int, target_accept: float, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    sampler = HMC(trajectory="quarter_turn", pooled_mass=True, shared_step_size=True, target_accept=target_accept)
    trajectory = sampler.run(target, y0, num_steps=num_steps, warmup=warmup, generator=generator)
    num_leapfrog_steps = int(trajectory.adapted["num_leapfrog_steps"])
    gradients = float(trajectory.warmup_info["num_leapfrog_steps"].sum() + trajectory.info["num_leapfrog_steps"].sum())
    return _row(f"HMC (pooled, quarter-turn rule, jitter {sampler.step_size_jitter}, L = {num_leapfrog_steps})",
                trajectory.states, gradients, target, acceptance=float(trajectory.acceptance_rate().mean()),
                divergences=int(trajectory.num_divergent().sum() + trajectory.warmup_info["divergent"].sum()),
                step_size=float(trajectory.adapted["step_size"][0]), num_leapfrog_steps=num_leapfrog_steps,
                warmup=warmup, target_accept=target_accept)


def run_meads(target: Target, y0: torch.Tensor, *, warmup: int, num_steps: int, thin: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    sampler = MEADS()
    trajectory = sampler.run(target, y0, num_steps=num_steps, warmup=warmup, thin=thin, generator=generator)
    moving = math.ceil(y0.shape[0] * (sampler.num_folds - 1) / sampler.num_folds)  # one fold rests per warmup step
    gradients = warmup * moving + num_steps * y0.shape[0]
    warmup_divergent = trajectory.warmup_info["divergent"].sum()
    return _row(f"MEADS (K = {sampler.num_folds}, thin {thin})", trajectory.states, gradients, target,
                acceptance=float(trajectory.acceptance_rate().mean()),
                divergences=int(trajectory.num_divergent().sum() + warmup_divergent),
                step_size=float(trajectory.adapted["step_size"].mean()),
                damping=float(trajectory.adapted["damping"].mean()), warmup=warmup)


def _settings(quick: bool) -> dict:
    if quick:
        return {"chains": 16, "hmc": {"warmup": 20, "num_steps": 20},
                "meads": {"warmup": 40, "num_steps": 40, "thin": 2}}
    # MEADS's kept draws are thinned by 4 (its draws are strongly autocorrelated, one gradient each; thinning
    # bounds the ESS computation's memory and costs little ESS). Warmups: HMC as in benchmarks.sampler_speed;
    # MEADS 1000 iterations (750 gradients per chain), since its first iterations take tiny steps.
    return {"chains": 512, "hmc": {"warmup": 300, "num_steps": 1000},
            "meads": {"warmup": 1000, "num_steps": 4000, "thin": 4}}


def markdown(results: dict) -> str:
    lines = ["| target | sampler | chains x kept draws | gradients | ESS per 1k gradients (min) | same, squares | "
             "sd of y[0] (true) | acceptance | divergences |", "|---|---|---|---|---|---|---|---|---|"]
    for target_name, rows in results["targets"].items():
        for row in rows:
            lines.append(f"| {target_name} | {row['sampler']} | {row['chains']} x {row['kept_draws_per_chain']} | "
                         f"{row['gradients']:.3g} | {row['ess_min_per_1k_gradients']:.3f} | "
                         f"{row['ess_squares_min_per_1k_gradients']:.3f} | {row['sd_first_coordinate']:.3f} "
                         f"({row['true_sd_first_coordinate']:.3f}) | {row['acceptance']:.3f} | {row['divergences']} |")
    lines.append("")
    lines.append(f"{results['machine'].get('threads', '?')} intra-op thread(s). ESS: minimum over coordinates, over "
                 "all chains, of the draws and of their squared deviations from the true mean, per 1000 gradients "
                 "of the whole run (warmup and pilot included). Divergences include warmup and pilot.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for meads.json / meads.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = _settings(args.quick)
    targets = {"neals_funnel_10d": (Funnel(dim=10, scale=3.0), 0.95),
               "gaussian_100d_cond100_rotated": (Gaussian.ill_conditioned(dim=100, condition_number=100.0), 0.8)}
    results = {"machine": bench.machine(), "settings": settings, "targets": {}}
    for name, (target, target_accept) in targets.items():
        y0 = target.initial_state(settings["chains"], torch.Generator().manual_seed(0))
        results["targets"][name] = [
            run_hmc(target, y0, **settings["hmc"], target_accept=target_accept, seed=1),
            run_meads(target, y0, **settings["meads"], seed=1),
        ]
        print(markdown({"machine": results["machine"], "targets": {name: results["targets"][name]}}), flush=True)
    stem = "meads_quick" if args.quick else "meads"
    bench.write(args.out, stem, results, markdown(results))
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
