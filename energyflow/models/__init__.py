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
Images (``ImageEBM``): no context; the candidate is an image ``[B, C, H, W]`` and the energy ``[B]``.
"""
from __future__ import annotations

from energyflow.models.conditioning import (
    DESCENT_SPACES,
    STEP_INDEX_MODES,
    DescentSpace,
    StepEnergy,
    StepIndexMode,
    check_descent_space,
    check_step_index_mode,
    conditioning_ebt,
    conditioning_index,
    model_parametrization,
)
from energyflow.models.image import ImageEBM
from energyflow.models.latent import FrozenAutoencoder, frozen_autoencoder, run_path
from energyflow.models.sequence import VectorSequenceEBM
from energyflow.models.text import CandidateEmbedding, DistributionAdapter, TextEBM
from energyflow.models.toy import GaussianEnergy

__all__ = [
    "CandidateEmbedding", "DESCENT_SPACES", "DescentSpace", "DistributionAdapter", "FrozenAutoencoder",
    "GaussianEnergy", "ImageEBM", "STEP_INDEX_MODES", "StepEnergy", "StepIndexMode", "TextEBM", "VectorSequenceEBM",
    "check_descent_space", "check_step_index_mode", "conditioning_ebt", "conditioning_index", "frozen_autoencoder",
    "model_parametrization", "run_path",
]
