"""A fixed-capacity store of chain states for persistent chains (PCD) and replay buffers.

``ChainBuffer(capacity)`` holds ``capacity`` rows; a row is a chain state ``[*event]`` plus, optionally,
companion fields of the same row (e.g. the context a state was optimized against), all stored as ``[capacity,
...]`` tensors. Any sampler draws its initial states from it and writes its final states back:

    draw = buffer.sample(num_chains, generator=generator)               # indices [k], states [k, *event]
    final = sampler.run(energy_fn, draw.states, num_steps=20, generator=generator).final_state
    buffer.write(draw.indices, final)

Filling: ``fill(event_shape)`` sets every row from ``init_fn`` (persistent chains: all rows live from the start);
``append(states, *companions)`` writes rows in ring order, overwriting the oldest once full (a replay buffer that
grows from empty). ``size`` counts the filled rows; draws come from those.

Drawing: ``sample(k)`` picks ``k`` filled rows uniformly *with* replacement (two chains of one batch may start
from the same row; when both are written back the later one wins). With an ``init_fn``, each drawn row is instead
restarted from a fresh ``init_fn`` state with probability ``reinit_fraction`` (a Bernoulli per row, so the number
restarted varies; PCD keeps its buffer exploring this way). The fresh states and the Bernoulli variates are drawn
for all ``k`` rows whatever the fraction and combined with ``torch.where``: no data-dependent shapes or host
syncs, and the random stream a draw consumes (and so everything a run does after it) does not depend on the
fraction. A restarted row keeps its stored companions (``init_fn`` makes states only).

Randomness: only from an explicit ``torch.Generator``, the buffer's own (``ChainBuffer(..., generator=g)``) or
one passed to the call (which takes precedence, e.g. a training run's generator); never the global RNG. Row
indices are drawn on the generator's device and moved to the storage's.

``init_fn(shape, *, device, dtype, generator) -> Tensor[shape]`` (e.g. ``energyflow.objectives.RandomNoise``).

Devices: the store lives where its first rows came from (or ``fill``'s ``device``) and moves with
``buffer.to(device)``; ``sample(..., device=, dtype=)`` returns states there. Checkpoints: the buffer is an
``nn.Module`` whose rows, ``size``, ``position`` and (if it has one) its generator's state travel in
``state_dict()`` as extra state -- plain tensors and ints, so ``torch.load(weights_only=True)`` reads them
and a resumed buffer draws exactly the rows (and, with its own generator, the random numbers) it would have.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

InitFn = Callable[..., Tensor]  # (shape, *, device, dtype, generator) -> Tensor[shape]


class BufferDraw(NamedTuple):
    indices: Tensor  # [k] int64 rows drawn (on the output device)
    states: Tensor  # [k, *event]: stored states, or fresh init_fn states where ``restarted``
    companions: tuple[Tensor, ...]  # each [k, ...]: the drawn rows' companion fields (on the storage device)
    restarted: Tensor  # [k] bool: rows restarted from init_fn (all False without an init_fn)


class ChainBuffer(nn.Module):
    """``capacity`` rows of (state, *companions); see the module docstring."""

    def __init__(self, capacity: int, *, init_fn: Optional[InitFn] = None, reinit_fraction: float = 0.0,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ChainBuffer capacity must be an int >= 1, got {capacity!r}")
        if not 0.0 <= float(reinit_fraction) <= 1.0:
            raise ValueError(f"ChainBuffer reinit_fraction must be in [0, 1], got {reinit_fraction!r}")
        if reinit_fraction > 0 and init_fn is None:
            raise ValueError("ChainBuffer reinit_fraction > 0 restarts rows from init_fn: pass init_fn=... (e.g. "
                             "energyflow.objectives.RandomNoise(1.0)) or reinit_fraction=0")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"ChainBuffer generator must be a torch.Generator, got {type(generator).__name__}")
        self.capacity, self.reinit_fraction = int(capacity), float(reinit_fraction)
        self.init_fn, self.generator = init_fn, generator
        self.fields: list[Tensor] = []  # [state, *companions], each [capacity, ...]; allocated on first fill/append
        self.size = 0  # filled rows (draws come from rows [0, size))
        self.position = 0  # the next row ``append`` overwrites

    def __len__(self) -> int:
        return self.size

    @property
    def states(self) -> Optional[Tensor]:
        """The stored states ``[capacity, *event]`` (None before the first fill/append)."""
        return self.fields[0] if self.fields else None

    def _generator(self, generator: Optional[torch.Generator]) -> torch.Generator:
        chosen = generator if generator is not None else self.generator
        if chosen is None:
            raise ValueError("ChainBuffer draws need a torch.Generator: pass generator= to this call or to "
                             "ChainBuffer(..., generator=torch.Generator().manual_seed(seed))")
        return chosen

    @torch.no_grad()
    def fill(self, event_shape: Sequence[int], *, device: Optional[torch.device] = None,
             dtype: Optional[torch.dtype] = None, generator: Optional[torch.Generator] = None) -> None:
        """Set every row's state from ``init_fn`` (companions, if any, are kept); afterwards ``size == capacity``."""
        if self.init_fn is None:
            raise ValueError("ChainBuffer.fill draws states from init_fn: construct it with init_fn=...")
        device = device if device is not None else (self.fields[0].device if self.fields else None)
        dtype = dtype if dtype is not None else (self.fields[0].dtype if self.fields else torch.get_default_dtype())
        states = self.init_fn((self.capacity, *event_shape), device=device, dtype=dtype,
                              generator=self._generator(generator))
        self.fields = [states, *self.fields[1:]]
        self.size, self.position = self.capacity, 0

    def sample(self, num: int, *, generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None,
               dtype: Optional[torch.dtype] = None) -> BufferDraw:
        """Draw ``num`` filled rows uniformly with replacement (some restarted from ``init_fn``; see the module
        docstring). States come back on ``device`` with ``dtype`` (default: the storage's)."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"ChainBuffer.sample needs num >= 1 rows, got {num!r}")
        if self.size == 0:
            raise ValueError("ChainBuffer is empty: fill(event_shape) or append(states) before sampling")
        generator = self._generator(generator)
        storage = self.fields[0]
        device = storage.device if device is None else torch.device(device)
        dtype = storage.dtype if dtype is None else dtype
        rows = torch.randint(self.size, (num,), generator=generator, device=generator.device)
        rows = rows.to(storage.device)
        indices, states = rows.to(device), storage[rows].to(device, dtype)
        companions = tuple(field[rows] for field in self.fields[1:])
        restarted = torch.zeros(num, dtype=torch.bool, device=device)
        if self.init_fn is not None:
            fresh = self.init_fn((num, *storage.shape[1:]), device=device, dtype=dtype, generator=generator)
            restarted = torch.rand(num, generator=generator, device=generator.device).to(device) < self.reinit_fraction
            states = torch.where(restarted.view(num, *([1] * (states.dim() - 1))), fresh, states)
        return BufferDraw(indices, states, companions, restarted)

    def _check_rows(self, rows: Sequence[Tensor], what: str) -> None:
        lengths = {row.shape[0] if row.dim() else None for row in rows}
        if len(lengths) != 1 or None in lengths:
            raise ValueError(f"ChainBuffer.{what}: every field needs the same leading (row) dimension, got shapes "
                             f"{[tuple(row.shape) for row in rows]}")
        if self.fields and (len(rows) != len(self.fields) or any(
                tuple(row.shape[1:]) != tuple(field.shape[1:]) for row, field in zip(rows, self.fields))):
            raise ValueError(f"ChainBuffer.{what}: rows of shapes {[tuple(r.shape[1:]) for r in rows]} do not match "
                             f"the stored fields {[tuple(f.shape[1:]) for f in self.fields]}")

    @torch.no_grad()
    def write(self, indices: Tensor, states: Tensor, *companions: Tensor) -> None:
        """Write states (detached; and, if given, every companion field) back into rows ``indices`` [k]."""
        if not self.fields:
            raise ValueError("ChainBuffer.write writes back into drawn rows: fill() or append() first")
        given = (states, *companions)
        if companions:
            self._check_rows(given, "write")
        elif tuple(states.shape[1:]) != tuple(self.fields[0].shape[1:]) or states.shape[:1] != indices.shape:
            raise ValueError(f"ChainBuffer.write: states {tuple(states.shape)} for indices {tuple(indices.shape)} "
                             f"do not match the stored states [capacity, {list(self.fields[0].shape[1:])}]")
        for field, value in zip(self.fields, given):
            field[indices.to(field.device)] = value.detach().to(field.device, field.dtype)

    @torch.no_grad()
    def append(self, states: Tensor, *companions: Tensor) -> None:
        """Write rows in ring order (detached), overwriting the oldest when full; a push larger than the capacity
        keeps its newest ``capacity`` rows. The first append allocates each field with its rows' dtype and device."""
        rows = tuple(row.detach() for row in (states, *companions))
        self._check_rows(rows, "append")
        if not self.fields:
            self.fields = [torch.zeros((self.capacity, *r.shape[1:]), dtype=r.dtype, device=r.device) for r in rows]
        batch = rows[0].shape[0]
        slots = (self.position + torch.arange(batch)) % self.capacity
        if batch > self.capacity:
            slots, rows = slots[-self.capacity:], tuple(r[-self.capacity:] for r in rows)
        for field, row in zip(self.fields, rows):
            field[slots.to(field.device)] = row.to(field.device, field.dtype)
        self.position = (self.position + batch) % self.capacity
        self.size = min(self.size + batch, self.capacity)

    def _apply(self, fn, recurse: bool = True):  # ``buffer.to(device)`` moves the stored rows too
        self.fields = [fn(field) for field in self.fields]
        return super()._apply(fn, recurse)

    def get_extra_state(self) -> dict:
        state = {"fields": list(self.fields), "size": self.size, "position": self.position}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def set_extra_state(self, state: dict) -> None:
        fields = list(state["fields"])
        if fields and fields[0].shape[0] != self.capacity:
            raise ValueError(f"the checkpoint's ChainBuffer has capacity {fields[0].shape[0]}, this one "
                             f"{self.capacity}; construct it with capacity={fields[0].shape[0]} to resume")
        if "generator" in state:
            if self.generator is None:
                raise ValueError("the checkpoint carries the ChainBuffer's own generator state: construct it with "
                                 "generator=torch.Generator(device) to resume its draws")
            self.generator.set_state(state["generator"])
        self.fields, self.size, self.position = fields, int(state["size"]), int(state["position"])

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, size={self.size}, reinit_fraction={self.reinit_fraction}"
