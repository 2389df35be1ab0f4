"""Thinking with a text EBT (``energyflow.models.TextEBM``): the context is encoded once, without a graph,
and reused by every optimization step and every self-verification candidate (``ContextCache.expand``).

The candidate state is logits ``[B, S, V]`` over the next token at every position, as in training.

Step-conditioned models (``model.step_conditioning``): the energy at the k-th thinking state (y_0, then
each step's proposal) is scored on ``model.step_index(k, step_index_mode)``, as in training: index k clamped
to the last step embedding (thinking longer than training reuses the last trained index), or index 0 in
``"single"`` mode. An adaLN model keeps one cache; a time-token model needs one context per index, so it
thinks from tokens (``think_tokens``, each index encoded once), not from a single ``think_on_cache`` cache.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from architectures.ebt import ContextCache
from energyflow.inference.optimize import ThinkingConfig
from energyflow.inference.verification import Verified, self_verify
from energyflow.models import StepEnergy, TextEBM
from energyflow.objectives.components import RandomNoise, Zeros
from samplers.transforms import Detach, LangevinNoise

InitialState = Callable[..., Tensor]  # (shape, *, device, dtype, generator) -> Tensor, as in objectives


def thinking_config(objective: nn.Module, *, num_steps: int, step_size: Optional[float] = None,
                    noise_scale: float = 0.0, accept_if_lower: bool = False,
                    energy_tolerance: Optional[float] = None, grad_tolerance: Optional[float] = None,
                    check_every: Optional[int] = None) -> ThinkingConfig:
    """A ``ThinkingConfig`` from a trained ``EBTObjective``: its evaluation sampler's (learned) step size
    unless ``step_size`` overrides it, its stability transforms (clamps) and its descent rule
    (``descent_space``: the thinking descends exactly as the model was trained to). Training noise and
    detaching are dropped: ``noise_scale`` is the inference noise; the randomized step-size schedule is a
    training trick.
    """
    sampler = objective.eval_sampler if objective.eval_sampler is not None else objective.sampler
    if step_size is None:
        operative = getattr(sampler, "operative_step_size", None)  # the learned value, raised to its floor
        step_size = (operative() if callable(operative) else sampler.step_size).detach().clone()
    transforms = tuple(t for t in sampler.transforms if not isinstance(t, (LangevinNoise, Detach)))
    space = getattr(objective, "descent_space", None)
    return ThinkingConfig(num_steps=num_steps, step_size=step_size, noise_scale=noise_scale,
                          accept_if_lower=accept_if_lower, energy_tolerance=energy_tolerance,
                          grad_tolerance=grad_tolerance, check_every=check_every, transforms=transforms,
                          parametrization=None if space is None else TextEBM.parametrization(space))


def encode(model: nn.Module, tokens: Tensor, step_index: Optional[int] = None) -> ContextCache:
    """The context stream of ``tokens [B, L]``, without a graph (inference never trains the weights);
    ``step_index`` for a time-token EBT (its context depends on the step)."""
    if step_index is None and getattr(model, "step_conditioning", None) == "time_token":
        raise ValueError("a time-token EBT encodes one context per step index: pass step_index (think_tokens and "
                         "generate_ebt do this for you)")
    with torch.no_grad():
        return model.encode(tokens) if step_index is None else model.encode(tokens, step_index=step_index)


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
                   initial_state: Optional[InitialState] = None, step_index_mode: str = "per_step") -> Verified:
    """Predict the last ``num_predictions`` cached positions by thinking from ``num_candidates`` random starts
    per input; ``cache`` holds one row per input and is expanded, not re-encoded.

    ``targets [B, num_predictions]`` (optional) records the per-token loss at every step.
    ``step_index_mode``: the trained objective's (``EBTObjective.step_index_mode``), for a step-conditioned model.
    """
    if getattr(model, "step_conditioning", None) == "time_token":
        raise ValueError("a time-token EBT needs one context per step index, which a single cache cannot give; "
                         "use think_tokens (or generate_ebt), which encode the tokens once per index")
    return think_on_contexts(model, lambda index: cache, cache.batch_size, num_predictions, config,
                             num_candidates=num_candidates, targets=targets, generator=generator,
                             initial_state=initial_state, step_index_mode=step_index_mode)


def think_on_contexts(model: nn.Module, context: Callable[[Optional[int]], ContextCache], batch: int,
                      num_predictions: int, config: ThinkingConfig, *, num_candidates: int = 1,
                      targets: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                      initial_state: Optional[InitialState] = None, step_index_mode: str = "per_step") -> Verified:
    """``think_on_cache`` with ``context(index)`` giving the (one row per input) cache of a step index
    (``None``: the shared context of an unconditioned or adaLN model); each is asked for once and expanded."""
    check_random_starts(initial_state, num_candidates, config.noise_scale)
    expand = (lambda cache: cache.expand(num_candidates)) if num_candidates > 1 else (lambda cache: cache)
    energy_fn = StepEnergy(model, lambda index: expand(context(index)), mode=step_index_mode,
                           parametrization=config.parametrization)
    first = energy_fn.context(0)  # the context of y_0 (every thinking run scores y_0)
    draw = initial_state if initial_state is not None else RandomNoise(1.0)
    y0 = draw((batch * num_candidates, num_predictions, model.vocab_size), device=first.keys[0].device,
              dtype=next(model.parameters()).dtype, generator=generator)  # the weights' precision, as in training
    record = None
    if targets is not None:
        record = token_losses(targets.repeat_interleave(num_candidates, dim=0))
    return self_verify(energy_fn, y0, config, num_candidates, generator=generator, record=record)


def think_tokens(model: nn.Module, tokens: Tensor, config: ThinkingConfig, *, num_candidates: int = 1,
                 targets: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                 initial_state: Optional[InitialState] = None, step_index_mode: str = "per_step") -> Verified:
    """Next-token predictions ``[B, S, V]`` for every position of ``tokens [B, S]`` (see ``think_on_cache``);
    a time-token EBT's context is encoded once per step index the thinking uses."""
    return think_on_contexts(model, lambda index: encode(model, tokens, index), tokens.shape[0], tokens.shape[1],
                             config, num_candidates=num_candidates, targets=targets, generator=generator,
                             initial_state=initial_state, step_index_mode=step_index_mode)

