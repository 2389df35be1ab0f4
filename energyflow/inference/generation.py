"""Autoregressive generation for the EBT and the Transformer++ baseline (greedy, temperature, top-p).

EBT: the prompt is encoded once; each new token is predicted by thinking (``num_candidates`` random starts,
self-verified by energy) against the cached context, sampled from the chosen candidate's distribution, and
appended to the cache (one token through the stack). ``use_cache=False`` is the reference that recomputes
both streams of the whole sequence at every optimization step; both give the same tokens. A step-conditioned
EBT scores each thinking state on its step index (``energyflow.inference.text``); a time-token EBT keeps one
cache per index it has used, each extended by every new token.
Baseline: the usual KV cache (``use_cache=False`` recomputes the whole sequence per token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from architectures.ebt import ContextCache
from architectures.transformer import KVCache
from energyflow.inference.optimize import ThinkingConfig
from energyflow.inference.text import InitialState, encode, extend_context, think_on_contexts
from energyflow.inference.verification import Verified, self_verify
from energyflow.models import conditioning_index
from energyflow.objectives.components import RandomNoise

Strategy = Literal["greedy", "sample"]


@dataclass(frozen=True)
class Decoding:
    """How a token is drawn from a predicted distribution: ``greedy`` (argmax) or ``sample`` at
    ``temperature``, restricted to the smallest set of tokens whose probability reaches ``top_p``."""

    strategy: Strategy = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.strategy not in ("greedy", "sample"):
            raise ValueError(f"strategy must be 'greedy' or 'sample', got {self.strategy!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use strategy='greedy' for argmax")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def next_token(logits: Tensor, decoding: Decoding, generator: Optional[torch.Generator] = None) -> Tensor:
    """``logits [B, V]`` -> tokens ``[B]`` (int64)."""
    if decoding.strategy == "greedy":
        return logits.argmax(dim=-1)
    probabilities = torch.softmax(logits.float() / decoding.temperature, dim=-1)
    if decoding.top_p < 1:
        sorted_probs, order = probabilities.sort(dim=-1, descending=True)
        # Keep a token if the mass strictly before it is below top_p (the top token always stays).
        keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < decoding.top_p
        sorted_probs = sorted_probs * keep
        probabilities = torch.zeros_like(probabilities).scatter(-1, order, sorted_probs)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    """``tokens [B, N]`` generated after the prompt; ``energies [B, N]``: the EBT's final energy of each chosen
    prediction (``None`` for the baseline); ``log_probs [B, N]``: the baseline's log-probability of each chosen
    token under its own distribution at temperature 1, whatever the decoding (``None`` for the EBT)."""

    tokens: Tensor
    energies: Optional[Tensor] = None
    log_probs: Optional[Tensor] = None

    @property
    def log_likelihood(self) -> Tensor:
        """``[B]``: the baseline's log-likelihood of each whole continuation (the sum of ``log_probs``)."""
        if self.log_probs is None:
            raise ValueError("this generation has no log-probabilities (an EBT generation is scored by energies)")
        return self.log_probs.sum(dim=1)


def _check_prompt(prompt: Tensor, max_new: int) -> None:
    if prompt.dim() != 2 or prompt.shape[1] == 0 or prompt.is_floating_point():
        raise ValueError(f"prompt must be a non-empty integer tensor [B, P], got {tuple(prompt.shape)} {prompt.dtype}")
    if not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"max_new must be an int >= 1, got {max_new!r}")


@torch.no_grad()
def generate_baseline(model: nn.Module, prompt: Tensor, max_new: int, decoding: Decoding = Decoding(), *,
                      generator: Optional[torch.Generator] = None, use_cache: bool = True) -> Generation:
    """Continue ``prompt [B, P]`` by ``max_new`` tokens with a causal LM (``TransformerPP``)."""
    _check_prompt(prompt, max_new)
    cache = KVCache() if use_cache else None
    sequence, new_tokens, log_probs = prompt, [], []
    logits = model(prompt, cache)[:, -1]
    for index in range(max_new):
        token = next_token(logits, decoding, generator)
        new_tokens.append(token)
        log_probs.append(torch.log_softmax(logits.float(), dim=-1).gather(-1, token[:, None]).squeeze(-1))
        sequence = torch.cat((sequence, token[:, None]), dim=1)
        if index < max_new - 1:
            logits = model(token[:, None], cache)[:, -1] if use_cache else model(sequence)[:, -1]
    return Generation(torch.stack(new_tokens, dim=1), log_probs=torch.stack(log_probs, dim=1))


@torch.no_grad()
def best_of_n_baseline(model: nn.Module, prompt: Tensor, max_new: int, num_samples: int,
                       decoding: Decoding = Decoding("sample"), *,
                       generator: Optional[torch.Generator] = None) -> Generation:
    """The Transformer++'s own test-time compute: draw ``num_samples`` continuations of each prompt row
    (one batch of ``B * num_samples`` rows) and keep the one its model finds most likely (the highest sum of
    temperature-1 log-probabilities). Costs ``num_samples`` forward passes per token; ``num_samples = 1`` is
    plain decoding. Returns ``tokens [B, max_new]`` and the kept continuation's ``log_probs``."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if num_samples > 1 and decoding.strategy == "greedy":
        raise ValueError("best-of-N with greedy decoding draws the same continuation N times; use "
                         "Decoding('sample', ...) or num_samples=1")
    _check_prompt(prompt, max_new)
    drawn = generate_baseline(model, prompt.repeat_interleave(num_samples, dim=0), max_new, decoding,
                              generator=generator)
    rows = prompt.shape[0]
    best = drawn.log_likelihood.view(rows, num_samples).argmax(dim=1)  # ties: the first drawn
    pick = torch.arange(rows, device=prompt.device) * num_samples + best
    return Generation(drawn.tokens[pick], log_probs=drawn.log_probs[pick])


def generate_ebt(model: nn.Module, prompt: Tensor, max_new: int, config: ThinkingConfig,
                 decoding: Decoding = Decoding(), *, num_candidates: int = 1,
                 generator: Optional[torch.Generator] = None, initial_state: Optional[InitialState] = None,
                 use_cache: bool = True, step_index_mode: str = "per_step") -> Generation:
    """Continue ``prompt [B, P]`` by ``max_new`` tokens with a ``TextEBM`` (see the module docstring);
    ``step_index_mode``: the trained objective's, for a step-conditioned model."""
    _check_prompt(prompt, max_new)
    draw = initial_state if initial_state is not None else RandomNoise(1.0)
    sequence, new_tokens, energies = prompt, [], []
    caches: dict[Optional[int], ContextCache] = {}  # step index (None: shared) -> the cache of `sequence`

    def context(step_index: Optional[int]):
        if step_index not in caches:
            caches[step_index] = encode(model, sequence, step_index)
        return caches[step_index]

    for index in range(max_new):
        if use_cache:
            verified = think_on_contexts(model, context, prompt.shape[0], 1, config, num_candidates=num_candidates,
                                         generator=generator, initial_state=draw, step_index_mode=step_index_mode)
        else:
            verified = _think_recomputing(model, sequence, config, num_candidates, generator, draw, step_index_mode)
        token = next_token(verified.state[:, 0], decoding, generator)
        new_tokens.append(token)
        energies.append(verified.energies[:, 0])
        sequence = torch.cat((sequence, token[:, None]), dim=1)
        if use_cache and index < max_new - 1:
            caches.update({key: extend_context(model, cache, token[:, None]) for key, cache in caches.items()})
    return Generation(torch.stack(new_tokens, dim=1), torch.stack(energies, dim=1))


def _think_recomputing(model: nn.Module, sequence: Tensor, config: ThinkingConfig, num_candidates: int,
                       generator: Optional[torch.Generator], draw: InitialState,
                       step_index_mode: str = "per_step") -> Verified:
    """The uncached reference: every energy evaluation runs both streams of the whole ``sequence [B, L]``."""
    tokens = sequence.repeat_interleave(num_candidates, dim=0)  # [B*n, L]
    rows, length = tokens.shape
    y0 = draw((rows, 1, model.vocab_size), device=tokens.device, dtype=next(model.parameters()).dtype,
              generator=generator)
    # Predictions attend to themselves only, so the filler at the other positions never reaches the last one.
    filler = torch.zeros(rows, length - 1, model.vocab_size, device=tokens.device)
    calls = [0]  # the k-th call scores the k-th thinking state (its step index, for a conditioned model)

    def energy_fn(y: Tensor) -> Tensor:
        step_index = conditioning_index(model, calls[0], step_index_mode)
        calls[0] += 1
        conditioning = {} if step_index is None else {"step_index": step_index}
        if config.parametrization is not None:  # the descent hands the image point (probabilities)
            conditioning["mapped"] = True
        return model(tokens, torch.cat((filler, y), dim=1), **conditioning)[:, -1:]

    return self_verify(energy_fn, y0, config, num_candidates, generator=generator)
