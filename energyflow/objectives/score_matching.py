"""Denoising score matching (Vincent, 2011) for an energy model.

Perturb data with Gaussian noise, y~ = y + sigma * eps, and regress the model's score -grad E(y~) onto the
score of the perturbation kernel, -(y~ - y) / sigma^2 = -eps / sigma. With the usual sigma^2 weighting the
loss is 1/2 || sigma * grad E(y~) - eps ||^2 per example. Its minimizer is E = -log p_sigma + const, the
energy of the *noised* data distribution: for Gaussian data N(m, S) the fit is N(m, S + sigma^2 I) exactly,
a known bias the tests check.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from energyflow.objectives.unrolled import ObjectiveOutput
from samplers.energy import energy_and_grad


class DenoisingScoreMatching(nn.Module):
    """``loss = mean_b 1/2 || sigma * grad_y E(y_b + sigma * eps_b) - eps_b ||^2``."""

    def __init__(self, sigma: float = 0.1):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"DenoisingScoreMatching needs sigma > 0, got {sigma}")
        self.sigma = float(sigma)

    def forward(self, energy_fn: Callable[[Tensor], Tensor], data: Tensor, *,
                generator: Optional[torch.Generator] = None) -> ObjectiveOutput:
        """``energy_fn(y [C, *event]) -> [C]`` (or ``[C, S]``); ``data [B, *event]``."""
        noise = torch.randn(data.shape, generator=generator, device=data.device, dtype=data.dtype)
        noisy = (data + self.sigma * noise).requires_grad_(True)
        # create_graph: the loss is a function of the gradient and must reach the energy's parameters.
        result = energy_and_grad(energy_fn, noisy, create_graph=True, validate=True)
        residual = (self.sigma * result.grad - noise).flatten(1)  # [B, event]
        loss = 0.5 * residual.pow(2).sum(dim=1).mean()
        metrics = {"score_matching_loss": loss.detach(), "energy": result.energy.detach().mean()}
        return ObjectiveOutput(loss, metrics, noisy.detach())
