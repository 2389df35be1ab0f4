"""PyroNUTS: an adapter over pyro-ppl's No-U-Turn sampler (``pyro.infer.NUTS(potential_fn=...)``).

The energy is pyro's potential. Pyro's NUTS is correct and adaptive (dual averaging of the step size,
windowed diagonal mass matrix, multinomial trajectory sampling) but it drives one chain at a time from
Python: every leapfrog step is a separate, unbatched energy call plus Python tree bookkeeping with host
syncs. This adapter therefore runs the C chains one after another, each with its own kernel, RNG seed
and adaptation (pyro's own multi-chain ``MCMC`` would use one process per chain instead: process start-up
and pickling per run, and a speed-up only where a free core per chain exists). Expect it to be two to three
orders of magnitude slower per effective sample than the batched ``HMC`` (``benchmarks/sampler_speed.py``
measures it) or the batched ``samplers.nuts.NUTS``: it is the independent reference that the batched NUTS is
tested against (``tests/samplers/test_nuts.py``), and a tuning-free sampler for a handful of chains.

Per-step info, recorded from inside pyro's tree building (its ``sample`` keeps them local):
- ``acceptance_prob``: mean Metropolis acceptance probability over the tree's leaves (the statistic
  step-size adaptation targets; pyro's running average ``acc. prob`` is the mean of these).
- ``accepted``: whether the transition moved the state. NUTS samples a point of the whole trajectory,
  so it (almost) always moves; a False marks a transition that stayed at its start.
- ``divergent``: pyro flagged a leaf whose energy error exceeded 1000 (or was NaN).
- ``step_size``, ``tree_depth`` (number of doublings) and ``num_leapfrog_steps`` (gradient evaluations).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import pyro.infer
import torch
from torch import Tensor, nn

from samplers.base import Recorder, check_final_energy, check_run_args
from samplers.energy import EnergyFn, check_energy_shape, check_finite_start, energy_and_grad
from samplers.trajectory import Trajectory

_SITE = "y"  # the single pyro "site" holding one chain's state [*event]


class _RecordingNUTS(pyro.infer.NUTS):
    """pyro's NUTS, unchanged, recording what one transition did (its ``sample`` keeps it local)."""

    def begin_transition(self) -> None:
        self.leaf_accept_probs: list[Tensor] = []
        self.leaf_divergent: list[Tensor] = []
        self.num_doublings = 0

    def _build_basetree(self, z, r, z_grads, log_slice, direction, energy_current):
        tree = super()._build_basetree(z, r, z_grads, log_slice, direction, energy_current)
        self.leaf_accept_probs.append(tree.sum_accept_probs)
        self.leaf_divergent.append(torch.as_tensor(tree.diverging))
        return tree

    def _build_tree(self, z, r, z_grads, log_slice, direction, tree_depth, energy_current):
        # sample() calls this with depth 0, 1, 2, ... once per doubling; recursive calls go shallower.
        self.num_doublings = max(self.num_doublings, tree_depth + 1)
        return super()._build_tree(z, r, z_grads, log_slice, direction, tree_depth, energy_current)


class PyroNUTS(nn.Module):
    """No-U-Turn sampler (pyro-ppl) behind the samplers' ``run`` interface.

    ``step_size`` is the initial step size; with ``adapt_step_size`` pyro first searches a reasonable one,
    then adapts it by dual averaging towards ``target_accept`` during warmup; ``adapt_mass`` adapts a
    diagonal inverse mass matrix in Stan's windows. ``max_tree_depth`` caps the doublings (2^depth - 1
    leapfrog steps). ``per_chain_energy=True`` is for energies whose row c depends on c (chain c conditioned
    on example c): each chain is then evaluated in place inside a full [C] batch (C times the compute per
    gradient); by default one chain's state [*event] is unsqueezed to a batch of one.
    """

    def __init__(
        self,
        step_size: float = 0.1,
        *,
        adapt_step_size: bool = True,
        adapt_mass: bool = True,
        target_accept: float = 0.8,
        max_tree_depth: int = 10,
        per_chain_energy: bool = False,
    ) -> None:
        super().__init__()
        if not (isinstance(step_size, (int, float)) and step_size > 0):
            raise ValueError(f"PyroNUTS step_size must be a positive float (pyro adapts one global step size per "
                             f"chain), got {step_size!r}")
        if not 0 < target_accept < 1:
            raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")
        if not (isinstance(max_tree_depth, int) and max_tree_depth >= 1):
            raise ValueError(f"max_tree_depth must be a positive int, got {max_tree_depth!r}")
        self.step_size, self.adapt_step_size, self.adapt_mass = float(step_size), adapt_step_size, adapt_mass
        self.target_accept, self.max_tree_depth, self.per_chain_energy = target_accept, max_tree_depth, per_chain_energy

    def _kernel(self, potential_fn: Callable[[dict], Tensor]) -> _RecordingNUTS:
        return _RecordingNUTS(
            potential_fn=potential_fn,
            step_size=self.step_size,
            adapt_step_size=self.adapt_step_size,
            adapt_mass_matrix=self.adapt_mass,
            full_mass=False,
            target_accept_prob=self.target_accept,
            max_tree_depth=self.max_tree_depth,
        )

    def _potential(self, energy_fn: EnergyFn, y0: Tensor, chain: int) -> Callable[[dict], Tensor]:
        """pyro potential for one chain: params {"y": [*event]} -> scalar energy (per-position summed)."""
        if not self.per_chain_energy:
            return lambda params: energy_fn(params[_SITE].unsqueeze(0)).sum()

        def in_place(params: dict) -> Tensor:
            batch = torch.cat([y0[:chain], params[_SITE].unsqueeze(0), y0[chain + 1 :]])  # [C, *event]
            return energy_fn(batch)[chain].sum()

        return in_place

    def _validate(self, energy_fn: EnergyFn, y0: Tensor) -> None:
        start = energy_and_grad(energy_fn, y0, validate=True)
        check_finite_start(start.energy, start.grad)
        if not self.per_chain_energy:
            with torch.no_grad():
                single = energy_fn(y0[:1])
            try:
                check_energy_shape(single, y0[:1])
            except ValueError as error:
                raise ValueError(f"PyroNUTS evaluates one chain at a time as a batch of one, but {error} If row c "
                                 "of your energy depends on c, pass PyroNUTS(per_chain_energy=True).") from None

    def _run_chain(self, energy_fn: EnergyFn, y0: Tensor, chain: int, warmup: int, num_steps: int, seed: int) -> dict:
        """One chain through pyro: states [warmup+num_steps, *event] and per-step info lists."""
        kernel = self._kernel(self._potential(energy_fn, y0, chain))
        kernel.initial_params = {_SITE: y0[chain].detach()}
        devices = [y0.device] if y0.device.type == "cuda" else []
        record: dict[str, list] = {k: [] for k in ("y", "acceptance_prob", "accepted", "divergent", "step_size",
                                                   "tree_depth", "num_leapfrog_steps")}
        with torch.random.fork_rng(devices=devices):  # pyro draws from torch's global RNG: isolate and seed it
            torch.manual_seed(seed)
            kernel.setup(warmup)
            params = kernel.initial_params
            for _ in range(warmup + num_steps):
                kernel.begin_transition()
                step_size = kernel.step_size  # the step size this transition integrates with
                new_params = kernel.sample(params)
                record["y"].append(new_params[_SITE].detach())
                record["acceptance_prob"].append(torch.stack(kernel.leaf_accept_probs).mean())
                record["accepted"].append(torch.any(new_params[_SITE] != params[_SITE]))
                record["divergent"].append(torch.stack(kernel.leaf_divergent).any())
                record["step_size"].append(step_size)
                record["tree_depth"].append(kernel.num_doublings)
                record["num_leapfrog_steps"].append(len(kernel.leaf_accept_probs))
                params = new_params
        record["inverse_mass"] = kernel.inverse_mass_matrix[(_SITE,)].reshape(y0.shape[1:])
        record["final_step_size"] = kernel.step_size
        kernel.cleanup()
        return record

    def run(
        self,
        energy_fn: EnergyFn,
        y0: Tensor,
        *,
        num_steps: int,
        warmup: int = 0,
        thin: int = 1,
        generator: Optional[torch.Generator] = None,
        differentiable: bool = False,
        truncate: Optional[int] = None,
        detach_between_steps: bool = False,
        final_energy: str = "graph",
    ) -> Trajectory:
        """Run each of the C chains of ``y0`` [C, *event] for ``warmup`` + ``num_steps`` pyro NUTS transitions.

        Seeds for the chains are drawn from ``generator`` (or torch's global RNG), so a run is reproducible
        and chains are independent. Returns a ``Trajectory`` like every sampler (``adapted``: the final
        ``step_size`` [C] and diagonal ``inverse_mass`` [C, *event]). ``final_energy`` is accepted for the
        shared signature: without a differentiable mode ``"graph"`` and ``"value"`` are the same, and
        ``"skip"`` is refused (the trees need every energy).
        """
        check_final_energy(final_energy, "PyroNUTS needs the energy of every state it visits (tree building and the "
                                         "accept test)")
        if differentiable:
            raise ValueError("PyroNUTS has no differentiable mode: its Metropolis-corrected, adaptively sized trees "
                             "are not differentiable. Use GradientDescent or Langevin with differentiable=True.")
        check_run_args(y0, num_steps, warmup, thin, generator, differentiable, truncate, detach_between_steps)
        self._validate(energy_fn, y0)
        device = generator.device if generator is not None else y0.device
        seeds = torch.randint(0, 2**62, (y0.shape[0],), generator=generator, device=device).tolist()
        chains = [self._run_chain(energy_fn, y0, c, warmup, num_steps, seed) for c, seed in enumerate(seeds)]
        return self._trajectory(energy_fn, y0, chains, warmup, num_steps, thin)

    def _trajectory(self, energy_fn: EnergyFn, y0: Tensor, chains: list[dict], warmup: int, num_steps: int,
                    thin: int) -> Trajectory:
        """Stack per-chain records into [T, C] and thin them exactly like the batched samplers."""
        def stacked(name: str, dtype: torch.dtype) -> Tensor:  # [warmup + num_steps, C]
            per_chain = [torch.stack([torch.as_tensor(value) for value in chain[name]]) for chain in chains]
            return torch.stack(per_chain, dim=1).to(device=y0.device, dtype=dtype)

        states = torch.stack([torch.stack(chain["y"]) for chain in chains], dim=1)  # [warmup+num_steps, C, *event]
        fields = {name: stacked(name, dtype) for name, dtype in (
            ("acceptance_prob", y0.dtype), ("accepted", torch.bool), ("divergent", torch.bool),
            ("step_size", y0.dtype), ("tree_depth", y0.dtype), ("num_leapfrog_steps", y0.dtype))}
        recorder = Recorder(y0, num_steps, thin, keep_graph=False)
        with torch.no_grad():
            for index in range(warmup + num_steps):
                info = _NUTSInfo(*(fields[name][index] for name in _NUTSInfo._fields))
                if index < warmup:
                    recorder.record_warmup(info)
                    continue
                kept = (index - warmup + 1) % thin == 0  # only kept states need their energy
                energy = energy_fn(states[index]) if kept else None
                energy = energy if energy is None or energy.dim() == 1 else energy.sum(dim=1)
                recorder.record(index - warmup, _Kept(states[index], energy), info)
        adapted = {
            "step_size": torch.tensor([chain["final_step_size"] for chain in chains], dtype=y0.dtype, device=y0.device),
            "inverse_mass": torch.stack([chain["inverse_mass"] for chain in chains]).to(y0),
        }
        return recorder.trajectory(adapted)


class _NUTSInfo(NamedTuple):
    acceptance_prob: Tensor
    accepted: Tensor
    divergent: Tensor
    step_size: Tensor
    tree_depth: Tensor
    num_leapfrog_steps: Tensor


class _Kept(NamedTuple):
    y: Tensor
    energy: Optional[Tensor]  # None for a state thinning drops
