"""Interchangeable read-outs: energy heads (hidden states -> scalar energies, lower is better) and the LM head.

Every energy head maps ``h [..., D]`` to one energy per leading index ``[...]``; ``MeanPatchEnergyHead``
additionally averages over the patch axis (``[B, N, D] -> [B]``).
"""
from __future__ import annotations

from torch import Tensor, nn

from architectures.layers import RMSNorm, zero_init


class LinearEnergyHead(nn.Module):
    """The paper's read-out: (optional) RMSNorm then a bias-free linear map to one scalar."""

    def __init__(self, dim: int, *, norm: bool = True, norm_eps: float = 1e-6, zero: bool = False) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, norm_eps) if norm else nn.Identity()
        self.proj = nn.Linear(dim, 1, bias=False)
        self.zero = zero  # read by ``reinit_heads`` after the model-wide init pass
        reinit_heads(self)

    def forward(self, h: Tensor) -> Tensor:  # [..., D] -> [...]
        return self.proj(self.norm(h)).squeeze(-1)


class QuadraticEnergyHead(nn.Module):
    """``E = 1/2 ||W norm(h)||^2`` with ``W [rank, D]``: non-negative, minimised where ``W h = 0``."""

    def __init__(self, dim: int, rank: int | None = None, *, norm: bool = True, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, norm_eps) if norm else nn.Identity()
        self.proj = nn.Linear(dim, rank or dim, bias=False)

    def forward(self, h: Tensor) -> Tensor:  # [..., D] -> [...]
        return 0.5 * self.proj(self.norm(h)).pow(2).sum(-1)


class MeanPatchEnergyHead(nn.Module):
    """Per-patch scalars from ``per_patch`` (any energy head) averaged into one energy per sample."""

    def __init__(self, per_patch: nn.Module) -> None:
        super().__init__()
        self.per_patch = per_patch

    def forward(self, h: Tensor) -> Tensor:  # [B, N, D] -> [B]
        if h.dim() != 3:
            raise ValueError(f"MeanPatchEnergyHead expects patch features [B, N, D], got {tuple(h.shape)}")
        return self.per_patch(h).mean(dim=-1)


def reinit_heads(module: nn.Module) -> None:
    """Re-apply the heads' own init below ``module`` (zero read-outs where ``zero=True``); models call it
    after their model-wide linear init, which would otherwise overwrite it."""
    for sub in module.modules():
        if isinstance(sub, LinearEnergyHead) and sub.zero:
            zero_init(sub.proj)


class LMHead(nn.Module):
    """Final RMSNorm and an untied, bias-free projection to vocabulary logits ``[..., D] -> [..., V]``."""

    def __init__(self, dim: int, vocab_size: int, *, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, norm_eps)
        self.proj = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(self.norm(h))
