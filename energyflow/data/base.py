"""The ``DataSource`` contract: what the trainer, evaluation and ``compare`` see of a data set.

A data source has a resumable, rank-sharded training stream, a fixed list of validation batches, and a way to
turn one of its raw batches into the task's batch on a device; nothing else about it (text, images, video) is
the trainer's business. ``BatchStream`` is the stream for any data set held as one tensor of examples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

Batch = dict[str, Tensor]


@runtime_checkable
class TrainStream(Protocol):
    """A deterministic stream of training batches whose whole state is its ``state_dict``."""

    def next_step(self) -> list[Any]:
        """This rank's micro-batches (raw, as the source stores them) for the next optimizer step."""

    def state_dict(self) -> dict[str, int]:
        """The position and whatever must match to resume (goes into every checkpoint)."""

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``; refuse a state from another data set, seed or batch layout."""


@runtime_checkable
class DataSource(Protocol):
    """What ``Trainer.fit``, ``evaluate_task`` and ``compare`` need from a data set."""

    def train_stream(self, *, micro_batch: int, accumulation_steps: int, seed: int, rank: int,
                     world_size: int) -> TrainStream:
        """The training stream: ``accumulation_steps`` micro-batches of ``micro_batch`` examples per step and
        rank, the same global batch for any number of ranks, reproducible from ``seed``."""

    def validation_batches(self, batch_size: int, max_batches: Optional[int] = None) -> list[Any]:
        """The held-out batches every evaluation of a run uses, in a fixed order (raw)."""

    def to_batch(self, raw: Any, device: Union[str, torch.device] = "cpu") -> Batch:
        """One raw batch as the task's batch dict on ``device``."""


def fixed_batches(examples: Tensor, batch_size: int, max_batches: Optional[int] = None) -> list[Tensor]:
    """``examples`` in order, in full batches of ``batch_size`` (a partial last batch is dropped so every batch
    mean has the same weight), at most ``max_batches``: the validation batches of a tensor data set."""
    count = len(examples) // batch_size
    if count == 0:
        raise ValueError(f"the validation split has {len(examples)} examples, fewer than one batch of "
                         f"{batch_size}; lower the evaluation batch size or raise the validation split")
    count = count if max_batches is None else min(count, max_batches)
    return [examples[i * batch_size:(i + 1) * batch_size] for i in range(count)]


@dataclass
class TensorData:
    """A ``DataSource`` held as two float tensors of examples, one row each: ``train [N, *example]`` and
    ``validation [M, *example]``; a batch is ``{batch_key: [B, *example]}``. Subclasses name the key and the
    example's layout (``example_layout``, e.g. ``"[N, C, H, W]"``, whose length fixes the number of dims)."""

    train: Tensor
    validation: Tensor
    batch_key: ClassVar[str] = "data"
    example_layout: ClassVar[str] = "[N, F]"

    def __post_init__(self) -> None:
        dims = len(self.example_layout.strip("[]").split(","))
        for name in ("train", "validation"):
            value = getattr(self, name)
            if value.dim() != dims or not value.is_floating_point() or len(value) == 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a non-empty float tensor "
                                 f"{self.example_layout}, got {tuple(value.shape)} {value.dtype}")
        if self.train.shape[1:] != self.validation.shape[1:]:
            raise ValueError(f"train and validation examples differ in shape: {tuple(self.train.shape[1:])} vs "
                             f"{tuple(self.validation.shape[1:])}")

    def train_stream(self, *, micro_batch: int, accumulation_steps: int = 1, seed: int = 0, rank: int = 0,
                     world_size: int = 1) -> "BatchStream":
        return BatchStream(self.train, micro_batch=micro_batch, accumulation_steps=accumulation_steps, seed=seed,
                           rank=rank, world_size=world_size)

    def validation_batches(self, batch_size: int, max_batches: Optional[int] = None) -> list[Tensor]:
        return fixed_batches(self.validation, batch_size, max_batches)

    def to_batch(self, raw: Tensor, device: Union[str, torch.device] = "cpu") -> Batch:
        """``[B, *example]`` -> ``{batch_key: [B, *example]}`` on ``device``."""
        return {self.batch_key: raw.to(device)}


class BatchStream:
    """Deterministic, seedable, resumable stream of training windows, sharded over DDP ranks.

    The stream is a sequence of epochs; epoch ``e`` is a permutation of the windows drawn from
    ``seed`` and ``e``. Each optimizer step consumes the next ``global_batch`` windows; rank ``r`` of
    ``world_size`` takes micro-batch ``m`` as rows ``(m * world_size + r) * micro_batch`` onward, so the
    union over ranks and micro-batches is the same global batch whatever the number of processes.
    ``position`` (windows consumed so far) is the whole state: it goes into every checkpoint.
    """

    def __init__(self, windows: Tensor, *, micro_batch: int, accumulation_steps: int = 1, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if micro_batch < 1 or accumulation_steps < 1:
            raise ValueError(f"micro_batch and accumulation_steps must be >= 1, got {micro_batch}, "
                             f"{accumulation_steps}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.windows, self.micro_batch, self.accumulation_steps = windows, micro_batch, accumulation_steps
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position = 0
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.accumulation_steps

    def _indices(self, start: int, count: int) -> Tensor:
        """Window indices for stream positions ``start .. start + count - 1`` (crossing epochs as needed)."""
        size, out = len(self.windows), []
        for position in range(start, start + count):
            epoch = position // size
            if epoch != self._epoch:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._order = epoch, torch.randperm(size, generator=generator)
            out.append(self._order[position % size])
        return torch.stack(out)

    def next_step(self) -> list[Tensor]:
        """This rank's ``accumulation_steps`` micro-batches ``[micro_batch, S+1]`` for the next step."""
        micro_batches = []
        for micro in range(self.accumulation_steps):
            start = self.position + (micro * self.world_size + self.rank) * self.micro_batch
            micro_batches.append(self.windows[self._indices(start, self.micro_batch)])
        self.position += self.global_batch
        return micro_batches

    def __iter__(self) -> Iterator[list[Tensor]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "num_windows": len(self.windows),
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the position; refuse a state from a different corpus, seed or global batch."""
        mine = self.state_dict()
        for key in ("seed", "num_windows", "global_batch"):
            if state[key] != mine[key]:
                raise ValueError(f"cannot resume the data stream: the checkpoint has {key}={state[key]}, this run "
                                 f"has {mine[key]}; resume with the run's original data and batch settings")
        self.position = int(state["position"])
