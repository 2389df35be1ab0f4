"""Energy models: a modality adapter + a backbone from ``architectures`` + an energy head.

Every model here speaks one protocol, which the objectives rely on:

- ``encode(context) -> cache``: the context stream, computed once per batch (inside the graph, so its
  weights train) and reused by every optimization step, self-verification sample and generated token;
- ``energy(context_or_cache, candidate) -> [B, S]`` (or ``[B]``): lower is better;
- ``candidate_shape(targets)``: the shape of the optimized state for a batch of targets.

Step conditioning (``architectures.EBT(step_conditioning=...)``): ``step_conditioning`` says how the energy
depends on the optimization step (``None``, ``"adaln"``, ``"time_token"``); ``step_index(k, mode)`` is the
conditioning index of the state ``y_k``; ``encode(context, step_index=k)`` encodes a time-token EBT's context
for index ``k`` and ``energy(context, candidate, step_index=k)`` scores on index ``k``. ``StepEnergy`` turns
all of that into the ``energy_fn(y)`` a descent calls once per state (used by the objective and inference).

Text: the candidate is a distribution over the vocabulary, held as logits ``[B, S, V]`` (the optimized
state) and turned into an embedding through softmax then either a learned ``Linear(V, D)``
(``candidate_embedding="linear"``, the paper's choice) or the token-embedding matrix
(``candidate_embedding="tied"``: the expected embedding under the distribution).
Continuous: context and candidate vectors ``[B, S, F]`` projected to the model width.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional, Union

import torch
from torch import Tensor, nn

from architectures.ebt import EBT, ContextCache
from architectures.layers import init_linear
from samplers.parametrization import Parametrization, SoftmaxParametrization

CandidateEmbedding = Literal["linear", "tied"]
DescentSpace = Literal["logits", "probabilities"]
DESCENT_SPACES = ("logits", "probabilities")
StepIndexMode = Literal["per_step", "single"]
STEP_INDEX_MODES = ("per_step", "single")


def check_step_index_mode(mode: str) -> str:
    if mode not in STEP_INDEX_MODES:
        raise ValueError(f"step_index_mode must be 'per_step' (state y_k on index k) or 'single' (index 0 at every "
                         f"step), got {mode!r}")
    return mode


def check_descent_space(descent_space: str) -> str:
    if descent_space not in DESCENT_SPACES:
        raise ValueError(f"descent_space must be 'probabilities' (the paper's rule: gradient w.r.t. p = softmax(y), "
                         f"next state p - a * dE/dp) or 'logits' (gradient through the softmax, next state "
                         f"y - a * dE/dy), got {descent_space!r}")
    return descent_space


def model_parametrization(model: nn.Module, descent_space: Optional[str]) -> Optional[Parametrization]:
    """The parametrization a descent over ``model``'s candidates uses for ``descent_space``; ``None`` when
    ``descent_space`` is ``None`` (the energy reads the state as it is: for a text EBT, the logit rule through
    its own softmax). A model without ``parametrization`` (continuous candidates) refuses a descent space."""
    if descent_space is None:
        return None
    if not callable(getattr(model, "parametrization", None)):
        raise ValueError(f"descent_space={descent_space!r} applies to a model whose candidate is read through a map "
                         f"(a text EBT's softmax); {type(model).__name__} reads its candidate as it is: leave "
                         "descent_space unset (None)")
    return model.parametrization(descent_space)


def conditioning_ebt(backbone: nn.Module) -> Optional[EBT]:
    """The step-conditioned ``EBT`` of ``backbone``: itself, or the EBT a wrapper holds as ``.ebt`` (e.g.
    ``HNetContextEBT``); ``None`` when the backbone is not step-conditioned."""
    ebt = backbone if isinstance(backbone, EBT) else getattr(backbone, "ebt", None)
    return ebt if isinstance(ebt, EBT) and ebt.step_conditioning is not None else None


def conditioning_index(model: nn.Module, state_index: int, mode: str = "per_step") -> Optional[int]:
    """The conditioning index of state ``y_{state_index}`` for any model: ``None`` if the model has no
    ``step_conditioning`` (or it is ``None``), else ``model.step_index(state_index, mode)``."""
    if getattr(model, "step_conditioning", None) is None:
        return None
    return model.step_index(state_index, mode)


class _StepConditioned(nn.Module):
    """What the step-conditioning protocol reads from a model with a ``backbone`` (see the module docstring)."""

    backbone: nn.Module

    @property
    def step_conditioning(self) -> Optional[str]:
        """``None``, ``"adaln"`` (index passed to ``energy``) or ``"time_token"`` (index in the context)."""
        ebt = conditioning_ebt(self.backbone)
        return ebt.step_conditioning if ebt is not None else None

    @property
    def num_step_embeddings(self) -> int:
        """Rows of the step-embedding table (0 without step conditioning)."""
        ebt = conditioning_ebt(self.backbone)
        return ebt.step_embed.num_embeddings if ebt is not None else 0

    def step_index(self, state_index: int, mode: str = "per_step") -> Optional[int]:
        """The index state ``y_k`` (``k = state_index``) is conditioned on: ``min(k, num_step_embeddings - 1)``
        (so more steps than the table has, e.g. at evaluation, reuse the last trained index), or 0 in
        ``"single"`` mode; ``None`` without step conditioning."""
        check_step_index_mode(mode)
        if state_index < 0:
            raise ValueError(f"state_index must be >= 0, got {state_index}")
        if self.step_conditioning is None:
            return None
        return 0 if mode == "single" else min(int(state_index), self.num_step_embeddings - 1)

    def _encode_real(self, real: Tensor, step_index: Optional[int]) -> ContextCache:
        if step_index is None:
            return self.backbone.encode_context(real)
        if self.step_conditioning != "time_token":
            raise ValueError(f"step_index conditions the context of a time-token EBT only; this model's step "
                             f"conditioning is {self.step_conditioning!r} (adaln: pass step_index to energy(); "
                             "unconditioned: drop it)")
        return self.backbone.encode_context(real, step_index=step_index)

    def _energies(self, context: Union[Tensor, ContextCache], embedded: Tensor,
                  step_index: Optional[int]) -> Tensor:
        if self.step_conditioning == "time_token" and step_index is not None:
            # The index lives in the context: encode tokens on it, or check that the cache was encoded on it.
            if isinstance(context, ContextCache):
                _check_same_index(context.step_index, step_index)
            else:
                context = self.encode(context, step_index=step_index)
            step_index = None
        cache = context if isinstance(context, ContextCache) else self.encode(context)
        return self.backbone.energies(cache, embedded, step_index=step_index)


def _check_same_index(cached, requested) -> None:
    same = (torch.equal(torch.as_tensor(cached), torch.as_tensor(requested).to(torch.as_tensor(cached).device))
            if isinstance(cached, Tensor) or isinstance(requested, Tensor) else cached == requested)
    if not same:
        raise ValueError(f"this time-token cache was encoded on step index {cached!r} but the energy was asked on "
                         f"{requested!r}; encode the context once per index with encode(context, step_index=k)")


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

    def energy(self, context: Union[Tensor, ContextCache], candidate: Tensor,
               step_index: Optional[int] = None) -> Tensor:
        """``candidate [B, S, F]`` -> energies ``[B, S]`` (``step_index``: as ``TextEBM.energy``)."""
        return self._energies(context, self.candidate_projection(candidate), step_index)

    def candidate_shape(self, targets: Tensor) -> tuple[int, ...]:
        return tuple(targets.shape)


Encoder = Callable[[Optional[int]], ContextCache]


class StepEnergy:
    """``energy_fn(y)`` for a descent whose ``k``-th call (``k = 0, 1, ...``) scores the state ``y_k``.

    State ``y_k`` is scored on ``conditioning_index(model, k, mode)``: nothing for an unconditioned model
    (the call is exactly ``model.energy(context, y)``), the index passed to ``energy`` for adaLN (one shared
    context), or the context of that index for a time-token EBT. ``encode(index)`` builds a context (``index``
    is ``None`` unless the model is a time-token EBT); each distinct context is built once, on first use,
    and kept in ``contexts`` (``prepare`` builds some ahead, e.g. inside a graph). Works with any model that
    has ``encode``/``energy``; without a ``step_conditioning`` attribute it counts as unconditioned.
    ``parametrization``: the one the descent runs with (``model_parametrization``); its calls then hand the image
    point ``u = map(y)`` (a text EBT's probabilities), scored with ``model.energy(..., mapped=True)``.
    """

    def __init__(self, model: nn.Module, encode: Encoder, *, mode: str = "per_step",
                 parametrization: Optional[Parametrization] = None) -> None:
        self.model, self._encode, self.mode = model, encode, check_step_index_mode(mode)
        self.mapped = parametrization is not None
        self.time_token = getattr(model, "step_conditioning", None) == "time_token"
        self.contexts: dict[Optional[int], ContextCache] = {}
        self.num_calls = 0

    def index(self, state_index: int) -> Optional[int]:
        return conditioning_index(self.model, state_index, self.mode)

    def context_key(self, state_index: int) -> Optional[int]:
        """Which context ``y_k`` is scored against: its index for a time-token EBT, else the one shared context."""
        return self.index(state_index) if self.time_token else None

    def context(self, state_index: int) -> ContextCache:
        key = self.context_key(state_index)
        if key not in self.contexts:
            self.contexts[key] = self._encode(key)
        return self.contexts[key]

    def prepare(self, state_indices, encode: Optional[Encoder] = None) -> None:
        """Build the contexts of ``state_indices`` now (with ``encode`` instead of the default, if given)."""
        for k in state_indices:
            key = self.context_key(k)
            if key not in self.contexts:
                self.contexts[key] = (encode or self._encode)(key)

    def energy_at(self, y: Tensor, state_index: int, *, mapped: bool = False) -> Tensor:
        """The energy of the state ``y`` scored as ``y_{state_index}`` (does not advance the call count);
        ``mapped=True``: ``y`` is already the image point ``map(state)`` of the model's parametrization."""
        context, index = self.context(state_index), self.index(state_index)
        keywords = {"mapped": True} if mapped else {}
        if index is None or self.time_token:
            return self.model.energy(context, y, **keywords)
        return self.model.energy(context, y, step_index=index, **keywords)

    def __call__(self, y: Tensor) -> Tensor:
        """What a descent calls: with a ``parametrization``, on the image point it hands (see the class)."""
        energy = self.energy_at(y, self.num_calls, mapped=self.mapped)
        self.num_calls += 1
        return energy


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
