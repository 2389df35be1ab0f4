"""Continuous vectors as a ``DataSource``: a data set of examples ``[N, F]`` (one row each), and an offline
Gaussian one whose true moments are known, so a fitted energy can be checked against them.

A batch is ``{"data": [B, F]}`` (float). The training stream is the same ``BatchStream`` the text windows use
(seeded permutations per epoch, rank-sharded, resumable from its ``state_dict``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from energyflow.data.base import TensorData


@dataclass
class VectorData(TensorData):
    """``train [N, F]`` and ``validation [M, F]`` float examples (a batch: ``{"data": [B, F]}``); ``mean`` and
    ``covariance`` of the distribution they were drawn from, where known (``None`` otherwise)."""

    mean: Optional[Tensor] = None
    covariance: Optional[Tensor] = None
    batch_key: ClassVar[str] = "data"
    example_layout: ClassVar[str] = "[N, F]"

    @property
    def dim(self) -> int:
        return self.train.shape[1]


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
