"""Replay buffer: earlier batches' final predictions become later batches' initial states.

Chains restarted from an already-refined prediction see states deeper into optimization than the K steps
of one batch, so the model learns to keep improving good predictions (longer effective chains). Each
entry stores the example (its inputs and targets) together with its final state, because a stored
prediction only means something for the context it was optimized against.

Built on ``samplers.buffer.ChainBuffer``: a row is the final state with the inputs and targets as its companion
fields, written in ring order (``push``) and drawn uniformly with replacement (``mix``). The buffer is an
``nn.Module`` whose contents travel in ``state_dict()`` as extra state (plain tensors and ints, loadable with
``torch.load(weights_only=True)``) in this module's own format, ``{"fields": [inputs, targets, states], "size",
"position"}`` (unchanged since before the ChainBuffer, so older checkpoints load), and a resumed run replays
exactly what it would have. Under ``torchrun`` each process fills its own buffer from its share of the batch: the
buffer is per-rank state (``per_rank_state = True``), and the trainer checkpoints every rank's buffer and gives
each rank its own back on resume (``energyflow.checkpoint``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from samplers.buffer import ChainBuffer


def run_generator(generator: Optional[torch.Generator], device: torch.device) -> torch.Generator:
    """The generator a draw uses: the run's, or (``None``, as before the ChainBuffer) the default generator of
    ``device`` -- the one ``torch.randint(..., device=device)`` without a generator would use."""
    if generator is not None:
        return generator
    device = torch.device(device)
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    raise ValueError(f"draws from a buffer on {device} need an explicit generator: pass generator=torch.Generator("
                     f"device={str(device)!r})")


class ReplayBuffer(ChainBuffer):
    """Ring buffer of (inputs, targets, final_state) rows; ``fraction`` of each batch is drawn from it."""

    per_rank_state = True  # each DDP rank holds its own buffer; see energyflow.checkpoint

    def __init__(self, capacity: int = 192, fraction: float = 0.5):
        if capacity < 1:
            raise ValueError(f"ReplayBuffer capacity must be >= 1, got {capacity}")
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"ReplayBuffer fraction must be in (0, 1), got {fraction}")
        super().__init__(int(capacity))
        self.fraction = float(fraction)

    @property
    def _fields(self) -> list[Tensor]:
        """[inputs, targets, states]: this module's order (the ChainBuffer keeps the state first)."""
        return [*self.fields[1:], *self.fields[:1]]

    def mix(
        self, inputs: Tensor, targets: Tensor, initial_state: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """Replace the last ``n = floor(fraction * B)`` rows with random stored rows (once enough are stored).

        Returns (inputs, targets, initial_state, n). The draw uses the run's generator, so it is reproducible.
        """
        batch = inputs.shape[0]
        num_replayed = min(int(self.fraction * batch), self.size)
        if num_replayed == 0:
            return inputs, targets, initial_state, 0
        draw = self.sample(num_replayed, generator=run_generator(generator, self.fields[0].device))
        fresh = batch - num_replayed
        mixed = [
            torch.cat([new[:fresh], stored.to(new.device, new.dtype)])
            for new, stored in zip((inputs, targets, initial_state), (*draw.companions, draw.states))
        ]
        return mixed[0], mixed[1], mixed[2], num_replayed

    def push(self, inputs: Tensor, targets: Tensor, final_state: Tensor) -> None:
        """Store every row of a batch (detached), overwriting the oldest rows when full."""
        self.append(final_state, inputs, targets)

    def get_extra_state(self) -> dict:
        return {"fields": self._fields, "size": self.size, "position": self.position}

    def set_extra_state(self, state: dict) -> None:
        fields = list(state["fields"])
        if fields and fields[0].shape[0] != self.capacity:
            raise ValueError(
                f"checkpoint replay buffer has capacity {fields[0].shape[0]}, this run's has {self.capacity}; "
                "bind ReplayBuffer.capacity to the checkpoint's value to resume"
            )
        self.fields = [*fields[2:], *fields[:2]]
        self.size, self.position = int(state["size"]), int(state["position"])

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, fraction={self.fraction}, size={self.size}"
