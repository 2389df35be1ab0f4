"""The linear diffusion schedule both image tasks noise with, and DDIM sampling for the DiT baseline.

Noise levels follow the paper's reference: a level ``l`` in (0, 1] is the point ``l`` of the way along a linear
DDPM schedule, i.e. timestep ``t(l) = round(l * T) - 1`` of a schedule with ``T = diffusion_steps / train_level``
timesteps (``diffusion_steps = 100`` and ``train_level = 0.1`` give the familiar ``T = 1000``, betas from 1e-4
to 0.02, and the training noise at ``t = 99``: ``x_t = 0.947 x + 0.321 eps`` on images in [-1, 1]; twice the
level, ``t = 199``, is ``0.812 x + 0.584 eps``). The EBT is trained at ``t(train_level)`` exactly; the DiT on
every ``t < diffusion_steps`` (the timesteps up to the training level), as DDPM trains.

DDIM (eta = 0, deterministic) from the noisy image's own timestep: ``S`` network passes at timesteps
``round(linspace(t, 0, S))``; each predicts eps, forms ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``
(clipped to [-1, 1], as DiT's sampler does) and moves to the next timestep, the last to ``x0`` itself.
``S = t + 1`` visits every timestep (the reference's 100 passes at the training level).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x_t [B, ...], timesteps [B]) -> predicted noise [B, ...]


class LinearDiffusion:
    """The linear beta schedule of DDPM (as scaled by DiT for ``num_timesteps`` timesteps) and its closed forms.

    ``diffusion_steps``: the timesteps up to the training noise level (the DiT's training range; the paper's 100);
    ``train_level``: that level (the paper's 0.1), so the schedule has ``diffusion_steps / train_level`` timesteps.
    """

    def __init__(self, diffusion_steps: int = 100, train_level: float = 0.1) -> None:
        if not isinstance(diffusion_steps, int) or diffusion_steps < 1:
            raise ValueError(f"diffusion_steps must be a positive int, got {diffusion_steps!r}")
        if not 0.0 < train_level <= 1.0:
            raise ValueError(f"train_level must be in (0, 1], got {train_level}")
        self.diffusion_steps, self.train_level = diffusion_steps, float(train_level)
        self.num_timesteps = int(round(diffusion_steps / train_level))
        scale = 1000.0 / self.num_timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, self.num_timesteps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1.0 - betas, dim=0)  # [T] float64

    def timestep(self, level: float) -> int:
        """The timestep of noise level ``level`` (``train_level`` -> ``diffusion_steps - 1``)."""
        if not 0.0 < level <= 1.0:
            raise ValueError(f"a noise level must be in (0, 1], got {level}")
        return max(int(round(level * self.num_timesteps)) - 1, 0)

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``sqrt(abar_t)`` and ``sqrt(1 - abar_t)`` for integer timesteps ``t [B]``, shaped to broadcast on ``like``."""
        alpha_bar = self.alpha_bar.to(like.device)[t.long()].to(like.dtype)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return alpha_bar.sqrt().view(shape), (1.0 - alpha_bar).sqrt().view(shape)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The forward process in closed form: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        signal, sigma = self.coefficients(t, x0)
        return signal * x0 + sigma * noise

    def noise(self, x0: Tensor, level: float, generator: Optional[torch.Generator]) -> Tensor:
        """``x0`` noised to ``level`` with noise drawn from ``generator``."""
        t = torch.full((x0.shape[0],), self.timestep(level), device=x0.device, dtype=torch.long)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.q_sample(x0, t, eps)

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        signal, sigma = self.coefficients(t, x_t)
        return (x_t - sigma * eps) / signal

    @staticmethod
    def ddim_timesteps(t_start: int, num_passes: int) -> list[int]:
        """The ``num_passes`` timesteps DDIM visits from ``t_start`` down to 0 (evenly spaced, distinct)."""
        if not isinstance(num_passes, int) or num_passes < 1:
            raise ValueError(f"the number of DDIM passes must be a positive int, got {num_passes!r}")
        if num_passes > t_start + 1:
            raise ValueError(f"{num_passes} DDIM passes from timestep {t_start} would repeat timesteps; use at most "
                             f"{t_start + 1} (one per timestep)")
        if num_passes == 1:
            return [t_start]
        return torch.linspace(t_start, 0, num_passes, dtype=torch.float64).round().long().tolist()

    def ddim(self, denoiser: Denoiser, x_t: Tensor, t_start: int, num_passes: int, *,
             clip_denoised: bool = True) -> Tensor:
        """Deterministic DDIM from ``x_t`` at timestep ``t_start`` with ``num_passes`` calls of ``denoiser``."""
        timesteps = self.ddim_timesteps(t_start, num_passes)
        x = x_t
        for i, t in enumerate(timesteps):
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            signal, sigma = self.coefficients(t_batch, x)
            x0 = (x - sigma * denoiser(x, t_batch)) / signal
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
            if i == len(timesteps) - 1:
                return x0
            eps = (x - signal * x0) / sigma  # re-derived from the (clipped) x0, as DDIM does
            next_signal, next_sigma = self.coefficients(torch.full_like(t_batch, timesteps[i + 1]), x)
            x = next_signal * x0 + next_sigma * eps
        raise AssertionError("unreachable")
