"""Energy models: a modality adapter + a backbone from ``architectures`` + an energy head.

Every model here speaks one protocol, which the objectives rely on:

- ``encode(context) -> cache``: the context stream, computed once per batch (inside the graph, so its
  weights train) and reused by every optimization step, self-verification sample and generated token;
- ``energy(context_or_cache, candidate) -> [B, S]`` (or ``[B]``): lower is better;
- ``candidate_shape(targets)``: the shape of the optimized state for a batch of targets.

Text: the candidate is a distribution over the vocabulary, held as logits ``[B, S, V]`` (the optimized
state) and turned into an embedding through softmax then either a learned ``Linear(V, D)``
(``candidate_embedding="linear"``, the paper's choice) or the token-embedding matrix
(``candidate_embedding="tied"``: the expected embedding under the distribution).
Continuous: context and candidate vectors ``[B, S, F]`` projected to the model width.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

from architectures.ebt import EBT, ContextCache
from architectures.layers import init_linear

CandidateEmbedding = Literal["linear", "tied"]


class DistributionAdapter(nn.Module):
    """Logits ``[B, S, V]`` -> softmax -> embedding ``[B, S, D]``."""

    def __init__(self, vocab_size: int, dim: int, *, mode: CandidateEmbedding = "linear",
                 token_embedding: Optional[nn.Embedding] = None) -> None:
        super().__init__()
        if mode not in ("linear", "tied"):
            raise ValueError(f"candidate_embedding must be 'linear' or 'tied', got {mode!r}")
        if mode == "tied" and token_embedding is None:
            raise ValueError("candidate_embedding='tied' needs the model's token embedding")
        self.mode, self.vocab_size = mode, vocab_size
        self.projection = nn.Linear(vocab_size, dim, bias=False) if mode == "linear" else None
        # A plain attribute (not a submodule) so the shared embedding is registered once, by the model.
        self._token_embedding = [token_embedding]

    def forward(self, logits: Tensor) -> Tensor:
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"candidate logits have {logits.shape[-1]} classes, the model's vocabulary "
                             f"has {self.vocab_size}")
        probabilities = torch.softmax(logits, dim=-1)  # [B, S, V]
        if self.projection is not None:
            return self.projection(probabilities)
        weight = self._token_embedding[0].weight  # [V, D]
        return probabilities.to(weight.dtype) @ weight


class TextEBM(nn.Module):
    """Autoregressive text EBT: E(tokens_0..i, distribution over token i+1) for every position i."""

    def __init__(self, backbone: EBT, vocab_size: int, *, candidate_embedding: CandidateEmbedding = "linear"):
        super().__init__()
        if vocab_size <= 1:
            raise ValueError(f"vocab_size must be > 1, got {vocab_size}")
        dim = backbone.config.dim
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.candidate = DistributionAdapter(vocab_size, dim, mode=candidate_embedding,
                                             token_embedding=self.token_embedding)
        init_linear(self.candidate, backbone.config.init)
        init_linear(self.token_embedding, backbone.config.init)
        self.backbone = backbone

    def encode(self, tokens: Tensor) -> ContextCache:
        """``tokens [B, S]`` -> the real stream's cache (in the graph)."""
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"context tokens must be an integer tensor [B, S], got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        return self.backbone.encode_context(self.token_embedding(tokens))

    def energy(self, context: Union[Tensor, ContextCache], candidate: Tensor,
               step_index: Optional[int] = None) -> Tensor:
        """``candidate`` logits ``[B, S, V]`` -> energies ``[B, S]``; ``context`` is tokens or ``encode(tokens)``."""
        cache = context if isinstance(context, ContextCache) else self.encode(context)
        return self.backbone.energies(cache, self.candidate(candidate), step_index=step_index)

    def forward(self, tokens: Tensor, candidate: Tensor) -> Tensor:
        """The uncached path (all ``2S`` tokens through the stack); equals ``energy(encode(tokens), ...)``."""
        return self.backbone(self.token_embedding(tokens), self.candidate(candidate))

    def candidate_shape(self, targets: Tensor) -> tuple[int, ...]:
        return (*targets.shape, self.vocab_size)


class VectorSequenceEBM(nn.Module):
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

    def encode(self, context: Tensor) -> ContextCache:
        """``context [B, S, F]`` -> cache."""
        if context.dim() != 3 or context.shape[-1] != self.feature_dim:
            raise ValueError(f"context must be [B, S, {self.feature_dim}], got {tuple(context.shape)}")
        return self.backbone.encode_context(self.context_projection(context))

    def energy(self, context: Union[Tensor, ContextCache], candidate: Tensor,
               step_index: Optional[int] = None) -> Tensor:
        """``candidate [B, S, F]`` -> energies ``[B, S]``."""
        cache = context if isinstance(context, ContextCache) else self.encode(context)
        return self.backbone.energies(cache, self.candidate_projection(candidate), step_index=step_index)

    def candidate_shape(self, targets: Tensor) -> tuple[int, ...]:
        return tuple(targets.shape)


class GaussianEnergy(nn.Module):
    """Unconditional quadratic energy ``E(y) = 1/2 (y - mean)^T P (y - mean)``, ``P = L L^T``.

    The exponential family of this energy is N(mean, P^-1), so its fitted moments can be read off exactly
    (``mean``, ``covariance``): the small continuous problem on which the classic EBM objectives are tested.
    ``L`` is lower triangular with a positive (softplus) diagonal, so P is always positive definite.
    """

    def __init__(self, dim: int, *, init_scale: float = 1.0):
        super().__init__()
        self.dim = dim
        self.location = nn.Parameter(torch.zeros(dim))
        self.raw_factor = nn.Parameter(torch.zeros(dim, dim))
        # softplus(raw) = 1 / init_scale on the diagonal: precision I / init_scale^2.
        with torch.no_grad():
            self.raw_factor.diagonal().fill_(float(torch.log(torch.expm1(torch.tensor(1.0 / init_scale)))))

    def precision_factor(self) -> Tensor:
        lower = torch.tril(self.raw_factor, diagonal=-1)
        return lower + torch.diag(nn.functional.softplus(self.raw_factor.diagonal()))

    def forward(self, y: Tensor) -> Tensor:
        """``y [C, dim]`` -> ``[C]``."""
        if y.dim() != 2 or y.shape[1] != self.dim:
            raise ValueError(f"GaussianEnergy expects [C, {self.dim}], got {tuple(y.shape)}")
        whitened = (y - self.location) @ self.precision_factor()  # [C, dim]
        return 0.5 * whitened.pow(2).sum(dim=1)

    @torch.no_grad()
    def covariance(self) -> Tensor:
        factor = self.precision_factor()
        return torch.linalg.inv(factor @ factor.T)
