"""System 2 inference: think longer, self-verify, adaptive compute, cached generation.

The core (``optimize``, ``verification``) is model-agnostic: any ``energy_fn(y [C, *event]) -> [C] | [C, S]``.
``text`` and ``generation`` bind it to ``energyflow.models.TextEBM`` and the Transformer++ baseline.
"""
from energyflow.inference.generation import (
    Decoding,
    Generation,
    best_of_n_baseline,
    generate_baseline,
    generate_ebt,
    next_token,
)
from energyflow.inference.optimize import ThinkingConfig, ThinkingResult, think
from energyflow.inference.text import (
    encode,
    extend_context,
    think_on_cache,
    think_tokens,
    thinking_config,
    token_losses,
)
from energyflow.inference.verification import (
    Verified,
    best_of_n_trace,
    lowest_energy_index,
    self_verify,
    take_candidates,
)

__all__ = [
    "Decoding", "Generation", "ThinkingConfig", "ThinkingResult", "Verified", "best_of_n_baseline", "best_of_n_trace",
    "encode",
    "extend_context", "generate_baseline", "generate_ebt", "lowest_energy_index", "next_token", "self_verify",
    "take_candidates", "think", "think_on_cache", "think_tokens", "thinking_config", "token_losses",
]
