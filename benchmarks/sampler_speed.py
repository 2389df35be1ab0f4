"""Effective samples per second and per gradient: every energyflow sampler against the peers installed, one run.

    python benchmarks/sampler_speed.py           # full run (~15-25 min), writes benchmarks/results/samplers.{json,md}
    python benchmarks/sampler_speed.py --quick   # smoke run with tiny settings (numbers meaningless)

Targets: a 100-dimensional Gaussian with standard deviations 0.1-1 (condition number 100 of the covariance)
under a random rotation (a diagonal mass matrix cannot undo it), the same Gaussian unrotated (which a diagonal
mass matrix whitens), Neal's funnel (10-d, v ~ N(0, 3^2)) and a Bayesian logistic regression on sklearn's
breast-cancer data (30 standardised features plus an intercept, N(0, 1) priors; its reference moments come from
a long run of a different sampler configuration, see ``logistic_reference``). 500 warmup transitions and 1000
kept draws for everyone; energyflow and BlackJAX run 1024 chains (128 on the regression).

Contenders, each adapting on its own as a user would run it (clocks cover warmup and sampling):
- energyflow ``HMC`` with the library's defaults for one target (``pooled_mass=True, shared_step_size=True``):
  ChEES trajectory adaptation (``trajectory="auto"``); the same with ``trajectory="quarter_turn"``; the same
  ChEES run with a dense mass matrix where the library has one (``mass="dense"``); on the funnel also ChEES with
  delayed rejection (``delayed_rejection=(8, 40)``, at most 100 leapfrog steps), eagerly and with
  ``samplers.compile_energy`` (compile time included); the batched ``NUTS`` (256
  chains: its lockstep trees cost the deepest tree of all chains per transition);
  ``MEADS``; ``MALA``;
- pyro's NUTS (``pyro.infer.MCMC``, one chain, what most pyro users pick), always;
- BlackJAX's ChEES-HMC (``blackjax.chees_adaptation`` + ``dynamic_hmc``, Adam at 0.025, as its docs show), with
  its identity metric and with its ``mass_matrix_estimation="diagonal"``, when blackjax is installed (it is not
  a dependency: ``pip install blackjax`` to measure). JAX compiles on first use: its rows report the seconds of
  a second, compiled, run (compilation excluded, which favours the peer) and the first run's in a column.
torchebm is not installed here (its wheel pins another torch), so it has no rows.

Threads: one intra-op thread for every contender (torch ``set_num_threads(1)``, XLA's single-threaded Eigen),
so ESS per second compares the algorithms and their implementations, not how many cores each grabs.
ESS is the minimum over coordinates, over all chains (pyro.ops.stats), of the draws and of their squared
deviations from the reference mean ("squares" -- what decides variance estimates, and not inflated by
antithetic draws). A gradient is one chain's energy+gradient evaluation, warmup included. Accuracy columns
guard against speed bought with wrong answers: max over coordinates of |mean error| / sd; the relative error of
every variance (the funnel: of v only; its x-coordinates' variance exp(4.5) ~ 90 is dominated by rare draws deep
in the mouth); on the funnel the z-score of E[v^2] against its true 9 (Monte Carlo standard error from the ESS of
v^2): a sampler that under-covers the neck shows it there.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first torch import
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import MCMC  # noqa: E402
from pyro.infer import NUTS as PyroNUTS  # noqa: E402

import samplers  # noqa: E402
from energyflow import bench  # noqa: E402
from samplers import HMC, MALA  # noqa: E402
from samplers.diagnostics import effective_sample_size  # noqa: E402
from samplers.zoo import Funnel, Gaussian, Target  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NUTS_CHAINS = 256
DELAYED_REJECTION = (8.0, 40.0)  # the funnel's DR-HMC rows: second-stage step size eps / a, a log-uniform in it


class LogisticRegression(Target):
    """Bayesian logistic regression on sklearn's breast-cancer data: standardised features plus an intercept,
    N(0, 1) priors on all 31 coefficients. ``mean``/``variance`` are set from a reference run."""

    def __init__(self) -> None:
        super().__init__()
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        x = torch.as_tensor(data.data, dtype=torch.float64)
        x = (x - x.mean(0)) / x.std(0)
        self.register_buffer("features", torch.cat([torch.ones(x.shape[0], 1, dtype=torch.float64), x], dim=1))
        self.register_buffer("labels", torch.as_tensor(data.target, dtype=torch.float64))
        self.dim, self.name = self.features.shape[1], "logistic_regression"
        self.mean = self.variance = self.covariance = None

    def energy(self, y: torch.Tensor) -> torch.Tensor:
        logits = y @ self.features.to(y).T  # [C, N]
        likelihood = torch.nn.functional.softplus(logits).sum(-1) - logits @ self.labels.to(y)
        return likelihood + 0.5 * y.square().sum(-1)

    def sample(self, num_samples, generator=None):
        raise NotImplementedError("no exact sampler: the reference moments come from a long MCMC run")

    def initial_state(self, num_chains, generator=None, *, dtype=torch.float32):
        return 0.1 * super().initial_state(num_chains, generator, dtype=dtype)


def logistic_reference(target: LogisticRegression, quick: bool) -> dict:
    """Reference moments: 256 chains of fixed-length HMC with a pooled diagonal mass, 0.6 x the adapted step
    size (acceptance ~0.95), 2000 draws -- a different configuration from every contender, in float64 (its
    minimum ESS is in the JSON: its Monte Carlo error is a small fraction of the contenders')."""
    generator = torch.Generator().manual_seed(123)
    y0 = target.initial_state(64 if quick else 256, generator, dtype=torch.float64)
    pilot = HMC(0.05, 10, pooled_mass=True, shared_step_size=True).run(target, y0, num_steps=10,
                                                                       warmup=40 if quick else 500, generator=generator)
    step = 0.6 * float(pilot.adapted["step_size"][0])
    sampler = HMC(step, 20, inverse_mass=pilot.adapted["inverse_mass"][:1], adapt_step_size=False, adapt_mass=False,
                  step_size_jitter=0.3)
    run = sampler.run(target, pilot.states[-1], num_steps=50 if quick else 2000, generator=generator)
    draws = run.states.flatten(0, 1)
    ess = _ess(run.states)
    return {"mean": draws.mean(0), "variance": draws.var(0), "min_ess": float(ess.min()),
            "acceptance": float(run.acceptance_rate().mean())}


def _ess(states: torch.Tensor, chunk: int = 10) -> torch.Tensor:
    """[T, C, dim] -> [dim] ESS, a few coordinates at a time (bounded float64 FFT memory)."""
    return torch.cat([effective_sample_size(states[..., i : i + chunk]) for i in range(0, states.shape[-1], chunk)])


def _accuracy(states: torch.Tensor, target: Target, variance_coordinates: slice) -> dict[str, float]:
    draws = states.detach().flatten(0, 1)
    mean = torch.stack([draws[:, i].double().mean() for i in range(draws.shape[1])])
    variance = torch.stack([draws[:, i].double().var() for i in range(draws.shape[1])])
    sd = target.variance.sqrt()
    out = {"max_abs_mean_error_over_sd": float(((mean - target.mean).abs() / sd).max()),
           "max_rel_variance_error": float(((variance - target.variance).abs() / target.variance)[variance_coordinates]
                                           .max())}
    if isinstance(target, Funnel):
        v_squared = states[..., :1].double().square()  # E[v^2] = scale^2 (mean 0)
        mcse = float(v_squared.flatten().std() / effective_sample_size(v_squared).clamp_min(1.0).sqrt().squeeze())
        out["sd_v"] = float(v_squared.mean().sqrt())
        out["z_v_squared"] = (float(v_squared.mean()) - target.scale**2) / mcse
    return out


def _result(name: str, states: torch.Tensor, seconds: float, gradients: float, target: Target,
            variance_coordinates: slice, **extra) -> dict:
    states = states.detach().float()
    ess = _ess(states)
    ess_squares = _ess((states - target.mean.to(states)).square())
    return {
        "sampler": name,
        "chains": states.shape[1],
        "kept_draws_per_chain": states.shape[0],
        "seconds": seconds,
        "ess_min": float(ess.min()),
        "ess_per_second_min": float(ess.min()) / seconds,
        "ess_squares_min": float(ess_squares.min()),
        "ess_squares_per_second_min": float(ess_squares.min()) / seconds,
        "gradient_evaluations": gradients,
        "microseconds_per_gradient": 1e6 * seconds / gradients,
        "ess_per_1k_gradients": 1e3 * float(ess.min()) / gradients,
        "ess_squares_per_1k_gradients": 1e3 * float(ess_squares.min()) / gradients,
        "load_average_1min_after": os.getloadavg()[0],
        **_accuracy(states, target, variance_coordinates),
        **extra,
    }


def _gradients(trajectory: samplers.Trajectory) -> float:
    """Energy+gradient evaluations of a run, warmup included, summed over chains."""
    total = 0.0
    for info in (trajectory.warmup_info, trajectory.info):
        if not info:
            continue
        if "num_leapfrog_steps" in info:
            total += float(info["num_leapfrog_steps"].sum())
        else:  # one gradient per transition; MEADS's resting fold records NaN and computes nothing
            total += float(torch.isfinite(info["acceptance_prob"].float()).sum())
    return total


def run_energyflow(name: str, make: Callable[[], torch.nn.Module], target: Target, *, num_chains: int, warmup: int,
                   num_steps: int, seed: int, variance_coordinates: slice) -> dict:
    generator = torch.Generator().manual_seed(seed)
    y0 = target.initial_state(num_chains, generator)
    sampler = make()
    start = time.perf_counter()
    energy = samplers.compile_energy(target) if "compiled energy" in name else target
    trajectory = sampler.run(energy, y0, num_steps=num_steps, warmup=warmup, generator=generator)
    seconds = time.perf_counter() - start
    adapted = {k: float(v.float().mean()) for k, v in trajectory.adapted.items() if v.numel() == 1 or k == "step_size"}
    divergent = trajectory.info["divergent"].sum() + (trajectory.warmup_info["divergent"].sum()
                                                       if trajectory.warmup_info else 0)
    return _result(f"energyflow {name}", trajectory.states, seconds, _gradients(trajectory), target,
                   variance_coordinates, acceptance=float(trajectory.acceptance_rate().mean()),
                   divergences=int(divergent), adapted=adapted)


def run_pyro(target: Target, *, warmup: int, num_steps: int, seed: int, variance_coordinates: slice) -> dict:
    """One chain of pyro's NUTS through ``pyro.infer.MCMC`` on a potential function, as a pyro user runs it."""
    calls = [0]

    def potential_fn(params: dict) -> torch.Tensor:
        calls[0] += 1
        return target.energy(params["y"].unsqueeze(0)).sum()

    pyro.set_rng_seed(seed)
    y0 = target.initial_state(1, torch.Generator().manual_seed(seed))[0]
    mcmc = MCMC(PyroNUTS(potential_fn=potential_fn, adapt_step_size=True, adapt_mass_matrix=True),
                num_samples=num_steps, warmup_steps=warmup, initial_params={"y": y0}, num_chains=1,
                disable_progbar=True)
    start = time.perf_counter()
    mcmc.run()
    seconds = time.perf_counter() - start
    states = mcmc.get_samples()["y"].unsqueeze(1)  # [T, 1, dim]
    diagnostics = mcmc.diagnostics()
    divergences = sum(len(chain) for chain in diagnostics["divergences"].values())
    return _result("pyro NUTS (1 chain)", states, seconds, calls[0], target, variance_coordinates,
                   acceptance=float(diagnostics["acceptance rate"]["chain 0"]), divergences=divergences)


def _jax_logdensity(target: Target):
    import jax.numpy as jnp

    if isinstance(target, Gaussian):
        mean, precision = jnp.asarray(target.mean.numpy(), jnp.float32), jnp.asarray(target.precision.numpy(),
                                                                                     jnp.float32)
        return lambda y: -0.5 * (y - mean) @ precision @ (y - mean)
    if isinstance(target, Funnel):
        scale, num_x = target.scale, target.dim - 1
        return lambda y: -(0.5 * (y[0] / scale) ** 2 + 0.5 * jnp.sum(y[1:] ** 2) * jnp.exp(-y[0]) + 0.5 * num_x * y[0])
    features = jnp.asarray(target.features.numpy(), jnp.float32)
    labels = jnp.asarray(target.labels.numpy(), jnp.float32)

    def logistic(y):
        logits = features @ y
        return -(jnp.sum(jnp.logaddexp(0.0, logits)) - logits @ labels + 0.5 * jnp.sum(y**2))

    return logistic


def run_blackjax_chees(target: Target, *, num_chains: int, warmup: int, num_steps: int, seed: int,
                       variance_coordinates: slice, mass: Optional[str]) -> dict:
    import blackjax
    import jax
    import numpy as np
    import optax

    logdensity = _jax_logdensity(target)
    y0 = jax.numpy.asarray(target.initial_state(num_chains, torch.Generator().manual_seed(seed)).numpy())

    def whole_run(key_seed: int):
        keys = jax.random.split(jax.random.PRNGKey(key_seed), 2)
        adaptation = blackjax.chees_adaptation(logdensity, num_chains, mass_matrix_estimation=mass)
        (last, parameters), info = adaptation.run(keys[0], y0, 0.1, optax.adam(0.025), warmup)
        kernel = blackjax.dynamic_hmc(logdensity, **parameters).step

        def one(states, key):
            states, step_info = jax.vmap(kernel)(jax.random.split(key, num_chains), states)
            return states, (states.position, step_info.num_integration_steps, step_info.acceptance_rate,
                            step_info.is_divergent)

        _, (positions, steps, acceptance, divergent) = jax.lax.scan(one, last, jax.random.split(keys[1], num_steps))
        positions.block_until_ready()
        warm = info._wrapped_info.info
        return (np.asarray(positions), float(steps.sum()) + float(warm.num_integration_steps.sum()),
                float(acceptance.mean()), int(divergent.sum()) + int(warm.is_divergent.sum()))

    start = time.perf_counter()
    whole_run(seed)
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()  # the second run reuses the compiled programs (same shapes)
    positions, gradients, acceptance, divergences = whole_run(seed + 1)
    seconds = time.perf_counter() - start
    label = "identity metric" if mass is None else f"{mass} metric"
    return _result(f"BlackJAX ChEES ({label})", torch.from_numpy(positions), seconds, gradients, target,
                   variance_coordinates, acceptance=acceptance, divergences=divergences,
                   first_run_seconds_incl_compile=first_seconds)


def energyflow_contenders(target: Target) -> dict[str, Callable[[], torch.nn.Module]]:
    one_target = {"pooled_mass": True, "shared_step_size": True}
    funnel = isinstance(target, Funnel)
    accept = {"target_accept": 0.95} if funnel else {}  # the funnel's neck needs small steps
    contenders = {
        "HMC (ChEES, default trajectory)": lambda: HMC(**one_target, **accept),
        "HMC (quarter-turn rule)": lambda: HMC(trajectory="quarter_turn", **one_target, **accept),
    }
    if "mass" in HMC.__init__.__code__.co_varnames:
        contenders["HMC (ChEES, dense mass)"] = lambda: HMC(mass="dense", **one_target, **accept)
    if hasattr(samplers, "NUTS") and samplers.NUTS.__module__ == "samplers.nuts" and hasattr(samplers, "PyroNUTS"):
        contenders["NUTS (batched)"] = lambda: samplers.NUTS(**one_target, **accept)
    if funnel and "delayed_rejection" in HMC.__init__.__code__.co_varnames:
        # Delayed rejection is for multiscale targets (a funnel's neck): on the others it only adds the second
        # stage's cost to every rejection.
        # Each rejected chain's factor drawn from DELAYED_REJECTION (its second stage L steps), and a cap of 100
        # leapfrog steps: on the funnel ChEES's T otherwise runs to the cap of 1000 steps (measured: T 26.7 at
        # eps 0.038, 740 evaluations a transition). The same with the energy compiled (samplers.compile_energy;
        # its one-off compile is inside the clock).
        def delayed_rejection():
            return HMC(delayed_rejection=DELAYED_REJECTION, max_leapfrog_steps=100, **one_target)

        contenders["HMC (ChEES, delayed rejection)"] = delayed_rejection
        if hasattr(samplers, "compile_energy"):
            contenders["HMC (ChEES, delayed rejection, compiled energy)"] = delayed_rejection
    if hasattr(samplers, "MEADS"):
        contenders["MEADS"] = lambda: samplers.MEADS()
    contenders["MALA"] = lambda: MALA(0.1, **one_target, **({"target_accept": 0.8} if funnel else {}))
    return contenders


def benchmark_target(target: Target, settings: dict, variance_coordinates: slice, peers: list[str],
                     exclude: tuple[str, ...] = ()) -> list[dict]:
    common = {"warmup": settings["warmup"], "num_steps": settings["num_steps"], "seed": 0,
              "variance_coordinates": variance_coordinates}
    rows = []
    for name, make in energyflow_contenders(target).items():
        if name in exclude:
            continue
        # Batched NUTS builds its trees in lockstep, so every transition costs the deepest tree of all its chains
        # (depth 6-7 of 256 chains on the rotated Gaussian, 2^7 - 1 leapfrog steps): fewer chains keep its run
        # within minutes; ESS per second and per gradient are rates, comparable across chain counts.
        chains = min(settings["num_chains"], NUTS_CHAINS) if name.startswith("NUTS") else settings["num_chains"]
        rows.append(run_energyflow(name, make, target, num_chains=chains, **common))
        print(f"  {rows[-1]['sampler']}: {rows[-1]['seconds']:.1f} s", flush=True)
    rows.append(run_pyro(target, **{**common, **settings["pyro"]}))
    if "blackjax" in peers:
        for mass in (None, "diagonal"):
            rows.append(run_blackjax_chees(target, num_chains=settings["num_chains"], mass=mass, **common))
    return rows


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
                                           step_size_jitter=0.3), 5)
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
        return {"default": {"num_chains": 16, "warmup": 30, "num_steps": 20, "pyro": {"warmup": 10, "num_steps": 10}},
                "regression": {"num_chains": 8, "warmup": 30, "num_steps": 20,
                               "pyro": {"warmup": 10, "num_steps": 10}}}
    # pyro's one chain gets 300 + 900: its cost is per draw and dominated by Python overhead, so ESS/s is a rate
    # that a longer run would not change, and the benchmark stays within its time.
    pyro = {"warmup": 300, "num_steps": 900}
    return {"default": {"num_chains": 1024, "warmup": 500, "num_steps": 1000, "pyro": pyro},
            "regression": {"num_chains": 128, "warmup": 500, "num_steps": 1000, "pyro": pyro}}


def _best_peer(rows: list[dict]) -> Optional[dict]:
    peers = [row for row in rows if row["sampler"].startswith("BlackJAX ChEES")]
    return max(peers, key=lambda row: row["ess_squares_per_1k_gradients"]) if peers else None


def markdown(results: dict) -> str:
    lines = [
        "| target | sampler | chains x draws | seconds | ESS/s | ESS/s (squares) | ESS per 1k grad | "
        "ESS per 1k grad (squares) | vs best ChEES (squares/grad, /s) | µs per grad | mean err / sd | "
        "var rel err | funnel sd(v), z(E v^2) | acceptance | divergences | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for target_name, rows in results["targets"].items():
        peer = _best_peer(rows)
        for row in rows:
            versus = "" if peer is None else (
                f"{row['ess_squares_per_1k_gradients'] / peer['ess_squares_per_1k_gradients']:.2f}x, "
                f"{row['ess_squares_per_second_min'] / peer['ess_squares_per_second_min']:.2f}x")
            funnel = f"{row['sd_v']:.2f}, {row['z_v_squared']:+.1f}" if "sd_v" in row else ""
            lines.append(
                f"| {target_name} | {row['sampler']} | {row['chains']} x {row['kept_draws_per_chain']} | "
                f"{row['seconds']:.1f} | {row['ess_per_second_min']:.0f} | {row['ess_squares_per_second_min']:.0f} | "
                f"{row['ess_per_1k_gradients']:.2f} | {row['ess_squares_per_1k_gradients']:.2f} | {versus} | "
                f"{row['microseconds_per_gradient']:.2f} | {row['max_abs_mean_error_over_sd']:.3f} | "
                f"{row['max_rel_variance_error']:.3f} | {funnel} | {row['acceptance']:.2f} | {row['divergences']} | "
                f"{row['load_average_1min_after']:.1f} |"
            )
    machine = results.get("machine", {})
    lines.append("")
    lines.append(
        f"One intra-op thread per contender (torch {machine.get('torch', '?')}, "
        f"{'blackjax ' + machine['blackjax'] if machine.get('blackjax') else 'blackjax not installed'}); seconds "
        "cover warmup and sampling (BlackJAX: its second, compiled run; the first, with compilation, is in the "
        "JSON). ESS: minimum over coordinates over all chains, of the draws and of their squared deviations from "
        "the (reference) mean. A gradient is one chain's energy+gradient evaluation, warmup included. \"vs best "
        "ChEES\": this row's ESS of squares per gradient and per second over the BlackJAX ChEES row with the "
        "most ESS of squares per gradient. Funnel: sd of v (true 3) and the z-score of the estimate of E[v^2] "
        "against 9 (its MCSE from the ESS of v^2). load: 1-minute load average after the run.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for samplers.json / samplers.md")
    parser.add_argument("--targets", nargs="*", default=None, help="run only these targets (names as in the table)")
    parser.add_argument("--exclude", nargs="*", default=(), help="energyflow contenders to leave out, by name "
                        "(e.g. 'NUTS (batched)': its lockstep trees on the funnel run to the depth cap)")
    parser.add_argument("--profile", action="store_true",
                        help="only profile one HMC transition (energy+gradient vs bookkeeping): samplers_profile.*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.profile:
        _write_profile(args.out)
        return
    settings = _settings(args.quick)
    peers = []
    try:
        import blackjax

        peers.append("blackjax")
    except ImportError:
        blackjax = None
    regression = LogisticRegression()
    reference = logistic_reference(regression, args.quick)
    regression.mean, regression.variance = reference["mean"], reference["variance"]
    targets = {
        "gaussian_100d_rotated": (Gaussian.ill_conditioned(dim=100, condition_number=100.0), "default"),
        "gaussian_100d_diagonal": (Gaussian.ill_conditioned(dim=100, condition_number=100.0, rotate=False), "default"),
        "neals_funnel_10d": (Funnel(dim=10, scale=3.0), "default"),
        "logistic_regression_breast_cancer": (regression, "regression"),
    }
    results = {
        "machine": {**bench.machine(), "pyro": pyro.__version__,
                    "blackjax": getattr(blackjax, "__version__", None), "load_average_at_start": os.getloadavg()},
        "settings": settings,
        "excluded": list(args.exclude),
        "logistic_reference": {"min_ess": reference["min_ess"], "acceptance": reference["acceptance"]},
        "targets": {},
    }
    for name, (target, key) in targets.items():
        if args.targets and name not in args.targets:
            continue
        print(name, flush=True)
        variance_coordinates = slice(0, 1) if isinstance(target, Funnel) else slice(None)
        results["targets"][name] = benchmark_target(target, settings[key], variance_coordinates, peers,
                                                    tuple(args.exclude))
        print(markdown({"machine": results["machine"], "targets": {name: results["targets"][name]}}), flush=True)
    stem = "samplers_quick" if args.quick else "samplers"
    bench.write(args.out, stem, results, markdown(results))
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
