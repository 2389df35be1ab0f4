"""Scoring text with a text EBT: the energy of observed tokens, and ranking candidate continuations.

The energy of an observed token is ``E(context, one-hot)``, the candidate state being the token's
one-hot logits scaled by ``target_logit`` (as the EBT objective represents ground truth: softmax of
20 * one-hot puts ~2e-9 mass off the token per class). Any list of continuations (e.g. sampled from
the Transformer++) is scored in one batched pass: the prompt is encoded once, expanded to one row per
continuation, and extended by each continuation's tokens (right-padded; causality keeps padding out
of every real position).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from energyflow.inference.text import encode, extend_context


def observed_state(tokens: Tensor, vocab_size: int, target_logit: float = 20.0) -> Tensor:
    """``tokens [B, S]`` -> logits ``[B, S, V]`` whose softmax is (to float32 precision) their one-hot."""
    return F.one_hot(tokens, vocab_size).float() * target_logit


@torch.no_grad()
def token_energies(model: nn.Module, tokens: Tensor, target_logit: float = 20.0) -> Tensor:
    """``tokens [B, L]`` -> ``[B, L-1]``: energy of token ``i+1`` given tokens ``0..i`` (lower = more expected)."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, L] with L >= 2 (a context and a next token), got {tuple(tokens.shape)}")
    cache = encode(model, tokens[:, :-1])
    return model.energy(cache, observed_state(tokens[:, 1:], model.vocab_size, target_logit))


@dataclass
class ContinuationScores:
    """Per continuation ``i``: ``token_energies[i] [len_i]``, ``mean_energy [N]`` (the ranking score: a mean,
    so length does not decide it), ``total_energy [N]``; ``order [N]``: indices from best (lowest) to worst."""

    token_energies: list[Tensor]
    mean_energy: Tensor
    total_energy: Tensor
    order: Tensor


@torch.no_grad()
def score_continuations(model: nn.Module, prompt: Tensor, continuations: Sequence[Tensor],
                        target_logit: float = 20.0) -> ContinuationScores:
    """Rank ``continuations`` (each ``[len_i]`` int64, ``len_i >= 1``) of ``prompt [P]`` by mean token energy."""
    if prompt.dim() != 1 or len(prompt) == 0:
        raise ValueError(f"prompt must be a non-empty 1-D token tensor, got shape {tuple(prompt.shape)}")
    if not continuations or any(c.dim() != 1 or len(c) == 0 for c in continuations):
        raise ValueError("continuations must be a non-empty list of non-empty 1-D token tensors")
    lengths = torch.tensor([len(c) for c in continuations], device=prompt.device)
    width = int(lengths.max())
    padded = torch.zeros(len(continuations), width, dtype=torch.long, device=prompt.device)
    for row, continuation in enumerate(continuations):
        padded[row, : len(continuation)] = continuation.to(prompt.device)
    cache = encode(model, prompt[None]).expand(len(continuations))
    if width > 1:  # token j of a continuation is predicted at the position of token j-1
        cache = extend_context(model, cache, padded[:, :-1])
    energies = model.energy(cache, observed_state(padded, model.vocab_size, target_logit))  # [N, width]
    valid = torch.arange(width, device=prompt.device)[None] < lengths[:, None]
    total = (energies * valid).sum(dim=1)
    mean = total / lengths
    per_token = [energies[row, :length] for row, length in enumerate(lengths.tolist())]
    return ContinuationScores(per_token, mean, total, torch.argsort(mean, stable=True))
