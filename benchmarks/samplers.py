"""Effective samples per second: batched HMC against pyro-ppl's NUTS and HMC, side by side in one run.

    python -m benchmarks.samplers            # full run (a few minutes), writes benchmarks/results/samplers.{json,md}
    python -m benchmarks.samplers --quick    # smoke run with tiny settings (numbers meaningless)

Targets: a 100-dimensional Gaussian with condition number 100 under a random rotation (so a diagonal mass
matrix cannot undo it), the same Gaussian unrotated (which a diagonal mass matrix whitens), and Neal's
funnel (10-d, v ~ N(0, 3^2)). Every contender adapts its step size
(dual averaging) and a diagonal mass matrix during its warmup, and its clock covers the whole run,
warmup included. The pyro baselines are used the way a user would: ``pyro.infer.MCMC`` with a
``NUTS``/``HMC`` kernel on ``potential_fn``, one chain (pyro's multi-chain mode runs one process per
chain, which on this shared 2-core CPU adds start-up cost and no throughput). Every contender runs with
one intra-op thread. ESS per second is the minimum over coordinates; accuracy columns guard against
speed bought with wrong answers: max over coordinates of |mean error| / sd, and of the relative error of
the variance (the funnel's x-coordinates are excluded from the variance column: their variance
exp(4.5) ~ 90 is dominated by rare draws deep in the mouth, so no run of this length estimates it).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

if __name__ == "__main__" and not __package__:
    # Run as a file, this script's folder would come first on sys.path and this file would shadow the
    # `samplers` package; put the repository root there instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import pyro
import torch
from pyro.infer import HMC as PyroHMC
from pyro.infer import MCMC
from pyro.infer import NUTS as PyroNUTS

from samplers import HMC
from samplers.diagnostics import effective_sample_size
from samplers.zoo import Funnel, Gaussian, Target

RESULTS = Path(__file__).parent / "results"


def _accuracy(states: torch.Tensor, target: Target, variance_coordinates: slice) -> dict[str, float]:
    draws = states.detach().double().flatten(0, 1)  # [T * C, dim]
    sd = target.variance.sqrt()
    mean_error = ((draws.mean(0) - target.mean).abs() / sd).max()
    variance = draws.var(0)[variance_coordinates]
    variance_error = ((variance - target.variance[variance_coordinates]).abs() / target.variance[variance_coordinates]).max()
    return {"max_abs_mean_error_over_sd": float(mean_error), "max_rel_variance_error": float(variance_error)}


def _result(name: str, states: torch.Tensor, seconds: float, gradient_evaluations: float, target: Target,
            variance_coordinates: slice, **extra) -> dict:
    ess = effective_sample_size(states)  # states [T, C, dim]
    return {
        "sampler": name,
        "chains": states.shape[1],
        "kept_draws_per_chain": states.shape[0],
        "seconds_incl_warmup": seconds,
        "ess_min": float(ess.min()),
        "ess_per_second_min": float(ess.min()) / seconds,
        "gradient_evaluations": gradient_evaluations,
        **_accuracy(states, target, variance_coordinates),
        **extra,
    }


def run_batched_hmc(target: Target, *, num_chains: int, warmup: int, num_steps: int, num_leapfrog_steps: int,
                    seed: int, variance_coordinates: slice) -> dict:
    generator = torch.Generator().manual_seed(seed)
    y0 = target.initial_state(num_chains, generator)
    sampler = HMC(step_size=0.1, num_leapfrog_steps=num_leapfrog_steps)
    start = time.perf_counter()
    trajectory = sampler.run(target, y0, num_steps=num_steps, warmup=warmup, generator=generator)
    seconds = time.perf_counter() - start
    evaluations = num_chains * (warmup + num_steps) * num_leapfrog_steps
    return _result(f"batched HMC ({num_chains} chains, {num_leapfrog_steps} leapfrog)", trajectory.states, seconds,
                   evaluations, target, variance_coordinates,
                   acceptance=float(trajectory.acceptance_rate().mean()),
                   divergences=int(trajectory.num_divergent().sum()))


def run_pyro(kernel_name: str, make_kernel: Callable, target: Target, *, warmup: int, num_steps: int, seed: int,
             variance_coordinates: slice) -> dict:
    """One chain through ``pyro.infer.MCMC``, as a pyro user would run it on a potential function."""
    calls = [0]

    def potential_fn(params: dict) -> torch.Tensor:
        calls[0] += 1
        return target.energy(params["y"].unsqueeze(0)).sum()

    pyro.set_rng_seed(seed)
    y0 = target.initial_state(1, torch.Generator().manual_seed(seed))[0]
    mcmc = MCMC(make_kernel(potential_fn), num_samples=num_steps, warmup_steps=warmup,
                initial_params={"y": y0}, num_chains=1, disable_progbar=True)
    start = time.perf_counter()
    mcmc.run()
    seconds = time.perf_counter() - start
    states = mcmc.get_samples()["y"].unsqueeze(1)  # [T, 1, dim]
    diagnostics = mcmc.diagnostics()
    divergences = sum(len(chain) for chain in diagnostics["divergences"].values())
    return _result(f"pyro {kernel_name} (1 chain)", states, seconds, calls[0], target, variance_coordinates,
                   acceptance=float(diagnostics["acceptance rate"]["chain 0"]), divergences=divergences)


def benchmark_target(target: Target, settings: dict, variance_coordinates: slice) -> list[dict]:
    hmc, pyro_run = settings["hmc"], settings["pyro"]
    leapfrog = hmc["num_leapfrog_steps"]
    return [
        run_batched_hmc(target, **hmc, seed=0, variance_coordinates=variance_coordinates),
        run_pyro("NUTS", lambda fn: PyroNUTS(potential_fn=fn, adapt_step_size=True, adapt_mass_matrix=True),
                 target, **pyro_run, seed=0, variance_coordinates=variance_coordinates),
        run_pyro(f"HMC ({leapfrog} leapfrog)",
                 lambda fn: PyroHMC(potential_fn=fn, num_steps=leapfrog, adapt_step_size=True, adapt_mass_matrix=True),
                 target, **pyro_run, seed=0, variance_coordinates=variance_coordinates),
    ]


def _settings(quick: bool) -> dict:
    if quick:
        small = {"hmc": {"num_chains": 16, "warmup": 20, "num_steps": 20, "num_leapfrog_steps": 4},
                 "pyro": {"warmup": 10, "num_steps": 10}}
        return {"gaussian": small, "funnel": small}
    return {
        "gaussian": {"hmc": {"num_chains": 1024, "warmup": 200, "num_steps": 600, "num_leapfrog_steps": 12},
                     "pyro": {"warmup": 300, "num_steps": 900}},
        "funnel": {"hmc": {"num_chains": 1024, "warmup": 200, "num_steps": 600, "num_leapfrog_steps": 16},
                   "pyro": {"warmup": 300, "num_steps": 900}},
    }


def markdown(results: dict) -> str:
    lines = [
        "| target | sampler | chains x kept draws | seconds (incl. warmup) | ESS min | ESS/s min | vs pyro NUTS | "
        "max abs mean err / sd | max rel var err | acceptance | divergences |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for target_name, rows in results["targets"].items():
        nuts = next(row for row in rows if row["sampler"].startswith("pyro NUTS"))
        for row in rows:
            ratio = row["ess_per_second_min"] / nuts["ess_per_second_min"]
            lines.append(
                f"| {target_name} | {row['sampler']} | {row['chains']} x {row['kept_draws_per_chain']} | "
                f"{row['seconds_incl_warmup']:.1f} | {row['ess_min']:.0f} | {row['ess_per_second_min']:.1f} | "
                f"{ratio:.0f}x | {row['max_abs_mean_error_over_sd']:.3f} | {row['max_rel_variance_error']:.3f} | "
                f"{row['acceptance']:.2f} | {row['divergences']} |"
            )
    lines.append("")
    lines.append("Clocks include warmup for every sampler; one intra-op thread each. ESS: minimum over coordinates, "
                 "over all chains. Acceptance: batched HMC reports its mean Metropolis acceptance probability, pyro "
                 "its fraction of accepted transitions (NUTS almost always moves).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for samplers.json / samplers.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = _settings(args.quick)
    targets = {
        "gaussian_100d_cond100_rotated": (Gaussian.ill_conditioned(dim=100, condition_number=100.0), "gaussian"),
        # The same spectrum without the rotation: a diagonal mass matrix can whiten it completely.
        "gaussian_100d_cond100_diagonal": (Gaussian.ill_conditioned(dim=100, condition_number=100.0, rotate=False),
                                           "gaussian"),
        "neals_funnel_10d": (Funnel(dim=10, scale=3.0), "funnel"),
    }
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "pyro": pyro.__version__, "threads": torch.get_num_threads()},
        "settings": settings,
        "targets": {},
    }
    for name, (target, key) in targets.items():
        variance_coordinates = slice(0, 1) if key == "funnel" else slice(None)
        results["targets"][name] = benchmark_target(target, settings[key], variance_coordinates)
        print(markdown({"targets": {name: results["targets"][name]}}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "samplers_quick" if args.quick else "samplers"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(results))
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
