"""Thinking with a text EBT (``energyflow.models.TextEBM``): the context is encoded once, without a graph,
and reused by every optimization step and every self-verification candidate (``ContextCache.expand``).

The candidate state is logits ``[B, S, V]`` over the next token at every position, as in training.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from architectures.ebt import ContextCache
from energyflow.inference.optimize import ThinkingConfig
from energyflow.inference.verification import Verified, self_verify
from energyflow.objectives.components import RandomNoise, Zeros
from samplers.transforms import Detach, LangevinNoise

InitialState = Callable[..., Tensor]  # (shape, *, device, dtype, generator) -> Tensor, as in objectives


def thinking_config(objective: nn.Module, *, num_steps: int, step_size: Optional[float] = None,
                    noise_scale: float = 0.0, accept_if_lower: bool = False,
                    energy_tolerance: Optional[float] = None, grad_tolerance: Optional[float] = None,
                    check_every: Optional[int] = None) -> ThinkingConfig:
    """A ``ThinkingConfig`` from a trained ``EBTObjective``: its evaluation sampler's (learned) step size
    unless ``step_size`` overrides it, and its stability transforms (clamps). Training noise and detaching
    are dropped: ``noise_scale`` is the inference noise; the randomized step-size schedule is a training trick.
    """
    sampler = objective.eval_sampler if objective.eval_sampler is not None else objective.sampler
    if step_size is None:
        step_size = sampler.step_size.detach().clone()
    transforms = tuple(t for t in sampler.transforms if not isinstance(t, (LangevinNoise, Detach)))
    return ThinkingConfig(num_steps=num_steps, step_size=step_size, noise_scale=noise_scale,
                          accept_if_lower=accept_if_lower, energy_tolerance=energy_tolerance,
                          grad_tolerance=grad_tolerance, check_every=check_every, transforms=transforms)


def encode(model: nn.Module, tokens: Tensor) -> ContextCache:
    """The context stream of ``tokens [B, L]``, without a graph (inference never trains the weights)."""
    with torch.no_grad():
        return model.encode(tokens)


def extend_context(model: nn.Module, cache: ContextCache, tokens: Tensor) -> ContextCache:
    """Continue ``cache`` (batch ``B``) by ``tokens [B, T]``: only the new tokens run through the stack."""
    if tokens.dim() != 2 or tokens.shape[0] != cache.batch_size:
        raise ValueError(f"tokens must be [B={cache.batch_size}, T] to extend the cache, got {tuple(tokens.shape)}")
    with torch.no_grad():
        return model.backbone.encode_context(model.token_embedding(tokens), cache=cache)


def token_losses(targets: Tensor) -> Callable[[Tensor], Tensor]:
    """A ``record`` for ``think``: logits ``[B, S, V]`` -> cross-entropy ``[B, S]`` (nats) against ``targets``."""
    def record(logits: Tensor) -> Tensor:
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        return losses.view_as(targets)
    return record


def check_random_starts(initial_state: Optional[InitialState], num_candidates: int, noise_scale: float) -> None:
    """Refuse self-verification that could only compare identical candidates: several starts drawn from a
    deterministic initial state (``Zeros``) with no noise all follow the same descent."""
    if num_candidates > 1 and isinstance(initial_state, Zeros) and noise_scale == 0:
        raise ValueError(f"{num_candidates} candidates from the model's Zeros initial state with no noise would all be "
                         "identical; add Langevin noise (noise_scale / --noise) or draw the starts with RandomNoise")


def think_on_cache(model: nn.Module, cache: ContextCache, num_predictions: int, config: ThinkingConfig, *,
                   num_candidates: int = 1, targets: Optional[Tensor] = None,
                   generator: Optional[torch.Generator] = None,
                   initial_state: Optional[InitialState] = None) -> Verified:
    """Predict the last ``num_predictions`` cached positions by thinking from ``num_candidates`` random starts
    per input; ``cache`` holds one row per input and is expanded, not re-encoded.

    ``targets [B, num_predictions]`` (optional) records the per-token loss at every step.
    """
    check_random_starts(initial_state, num_candidates, config.noise_scale)
    batch = cache.batch_size
    expanded = cache.expand(num_candidates) if num_candidates > 1 else cache
    draw = initial_state if initial_state is not None else RandomNoise(1.0)
    device = cache.keys[0].device
    y0 = draw((batch * num_candidates, num_predictions, model.vocab_size), device=device, dtype=torch.float32,
              generator=generator)
    record = None
    if targets is not None:
        record = token_losses(targets.repeat_interleave(num_candidates, dim=0))
    return self_verify(lambda y: model.energy(expanded, y), y0, config, num_candidates, generator=generator,
                       record=record)


def think_tokens(model: nn.Module, tokens: Tensor, config: ThinkingConfig, *, num_candidates: int = 1,
                 targets: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                 initial_state: Optional[InitialState] = None) -> Verified:
    """Next-token predictions ``[B, S, V]`` for every position of ``tokens [B, S]`` (see ``think_on_cache``)."""
    return think_on_cache(model, encode(model, tokens), tokens.shape[1], config, num_candidates=num_candidates,
                          targets=targets, generator=generator, initial_state=initial_state)

