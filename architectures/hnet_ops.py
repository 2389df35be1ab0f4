"""The tensor operations of H-Net dynamic chunking (Hwang, Wang, Gu, 2025), in plain differentiable torch.

Shapes: ``B`` batch, ``L`` positions of a stage's input (bytes for stage 0), ``M`` chunks (the most in any
row of the batch), ``D`` width. ``p [B, L]`` boundary probabilities, ``b [B, L]`` hard boundaries (bool).

Rows of a batch have different numbers of chunks. Chunks are packed to the front of each row and padded at
the end (``chunk_valid [B, M]``): because every consumer is causal over chunks, padding that sits after all
real chunks can never influence them, so no key-padding mask is needed in the main network. Everything is
vectorized over rows (gather / argsort / cumsum); the only host synchronisation is reading ``M`` (a shape).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Chunks(NamedTuple):
    """The output of :func:`chunk`."""

    vectors: Tensor  # [B, M, D] the vector of each chunk's first position
    probabilities: Tensor  # [B, M] boundary probability of each chunk's first position
    valid: Tensor  # [B, M] bool: a real chunk (False = padding at the end of the row)
    index: Tensor  # [B, L] int64: the chunk each position belongs to


class RoutingStats(NamedTuple):
    """Per-stage boundary statistics over the stage's real positions. ``ratio_loss`` and
    ``mean_probability`` stay in the autograd graph (the objective adds the loss); the fraction is detached."""

    boundary_fraction: Tensor  # [] F: fraction of positions that start a chunk
    mean_probability: Tensor  # [] G: mean boundary probability
    ratio_loss: Tensor  # [] N/(N-1) ((N-1) F G + (1-F)(1-G)); equals 1 at F = G = 1/N


def boundary_probabilities(queries: Tensor, keys: Tensor) -> Tensor:
    """``p_t = (1 - cos(q_{t-1}, k_t)) / 2`` with ``p_0 = 1``: ``queries, keys [B, L, D] -> p [B, L]``.

    A position whose representation turns away from its predecessor's starts a new chunk; the first
    position always does.
    """
    cos = torch.nn.functional.cosine_similarity(queries[:, :-1], keys[:, 1:], dim=-1)  # [B, L-1]
    first = torch.ones_like(queries[:, :1, 0])
    # Rounding can push |cos| a hair past 1; the clamp keeps p a probability.
    return torch.cat((first, ((1 - cos) / 2).clamp(0.0, 1.0)), dim=1)


def chunk(h: Tensor, probabilities: Tensor, boundaries: Tensor) -> Chunks:
    """Keep the boundary positions of ``h [B, L, D]``, packed to the front of each row.

    ``boundaries[:, 0]`` must be True (the first position starts the first chunk). A chunk is represented by
    its *first* position, so chunk ``k`` depends only on positions up to its start: the model stays causal.
    """
    counts = boundaries.sum(dim=1)  # [B]
    num_chunks = int(counts.max())  # a shape: the one host sync of the chunk layer
    # A stable sort of "is not a boundary" lists each row's boundary positions first, in order.
    order = torch.argsort((~boundaries).to(torch.int8), dim=1, stable=True)[:, :num_chunks]  # [B, M]
    vectors = h.gather(1, order.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    valid = torch.arange(num_chunks, device=h.device).unsqueeze(0) < counts.unsqueeze(1)
    index = boundaries.long().cumsum(dim=1) - 1  # [B, L]
    return Chunks(vectors, probabilities.gather(1, order), valid, index)


def ema_scan(z: Tensor, probabilities: Tensor) -> Tensor:
    """Reference EMA over chunks, one step at a time: ``zbar_k = P_k z_k + (1 - P_k) zbar_{k-1}``.

    ``z [B, M, D]``, ``probabilities [B, M]`` -> ``[B, M, D]``. ``P_0 = 1`` makes the start value irrelevant.
    """
    p = probabilities.unsqueeze(-1).to(z.dtype)  # [B, M, 1]
    state = torch.zeros_like(z[:, 0])
    outputs = []
    for k in range(z.shape[1]):
        state = p[:, k] * z[:, k] + (1 - p[:, k]) * state
        outputs.append(state)
    return torch.stack(outputs, dim=1)


def ema_vectorized(z: Tensor, probabilities: Tensor) -> Tensor:
    """The same EMA as one lower-triangular weighting: ``zbar_k = sum_{j<=k} P_j prod_{j<i<=k} (1 - P_i) z_j``.

    The log-decays are summed per (k, j) pair by a masked cumulative sum (no difference of large prefix
    sums, so no cancellation), and the upper triangle is set to ``-inf`` *before* the exponential, so no
    ``inf * 0`` can appear in the forward or backward pass. ``1 - P`` is clamped to the smallest normal
    number so that ``P = 1`` has a finite log and gradient: ``P_0 = 1`` always, and its decay never enters
    the sum; an exact 1 further in (a router cosine of exactly -1, measure zero) gets no gradient through its
    decay. ``O(M^2 D)`` work, no Python loop.
    """
    # The weights in float32 (float64 for float64 inputs): log-decays summed in bf16 lose the long memories.
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    p = probabilities.to(dtype)
    log_decay = torch.log((1 - p).clamp_min(torch.finfo(dtype).tiny))  # [B, M]
    ones = torch.ones(z.shape[1], z.shape[1], dtype=torch.bool, device=z.device)
    strictly_lower, lower = ones.tril(-1), ones.tril(0)
    # terms[b, k, j] = log_decay[b, k] where k > j: the cumsum over k gives sum_{j<i<=k} log_decay[b, i].
    terms = torch.where(strictly_lower, log_decay.unsqueeze(-1), torch.zeros((), dtype=dtype, device=z.device))
    segment = terms.cumsum(dim=1).masked_fill(~lower, float("-inf"))  # [B, M(k), M(j)], -inf where j > k
    weights = segment.exp() * p.unsqueeze(1)  # [B, M, M]
    return weights.to(z.dtype) @ z


def dechunk(smoothed: Tensor, index: Tensor) -> Tensor:
    """Every position takes the vector of the chunk it belongs to: ``[B, M, D], [B, L] -> [B, L, D]``."""
    return smoothed.gather(1, index.unsqueeze(-1).expand(-1, -1, smoothed.shape[-1]))


def straight_through(confidence: Tensor) -> Tensor:
    """Exactly 1 in the forward pass, gradient 1 to ``confidence`` in the backward pass.

    ``1 + (c - sg(c))`` rather than ``c + sg(1 - c)``: ``c - c`` is exactly 0 in floating point, so the
    factor multiplies by exactly 1.
    """
    return 1 + (confidence - confidence.detach())


def confidence(probabilities: Tensor, boundaries: Tensor) -> Tensor:
    """The router's confidence in its own decision: ``p`` at boundaries, ``1 - p`` elsewhere ``[B, L]``."""
    return torch.where(boundaries, probabilities, 1 - probabilities)


def ratio_loss(boundary_fraction: Tensor, mean_probability: Tensor, compression: float) -> Tensor:
    """``N/(N-1) ((N-1) F G + (1-F)(1-G))`` for a target of one boundary every ``N = compression`` positions.

    ``F`` is not differentiable (hard decisions); the gradient reaches the router through ``G``:
    ``dL/dG = N/(N-1) (N F - 1)`` lowers the probabilities when ``F > 1/N`` and raises them when ``F < 1/N``.
    """
    if compression <= 1:
        raise ValueError(f"the target compression N must be > 1 (one boundary every N positions), got {compression}")
    n = float(compression)
    f, g = boundary_fraction, mean_probability
    return n / (n - 1) * ((n - 1) * f * g + (1 - f) * (1 - g))


def routing_stats(probabilities: Tensor, boundaries: Tensor, valid: Tensor, compression: float) -> RoutingStats:
    """Statistics over the ``valid [B, L]`` positions (padding chunks of an inner stage do not count)."""
    weight = valid.to(probabilities.dtype)
    total = weight.sum()
    fraction = ((boundaries & valid).to(probabilities.dtype).sum() / total).detach()
    mean_probability = (probabilities * weight).sum() / total
    return RoutingStats(fraction, mean_probability, ratio_loss(fraction, mean_probability, compression))
