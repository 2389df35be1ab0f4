"""Every gin configurable of the project, registered in one place (nothing binds at import time).

``samplers`` and ``architectures`` never import gin; their classes are registered here. Recipes may name a
configurable by its short name (``TransformerPP``) or with its module (``architectures.TransformerPP``).
Sections: data, tasks, trainer and optimizer, architectures, samplers, roots. Add a section for a new
component family rather than registering anywhere else.
"""
from __future__ import annotations

from typing import Any, Optional

import gin

import architectures
import samplers
from energyflow import config, data, experiment, optim, tasks, trainer
from energyflow.data import tokens as _tokens


def _register(module: str, *objects: Any) -> None:
    for obj in objects:
        gin.external_configurable(obj, module=module)


# ---------------------------------------------------------------------------------------------- data
_register("energyflow.data", data.pydoc_corpus, data.text_files, data.hf_corpus, data.text_data, data.gaussian_data,
          data.photo_patches, data.digits_images, data.image_folder, data.hf_images, data.moving_digits,
          data.bouncing_shapes, data.npy_clips)
_register("energyflow.data.tokens", _tokens.token_shards, _tokens.corpus_vocab_size, _tokens.tokenizer_vocab_size)

# --------------------------------------------------------------------------------------------- tasks
_register("energyflow.tasks", tasks.LanguageModelTask)

# ----------------------------------------------------------------------------- trainer and optimizer
_register("energyflow.trainer", trainer.Trainer)
_register("energyflow.optim", optim.paper_learning_rate)


# ------------------------------------------------------------------------------------- architectures
def transformer_preset(size: str, *, max_seq_len: Optional[int] = None, ffn_hidden: Optional[int] = None,
                       ffn_multiplier: Optional[float] = None, rope_theta: Optional[float] = None,
                       norm_eps: Optional[float] = None, init: Optional[str] = None,
                       embedding_std: Optional[float] = None,
                       attention_backend: Optional[str] = None) -> architectures.TransformerConfig:
    """``TransformerConfig.from_preset`` with an explicit signature, so that gin rejects a typo'd field at
    parse time (naming the file and line). ``None`` keeps the dataclass default."""
    overrides = {"max_seq_len": max_seq_len, "ffn_hidden": ffn_hidden, "ffn_multiplier": ffn_multiplier,
                 "rope_theta": rope_theta, "norm_eps": norm_eps, "init": init, "embedding_std": embedding_std,
                 "attention_backend": attention_backend}
    return architectures.TransformerConfig.from_preset(size, **{k: v for k, v in overrides.items() if v is not None})


def bidirectional_preset(size: str, *, image_size: int, patch_size: int, in_channels: int = 3,
                         mlp_ratio: Optional[float] = None, init: Optional[str] = None,
                         attention_backend: Optional[str] = None) -> architectures.BidirectionalConfig:
    """``BidirectionalConfig.from_preset`` (the paper's layers/heads/width for ``size``) with the image fields,
    with an explicit signature so that gin rejects a typo'd field at parse time."""
    overrides = {"mlp_ratio": mlp_ratio, "init": init, "attention_backend": attention_backend}
    return architectures.BidirectionalConfig.from_preset(
        size, image_size=image_size, patch_size=patch_size, in_channels=in_channels,
        **{k: v for k, v in overrides.items() if v is not None})


_register("architectures", transformer_preset, bidirectional_preset, architectures.TransformerConfig, architectures.TransformerPP,
          architectures.EBT, architectures.LinearEnergyHead, architectures.QuadraticEnergyHead,
          architectures.MeanPatchEnergyHead, architectures.LMHead, architectures.BidirectionalConfig,
          architectures.BidirectionalTransformer, architectures.ContinuousTransformerPP)

# ------------------------------------------------------------------------------------------ samplers
_register("samplers", samplers.GradientDescent, samplers.Langevin, samplers.MALA, samplers.HMC, samplers.NUTS,
          samplers.PyroNUTS, samplers.MEADS, samplers.SGLD, samplers.SGHMC)
_register("samplers.schedules", samplers.Constant, samplers.LinearAnneal, samplers.GeometricAnneal,
          samplers.CosineAnneal, samplers.RandomizedStepSize)
_register("samplers.transforms", samplers.ClampGradient, samplers.ClampState, samplers.LangevinNoise,
          samplers.Detach)

# ------------------------------------------------------------------------- EBT models, objectives, task
from energyflow import models as _ebt_models, objectives as _ebt_objectives  # noqa: E402
from energyflow.tasks import text as _ebt_tasks  # noqa: E402

_register("energyflow.models", _ebt_models.TextEBM, _ebt_models.VectorSequenceEBM, _ebt_models.GaussianEnergy,
          _ebt_models.ImageEBM)
_register("energyflow.objectives", _ebt_objectives.EBTObjective, _ebt_objectives.RandomNoise,
          _ebt_objectives.Zeros, _ebt_objectives.InputState, _ebt_objectives.RandomNumSteps, _ebt_objectives.LinearLabelSmoothing,
          _ebt_objectives.CrossEntropy, _ebt_objectives.SmoothL1, _ebt_objectives.MeanSquaredError,
          _ebt_objectives.ReplayBuffer, _ebt_objectives.ContrastiveTerm,
          samplers.WarmupLangevinNoise,  # a samplers transform, registered under its old gin module
          _ebt_objectives.ContrastiveDivergence, _ebt_objectives.PersistentChains,
          _ebt_objectives.DenoisingScoreMatching)
# Validation's descent usually differs from training's (no randomized step size, no noise): a second name
# for the same class lets a recipe configure both without gin scopes (which `compare` already uses).
gin.external_configurable(samplers.GradientDescent, name="EvalGradientDescent", module="energyflow.objectives")
_register("energyflow.tasks", _ebt_tasks.EBTLanguageModelTask, tasks.EnergyModelTask)

# ------------------------------------------------------------------------- images: the EBT and the DiT
from energyflow.objectives import diffusion as _diffusion  # noqa: E402

_register("energyflow.objectives", _diffusion.LinearDiffusion)
_register("energyflow.tasks", tasks.ImageDenoisingTask, tasks.DiffusionDenoisingTask)

# ----------------------------------------------------------------- video: the EBT and the Transformer++
_register("energyflow.tasks", tasks.NextFrameEBTTask, tasks.NextFrameRegressionTask, tasks.AutoencoderTask)
_register("architectures", architectures.ConvAutoencoder)
_register("energyflow.models", _ebt_models.frozen_autoencoder, _ebt_models.run_path)

# ---------------------------------------------------------------------- H-Net backbone and its tasks
from architectures import hnet as _hnet, hnet_ebt as _hnet_ebt  # noqa: E402
from energyflow.tasks import hnet as _hnet_tasks  # noqa: E402

_register("architectures", _hnet.HNetConfig, _hnet.HNet, _hnet.HNetLM, _hnet_ebt.HNetContextEBT)
_register("energyflow.tasks", _hnet_tasks.HNetLanguageModelTask, _hnet_tasks.HNetEBTLanguageModelTask)

# ------------------------------------------------------------------------------------------- sweeps
from energyflow.sweeps import spec as _sweep_spec  # noqa: E402

_register("energyflow.sweeps", _sweep_spec.sweep)

# --------------------------------------------------------------------------------------------- roots
# `energyflow train` calls `launch`; `launch.program` is `train` unless a recipe binds `@compare`.
_register("energyflow", experiment.train, experiment.compare, experiment.launch)


# ------------------------------------------------------------------------- parsing, with everything registered
def parse_recipe(name, bindings=(), *, root=None):
    """``energyflow.config.parse_recipe`` once every configurable above is registered (importing this module
    registers them): the recipe and its ``--bind`` overrides, unknown names named with file and line."""
    return config.parse_recipe(name, bindings, root=root)


def parse_text(text: str, source: str) -> None:
    """``energyflow.config.parse_text`` with every configurable registered (e.g. a run's operative config)."""
    config.parse_text(text, source)
