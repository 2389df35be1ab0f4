"""A quadratic energy with readable moments: the small continuous problem the classic objectives are tested on."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class GaussianEnergy(nn.Module):
    """Unconditional quadratic energy ``E(y) = 1/2 (y - mean)^T P (y - mean)``, ``P = L L^T``.

    The exponential family of this energy is N(mean, P^-1), so its fitted moments can be read off exactly
    (``mean``, ``covariance``): the small continuous problem on which the classic EBM objectives are tested.
    ``L`` is lower triangular with a positive (softplus) diagonal, so P is always positive definite.
    """

    def __init__(self, dim: int, *, init_scale: float = 1.0):
        super().__init__()
        self.dim = dim
        self.location = nn.Parameter(torch.zeros(dim))
        self.raw_factor = nn.Parameter(torch.zeros(dim, dim))
        # softplus(raw) = 1 / init_scale on the diagonal: precision I / init_scale^2.
        with torch.no_grad():
            self.raw_factor.diagonal().fill_(float(torch.log(torch.expm1(torch.tensor(1.0 / init_scale)))))

    def precision_factor(self) -> Tensor:
        lower = torch.tril(self.raw_factor, diagonal=-1)
        return lower + torch.diag(nn.functional.softplus(self.raw_factor.diagonal()))

    def forward(self, y: Tensor) -> Tensor:
        """``y [C, dim]`` -> ``[C]``."""
        if y.dim() != 2 or y.shape[1] != self.dim:
            raise ValueError(f"GaussianEnergy expects [C, {self.dim}], got {tuple(y.shape)}")
        whitened = (y - self.location) @ self.precision_factor()  # [C, dim]
        return 0.5 * whitened.pow(2).sum(dim=1)

    @torch.no_grad()
    def covariance(self) -> Tensor:
        factor = self.precision_factor()
        return torch.linalg.inv(factor @ factor.T)
