"""Trainable tasks: the one interface between a model and the shared, task-agnostic trainer.

A task is a ``torch.nn.Module`` that owns its model and every other trainable part (for example a
sampler whose step size is a learnable ``nn.Parameter``). The trainer wraps the task itself in
``DistributedDataParallel`` and calls it, so ``forward`` is ``loss``. Implement:

``loss(batch, *, step, generator) -> (loss, metrics)``
    ``batch``: the data source's batch on the task's device (text: ``{"tokens": [B, S] int64, "targets":
    [B, S] int64}``; images: ``{"images": [B, C, H, W]}``; video: ``{"frames": [B, T, C, H, W]}``; vectors: ``{"data": [B, F]}``; see ``energyflow.data``). ``loss``: a scalar to minimize (the trainer scales it for gradient accumulation).
    ``metrics``: ``dict[str, Tensor]`` of detached scalar *means over the batch*; the trainer averages them
    over micro-batches and processes, logs every one to TensorBoard and checks them for NaN/Inf.
    ``step``: the 0-based optimizer step being taken (for warm-ups and schedules inside the task).
    ``generator``: a ``torch.Generator`` on the task's device, reseeded by the trainer from
    (seed, step, micro-batch, rank). Draw *all* randomness from it: that is what makes resume bit-exact.

``evaluate(batch, *, num_steps=None) -> metrics``
    Validation metrics (scalar means) for one batch. ``num_steps`` is the number of optimization steps
    for iterative tasks (EBTs: 1, 2, 4, ... at ``energyflow eval``); others ignore it. The trainer does not
    wrap it in ``torch.no_grad`` (an EBT needs gradients w.r.t. its candidate): a task that needs no
    gradient disables them itself. The trainer puts the task in ``eval()`` mode around it.

Class attributes and hooks (defaults below):

- ``has_optimization_steps``: True when ``evaluate``'s ``num_steps`` changes the prediction.
- ``evaluation_counts(requested)``: the ``num_steps`` values reports evaluate at (default: ``requested`` for
  an iterative task, ``[None]`` otherwise; the image tasks add 0, the noisy input, and the DiT uses its own
  DDIM pass counts); ``steps_label`` names them in tables (default ``"optimization steps"``).
- ``table_metrics``: the validation metrics that tables and ``energyflow eval`` print, in order (default
  ``("loss",)``; the text tasks add ``"perplexity"``).
- ``cross_entropy_metrics``: glob patterns naming metrics that are mean token cross-entropies in nats.
  The trainer and the evaluator derive a perplexity for each as exp(mean loss), never a mean of
  perplexities: ``loss`` -> ``perplexity``, ``loss_step_2`` -> ``perplexity_step_2``.
- ``lr_multipliers()``: ``{parameter-name glob: learning-rate multiplier}``, e.g. an EBT's
  ``{"*step_size*": 1500.0}``; merged with (and overridden by) ``Trainer.lr_multipliers``.
- ``no_weight_decay()``: parameter-name globs exempt from weight decay. Parameters with fewer than two
  dimensions (norm scales, biases, scalar step sizes) are always exempt.
- State: parameters and buffers are checkpointed through ``state_dict()``; other state (e.g. a replay
  buffer) goes through ``nn.Module.get_extra_state``/``set_extra_state`` and must hold only tensors and
  primitive containers so that checkpoints load with ``torch.load(weights_only=True)``. Parameter
  names and shapes form the architecture fingerprint that refuses a checkpoint from another model.
"""
from __future__ import annotations

from energyflow.tasks.base import Metrics, Task, check_batch
from energyflow.tasks.image import DiffusionDenoisingTask, ImageDenoisingTask
from energyflow.tasks.video import AutoencoderTask, NextFrameEBTTask, NextFrameRegressionTask
from energyflow.tasks.hnet import HNetEBTLanguageModelTask, HNetLanguageModelTask, RoutingRecorder
from energyflow.tasks.text import EBTLanguageModelTask, LanguageModelTask
from energyflow.tasks.vectors import EnergyModelTask

__all__ = ["DiffusionDenoisingTask", "EBTLanguageModelTask", "EnergyModelTask", "ImageDenoisingTask",
           "AutoencoderTask", "NextFrameEBTTask", "NextFrameRegressionTask", "HNetEBTLanguageModelTask", "HNetLanguageModelTask",
           "LanguageModelTask", "Metrics", "RoutingRecorder", "Task", "check_batch"]
