"""Continuous vectors as a ``DataSource``: a data set of examples ``[N, F]`` (one row each), and an offline
Gaussian one whose true moments are known, so a fitted energy can be checked against them.

A batch is ``{"data": [B, F]}`` (float). The training stream is the same ``BatchStream`` the text windows use
(seeded permutations per epoch, rank-sharded, resumable from its ``state_dict``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from energyflow.data.base import Batch, BatchStream, fixed_batches


@dataclass
class VectorData:
    """``train [N, F]`` and ``validation [M, F]`` float examples; ``mean`` / ``covariance`` of the distribution
    they were drawn from, where known (``None`` otherwise)."""

    train: Tensor
    validation: Tensor
    mean: Optional[Tensor] = None
    covariance: Optional[Tensor] = None

    def __post_init__(self) -> None:
        for name in ("train", "validation"):
            value = getattr(self, name)
            if value.dim() != 2 or not value.is_floating_point() or len(value) == 0:
                raise ValueError(f"VectorData.{name} must be a non-empty float tensor [N, F], got "
                                 f"{tuple(value.shape)} {value.dtype}")
        if self.train.shape[1] != self.validation.shape[1]:
            raise ValueError(f"train and validation examples differ in width: {self.train.shape[1]} vs "
                             f"{self.validation.shape[1]}")

    @property
    def dim(self) -> int:
        return self.train.shape[1]

    def train_stream(self, *, micro_batch: int, accumulation_steps: int = 1, seed: int = 0, rank: int = 0,
                     world_size: int = 1) -> BatchStream:
        return BatchStream(self.train, micro_batch=micro_batch, accumulation_steps=accumulation_steps, seed=seed,
                           rank=rank, world_size=world_size)

    def validation_batches(self, batch_size: int, max_batches: Optional[int] = None) -> list[Tensor]:
        return fixed_batches(self.validation, batch_size, max_batches)

    def to_batch(self, raw: Tensor, device: Union[str, torch.device] = "cpu") -> Batch:
        """``[B, F]`` -> ``{"data": [B, F]}`` on ``device``."""
        return {"data": raw.to(device)}


def gaussian_data(*, dim: int = 2, num_train: int = 4096, num_validation: int = 512, seed: int = 0) -> VectorData:
    """Examples from a correlated Gaussian N(m, S) drawn once from ``seed`` (m ~ N(0, 1), S = A A^T / dim + I / 2
    with A ~ N(0, 1)); the first ``num_train`` rows train, the next ``num_validation`` validate."""
    if dim < 1 or num_train < 1 or num_validation < 1:
        raise ValueError(f"gaussian_data needs dim, num_train and num_validation >= 1, got {dim}, {num_train}, "
                         f"{num_validation}")
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=generator)
    factor = torch.randn(dim, dim, generator=generator)
    covariance = factor @ factor.T / dim + 0.5 * torch.eye(dim)
    draws = torch.randn(num_train + num_validation, dim, generator=generator)
    examples = mean + draws @ torch.linalg.cholesky(covariance).T
    return VectorData(examples[:num_train].contiguous(), examples[num_train:].contiguous(), mean, covariance)
