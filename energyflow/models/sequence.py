"""The autoregressive EBT over continuous vectors (e.g. video latents)."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from architectures.ebt import EBT, ContextCache
from architectures.layers import init_linear
from energyflow.models.conditioning import _StepConditioned


class VectorSequenceEBM(_StepConditioned):
    """Autoregressive EBT over continuous vectors (e.g. video latents): E(x_0..i, candidate x_{i+1})."""

    def __init__(self, backbone: EBT, feature_dim: int):
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        dim = backbone.config.dim
        self.feature_dim = feature_dim
        self.context_projection = nn.Linear(feature_dim, dim, bias=False)
        self.candidate_projection = nn.Linear(feature_dim, dim, bias=False)
        init_linear(self.context_projection, backbone.config.init)
        init_linear(self.candidate_projection, backbone.config.init)
        self.backbone = backbone

    def encode(self, context: Tensor, step_index: Optional[int] = None) -> ContextCache:
        """``context [B, S, F]`` -> cache (``step_index``: as ``TextEBM.encode``)."""
        if context.dim() != 3 or context.shape[-1] != self.feature_dim:
            raise ValueError(f"context must be [B, S, {self.feature_dim}], got {tuple(context.shape)}")
        return self._encode_real(self.context_projection(context), step_index)

    def extend(self, cache: ContextCache, frames: Tensor) -> ContextCache:
        """Continue ``cache`` by ``frames [B, T, F]`` (only the new vectors run through the stack): an
        autoregressive rollout appends each predicted frame without re-encoding the ones before it."""
        if frames.dim() != 3 or frames.shape[-1] != self.feature_dim or frames.shape[0] != cache.batch_size:
            raise ValueError(f"frames must be [B={cache.batch_size}, T, {self.feature_dim}] to extend the cache, got "
                             f"{tuple(frames.shape)}")
        if self.step_conditioning == "time_token":
            raise ValueError("a time-token EBT's context depends on the step index; re-encode it per index instead")
        return self.backbone.encode_context(self.context_projection(frames), cache=cache)

    def energy(self, context: Union[Tensor, ContextCache], candidate: Tensor,
               step_index: Optional[int] = None) -> Tensor:
        """``candidate [B, S, F]`` -> energies ``[B, S]`` (``step_index``: as ``TextEBM.energy``)."""
        return self._energies(context, self.candidate_projection(candidate), step_index)

    def candidate_shape(self, targets: Tensor) -> tuple[int, ...]:
        return tuple(targets.shape)
