"""Objectives: the EBT unrolled-optimization loss and its tricks, and the classic EBM objectives.

- :class:`EBTObjective` (``unrolled``): K differentiable descent steps, a task loss on each state.
- Components (``components``): initial states, step counts, label smoothing, task losses.
- :class:`ReplayBuffer` (``replay``): earlier final predictions as later initial states.
- :class:`ContrastiveDivergence` (``contrastive_divergence``): persistent CD with any sampler.
- :class:`DenoisingScoreMatching` (``score_matching``).
- :class:`LinearDiffusion` (``diffusion``): the linear DDPM schedule, noise levels, DDIM (the image tasks).
"""
from energyflow.objectives.components import (CrossEntropy, InputState, LinearLabelSmoothing, MeanSquaredError,
                                              RandomNoise, RandomNumSteps, SmoothL1, Zeros)
from energyflow.objectives.diffusion import LinearDiffusion
from energyflow.objectives.contrastive_divergence import ContrastiveDivergence, PersistentChains
from energyflow.objectives.replay import ReplayBuffer
from energyflow.objectives.score_matching import DenoisingScoreMatching
from energyflow.objectives.unrolled import ContrastiveTerm, EBTObjective, ObjectiveOutput

__all__ = [
    "CrossEntropy", "InputState", "LinearLabelSmoothing", "MeanSquaredError", "RandomNoise", "RandomNumSteps",
    "SmoothL1", "Zeros",
    "ContrastiveDivergence", "PersistentChains", "ReplayBuffer", "DenoisingScoreMatching", "ContrastiveTerm",
    "EBTObjective", "LinearDiffusion", "ObjectiveOutput",
]
