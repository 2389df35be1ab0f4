"""What a sampler's ``run`` returns: kept states, their energies and per-step, per-chain information."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

# Names of the per-step, per-chain info every sampler reports (each a [T, C] tensor in ``Trajectory.info``).
# Samplers without a Metropolis correction report acceptance_prob = 1, accepted = True.
INFO_FIELDS = ("acceptance_prob", "accepted", "divergent", "step_size")


@dataclass
class Trajectory:
    """States kept after warmup (optionally thinned).

    states:   [T, C, *event]
    energies: [T, C]            total energy per chain (per-position energies summed)
    info:     dict name -> [T, C] for every name in INFO_FIELDS (and any sampler-specific extras,
              e.g. ``num_leapfrog_steps`` or ``tree_depth`` for NUTS); step_size is the per-chain step
              size used (its mean over the event for per-element step sizes)
    warmup_info: the same dict for the warmup steps (adaptation diagnostics), or None without warmup
    adapted: final adapted parameters (e.g. ``step_size`` [C], ``inverse_mass`` [C, *event]) or empty
    """

    states: Tensor
    energies: Tensor
    info: dict[str, Tensor]
    warmup_info: Optional[dict[str, Tensor]] = None
    adapted: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return self.states.shape[0]

    @property
    def num_chains(self) -> int:
        return self.states.shape[1]

    @property
    def final_state(self) -> Tensor:
        """[C, *event] the last kept state (in differentiable mode it carries the graph)."""
        return self.states[-1]

    def acceptance_rate(self) -> Tensor:
        """[C] mean acceptance probability per chain over the kept steps."""
        return self.info["acceptance_prob"].float().mean(dim=0)

    def num_divergent(self) -> Tensor:
        """[C] number of divergent transitions per chain over the kept steps."""
        return self.info["divergent"].sum(dim=0)

    def ess(self) -> Tensor:
        """[*event] effective sample size over all chains (pyro.ops.stats), per coordinate."""
        from samplers.diagnostics import effective_sample_size

        return effective_sample_size(self.states)

    def rhat(self) -> Tensor:
        """[*event] split R-hat over chains, per coordinate."""
        from samplers.diagnostics import split_rhat

        return split_rhat(self.states)

    def summary(self, *, title: str = "sampler diagnostics", print_table: bool = True):
        """Build (and by default print) a ``rich`` table of diagnostics; returns the table."""
        from samplers.diagnostics import summary_table

        return summary_table(self, title=title, print_table=print_table)

    def detach(self) -> "Trajectory":
        return Trajectory(
            self.states.detach(),
            self.energies.detach(),
            {k: v.detach() for k, v in self.info.items()},
            None if self.warmup_info is None else {k: v.detach() for k, v in self.warmup_info.items()},
            {k: v.detach() for k, v in self.adapted.items()},
        )


def stack_info(infos: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack a list of per-step info dicts ({name: [C]}) into {name: [T, C]}."""
    if not infos:
        return {}
    return {name: torch.stack([info[name] for info in infos]) for name in infos[0]}
