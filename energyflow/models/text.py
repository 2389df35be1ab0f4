"""The text EBT: logits over the vocabulary -> softmax -> an embedding, scored by an ``architectures.EBT``.

The candidate map ``h = softmax(y) @ E`` (``y [B, S, V]`` logits, ``E [V, D]``) is where the vocabulary size
costs memory: a descent step differentiates it with ``create_graph=True`` and the outer loss differentiates that
again, so autograd keeps, per step, the probabilities, the gradient ``dE/dp = g @ E^T`` and the softmax's own
backward inputs (``[B, S, V]`` each), and the second-order backward of the softmax makes several more
full-vocabulary temporaries at once, which is where the training step peaks (``benchmarks/vocab_scale.py``).
``_SoftmaxEmbedding`` is the same map as one autograd node that saves only the logits and ``E``: its backward,
``_SoftmaxEmbeddingBackward`` (``dE/dy = p * (q - <q, p>)`` with ``q = g @ E^T``), is itself one node with a
hand-derived backward, and both recompute ``p = softmax(y)`` row chunk by row chunk (a few MiB at a time) rather
than keep it. The numbers are the plain formula's to rounding (float64 tests compare values, first and second
derivatives against autograd on ``softmax(y) @ E``); a backward that itself builds a graph (a third derivative,
or a first-order gradient taken with ``create_graph`` w.r.t. ``E``) runs the plain formula under autograd, so
every order stays exact.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

from architectures.ebt import EBT, ContextCache
from architectures.layers import init_linear
from energyflow.models.conditioning import DescentSpace, _StepConditioned, check_descent_space
from samplers.parametrization import SoftmaxParametrization

CandidateEmbedding = Literal["linear", "tied"]


# Rows per chunk: this many elements of a [rows, V] temporary (16 MiB of float32); V = 256 is one chunk up to
# 16,384 positions, V = 50,277 chunks of 83 positions.
CHUNK_ELEMENTS = 1 << 22
# Default of ``recompute_probabilities``: from this vocabulary size on (the byte-level recipes stay on the plain
# autograd graph, bit for bit as they were measured).
RECOMPUTE_FROM_VOCAB = 4096


def _matmul_dtype(y: Tensor, weight: Tensor) -> torch.dtype:
    """The precision ``p @ E`` runs in, as the plain path would: autocast's dtype when it is on for ``y``'s device
    (its matmuls cast both operands), else the weight's."""
    device = y.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _row_chunks(rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _grad_needed(node) -> bool:
    """Whether the running backward will use a gradient flowing into ``node`` (``None``: a tensor without
    history that requires grad has none, so it is needed; an engine that cannot tell: assume it is)."""
    if node is None:
        return True
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


class _SoftmaxEmbedding(torch.autograd.Function):
    """``h = softmax(y) @ E`` for ``y [N, V]``, ``E [V, D]``, saving ``y`` and ``E`` only (see the module docstring).

    Backward, for an upstream ``g [N, D]``: ``dy = _SoftmaxEmbeddingBackward(g, y, E)`` (one differentiable node)
    and ``dE = softmax(y)^T @ g``, computed only when the running backward uses it (a descent's inner
    ``autograd.grad(E, y)`` does not)."""

    @staticmethod
    def forward(ctx, y: Tensor, weight: Tensor, mm_dtype: torch.dtype, weight_node) -> Tensor:
        rows, vocab = y.shape
        with torch.autocast(y.device.type, enabled=False):
            weight_mm = weight.to(mm_dtype)
            out = torch.empty(rows, weight.shape[1], dtype=mm_dtype, device=y.device)
            for part in _row_chunks(rows, vocab):
                torch.mm(torch.softmax(y[part], dim=-1).to(mm_dtype), weight_mm, out=out[part])
        ctx.save_for_backward(y, weight)
        ctx.mm_dtype, ctx.weight_node = mm_dtype, weight_node
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, weight = ctx.saved_tensors
        d_y = d_weight = None
        if ctx.needs_input_grad[0]:
            d_y = _SoftmaxEmbeddingBackward.apply(grad, y, weight, ctx.mm_dtype)
        if ctx.needs_input_grad[1] and _grad_needed(ctx.weight_node):
            with torch.autocast(y.device.type, enabled=False):
                if torch.is_grad_enabled():  # create_graph: the plain formula, under autograd
                    d_weight = torch.softmax(y, dim=-1).to(ctx.mm_dtype).t() @ grad.to(ctx.mm_dtype)
                else:
                    grad_mm = grad.to(ctx.mm_dtype)
                    d_weight = torch.zeros(weight.shape, dtype=ctx.mm_dtype, device=y.device)
                    for part in _row_chunks(*y.shape):
                        d_weight.addmm_(torch.softmax(y[part], dim=-1).to(ctx.mm_dtype).t(), grad_mm[part])
            d_weight = d_weight.to(weight.dtype)
        return d_y, d_weight, None, None


class _SoftmaxEmbeddingBackward(torch.autograd.Function):
    """``dy = p * (q - <q, p>)`` with ``p = softmax(y)`` and ``q = g @ E^T`` (the adjoint of ``_SoftmaxEmbedding``
    at ``y``), saving ``g``, ``y`` and ``E``.

    Its backward, for an upstream ``v [N, V]`` with ``a = <v, p>`` and ``c = <q, p>`` (per row):
    ``s = p * (v - a)`` (the map ``q -> dy`` is the softmax's Jacobian, symmetric), so ``d/dg = s @ E`` and
    ``d/dE = s^T @ g``; and through ``p`` with ``q`` fixed, ``r = v * (q - c) - a * q`` and
    ``d/dy = p * (r - <r, p>)``. Row chunk by row chunk, without a graph; when the backward itself builds one
    (a third derivative), the plain formula under autograd instead."""

    @staticmethod
    def forward(ctx, grad: Tensor, y: Tensor, weight: Tensor, mm_dtype: torch.dtype) -> Tensor:
        rows, vocab = y.shape
        out = torch.empty_like(y)
        with torch.autocast(y.device.type, enabled=False):
            weight_t, grad_mm = weight.to(mm_dtype).t(), grad.to(mm_dtype)
            for part in _row_chunks(rows, vocab):
                p = torch.softmax(y[part], dim=-1)
                q = (grad_mm[part] @ weight_t).to(p.dtype)
                out[part] = p * (q - (q * p).sum(-1, keepdim=True))
        ctx.save_for_backward(grad, y, weight)
        ctx.mm_dtype = mm_dtype
        return out

    @staticmethod
    def backward(ctx, upstream: Tensor):
        grad, y, weight = ctx.saved_tensors
        need_grad, need_y, need_weight = ctx.needs_input_grad[:3]
        mm_dtype = ctx.mm_dtype
        with torch.autocast(y.device.type, enabled=False):
            if torch.is_grad_enabled():  # create_graph: the plain formula, under autograd (exact at every order)
                return (*_embedding_vjp(upstream, grad, y, weight, mm_dtype, need_grad, need_y, need_weight), None)
            d_grad = torch.empty(grad.shape, dtype=mm_dtype, device=y.device) if need_grad else None
            d_y = torch.empty_like(y) if need_y else None
            d_weight = torch.zeros(weight.shape, dtype=mm_dtype, device=y.device) if need_weight else None
            weight_mm, grad_mm = weight.to(mm_dtype), grad.to(mm_dtype)
            for part in _row_chunks(*y.shape):
                p, v = torch.softmax(y[part], dim=-1), upstream[part]
                a = (v * p).sum(-1, keepdim=True)
                if need_grad or need_weight:
                    s = (p * (v - a)).to(mm_dtype)
                    if need_grad:
                        torch.mm(s, weight_mm, out=d_grad[part])
                    if need_weight:
                        d_weight.addmm_(s.t(), grad_mm[part])
                if need_y:
                    q = (grad_mm[part] @ weight_mm.t()).to(p.dtype)
                    r = v * (q - (q * p).sum(-1, keepdim=True)) - a * q
                    d_y[part] = p * (r - (r * p).sum(-1, keepdim=True))
        return (None if d_grad is None else d_grad.to(grad.dtype), d_y,
                None if d_weight is None else d_weight.to(weight.dtype), None)


def _embedding_vjp(upstream, grad, y, weight, mm_dtype, need_grad, need_y, need_weight):
    """``_SoftmaxEmbeddingBackward``'s backward by the same formulas on whole tensors, differentiable."""
    p = torch.softmax(y, dim=-1)
    a = (upstream * p).sum(-1, keepdim=True)
    s = (p * (upstream - a)).to(mm_dtype)
    d_grad = (s @ weight.to(mm_dtype)).to(grad.dtype) if need_grad else None
    d_weight = (s.t() @ grad.to(mm_dtype)).to(weight.dtype) if need_weight else None
    d_y = None
    if need_y:
        q = (grad.to(mm_dtype) @ weight.to(mm_dtype).t()).to(p.dtype)
        r = upstream * (q - (q * p).sum(-1, keepdim=True)) - a * q
        d_y = p * (r - (r * p).sum(-1, keepdim=True))
    return d_grad, d_y, d_weight


def softmax_embedding(logits: Tensor, weight: Tensor) -> Tensor:
    """``softmax(logits) @ weight`` (``logits [..., V]``, ``weight [V, D]``) as ``_SoftmaxEmbedding``: the same
    values and derivatives of every order as the plain formula, with no ``[..., V]`` tensor kept for backward
    beyond the logits (see the module docstring)."""
    if weight.dim() != 2 or logits.shape[-1] != weight.shape[0]:
        raise ValueError(f"softmax_embedding needs logits [..., V] and a weight [V, D]; got {tuple(logits.shape)} "
                         f"and {tuple(weight.shape)}")
    # The node a gradient for ``weight`` flows into (no graph is built without grad mode, so none is needed).
    node = (torch.autograd.graph.get_gradient_edge(weight).node
            if weight.requires_grad and torch.is_grad_enabled() else None)
    flat = logits.reshape(-1, logits.shape[-1])
    out = _SoftmaxEmbedding.apply(flat, weight, _matmul_dtype(logits, weight), node)
    return out.reshape(*logits.shape[:-1], weight.shape[1])


class DistributionAdapter(nn.Module):
    """Logits ``[B, S, V]`` -> softmax -> embedding ``[B, S, D]``.

    ``recompute_probabilities``: run the map as ``softmax_embedding`` (saves only the logits; the probabilities
    are recomputed in the backward, chunked over positions) instead of autograd on ``softmax`` and the matmul;
    ``None`` (default): from ``RECOMPUTE_FROM_VOCAB`` classes on. Same numbers to rounding either way."""

    def __init__(self, vocab_size: int, dim: int, *, mode: CandidateEmbedding = "linear",
                 token_embedding: Optional[nn.Embedding] = None,
                 recompute_probabilities: Optional[bool] = None) -> None:
        super().__init__()
        if mode not in ("linear", "tied"):
            raise ValueError(f"candidate_embedding must be 'linear' or 'tied', got {mode!r}")
        if mode == "tied" and token_embedding is None:
            raise ValueError("candidate_embedding='tied' needs the model's token embedding")
        if recompute_probabilities is not None and not isinstance(recompute_probabilities, bool):
            raise TypeError(f"recompute_probabilities must be True, False or None (from {RECOMPUTE_FROM_VOCAB} "
                            f"classes on), got {recompute_probabilities!r}")
        self.mode, self.vocab_size = mode, vocab_size
        self.recompute_probabilities = (vocab_size >= RECOMPUTE_FROM_VOCAB if recompute_probabilities is None
                                        else recompute_probabilities)
        self.projection = nn.Linear(vocab_size, dim, bias=False) if mode == "linear" else None
        # A plain attribute (not a submodule) so the shared embedding is registered once, by the model.
        self._token_embedding = [token_embedding]

    def forward(self, candidate: Tensor, mapped: bool = False) -> Tensor:
        """``candidate``: logits, or (``mapped=True``) already a distribution ``softmax(logits)``."""
        if candidate.shape[-1] != self.vocab_size:
            raise ValueError(f"candidate logits have {candidate.shape[-1]} classes, the model's vocabulary "
                             f"has {self.vocab_size}")
        if self.recompute_probabilities and not mapped:
            weight = self.projection.weight.t() if self.projection is not None else self._token_embedding[0].weight
            return softmax_embedding(candidate, weight)
        probabilities = candidate if mapped else torch.softmax(candidate, dim=-1)  # [B, S, V]
        if self.projection is not None:
            return self.projection(probabilities)
        weight = self._token_embedding[0].weight  # [V, D]
        return probabilities.to(weight.dtype) @ weight


class TextEBM(_StepConditioned):
    """Autoregressive text EBT: E(tokens_0..i, distribution over token i+1) for every position i.

    ``recompute_probabilities``: how the candidate map runs (``DistributionAdapter``; ``None``: by vocabulary
    size)."""

    def __init__(self, backbone: EBT, vocab_size: int, *, candidate_embedding: CandidateEmbedding = "linear",
                 recompute_probabilities: Optional[bool] = None):
        super().__init__()
        if vocab_size <= 1:
            raise ValueError(f"vocab_size must be > 1, got {vocab_size}")
        dim = backbone.config.dim
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.candidate = DistributionAdapter(vocab_size, dim, mode=candidate_embedding,
                                             token_embedding=self.token_embedding,
                                             recompute_probabilities=recompute_probabilities)
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
