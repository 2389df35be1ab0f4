"""Effective samples per second: batched HMC against pyro-ppl's NUTS and HMC, side by side in one run.

    python -m benchmarks.samplers            # full run (a few minutes), writes benchmarks/results/samplers.{json,md}
    python -m benchmarks.samplers --quick    # smoke run with tiny settings (numbers meaningless)

Targets: a 100-dimensional Gaussian with condition number 100 under a random rotation (so a diagonal mass
matrix cannot undo it), the same Gaussian unrotated (which a diagonal mass matrix whitens), and Neal's
funnel (10-d, v ~ N(0, 3^2)). Every contender adapts its step size
(dual averaging) and a diagonal mass matrix during its warmup, and its clock covers the whole run,
warmup included. The pyro baselines are used the way a user would: ``pyro.infer.MCMC`` with a
``NUTS``/``HMC`` kernel on ``potential_fn``, one chain (pyro's multi-chain mode runs one process per
chain, which on this shared 2-core CPU adds start-up cost and no throughput).

Batched HMC is run as a user following ``docs/samplers.md`` would: pooled mass matrix and one shared step
size (all chains sample one target), step-size jitter, and a leapfrog count from a documented rule. A
pilot (warmup with ``PILOT_LEAPFROG_STEPS``, then a few draws) adapts eps and M^-1; the rule then sets
L = ceil((pi / 2) * sqrt(lambda_max) / eps), where lambda_max is the largest eigenvalue of the pilot
draws' covariance in whitened coordinates (y / sqrt(M^-1)): the slowest direction then turns by about a
quarter period per transition, which decorrelates it, while faster directions get jitter-randomized
phases. The main run starts from the pilot's last states with eps, M^-1 and L fixed; the clock covers
the pilot.

Threads: every contender runs with the machine's default of 2 intra-op threads, with
``OMP_WAIT_POLICY=PASSIVE`` (set below, before torch loads): on this CPU, shared with other jobs, OpenMP's
default busy-waiting made a 1024 x 100 energy+gradient ~100x slower with 2 threads than with 1
(measured 62 ms vs 0.6 ms); passive waiting removes that pathology for every contender alike.
ESS per second is the minimum over coordinates; accuracy columns guard against
speed bought with wrong answers: max over coordinates of |mean error| / sd, and of the relative error of
the variance (the funnel's x-coordinates are excluded from the variance column: their variance
exp(4.5) ~ 90 is dominated by rare draws deep in the mouth, so no run of this length estimates it).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first torch import (see the docstring)

import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import HMC as PyroHMC  # noqa: E402
from pyro.infer import MCMC  # noqa: E402
from pyro.infer import NUTS as PyroNUTS  # noqa: E402

from energyflow import bench  # noqa: E402
from samplers import HMC  # noqa: E402
from samplers.diagnostics import effective_sample_size  # noqa: E402
from samplers.zoo import Funnel, Gaussian, Target  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PILOT_LEAPFROG_STEPS = 8
PILOT_DRAWS = 30  # kept pilot draws per chain for the whitened covariance
STEP_SIZE_JITTER = 0.3


def _ess(states: torch.Tensor, chunk: int = 10) -> torch.Tensor:
    """[T, C, dim] -> [dim] ESS, a few coordinates at a time (the float64 FFT of all of them at once would
    need several GB for 1024 chains x 2000 draws x 100 coordinates)."""
    return torch.cat([effective_sample_size(states[..., i : i + chunk]) for i in range(0, states.shape[-1], chunk)])


def _accuracy(states: torch.Tensor, target: Target, variance_coordinates: slice) -> dict[str, float]:
    draws = states.detach().flatten(0, 1)  # [T * C, dim]; float64 one coordinate at a time to bound memory
    mean = torch.stack([draws[:, i].double().mean() for i in range(draws.shape[1])])
    variance = torch.stack([draws[:, i].double().var() for i in range(draws.shape[1])])
    sd = target.variance.sqrt()
    mean_error = ((mean - target.mean).abs() / sd).max()
    variance = variance[variance_coordinates]
    true_variance = target.variance[variance_coordinates]
    variance_error = ((variance - true_variance).abs() / true_variance).max()
    return {"max_abs_mean_error_over_sd": float(mean_error), "max_rel_variance_error": float(variance_error)}


def _result(name: str, states: torch.Tensor, seconds: float, gradient_evaluations: float, target: Target,
            variance_coordinates: slice, **extra) -> dict:
    ess = _ess(states)  # states [T, C, dim]
    # The squares' ESS guards against antithetic draws flattering the means' ESS (it can exceed the draw count).
    ess_squares = _ess((states - target.mean.to(states)).square())
    return {
        "sampler": name,
        "chains": states.shape[1],
        "kept_draws_per_chain": states.shape[0],
        "seconds_incl_warmup": seconds,
        "ess_min": float(ess.min()),
        "ess_per_second_min": float(ess.min()) / seconds,
        "ess_squares_min": float(ess_squares.min()),
        "ess_squares_per_second_min": float(ess_squares.min()) / seconds,
        "gradient_evaluations": gradient_evaluations,
        "microseconds_per_gradient": 1e6 * seconds / gradient_evaluations,
        "ess_min_per_1k_gradients": 1e3 * float(ess.min()) / gradient_evaluations,
        "load_average_1min_after": os.getloadavg()[0],
        **_accuracy(states, target, variance_coordinates),
        **extra,
    }


def leapfrog_rule(states: torch.Tensor, step_size: float, inverse_mass: torch.Tensor) -> int:
    """L = ceil((pi / 2) * sqrt(lambda_max) / eps) from pilot draws [T, C, dim] (see the module docstring)."""
    whitened = (states / inverse_mass.sqrt()).flatten(0, 1).double()  # [T * C, dim]
    lambda_max = float(torch.linalg.eigvalsh(torch.cov(whitened.T))[-1])
    return max(1, math.ceil(0.5 * math.pi * math.sqrt(lambda_max) / step_size))


def run_batched_hmc(target: Target, *, num_chains: int, warmup: int, num_steps: int, target_accept: float,
                    seed: int, variance_coordinates: slice) -> dict:
    generator = torch.Generator().manual_seed(seed)
    y0 = target.initial_state(num_chains, generator)
    pilot = HMC(0.1, PILOT_LEAPFROG_STEPS, pooled_mass=True, shared_step_size=True, target_accept=target_accept,
                step_size_jitter=STEP_SIZE_JITTER)
    start = time.perf_counter()
    trace = pilot.run(target, y0, num_steps=PILOT_DRAWS, warmup=warmup, generator=generator)
    step_size, inverse_mass = float(trace.adapted["step_size"][0]), trace.adapted["inverse_mass"][:1]
    num_leapfrog_steps = leapfrog_rule(trace.states, step_size, inverse_mass)
    sampler = HMC(step_size, num_leapfrog_steps, inverse_mass=inverse_mass, adapt_step_size=False, adapt_mass=False,
                  step_size_jitter=STEP_SIZE_JITTER)
    trajectory = sampler.run(target, trace.states[-1], num_steps=num_steps, generator=generator)
    seconds = time.perf_counter() - start
    evaluations = num_chains * ((warmup + PILOT_DRAWS) * PILOT_LEAPFROG_STEPS + num_steps * num_leapfrog_steps)
    return _result(f"batched HMC ({num_chains} chains, {num_leapfrog_steps} leapfrog)", trajectory.states, seconds,
                   evaluations, target, variance_coordinates,
                   acceptance=float(trajectory.acceptance_rate().mean()),
                   divergences=int(trajectory.num_divergent().sum() + trace.num_divergent().sum()),
                   step_size=step_size, num_leapfrog_steps=num_leapfrog_steps, target_accept=target_accept,
                   warmup_share_of_gradients=num_chains * (warmup + PILOT_DRAWS) * PILOT_LEAPFROG_STEPS / evaluations)


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
    hmc, pyro_nuts, pyro_hmc = settings["hmc"], settings["pyro_nuts"], settings["pyro_hmc"]
    batched = run_batched_hmc(target, **hmc, seed=0, variance_coordinates=variance_coordinates)
    leapfrog = batched["num_leapfrog_steps"]  # pyro's HMC gets the same trajectory length in steps
    return [
        batched,
        run_pyro("NUTS", lambda fn: PyroNUTS(potential_fn=fn, adapt_step_size=True, adapt_mass_matrix=True),
                 target, **pyro_nuts, seed=0, variance_coordinates=variance_coordinates),
        run_pyro(f"HMC ({leapfrog} leapfrog)",
                 lambda fn: PyroHMC(potential_fn=fn, num_steps=leapfrog, adapt_step_size=True, adapt_mass_matrix=True),
                 target, **pyro_hmc, seed=0, variance_coordinates=variance_coordinates),
    ]


def profile_transition(num_chains: int = 1024, num_leapfrog_steps: int = 12, repeats: int = 5) -> dict:
    """Where one batched HMC transition's time goes: energy+gradient calls against everything else
    (momentum draw, leapfrog updates, accept test, selects), best of ``repeats`` on the rotated Gaussian."""
    from samplers.energy import energy_and_grad
    from samplers.hmc import init, step

    target = Gaussian.ill_conditioned(dim=100, condition_number=100.0)
    generator = torch.Generator().manual_seed(0)
    state = init(target.initial_state(num_chains, generator), target)
    step_size, inverse_mass = torch.full((num_chains, 1), 0.05), torch.ones(1, 100)

    def best_seconds(fn: Callable, calls: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - start) / calls)
        return min(times)

    # The energy is timed at fresh states (as in a trajectory), not at one cache-hot state.
    states = [target.initial_state(num_chains, generator) for _ in range(8)]
    energy = best_seconds(lambda: [energy_and_grad(target, y) for y in states], 10) / len(states)
    transition = best_seconds(lambda: step(state, target, step_size=step_size, generator=generator,
                                           num_leapfrog_steps=num_leapfrog_steps, inverse_mass=inverse_mass,
                                           step_size_jitter=STEP_SIZE_JITTER), 5)
    bookkeeping = transition - num_leapfrog_steps * energy
    return {"chains": num_chains, "num_leapfrog_steps": num_leapfrog_steps, "energy_and_grad_ms": 1e3 * energy,
            "transition_ms": 1e3 * transition, "bookkeeping_ms": 1e3 * bookkeeping,
            "bookkeeping_share": bookkeeping / transition, "threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0]}


def _write_profile(out: Path) -> None:
    profile = profile_transition()
    values = (f"{value:.3g}" if isinstance(value, float) else str(value) for value in profile.values())
    text = f"| {' | '.join(profile)} |\n|{'---|' * len(profile)}\n| {' | '.join(values)} |\n"
    bench.write(out, "samplers_profile", profile, text)
    print(text)


def _settings(quick: bool) -> dict:
    if quick:
        small = {"hmc": {"num_chains": 16, "warmup": 20, "num_steps": 20, "target_accept": 0.8},
                 "pyro_nuts": {"warmup": 10, "num_steps": 10}, "pyro_hmc": {"warmup": 10, "num_steps": 10}}
        return {"gaussian": small, "funnel": small}
    # pyro's fixed-length HMC is the slowest contender by far (no batching, long trajectories): a shorter run
    # keeps the whole benchmark within a few minutes; its ESS/s is a rate, so the shorter run is still fair.
    pyro_nuts, pyro_hmc = {"warmup": 300, "num_steps": 900}, {"warmup": 150, "num_steps": 300}
    return {
        # 2000 kept draws: the warmup and pilot are fixed costs, so a longer run shows the sampler's rate, as
        # pyro's 300 + 900 does for NUTS (whose cost is per draw and dominated by Python overhead).
        "gaussian": {"hmc": {"num_chains": 1024, "warmup": 150, "num_steps": 2000, "target_accept": 0.8},
                     "pyro_nuts": pyro_nuts, "pyro_hmc": pyro_hmc},
        # The funnel's neck needs small steps: a higher target acceptance trades speed for fewer divergences.
        "funnel": {"hmc": {"num_chains": 1024, "warmup": 300, "num_steps": 1000, "target_accept": 0.95},
                   "pyro_nuts": pyro_nuts, "pyro_hmc": pyro_hmc},
    }


def markdown(results: dict) -> str:
    lines = [
        "| target | sampler | chains x kept draws | seconds (incl. warmup) | ESS min | ESS/s min | vs pyro NUTS | "
        "ESS/s min (squares) | vs pyro NUTS (squares) | ESS per 1k gradients | µs per gradient | "
        "max abs mean err / sd | max rel var err | acceptance | divergences | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for target_name, rows in results["targets"].items():
        nuts = next(row for row in rows if row["sampler"].startswith("pyro NUTS"))
        for row in rows:
            ratio = row["ess_per_second_min"] / nuts["ess_per_second_min"]
            ratio_squares = row["ess_squares_per_second_min"] / nuts["ess_squares_per_second_min"]
            lines.append(
                f"| {target_name} | {row['sampler']} | {row['chains']} x {row['kept_draws_per_chain']} | "
                f"{row['seconds_incl_warmup']:.1f} | {row['ess_min']:.0f} | {row['ess_per_second_min']:.1f} | "
                f"{ratio:.0f}x | {row['ess_squares_per_second_min']:.1f} | {ratio_squares:.0f}x | "
                f"{row['ess_min_per_1k_gradients']:.2f} | {row['microseconds_per_gradient']:.2f} | "
                f"{row['max_abs_mean_error_over_sd']:.3f} | {row['max_rel_variance_error']:.3f} | "
                f"{row['acceptance']:.2f} | {row['divergences']} | {row['load_average_1min_after']:.1f} |"
            )
    machine = results.get("machine", {})
    lines.append("")
    lines.append(f"Clocks include warmup (for batched HMC: its pilot) for every sampler; {machine.get('threads', '?')} "
                 f"intra-op threads each (OMP_WAIT_POLICY={machine.get('omp_wait_policy', '?')}), on a CPU shared "
                 "with other jobs (load avg: 1-minute load average after each run). ESS: minimum over coordinates, "
                 "over all chains, of the draws (\"ESS\") and of their squared deviations from the true mean "
                 "(\"squares\"). A gradient is one chain's energy+gradient evaluation. Acceptance: batched HMC "
                 "reports its mean Metropolis acceptance probability, pyro its fraction of accepted transitions "
                 "(NUTS almost always moves). Divergences of batched HMC include its pilot.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for samplers.json / samplers.md")
    parser.add_argument("--profile", action="store_true",
                        help="only profile one HMC transition (energy+gradient vs bookkeeping): samplers_profile.*")
    args = parser.parse_args()
    if args.profile:
        _write_profile(args.out)
        return
    settings = _settings(args.quick)
    targets = {
        "gaussian_100d_cond100_rotated": (Gaussian.ill_conditioned(dim=100, condition_number=100.0), "gaussian"),
        # The same spectrum without the rotation: a diagonal mass matrix can whiten it completely.
        "gaussian_100d_cond100_diagonal": (Gaussian.ill_conditioned(dim=100, condition_number=100.0, rotate=False),
                                           "gaussian"),
        "neals_funnel_10d": (Funnel(dim=10, scale=3.0), "funnel"),
    }
    results = {
        "machine": {**bench.machine(), "pyro": pyro.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "load_average_at_start": os.getloadavg()},
        "settings": settings,
        "targets": {},
    }
    for name, (target, key) in targets.items():
        variance_coordinates = slice(0, 1) if key == "funnel" else slice(None)
        results["targets"][name] = benchmark_target(target, settings[key], variance_coordinates)
        print(markdown({"machine": results["machine"], "targets": {name: results["targets"][name]}}), flush=True)
    stem = "samplers_quick" if args.quick else "samplers"
    bench.write(args.out, stem, results, markdown(results))
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
