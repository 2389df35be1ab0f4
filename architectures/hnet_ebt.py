"""The autoregressive EBT with an H-Net context (real) stream.

The two-stream EBT (``architectures/ebt.py``) runs its real stream through its own blocks and hands each
layer's real keys/values to the prediction stream. Here the real stream is an H-Net over the context
bytes instead: its byte-level output ``h [B, S, D]`` (causal, so position ``j`` sees bytes ``0..j``) is
projected by each EBT layer's own attention norm and key/value projection into that layer's context
keys/values. The result is an ordinary ``ContextCache``, and the prediction stream attends to it with the
EBT's unchanged ``energies`` code: prediction ``i`` sees context ``0..i`` and itself only, RoPE puts context
``j`` at ``j`` and prediction ``i`` at ``i + 1``. The H-Net runs once per batch (inside the graph, so it
trains); every descent step reuses the cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from architectures.ebt import EBT, ContextCache, StepIndex
from architectures.hnet import HNet
from architectures.hnet_ops import RoutingStats


@dataclass(frozen=True)
class HNetContextCache(ContextCache):
    """A ``ContextCache`` that also carries the H-Net's per-stage routing statistics (in the graph), so the
    objective can add the ratio loss of the very pass that built the context."""

    routing: tuple[RoutingStats, ...] = ()


class HNetContextEBT(nn.Module):
    """``energies(encode_context(real), predicted) -> [B, S]`` with an H-Net context stream.

    Speaks the ``EBT`` backbone protocol that ``energyflow.models.TextEBM`` uses (``config``,
    ``encode_context``, ``energies``, ``forward``). The EBT's blocks serve the prediction stream and the
    per-layer context projections; the H-Net's outer width must equal the EBT's width.
    """

    def __init__(self, hnet: HNet, ebt: EBT) -> None:
        super().__init__()
        if hnet.config.dims[0] != ebt.config.dim:
            raise ValueError(f"the H-Net's byte width {hnet.config.dims[0]} must equal the EBT width "
                             f"{ebt.config.dim}; set HNetConfig.dims[0] = {ebt.config.dim}")
        if ebt.step_conditioning == "time_token":
            raise ValueError("the time-token EBT conditions its real stream on the step, which an H-Net context "
                             "computed once per batch cannot do; use step_conditioning='adaln' or None")
        self.hnet, self.ebt = hnet, ebt
        self.config = ebt.config  # width and init scheme, read by the models that embed into this backbone

    def encode_context(self, real: Tensor) -> HNetContextCache:
        """``real [B, S, D]`` embeddings -> per-layer keys/values ``[B, H, S, Dh]`` and the routing stats."""
        if real.dim() == 3 and real.shape[1] > self.ebt.config.max_seq_len:
            raise ValueError(f"context length {real.shape[1]} exceeds the EBT's max_seq_len="
                             f"{self.ebt.config.max_seq_len}; raise it in the TransformerConfig")
        h, routing = self.hnet(real)  # [B, S, D]; the H-Net validates the shape
        positions = torch.arange(real.shape[1], device=real.device)
        keys, values = [], []
        for block in self.ebt.blocks:
            _, k, v = block.attn.project(block.attn_norm(h), positions)
            keys.append(k)
            values.append(v)
        return HNetContextCache(tuple(keys), tuple(values), routing=tuple(routing))

    def energies(self, cache: ContextCache, predicted: Tensor, step_index: StepIndex = None) -> Tensor:
        """Energies ``[B, S]`` of ``predicted [B, S, D]``: the EBT's own prediction stream on this cache."""
        return self.ebt.energies(cache, predicted, step_index)

    def forward(self, real: Tensor, predicted: Tensor, step_index: Optional[int] = None) -> Tensor:
        """``energies(encode_context(real), predicted)``: the H-Net context has one formulation only."""
        return self.energies(self.encode_context(real), predicted, step_index)
