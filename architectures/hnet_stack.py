"""A causal Transformer stack (encoder, decoder or main network of an H-Net stage) with a *masked* KV cache.

In incremental decoding the rows of a batch advance at different rates inside an H-Net: a main network
receives a new chunk only in the rows whose current byte is a boundary. ``step`` therefore takes an
``active [B]`` mask: every row computes, but only active rows commit their key/value (``valid``) and
advance their position counter (RoPE position = number of committed entries). Inactive rows' keys stay in
the cache, masked out, so all rows keep one rectangular tensor and no per-row Python loop is needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from architectures.layers import AttentionBackend, RMSNorm, TransformerBlock, causal_mask


@dataclass
class StackCache:
    """Keys/values ``[B, H, T, Dh]`` per layer for every step taken, ``valid [B, T]`` (committed entries),
    ``count [B]`` (committed entries per row = the next RoPE position)."""

    valid: Tensor
    count: Tensor
    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls, batch: int, device: torch.device) -> "StackCache":
        return cls(torch.zeros(batch, 0, dtype=torch.bool, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))


class CausalStack(nn.Module):
    """``num_layers`` pre-norm Llama blocks (the shared ``TransformerBlock``) and a final RMSNorm."""

    def __init__(self, dim: int, num_heads: int, num_layers: int, ffn_hidden: int, *, norm_eps: float = 1e-6,
                 rope_theta: float = 10000.0, backend: AttentionBackend = "auto") -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"an H-Net stack needs at least one layer, got num_layers={num_layers}")
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, ffn_hidden, norm_eps=norm_eps, rope_theta=rope_theta, backend=backend)
            for _ in range(num_layers))
        self.norm = RMSNorm(dim, norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        """Causal pass over ``x [B, T, D]`` at positions ``0..T-1`` -> ``[B, T, D]``."""
        length = x.shape[1]
        positions = torch.arange(length, device=x.device)
        mask = causal_mask(length, length, x.device)
        for block in self.blocks:
            x, _ = block(x, positions, mask)
        return self.norm(x)

    def step(self, x: Tensor, cache: StackCache, active: Tensor) -> tuple[Tensor, StackCache]:
        """One new entry ``x [B, 1, D]`` per row; rows with ``active [B] = False`` do not commit it.

        Returns ``[B, 1, D]`` (meaningful in active rows) and the extended cache.
        """
        positions = cache.count.unsqueeze(1)  # [B, 1]: RoPE at each row's own next position
        # A query sees the committed entries and itself: [B, 1(H), 1(Tq), T + 1].
        sees = torch.cat((cache.valid, cache.valid.new_ones(x.shape[0], 1)), dim=1)[:, None, None, :]
        keys, values = [], []
        for index, block in enumerate(self.blocks):
            past = (cache.keys[index], cache.values[index]) if cache.keys else None
            x, (k, v) = block(x, positions, sees, past)
            keys.append(k)
            values.append(v)
        valid = torch.cat((cache.valid, active.unsqueeze(1)), dim=1)
        return self.norm(x), StackCache(valid, cache.count + active.long(), keys, values)
