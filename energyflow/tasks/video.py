"""Video next-frame prediction: ``NextFrameEBTTask`` (an autoregressive EBT over frame vectors, the same
two-stream model as for text with a continuous candidate) and ``NextFrameRegressionTask`` (the Transformer++
regressing the next frame), both on ``{"frames": [B, T, C, H, W]}`` batches in [-1, 1].

A frame enters as one vector (its pixels, ``F = C * H * W``) that the model projects to its width: frames
0..t are the real stream and the candidate for position t is frame t + 1. Training: smooth-L1 to the true next
frame at every position (the EBT at every descent step, starting from a copy of the current frame).

Validation reports, on the held-out clips:
- teacher-forced next-frame error at every position: ``loss`` (smooth-L1), ``mse`` and ``psnr`` (on [0, 1]
  frames, predictions clipped to [0, 1]; PSNR is the mean over frames of 10 log10(1 / MSE));
- an autoregressive rollout: condition on the first ``context_frames`` frames and predict the next
  ``rollout_frames`` one at a time, each prediction appended to the context (the EBT reuses its context cache,
  the Transformer++ its KV cache): ``mse@h`` and ``psnr@h`` for horizon h = 1..m;
- for the EBT, ``energy_error_spearman``: the rank correlation, over every rolled-out frame, between the
  energy of the prediction and its MSE (the energy as uncertainty).
Reference predictors everyone understands ride along as step counts of the EBT's table: ``0`` is *copy the
last frame* (the descent's start, zero steps) and ``"linear"`` is linear extrapolation of the last two frames.
"""
from __future__ import annotations

from typing import ClassVar, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from energyflow.data import Batch
from energyflow.models.sequence import VectorSequenceEBM
from energyflow.objectives.unrolled import EBTObjective
from energyflow.tasks.base import Metrics, Task, descent_lr_multipliers
from energyflow.metrics import spearman
from energyflow.tasks.image import unit_range_errors

StepCount = Union[int, str, None]
LINEAR = "linear"


def check_video_batch(batch: Batch) -> Tensor:
    frames = batch.get("frames")
    if frames is None or frames.dim() != 5 or not frames.is_floating_point():
        raise ValueError(f"a video batch needs 'frames': a float tensor [B, T, C, H, W]; got keys {sorted(batch)}"
                         + ("" if frames is None else f" and frames {tuple(frames.shape)} {frames.dtype}"))
    return frames


def check_features(vectors: Tensor, feature_dim: int, frame_shape: tuple[int, ...], latent: bool) -> Tensor:
    if vectors.shape[-1] != feature_dim:
        what = "latents of the autoencoder" if latent else "frames"
        raise ValueError(f"{what} of {tuple(frame_shape)} (C, H, W) are {vectors.shape[-1]} values but the model "
                         f"takes {feature_dim}; set the model's FRAME_FEATURES to C * H * W of the "
                         + ("autoencoder's latents" if latent else "data"))
    return vectors


def linear_extrapolation(previous: Tensor, last: Tensor) -> Tensor:
    """``last + (last - previous)``, clipped to [-1, 1]."""
    return (2 * last - previous).clamp(-1.0, 1.0)


class _NextFrameTask(Task):
    """The shared evaluation: teacher-forced errors, the rollout and its per-horizon errors. With a frozen
    ``autoencoder`` (``energyflow.models.frozen_autoencoder``) the models read and predict its latents (the
    paper's setting) and every error is measured on the decoded frames against the true pixels."""

    cross_entropy_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, context_frames: int, rollout_frames: int, eval_seed: int,
                 autoencoder: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        if context_frames < 2 or rollout_frames < 1:
            raise ValueError(f"context_frames must be >= 2 (linear extrapolation reads two) and rollout_frames >= 1, "
                             f"got {context_frames} and {rollout_frames}")
        self.context_frames, self.rollout_frames, self.eval_seed = int(context_frames), int(rollout_frames), eval_seed
        self.table_metrics = ("mse", "psnr", *[f"psnr@{h}" for h in range(1, self.rollout_frames + 1)])

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _vectors(self, batch: Batch) -> Tensor:
        """The batch in the models' space: frame vectors, or the autoencoder's latents."""
        return self.to_work(check_video_batch(batch))

    def _spaces(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(the models' vectors ``[B, T, F]``, the true pixels ``[B, T, C*H*W]``)."""
        frames = check_video_batch(batch)
        return self.to_work(frames), frames.flatten(2).to(self._dtype())

    def to_work(self, frames: Tensor) -> Tensor:
        """``[B, T, C, H, W]`` -> the models' vectors ``[B, T, F]`` (through the frozen encoder, if any)."""
        frames = frames.to(self._dtype())
        self.frame_shape = tuple(frames.shape[2:])
        if self.autoencoder is None:
            return check_features(frames.flatten(2), self.feature_dim, self.frame_shape, False)
        latents = self.autoencoder.encode(frames.flatten(0, 1)).to(frames.dtype)
        return check_features(latents.reshape(frames.shape[0], frames.shape[1], -1), self.feature_dim,
                              self.frame_shape, True)

    def to_pixels(self, vectors: Tensor) -> Tensor:
        """The models' vectors ``[B, T, F]`` -> pixel vectors ``[B, T, C*H*W]`` (decoded, if latents)."""
        if self.autoencoder is None:
            return vectors
        channels, height, width = self.frame_shape
        latent = self.autoencoder.latent_shape(height, width)
        decoded = self.autoencoder.decode(vectors.reshape(-1, *latent).to(next(self.autoencoder.parameters()).dtype))
        return decoded.reshape(vectors.shape[0], vectors.shape[1], -1).to(vectors.dtype)

    def _check_length(self, vectors: Tensor) -> None:
        needed = self.context_frames + self.rollout_frames
        if vectors.shape[1] < needed:
            raise ValueError(f"clips of {vectors.shape[1]} frames cannot hold {self.context_frames} context frames and "
                             f"{self.rollout_frames} rolled-out ones; lower context_frames/rollout_frames or use longer "
                             "clips")

    @staticmethod
    def _errors(prediction: Tensor, target: Tensor, prefix: str = "") -> Metrics:
        mse, psnr = unit_range_errors(prediction.flatten(0, 1), target.flatten(0, 1))
        return {f"{prefix}mse": mse.mean(), f"{prefix}psnr": psnr.mean()}

    def _rollout_metrics(self, rollout: Tensor, truth: Tensor) -> Metrics:
        """``rollout``, ``truth``: ``[B, m, F]``."""
        metrics: Metrics = {}
        for h in range(self.rollout_frames):
            mse, psnr = unit_range_errors(rollout[:, h], truth[:, h])
            metrics[f"mse@{h + 1}"], metrics[f"psnr@{h + 1}"] = mse.mean(), psnr.mean()
        return metrics

    def _references(self, vectors: Tensor, kind: StepCount) -> Metrics:
        """Copy-last-frame (``0``) or linear extrapolation (``"linear"``): teacher forced and rolled out."""
        inputs, targets = vectors[:, :-1], vectors[:, 1:]
        n, m = self.context_frames, self.rollout_frames
        if kind == 0:
            forced = inputs
            rollout = vectors[:, n - 1:n].expand(-1, m, -1)
        else:
            previous = torch.cat((vectors[:, :1], vectors[:, :-2]), dim=1)  # frame t-1 (frame 0 repeats itself)
            forced = linear_extrapolation(previous, inputs)
            last, before, steps = vectors[:, n - 1], vectors[:, n - 2], []
            for _ in range(m):
                last, before = linear_extrapolation(before, last), last
                steps.append(last)
            rollout = torch.stack(steps, dim=1)
        loss = F.smooth_l1_loss(forced.double(), targets.double(), beta=1.0)
        return {"loss": loss, **self._errors(forced, targets), **self._rollout_metrics(rollout, vectors[:, n:n + m])}


class NextFrameEBTTask(_NextFrameTask):
    """An autoregressive EBT (``VectorSequenceEBM``) predicting the next frame by energy descent.

    ``objective``: an ``EBTObjective`` whose descent starts at the current frame (``initial_state =
    InputState()``) with a regression loss (``SmoothL1``); every trick of the text objective applies.
    ``step_size_lr_multiplier`` / ``noise_lr_multiplier``: as for text (the paper's video: 90 000 for a step
    size of 30 000). ``context_frames`` / ``rollout_frames``: the rollout of validation (see the module).
    ``autoencoder``: a frozen one (``frozen_autoencoder(run_dir)``): the EBT descends its latents.
    """

    has_optimization_steps: ClassVar[bool] = True

    def __init__(self, model: VectorSequenceEBM, objective: EBTObjective, *, context_frames: int = 8,
                 rollout_frames: int = 4, step_size_lr_multiplier: float = 90000.0, noise_lr_multiplier: float = 1.0,
                 autoencoder: Optional[nn.Module] = None, eval_seed: int = 1234) -> None:
        super().__init__(context_frames=context_frames, rollout_frames=rollout_frames, eval_seed=eval_seed,
                         autoencoder=autoencoder)
        if not isinstance(model, VectorSequenceEBM):
            raise TypeError(f"NextFrameEBTTask needs a VectorSequenceEBM, got {type(model).__name__}")
        if objective.loss_fn.supports_label_smoothing:
            raise ValueError("the video EBT regresses the next frame: set EBTObjective.loss = @SmoothL1() (the paper's) "
                             f"or @MeanSquaredError(), not {type(objective.loss_fn).__name__}")
        self.model, self.objective = model, objective
        self.step_size_lr_multiplier, self.noise_lr_multiplier = step_size_lr_multiplier, noise_lr_multiplier
        self.table_metrics = (*self.table_metrics, "energy_error_spearman")

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim

    def loss(self, batch: Batch, *, step: int, generator: torch.Generator) -> tuple[Tensor, Metrics]:
        vectors = self._vectors(batch)
        out = self.objective(self.model, vectors[:, :-1], vectors[:, 1:], generator=generator, step=step)
        return out.loss, {"loss": out.loss.detach(), **out.metrics}

    def default_steps(self) -> int:
        from energyflow.objectives.components import resolve_num_steps

        return resolve_num_steps(self.objective.num_steps, 0, training=False)

    def evaluate(self, batch: Batch, *, num_steps: StepCount = None) -> Metrics:
        vectors, pixels = self._spaces(batch)
        self._check_length(vectors)
        if num_steps in (0, LINEAR):
            return self._references(pixels, num_steps)
        steps = self.default_steps() if num_steps is None else int(num_steps)
        generator = torch.Generator(device=vectors.device).manual_seed(self.eval_seed)
        out = self.objective(self.model, vectors[:, :-1], vectors[:, 1:], generator=generator, num_steps=steps)
        metrics = {name: value for name, value in out.metrics.items() if name != "replayed_fraction"}
        metrics = {**metrics, "loss": metrics["final_loss"],
                   **self._errors(self.to_pixels(out.final_state), pixels[:, 1:])}
        n, m = self.context_frames, self.rollout_frames
        rollout, energies = self.rollout(vectors[:, :n], m, steps)
        rollout, truth = self.to_pixels(rollout), pixels[:, n:n + m]
        metrics.update(self._rollout_metrics(rollout, truth))
        per_frame_mse = unit_range_errors(rollout.flatten(0, 1), truth.flatten(0, 1))[0]
        metrics["energy_error_spearman"] = spearman(energies.flatten(), per_frame_mse)
        return metrics

    def thinking(self, num_steps: int, step_size: Optional[float] = None):
        """The inference descent of this run (its learned step size and clamps, no training noise)."""
        from energyflow.inference.text import thinking_config

        return thinking_config(self.objective, num_steps=num_steps, step_size=step_size)

    def rollout(self, context: Tensor, num_frames: int, num_steps: int, *, config=None,
                num_candidates: int = 1, jitter: float = 0.0,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """Predict ``num_frames`` frames after ``context [B, n, F]``, each by ``num_steps`` descent steps from a copy
        of the frame before it, appended to the context cache (never re-encoded). ``num_candidates > 1``:
        best-of-N, candidates 2..N starting at that copy plus ``jitter * N(0, I)``, the lowest final energy kept.
        Returns the frames ``[B, m, F]`` and their energies ``[B, m]``."""
        from energyflow.inference.optimize import think
        from energyflow.inference.verification import lowest_energy_index, take_candidates

        config = config if config is not None else self.thinking(num_steps)
        with torch.no_grad():
            cache = self.model.encode(context)
        last, frames, energies = context[:, -1:], [], []
        for _ in range(num_frames):
            expanded = cache.expand(num_candidates) if num_candidates > 1 else cache
            start = last.repeat_interleave(num_candidates, dim=0)
            if num_candidates > 1:
                noise = jitter * torch.randn(start.shape, generator=generator, device=start.device, dtype=start.dtype)
                noise.view(context.shape[0], num_candidates, *start.shape[1:])[:, 0] = 0.0  # candidate 1: the copy
                start = start + noise
            result = think(lambda y, c=expanded: self.model.energy(c, y), start, config)
            index = lowest_energy_index(result.energies, num_candidates)
            predicted = take_candidates(result.state, index, num_candidates).detach()  # [B, 1, F]
            energies.append(take_candidates(result.energies, index, num_candidates).detach()[:, 0])
            frames.append(predicted[:, 0])
            with torch.no_grad():
                cache = self.model.extend(cache, predicted)
            last = predicted
        return torch.stack(frames, dim=1), torch.stack(energies, dim=1)

    def evaluation_counts(self, requested: Sequence[int]) -> list[StepCount]:
        """Copy-last (``0``), linear extrapolation (``"linear"``), then the EBT at each of ``requested`` steps."""
        return [0, LINEAR, *sorted({int(k) for k in requested if int(k) > 0})]

    def lr_multipliers(self) -> dict[str, float]:
        return descent_lr_multipliers(self.objective, self.step_size_lr_multiplier, self.noise_lr_multiplier)


class NextFrameRegressionTask(_NextFrameTask):
    """The Transformer++ baseline: ``architectures.ContinuousTransformerPP`` regresses frame t + 1 from frames 0..t
    (smooth-L1, the EBT's loss), rolled out with its KV cache."""

    def __init__(self, model: nn.Module, *, context_frames: int = 8, rollout_frames: int = 4,
                 autoencoder: Optional[nn.Module] = None, eval_seed: int = 1234) -> None:
        super().__init__(context_frames=context_frames, rollout_frames=rollout_frames, eval_seed=eval_seed,
                         autoencoder=autoencoder)
        if not hasattr(model, "feature_dim"):
            raise TypeError(f"NextFrameRegressionTask needs a model over frame vectors (ContinuousTransformerPP), got "
                            f"{type(model).__name__}")
        self.model = model

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim

    def loss(self, batch: Batch, *, step: int, generator: torch.Generator) -> tuple[Tensor, Metrics]:
        vectors = self._vectors(batch)
        predicted = self.model(vectors[:, :-1])
        loss = F.smooth_l1_loss(predicted if predicted.dtype == torch.float64 else predicted.float(),
                                vectors[:, 1:].to(predicted.dtype if predicted.dtype == torch.float64 else torch.float32),
                                beta=1.0)
        return loss, {"loss": loss.detach()}

    def evaluate(self, batch: Batch, *, num_steps: StepCount = None) -> Metrics:
        vectors, pixels = self._spaces(batch)
        self._check_length(vectors)
        with torch.no_grad():
            forced = self.model(vectors[:, :-1])
            loss = F.smooth_l1_loss(forced.double(), vectors[:, 1:].double(), beta=1.0)
            n, m = self.context_frames, self.rollout_frames
            rollout = self.rollout(vectors[:, :n], m)
        return {"loss": loss, **self._errors(self.to_pixels(forced), pixels[:, 1:]),
                **self._rollout_metrics(self.to_pixels(rollout), pixels[:, n:n + m])}

    def rollout(self, context: Tensor, num_frames: int) -> Tensor:
        """``num_frames`` frames after ``context [B, n, F]``, each fed back through the KV cache."""
        from architectures.transformer import KVCache

        cache = KVCache()
        with torch.no_grad():
            prediction = self.model(context, cache)[:, -1:]
            frames = [prediction]
            for _ in range(num_frames - 1):
                prediction = self.model(prediction, cache)
                frames.append(prediction)
        return torch.cat(frames, dim=1)




class AutoencoderTask(Task):
    """Trains an ``architectures.ConvAutoencoder`` to reconstruct frames (``{"frames": [B, T, C, H, W]}``, every
    frame) or images (``{"images": [B, C, H, W]}``): MSE in [-1, 1]; validation reports the reconstruction's MSE
    and PSNR on [0, 1]. A frozen copy (``energyflow.models.frozen_autoencoder(run_dir)``) then gives the video
    models their latents."""

    cross_entropy_metrics: ClassVar[tuple[str, ...]] = ()
    table_metrics: ClassVar[tuple[str, ...]] = ("loss", "mse", "psnr")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def _images(self, batch: Batch) -> Tensor:
        if "frames" in batch:
            images = check_video_batch(batch).flatten(0, 1)
        elif "images" in batch:
            images = batch["images"]
        else:
            raise ValueError(f"an autoencoder batch needs 'frames' [B, T, C, H, W] or 'images' [B, C, H, W]; got keys "
                             f"{sorted(batch)}")
        return images.to(next(self.parameters()).dtype)

    def loss(self, batch: Batch, *, step: int, generator: torch.Generator) -> tuple[Tensor, Metrics]:
        images = self._images(batch)
        loss = F.mse_loss(self.model(images), images)
        return loss, {"loss": loss.detach()}

    def evaluate(self, batch: Batch, *, num_steps: StepCount = None) -> Metrics:
        images = self._images(batch)
        with torch.no_grad():
            reconstruction = self.model(images)
        mse, psnr = unit_range_errors(reconstruction, images)
        return {"loss": F.mse_loss(reconstruction.double(), images.double()), "mse": mse.mean(), "psnr": psnr.mean()}
