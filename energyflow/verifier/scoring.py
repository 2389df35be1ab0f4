"""Scoring text with a text EBT: the energy of observed tokens, and ranking candidate continuations.

The energy of an observed token is ``E(context, one-hot)``, the candidate state being the token's
one-hot logits scaled by ``target_logit`` (as the EBT objective represents ground truth: softmax of
20 * one-hot puts ~2e-9 mass off the token per class). Any list of continuations (e.g. sampled from
the Transformer++) is scored in one batched pass: the prompt is encoded once, expanded to one row per
continuation, and extended by each continuation's tokens (right-padded; causality keeps padding out
of every real position).

A step-conditioned EBT scores observed text as a fully descended state: on the index of the last
optimisation step it was trained on (``min(k, num_step_embeddings - 1)`` for large ``k``, i.e. the last
step embedding; index 0 in ``"single"`` mode), the index its own final predictions are scored on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from energyflow.inference.text import encode, extend_context
from energyflow.models import conditioning_index


def observed_state(tokens: Tensor, vocab_size: int, target_logit: float = 20.0) -> Tensor:
    """``tokens [B, S]`` -> logits ``[B, S, V]`` whose softmax is (to float32 precision) their one-hot."""
    return F.one_hot(tokens, vocab_size).float() * target_logit


_FULLY_DESCENDED = 2**31  # a state index past any step-embedding table: clamps to the last trained index


def observed_index(model: nn.Module, step_index_mode: str = "per_step") -> "int | None":
    """The conditioning index observed text is scored on (see the module docstring); ``None`` for an
    unconditioned model."""
    return conditioning_index(model, _FULLY_DESCENDED, step_index_mode)


def _encode_and_score(model: nn.Module, index: "int | None"):
    """``encode`` and ``energy`` for ``model`` on conditioning ``index``: a time-token EBT encodes its context on
    it, an adaLN one passes it to ``energy``; an unconditioned model is called exactly as without."""
    time_token = getattr(model, "step_conditioning", None) == "time_token"

    def encode_tokens(tokens: Tensor):
        return encode(model, tokens, step_index=index if time_token else None)

    def energy(cache, state: Tensor) -> Tensor:
        return model.energy(cache, state) if index is None else model.energy(cache, state, step_index=index)

    return encode_tokens, energy


@torch.no_grad()
def token_energies(model: nn.Module, tokens: Tensor, target_logit: float = 20.0, *,
                   step_index_mode: str = "per_step") -> Tensor:
    """``tokens [B, L]`` -> ``[B, L-1]``: energy of token ``i+1`` given tokens ``0..i`` (lower = more expected).

    ``step_index_mode``: the trained objective's (``EBTObjective.step_index_mode``), for a step-conditioned EBT."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, L] with L >= 2 (a context and a next token), got {tuple(tokens.shape)}")
    encode_tokens, energy = _encode_and_score(model, observed_index(model, step_index_mode))
    return energy(encode_tokens(tokens[:, :-1]), observed_state(tokens[:, 1:], model.vocab_size, target_logit))


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
                        target_logit: float = 20.0, *, step_index_mode: str = "per_step") -> ContinuationScores:
    """Rank ``continuations`` (each ``[len_i]`` int64, ``len_i >= 1``) of ``prompt [P]`` by mean token energy.

    ``step_index_mode``: the trained objective's (``EBTObjective.step_index_mode``), for a step-conditioned EBT."""
    if prompt.dim() != 1 or len(prompt) == 0:
        raise ValueError(f"prompt must be a non-empty 1-D token tensor, got shape {tuple(prompt.shape)}")
    if not continuations or any(c.dim() != 1 or len(c) == 0 for c in continuations):
        raise ValueError("continuations must be a non-empty list of non-empty 1-D token tensors")
    lengths = torch.tensor([len(c) for c in continuations], device=prompt.device)
    width = int(lengths.max())
    padded = torch.zeros(len(continuations), width, dtype=torch.long, device=prompt.device)
    for row, continuation in enumerate(continuations):
        padded[row, : len(continuation)] = continuation.to(prompt.device)
    encode_tokens, energy = _encode_and_score(model, observed_index(model, step_index_mode))
    cache = encode_tokens(prompt[None]).expand(len(continuations))
    if width > 1:  # token j of a continuation is predicted at the position of token j-1
        cache = extend_context(model, cache, padded[:, :-1])
    energies = energy(cache, observed_state(padded, model.vocab_size, target_logit))  # [N, width]
    valid = torch.arange(width, device=prompt.device)[None] < lengths[:, None]
    total = (energies * valid).sum(dim=1)
    mean = total / lengths
    per_token = [energies[row, :length] for row, length in enumerate(lengths.tolist())]
    return ContinuationScores(per_token, mean, total, torch.argsort(mean, stable=True))
