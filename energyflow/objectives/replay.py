"""Replay buffer: earlier batches' final predictions become later batches' initial states.

Chains restarted from an already-refined prediction see states deeper into optimization than the K steps
of one batch, so the model learns to keep improving good predictions (longer effective chains). Each
entry stores the example (its inputs and targets) together with its final state, because a stored
prediction only means something for the context it was optimized against.

The buffer is an ``nn.Module`` whose contents travel in ``state_dict()`` as extra state (plain tensors and
ints, loadable with ``torch.load(weights_only=True)``), so a resumed run replays exactly what it would have.
Under ``torchrun`` each process fills its own buffer from its share of the batch: the buffer is per-rank
state (``per_rank_state = True``), and the trainer checkpoints every rank's buffer and gives each rank its
own back on resume (``energyflow.checkpoint``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class ReplayBuffer(nn.Module):
    """Ring buffer of (inputs, targets, final_state) rows; ``fraction`` of each batch is drawn from it."""

    per_rank_state = True  # each DDP rank holds its own buffer; see energyflow.checkpoint

    def __init__(self, capacity: int = 192, fraction: float = 0.5):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"ReplayBuffer capacity must be >= 1, got {capacity}")
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"ReplayBuffer fraction must be in (0, 1), got {fraction}")
        self.capacity, self.fraction = int(capacity), float(fraction)
        self._fields: list[Tensor] = []  # each [capacity, ...], allocated on the first push
        self.size = 0  # number of filled rows
        self.position = 0  # next row to overwrite

    def __len__(self) -> int:
        return self.size

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
        device = generator.device if generator is not None else self._fields[0].device
        index = torch.randint(self.size, (num_replayed,), generator=generator, device=device)
        index = index.to(self._fields[0].device)
        fresh = batch - num_replayed
        mixed = [
            torch.cat([new[:fresh], stored[index].to(new.device, new.dtype)])
            for new, stored in zip((inputs, targets, initial_state), self._fields)
        ]
        return mixed[0], mixed[1], mixed[2], num_replayed

    @torch.no_grad()
    def push(self, inputs: Tensor, targets: Tensor, final_state: Tensor) -> None:
        """Store every row of a batch (detached), overwriting the oldest rows when full."""
        rows = (inputs.detach(), targets.detach(), final_state.detach())
        if not self._fields:
            self._fields = [torch.zeros((self.capacity, *r.shape[1:]), dtype=r.dtype, device=r.device) for r in rows]
        batch = rows[0].shape[0]
        slots = (self.position + torch.arange(batch)) % self.capacity
        if batch > self.capacity:  # only the newest `capacity` rows survive a single oversized push
            slots, rows = slots[-self.capacity :], tuple(r[-self.capacity :] for r in rows)
        for storage, row in zip(self._fields, rows):
            storage[slots.to(storage.device)] = row.to(storage.dtype)
        self.position = (self.position + batch) % self.capacity
        self.size = min(self.size + batch, self.capacity)

    def get_extra_state(self) -> dict:
        return {"fields": list(self._fields), "size": self.size, "position": self.position}

    def set_extra_state(self, state: dict) -> None:
        fields = list(state["fields"])
        if fields and fields[0].shape[0] != self.capacity:
            raise ValueError(
                f"checkpoint replay buffer has capacity {fields[0].shape[0]}, this run's has {self.capacity}; "
                "bind ReplayBuffer.capacity to the checkpoint's value to resume"
            )
        self._fields, self.size, self.position = fields, int(state["size"]), int(state["position"])

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, fraction={self.fraction}, size={self.size}"
