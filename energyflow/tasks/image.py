"""Image denoising, the paper's continuous headline: ``ImageDenoisingTask`` (a bidirectional EBT that descends
from the noisy image) and ``DiffusionDenoisingTask`` (the DiT baseline: DDPM training, DDIM from the noisy
image's timestep), both on ``{"images": [B, C, H, W]}`` batches in [-1, 1] and the same noise
(``energyflow.objectives.diffusion.LinearDiffusion``).

Validation noises every held-out image at each of ``eval_levels`` (default: the training level and twice it,
out of distribution) with noise from ``eval_seed`` -- the same noise in both tasks, so their numbers compare
image for image -- and reports, per level ``l``: ``mse@l`` (mean squared error on [0, 1] images, predictions
clipped to [0, 1]), ``psnr@l`` (the mean over images of 10 log10(1 / MSE)), and the network passes that produced
the prediction: ``forward_passes`` and ``backward_passes`` (an EBT step is one forward and one backward pass
through the network, w.r.t. the image; a DDIM step one forward). Step count 0 is the noisy input itself.
"""
from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from architectures.bidirectional import BidirectionalTransformer
from energyflow.data import Batch
from energyflow.objectives.diffusion import LinearDiffusion
from energyflow.models.image import ImageEBM
from energyflow.objectives.unrolled import EBTObjective
from energyflow.tasks.base import Metrics, Task, descent_lr_multipliers


def check_image_batch(batch: Batch, shape: Optional[tuple[int, int, int]] = None) -> Tensor:
    """The batch's ``images`` ``[B, C, H, W]`` (a float tensor), checked against the model's ``(C, H, W)``."""
    images = batch.get("images")
    if images is None or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"an image batch needs 'images': a float tensor [B, C, H, W]; got keys {sorted(batch)}"
                         + ("" if images is None else f" and images {tuple(images.shape)} {images.dtype}"))
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"the images are {tuple(images.shape[1:])} (C, H, W) but the model takes {tuple(shape)}; set "
                         "the data's patch_size/channels or the model's image_size/in_channels to agree")
    return images


def unit_range_errors(prediction: Tensor, clean: Tensor) -> tuple[Tensor, Tensor]:
    """Per image: MSE between ``prediction`` and ``clean`` (both in [-1, 1]) read as [0, 1] images, the prediction
    clipped to [0, 1] (what one would save), and the PSNR ``10 log10(1 / MSE)`` (capped at 100 dB for a perfect
    image). Float64, ``[B]`` each."""
    predicted = ((prediction.detach().double() + 1.0) / 2.0).clamp(0.0, 1.0)
    target = (clean.detach().double() + 1.0) / 2.0
    mse = (predicted - target).pow(2).flatten(1).mean(dim=1)
    psnr = 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return mse, psnr


def level_name(level: float) -> str:
    return f"{level:g}"


class _DenoisingTask(Task):
    """What both denoisers share: the noise, the evaluation levels and seed, the metrics per level."""

    cross_entropy_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, diffusion: Optional[LinearDiffusion], eval_levels: Optional[Sequence[float]],
                 eval_seed: int) -> None:
        super().__init__()
        self.diffusion = diffusion if diffusion is not None else LinearDiffusion()
        train = self.diffusion.train_level
        levels = tuple(float(level) for level in (eval_levels if eval_levels is not None else (train, 2 * train)))
        if not levels:
            raise ValueError("eval_levels is empty; give at least one noise level, e.g. [0.1, 0.2]")
        for level in levels:
            self.diffusion.timestep(level)  # a clear error for a level outside (0, 1]
        self.eval_levels, self.eval_seed = levels, int(eval_seed)
        self.table_metrics = ("forward_passes", "backward_passes",
                              *[f"{kind}@{level_name(level)}" for level in levels for kind in ("mse", "psnr")])

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _noisy(self, clean: Tensor, level: float, index: int) -> Tensor:
        """``clean`` at ``level`` with the evaluation noise of level ``index`` (the same in every task)."""
        generator = torch.Generator(device=clean.device).manual_seed(self.eval_seed + 7919 * index)
        return self.diffusion.noise(clean, level, generator)

    def _denoise(self, noisy: Tensor, clean: Tensor, level: float, num_steps: int) -> tuple[Tensor, Metrics]:
        raise NotImplementedError

    def _passes(self, num_steps: int) -> tuple[float, float]:
        raise NotImplementedError

    def default_steps(self) -> int:
        raise NotImplementedError

    def evaluate(self, batch: Batch, *, num_steps: Optional[int] = None) -> Metrics:
        clean = check_image_batch(batch, self.image_shape).to(self._dtype())
        steps = self.default_steps() if num_steps is None else int(num_steps)
        if steps < 0:
            raise ValueError(f"the number of denoising steps must be >= 0 (0: the noisy input), got {steps}")
        forward, backward = self._passes(steps)
        metrics: Metrics = {"forward_passes": torch.tensor(forward), "backward_passes": torch.tensor(backward)}
        for index, level in enumerate(self.eval_levels):
            noisy = self._noisy(clean, level, index)
            prediction, extra = (noisy, {}) if steps == 0 else self._denoise(noisy, clean, level, steps)
            mse, psnr = unit_range_errors(prediction, clean)
            name = level_name(level)
            metrics[f"mse@{name}"], metrics[f"psnr@{name}"] = mse.mean(), psnr.mean()
            if index == 0:  # the task's own loss and diagnostics at the first (training) level
                metrics["loss"] = F.smooth_l1_loss(prediction.detach().double(), clean.double(), beta=1.0)
                metrics.update(extra)
        return metrics

    def evaluation_counts(self, requested: Sequence[int]) -> list[Optional[int]]:
        """The step counts evaluation runs at: 0 (the noisy input) and ``requested``."""
        return sorted({0, *(int(k) for k in requested)})


class ImageDenoisingTask(_DenoisingTask):
    """A bidirectional EBT (``ImageEBM``) trained to denoise by energy descent (the paper's image System 1/2).

    Training noises each clean image to the training level (``diffusion.train_level``: timestep
    ``diffusion_steps - 1``) and runs the ``objective`` (an ``EBTObjective`` with ``initial_state=InputState()``
    and a regression loss, e.g. ``SmoothL1(beta=1)``, against the clean image at every step): every trick the
    text objective has (detach, truncation, randomized step size and steps, Langevin noise, clamps) applies.
    ``step_size_lr_multiplier``: the learnable step size's learning-rate multiplier (the paper: 9000 for a
    step size of 3000); ``noise_lr_multiplier`` the same for a learnable Langevin noise scale.
    """

    has_optimization_steps: ClassVar[bool] = True

    def __init__(self, model: ImageEBM, objective: EBTObjective, *, diffusion: Optional[LinearDiffusion] = None,
                 step_size_lr_multiplier: float = 9000.0, noise_lr_multiplier: float = 1.0,
                 eval_levels: Optional[Sequence[float]] = None, eval_seed: int = 1234) -> None:
        super().__init__(diffusion, eval_levels, eval_seed)
        if not isinstance(model, ImageEBM):
            raise TypeError(f"ImageDenoisingTask needs an ImageEBM, got {type(model).__name__}")
        if not getattr(objective.initial_state, "takes_inputs", False):
            raise ValueError("the image EBT's descent starts at the noisy image: set EBTObjective.initial_state = "
                             "@InputState() (got " + type(objective.initial_state).__name__ + ")")
        if objective.loss_fn.supports_label_smoothing:
            raise ValueError("the image EBT regresses the clean image: set EBTObjective.loss = @SmoothL1() (the "
                             f"paper's, beta = 1) or @MeanSquaredError(), not {type(objective.loss_fn).__name__}")
        self.model, self.objective = model, objective
        self.step_size_lr_multiplier, self.noise_lr_multiplier = step_size_lr_multiplier, noise_lr_multiplier
        self.image_shape = model.image_shape

    def loss(self, batch: Batch, *, step: int, generator: torch.Generator) -> tuple[Tensor, Metrics]:
        clean = check_image_batch(batch, self.image_shape).to(self._dtype())
        noisy = self.diffusion.noise(clean, self.diffusion.train_level, generator)
        out = self.objective(self.model, noisy, clean, generator=generator, step=step)
        return out.loss, {"loss": out.loss.detach(), **out.metrics}

    def default_steps(self) -> int:
        from energyflow.objectives.components import resolve_num_steps

        return resolve_num_steps(self.objective.num_steps, 0, training=False)

    def _passes(self, num_steps: int) -> tuple[float, float]:
        return float(num_steps), float(num_steps)

    def _denoise(self, noisy: Tensor, clean: Tensor, level: float, num_steps: int) -> tuple[Tensor, Metrics]:
        generator = torch.Generator(device=noisy.device).manual_seed(self.eval_seed)
        out = self.objective(self.model, noisy, clean, generator=generator, num_steps=num_steps)
        keep = ("initial_energy", "last_step_energy", "energy_gap", "final_energy", "final_energy_gap", "step_size")
        return out.final_state, {name: out.metrics[name] for name in keep if name in out.metrics}

    def lr_multipliers(self) -> dict[str, float]:
        return descent_lr_multipliers(self.objective, self.step_size_lr_multiplier, self.noise_lr_multiplier)


class DiffusionDenoisingTask(_DenoisingTask):
    """The DiT baseline: ``BidirectionalTransformer(mode="denoise")`` predicts the noise (eps-prediction, MSE) of
    ``x_t`` at timesteps drawn uniformly from ``[0, diffusion.diffusion_steps)`` (DDPM, the linear schedule),
    and denoises by DDIM from the noisy image's own timestep.

    ``sampling_steps``: the DDIM pass counts evaluation reports (each capped at one pass per timestep);
    ``default_passes``: the count of the trainer's periodic validation. ``clip_denoised``: clip each predicted
    clean image to [-1, 1] (DiT's sampler does).
    """

    has_optimization_steps: ClassVar[bool] = True
    steps_label: ClassVar[str] = "DDIM steps"

    def __init__(self, model: BidirectionalTransformer, *, diffusion: Optional[LinearDiffusion] = None,
                 sampling_steps: Sequence[int] = (1, 2, 5, 10, 25, 100), default_passes: int = 10,
                 clip_denoised: bool = True, eval_levels: Optional[Sequence[float]] = None,
                 eval_seed: int = 1234) -> None:
        super().__init__(diffusion, eval_levels, eval_seed)
        if not isinstance(model, BidirectionalTransformer) or model.mode != "denoise":
            raise ValueError("DiffusionDenoisingTask needs a BidirectionalTransformer(mode='denoise') (the energy mode "
                             "is the EBT's: ImageDenoisingTask with an ImageEBM)")
        counts = [int(k) for k in sampling_steps]
        if not counts or min(counts) < 1 or default_passes < 1:
            raise ValueError(f"sampling_steps and default_passes must be positive, got {sampling_steps}, "
                             f"{default_passes}")
        self.model, self.sampling_steps = model, tuple(counts)
        self.default_passes, self.clip_denoised = int(default_passes), bool(clip_denoised)
        config = model.config
        self.image_shape = (config.in_channels, config.image_size, config.image_size)

    def loss(self, batch: Batch, *, step: int, generator: torch.Generator) -> tuple[Tensor, Metrics]:
        clean = check_image_batch(batch, self.image_shape).to(self._dtype())
        t = torch.randint(0, self.diffusion.diffusion_steps, (clean.shape[0],), generator=generator,
                          device=clean.device)
        eps = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        predicted = self.model(self.diffusion.q_sample(clean, t, eps), t)
        loss = F.mse_loss(predicted.float() if predicted.dtype != torch.float64 else predicted, eps.to(predicted))
        return loss, {"loss": loss.detach()}

    def default_steps(self) -> int:
        return self.default_passes

    def _passes(self, num_steps: int) -> tuple[float, float]:
        return float(num_steps), 0.0

    def _denoise(self, noisy: Tensor, clean: Tensor, level: float, num_steps: int) -> tuple[Tensor, Metrics]:
        t_start = self.diffusion.timestep(level)
        if num_steps > t_start + 1:
            raise ValueError(f"{num_steps} DDIM passes from timestep {t_start} (noise level {level:g}) would repeat "
                             f"timesteps; ask for at most {t_start + 1} (DiffusionDenoisingTask.sampling_steps)")
        with torch.no_grad():
            denoised = self.diffusion.ddim(self.model, noisy, t_start, num_steps,
                                           clip_denoised=self.clip_denoised)
        return denoised, {}

    def evaluation_counts(self, requested: Sequence[int]) -> list[Optional[int]]:
        """The DiT's own DDIM pass counts (``sampling_steps``), whatever the EBT's step counts are."""
        return list(self.sampling_steps)
