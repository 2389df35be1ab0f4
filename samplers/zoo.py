"""An energy zoo: targets with known moments for tests, docs and benchmarks.

Every target is an ``nn.Module`` whose ``forward`` is its energy, so it can be handed to any sampler as
``energy_fn``: ``energy(y: [C, dim]) -> [C]``, lower is better, computed in ``y``'s dtype and on ``y``'s
device. Energies are the exact negative log densities (normalized) except ``DoubleWell``, whose
normalizing constant is only known numerically. Each target exposes its exact ``mean``, ``variance`` and
``covariance`` (float64, ``None`` where unknown), ``initial_state(num_chains, generator)`` and an exact
sampler ``sample(num_samples, generator)`` used by the tests to check the stated moments.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Optional

import torch
from torch import Tensor, nn

_LOG_2PI = math.log(2 * math.pi)


class Target(nn.Module, ABC):
    """Base class: ``dim``, exact moments (float64 or ``None``), an energy and an exact sampler."""

    dim: int
    mean: Optional[Tensor]
    variance: Optional[Tensor]
    covariance: Optional[Tensor]

    @abstractmethod
    def energy(self, y: Tensor) -> Tensor:
        """[C, dim] -> [C] energy (lower is better) in y's dtype, on y's device."""

    def forward(self, y: Tensor) -> Tensor:
        return self.energy(y)

    @abstractmethod
    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """[num_samples, dim] float64 exact draws from the target."""

    def initial_state(
        self, num_chains: int, generator: Optional[torch.Generator] = None, *, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """[num_chains, dim] standard-normal starting points (every zoo target has mass there), on the
        generator's device."""
        device = generator.device if generator is not None else None
        return torch.randn(num_chains, self.dim, generator=generator, dtype=dtype, device=device)

    def _randn(self, *shape: int, generator: Optional[torch.Generator]) -> Tensor:
        device = generator.device if generator is not None else None
        return torch.randn(*shape, generator=generator, dtype=torch.float64, device=device)


class Gaussian(Target):
    """N(mean, covariance) with a full covariance; energy = -log N(y; mean, covariance)."""

    def __init__(self, mean: Tensor, covariance: Tensor, *, name: str = "gaussian"):
        super().__init__()
        mean, covariance = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(covariance, dtype=torch.float64)
        if mean.dim() != 1 or covariance.shape != (mean.numel(), mean.numel()):
            raise ValueError(f"Gaussian needs mean [dim] and covariance [dim, dim]; got {tuple(mean.shape)} "
                             f"and {tuple(covariance.shape)}")
        self.name, self.dim = name, mean.numel()
        cholesky = torch.linalg.cholesky(covariance)  # raises if not positive definite
        self.register_buffer("mean", mean)
        self.register_buffer("covariance", covariance)
        self.register_buffer("variance", covariance.diagonal().clone())
        self.register_buffer("cholesky", cholesky)
        self.register_buffer("precision", torch.cholesky_inverse(cholesky))
        self.log_normalizer = 0.5 * self.dim * _LOG_2PI + cholesky.diagonal().log().sum().item()

    @classmethod
    def ill_conditioned(
        cls, dim: int = 100, condition_number: float = 100.0, *, rotate: bool = True, seed: int = 0
    ) -> "Gaussian":
        """Zero-mean Gaussian whose covariance eigenvalues are log-spaced in [1/condition_number, 1].

        ``rotate=True`` applies a random orthogonal rotation (fixed by ``seed``), so the correlations are
        strong and a diagonal mass matrix cannot undo the conditioning; ``rotate=False`` keeps it diagonal.
        """
        generator = torch.Generator().manual_seed(seed)
        eigenvalues = torch.logspace(0.0, -math.log10(condition_number), dim, dtype=torch.float64)
        if rotate:
            q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
            q = q * r.diagonal().sign()  # sign fix makes Q Haar-distributed
            covariance = (q * eigenvalues) @ q.T
            covariance = 0.5 * (covariance + covariance.T)
        else:
            covariance = torch.diag(eigenvalues)
        return cls(torch.zeros(dim, dtype=torch.float64), covariance, name=f"gaussian_{dim}d_cond{condition_number:g}")

    def energy(self, y: Tensor) -> Tensor:
        centered = y - self.mean.to(y)  # [C, dim]
        quadratic = ((centered @ self.precision.to(y)) * centered).sum(dim=-1)
        return 0.5 * quadratic + self.log_normalizer

    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> Tensor:
        noise = self._randn(num_samples, self.dim, generator=generator)
        return self.mean + noise @ self.cholesky.T


class GaussianMixture(Target):
    """Mixture of diagonal Gaussians: sum_k w_k N(means_k, diag(scales_k^2))."""

    def __init__(self, means: Tensor, scales: Tensor, weights: Tensor, *, name: str = "gaussian_mixture"):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        scales = torch.as_tensor(scales, dtype=torch.float64).expand_as(means).clone()
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if means.dim() != 2 or weights.shape != (means.shape[0],) or bool((scales <= 0).any()):
            raise ValueError("GaussianMixture needs means [K, dim], positive scales broadcastable to it, "
                             f"weights [K]; got {tuple(means.shape)}, {tuple(scales.shape)}, {tuple(weights.shape)}")
        weights = weights / weights.sum()
        self.name, self.dim = name, means.shape[1]
        self.register_buffer("means", means)
        self.register_buffer("scales", scales)
        self.register_buffer("log_weights", weights.log())
        mean = weights @ means
        second_moment = torch.einsum("k,ki,kj->ij", weights, means, means) + torch.diag(weights @ scales**2)
        self.register_buffer("mean", mean)
        self.register_buffer("covariance", second_moment - torch.outer(mean, mean))
        self.register_buffer("variance", self.covariance.diagonal().clone())

    @classmethod
    def two_modes(cls, dim: int = 2) -> "GaussianMixture":
        """Two unequal, overlapping modes 2.5 apart along the first axis (MCMC mixes between them)."""
        means = torch.zeros(2, dim, dtype=torch.float64)
        means[0, 0], means[1, 0] = -1.0, 1.5
        return cls(means, torch.full((2, dim), 0.75), torch.tensor([0.3, 0.7]), name=f"mixture_{dim}d")

    def energy(self, y: Tensor) -> Tensor:
        scales = self.scales.to(y)  # [K, dim]
        z = (y.unsqueeze(1) - self.means.to(y)) / scales  # [C, K, dim]
        log_components = -0.5 * (z**2).sum(-1) - scales.log().sum(-1) - 0.5 * self.dim * _LOG_2PI
        return -torch.logsumexp(log_components + self.log_weights.to(y), dim=1)

    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> Tensor:
        component = torch.multinomial(self.log_weights.exp(), num_samples, replacement=True, generator=generator)
        noise = self._randn(num_samples, self.dim, generator=generator)
        return self.means[component] + self.scales[component] * noise


class DoubleWell(Target):
    """Independent double wells: E(y) = barrier * sum_i (y_i^2 - 1)^2, modes at y_i = +-1.

    Unnormalized. The mean is 0 by symmetry; the variance is a 1-d quadrature, exact to ~1e-12 on the
    interval [-bound, bound] outside which the density is below exp(-40) of its peak.
    """

    def __init__(self, dim: int = 2, barrier: float = 1.0, *, name: str = "double_well"):
        super().__init__()
        if barrier <= 0:
            raise ValueError(f"DoubleWell barrier must be positive, got {barrier}")
        self.name, self.dim, self.barrier = name, dim, float(barrier)
        self.bound = math.sqrt(1.0 + math.sqrt(40.0 / barrier))
        grid = torch.linspace(-self.bound, self.bound, 200_001, dtype=torch.float64)
        density = torch.exp(-self.barrier * (grid**2 - 1) ** 2)
        variance = torch.trapezoid(grid**2 * density, grid) / torch.trapezoid(density, grid)
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("variance", variance.expand(dim).clone())
        self.register_buffer("covariance", torch.diag(self.variance))

    def energy(self, y: Tensor) -> Tensor:
        return self.barrier * ((y**2 - 1) ** 2).sum(dim=-1)

    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Rejection sampling per coordinate from Uniform(-bound, bound); the density peaks at 1."""
        device = generator.device if generator is not None else None
        flat = torch.empty(0, dtype=torch.float64, device=device)
        needed = num_samples * self.dim
        while flat.numel() < needed:
            proposal = (2 * torch.rand(2 * needed, generator=generator, dtype=torch.float64, device=device) - 1) * self.bound
            uniform = torch.rand(2 * needed, generator=generator, dtype=torch.float64, device=device)
            keep = uniform < torch.exp(-self.barrier * (proposal**2 - 1) ** 2)
            flat = torch.cat([flat, proposal[keep]])
        return flat[:needed].reshape(num_samples, self.dim)


class Banana(Target):
    """Rosenbrock-type banana: y1 ~ N(location, scale^2), y2 | y1 ~ N(curvature * y1^2, conditional_scale^2).

    Exact moments: E y1 = a, Var y1 = s^2, E y2 = b (a^2 + s^2), Var y2 = t^2 + b^2 (4 a^2 s^2 + 2 s^4),
    Cov(y1, y2) = 2 a b s^2 (a = location, s = scale, b = curvature, t = conditional_scale).
    """

    def __init__(self, curvature: float = 1.0, location: float = 0.0, scale: float = 1.0,
                 conditional_scale: float = 0.5, *, name: str = "banana"):
        super().__init__()
        self.name, self.dim = name, 2
        self.curvature, self.location, self.scale, self.conditional_scale = curvature, location, scale, conditional_scale
        a, b, s, t = location, curvature, scale, conditional_scale
        mean = torch.tensor([a, b * (a**2 + s**2)], dtype=torch.float64)
        cross = 2 * a * b * s**2
        covariance = torch.tensor([[s**2, cross], [cross, t**2 + b**2 * (4 * a**2 * s**2 + 2 * s**4)]],
                                  dtype=torch.float64)
        self.register_buffer("mean", mean)
        self.register_buffer("covariance", covariance)
        self.register_buffer("variance", covariance.diagonal().clone())
        self.log_normalizer = _LOG_2PI + math.log(s) + math.log(t)

    def energy(self, y: Tensor) -> Tensor:
        first = (y[:, 0] - self.location) / self.scale
        second = (y[:, 1] - self.curvature * y[:, 0] ** 2) / self.conditional_scale
        return 0.5 * (first**2 + second**2) + self.log_normalizer

    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> Tensor:
        noise = self._randn(num_samples, 2, generator=generator)
        first = self.location + self.scale * noise[:, 0]
        second = self.curvature * first**2 + self.conditional_scale * noise[:, 1]
        return torch.stack([first, second], dim=1)


class Funnel(Target):
    """Neal's funnel: v = y[:, 0] ~ N(0, scale^2), y[:, i] | v ~ N(0, exp(v)) for i >= 1.

    Exact moments: every mean is 0; Var v = scale^2; Var y_i = E exp(v) = exp(scale^2 / 2) (about 90 for
    Neal's scale 3: heavy-tailed, so sample variances of y_i converge slowly); all covariances vanish.
    """

    def __init__(self, dim: int = 10, scale: float = 3.0, *, name: str = "funnel"):
        super().__init__()
        if dim < 2:
            raise ValueError(f"Funnel needs dim >= 2 (v and at least one x), got {dim}")
        self.name, self.dim, self.scale = name, dim, float(scale)
        variance = torch.full((dim,), math.exp(scale**2 / 2), dtype=torch.float64)
        variance[0] = scale**2
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("variance", variance)
        self.register_buffer("covariance", torch.diag(variance))

    def energy(self, y: Tensor) -> Tensor:
        v, x = y[:, 0], y[:, 1:]
        num_x = self.dim - 1
        energy_v = 0.5 * (v / self.scale) ** 2 + math.log(self.scale) + 0.5 * _LOG_2PI
        energy_x = 0.5 * (x**2).sum(-1) * torch.exp(-v) + 0.5 * num_x * (v + _LOG_2PI)
        return energy_v + energy_x

    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> Tensor:
        noise = self._randn(num_samples, self.dim, generator=generator)
        v = self.scale * noise[:, :1]
        return torch.cat([v, torch.exp(0.5 * v) * noise[:, 1:]], dim=1)
