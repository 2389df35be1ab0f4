"""The text EBT: logits over the vocabulary -> softmax -> an embedding, scored by an ``architectures.EBT``."""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

from architectures.ebt import EBT, ContextCache
from architectures.layers import init_linear
from energyflow.models.conditioning import DescentSpace, _StepConditioned, check_descent_space
from samplers.parametrization import SoftmaxParametrization

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

    def forward(self, candidate: Tensor, mapped: bool = False) -> Tensor:
        """``candidate``: logits, or (``mapped=True``) already a distribution ``softmax(logits)``."""
        if candidate.shape[-1] != self.vocab_size:
            raise ValueError(f"candidate logits have {candidate.shape[-1]} classes, the model's vocabulary "
                             f"has {self.vocab_size}")
        probabilities = candidate if mapped else torch.softmax(candidate, dim=-1)  # [B, S, V]
        if self.projection is not None:
            return self.projection(probabilities)
        weight = self._token_embedding[0].weight  # [V, D]
        return probabilities.to(weight.dtype) @ weight


class TextEBM(_StepConditioned):
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
        init_linear(self.token_embedding, backbone.config.init, embedding_std=backbone.config.embedding_std)
        self.backbone = backbone

    def encode(self, tokens: Tensor, step_index: Optional[int] = None) -> ContextCache:
        """``tokens [B, S]`` -> the real stream's cache (in the graph); ``step_index`` only for a time-token
        EBT, whose context depends on the step (one encoding per distinct index)."""
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"context tokens must be an integer tensor [B, S], got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        return self._encode_real(self.token_embedding(tokens), step_index)

    def energy(self, context: Union[Tensor, ContextCache], candidate: Tensor,
               step_index: Optional[int] = None, *, mapped: bool = False) -> Tensor:
        """``candidate`` logits ``[B, S, V]`` -> energies ``[B, S]``; ``context`` is tokens or ``encode(tokens)``.

        ``mapped=True``: ``candidate`` is already the distribution ``softmax(logits)`` (the image point of
        ``parametrization``, which a parametrized descent hands its energy).
        ``step_index``: for adaLN, the index scored on; for a time-token EBT, the index its cache was encoded
        on (checked; tokens are encoded on it)."""
        return self._energies(context, self.candidate(candidate, mapped), step_index)

    def forward(self, tokens: Tensor, candidate: Tensor, step_index: Optional[int] = None, *,
                mapped: bool = False) -> Tensor:
        """The uncached path (all ``2S`` tokens through the stack); equals ``energy(encode(tokens), ...)``
        (``step_index``: the index scored on, for either kind of step conditioning; ``mapped``: as there)."""
        if step_index is None:
            return self.backbone(self.token_embedding(tokens), self.candidate(candidate, mapped))
        return self.backbone(self.token_embedding(tokens), self.candidate(candidate, mapped), step_index)

    @staticmethod
    def parametrization(descent_space: DescentSpace) -> SoftmaxParametrization:
        """How a descent over this model's logits reads them: ``softmax``, with the gradient w.r.t. the
        probabilities and the next state ``p - a * dE/dp`` (``"probabilities"``, the paper's reference code) or
        through the softmax, ``y - a * dE/dy`` (``"logits"``). See ``samplers.parametrization``."""
        return SoftmaxParametrization(check_descent_space(descent_space))

    def candidate_shape(self, targets: Tensor) -> tuple[int, ...]:
        return (*targets.shape, self.vocab_size)
