"""Mass matrices for the batched samplers: diagonal (a plain tensor), dense and low-rank-plus-diagonal.

Every mass is given by its inverse Sigma = M^-1, the covariance it whitens: HMC draws momenta p ~ N(0, M),
moves with the velocity Sigma p and has the kinetic energy p^T Sigma p / 2; preconditioned MALA proposes
y' = y - eta Sigma g + sqrt(2 eta) Sigma^{1/2} xi (eta = eps^2 / 2). Event dims are flattened: an event of
shape [*event] is one vector of d = prod(event) coordinates.

- **Diagonal**: a tensor broadcasting to the state (``[C, *event]`` per chain, ``[1, *event]`` pooled),
  exactly as before this module existed; the samplers keep their own tensor code for it, bit for bit.
  Cost O(d) per application; only the variances are learned.
- **Dense** (``DenseMass``): one d x d Sigma shared by every chain, stored with its Cholesky factor L
  (Sigma = L L^T). Velocity and kinetic energy are one [C, d] x [d, d] product, a momentum one triangular
  solve, so O(d^2) per chain and application, O(d^2) memory and an O(d^3) factorization per adaptation
  window. It undoes any linear correlation; worth it while d^2 is small next to the energy's own cost.
- **Low-rank plus diagonal** (``LowRankMass``): Sigma = D^{1/2} (I + U diag(lambda - 1) U^T) D^{1/2} with D
  the pooled variances and (lambda, U) k eigenpairs of the *correlation* matrix D^{-1/2} Cov D^{-1/2} of the
  warmup draws (a PCA of the standardized draws). Of the correlation's eigenvalues, which average 1, the
  k farthest from 1 in log scale are kept -- the stretched *and* the squeezed directions, as in Seyboldt's
  low-rank adaptation in nutpie -- and the other d - k directions keep the diagonal scaling. With U
  orthonormal, A = I + U diag(lambda - 1) U^T has A^t = I + U diag(lambda^t - 1) U^T for any power t, so
  Sigma p, Sigma^{1/2} xi (as D^{1/2} A^{1/2} xi), a momentum D^{-1/2} A^{-1/2} xi and log det Sigma all
  cost O(d k). For large d, when only a few directions are correlated. (Unlike nutpie it uses the draws
  only, not the gradients.)

The integrators (``samplers.integrators``) and MALA dispatch once per call on the type: a tensor (or
``None``, the identity) takes the diagonal code, a ``MassMatrix`` its methods. Masses are ``nn.Module``s
so a sampler holding one moves and saves it with its own state; ``cast`` makes a copy in a state's dtype and
device without touching the original.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

_LOG_4PI = math.log(4 * math.pi)


def chain_values(step_size: Tensor, num_chains: int) -> Tensor:
    """A scalar, [1, 1, ...] or [C, 1, ...] step size as [C] (or [1]); a per-element one is an error: with a
    non-diagonal Sigma a per-coordinate step would not commute with it (the proposal density assumes it does)."""
    if step_size.dim() == 0:
        return step_size.reshape(1)
    flat = step_size.reshape(step_size.shape[0], -1)
    if flat.shape[1] != 1 or step_size.shape[0] not in (1, num_chains):
        raise ValueError(f"a dense or low-rank mass needs a scalar or per-chain step size, got shape "
                         f"{tuple(step_size.shape)}; pass a float or a [C] tensor")
    return flat[:, 0]


class MassMatrix(nn.Module):
    """Base class: an inverse mass Sigma = L L^T on the flattened event of d coordinates, shared by all chains.

    Subclasses implement the flat [C, d] -> [C, d] maps ``_sigma`` (Sigma x), ``_factor`` (L x),
    ``_factor_transpose`` (L^T x), ``_inverse_factor_transpose`` (L^-T x, the momentum of noise x),
    ``_whiten`` (L^-1 x) and ``log_det`` (log det Sigma); the public methods take [C, *event] tensors.
    """

    dim: int

    def velocity(self, momentum: Tensor) -> Tensor:
        """[C, *event] Sigma p: the drift direction of the leapfrog."""
        return self._sigma(momentum.flatten(1)).view_as(momentum)

    def kinetic_energy(self, momentum: Tensor) -> Tensor:
        """[C] p^T Sigma p / 2 = |L^T p|^2 / 2."""
        return 0.5 * self._factor_transpose(momentum.flatten(1)).square().sum(dim=1)

    def sample_momentum(self, y: Tensor, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        """(momentum [C, *event] ~ N(0, M) as p = L^-T xi, its kinetic energy |xi|^2 / 2 [C])."""
        noise = torch.randn(y.shape[0], self.dim, generator=generator, device=y.device, dtype=y.dtype)
        return self._inverse_factor_transpose(noise).view_as(y), 0.5 * noise.square().sum(dim=1)

    def whiten(self, y: Tensor) -> Tensor:
        """[C, d] L^-1 y: coordinates in which this mass is the identity (|L^-1 y|^2 = y^T Sigma^-1 y)."""
        return self._whiten(y.flatten(1))

    def preconditioned_drift(self, grad: Tensor) -> Tensor:
        """[C, *event] Sigma g: MALA's drift direction (the same map as ``velocity``)."""
        return self.velocity(grad)

    def propose(self, y: Tensor, drift: Tensor, step_size: Tensor, noise: Tensor) -> Tensor:
        """MALA's y' = y - eta Sigma g + sqrt(2 eta) L xi, with ``drift`` = Sigma g and ``noise`` xi [C, *event]."""
        eta = chain_values(step_size, y.shape[0])[:, None]
        flat = y.flatten(1) - eta * drift.flatten(1) + torch.sqrt(2.0 * eta) * self._factor(noise.flatten(1))
        return flat.view_as(y)

    def proposal_log_density(self, point: Tensor, origin: Tensor, drift: Tensor, step_size: Tensor) -> Tensor:
        """[C] log N(point; origin - eta Sigma g, 2 eta Sigma) with ``drift`` = Sigma g at ``origin`` (normalized)."""
        eta = chain_values(step_size, point.shape[0])
        residual = point.flatten(1) - origin.flatten(1) + eta[:, None] * drift.flatten(1)
        whitened = self._whiten(residual)
        quadratic = whitened.square().sum(dim=1) / (2.0 * eta)
        return -0.5 * (quadratic + self.dim * (_LOG_4PI + torch.log(eta)) + self.log_det())

    def cast(self, reference: Tensor) -> "MassMatrix":
        """A copy in ``reference``'s dtype and device (the original is left as it is)."""
        raise NotImplementedError

    def inverse_mass_matrix(self) -> Tensor:
        """[d, d] Sigma, explicitly (for tests and inspection)."""
        eye = torch.eye(self.dim, dtype=self.reference_dtype, device=self.reference_device)
        return self._sigma(eye)

    def tensors(self) -> dict[str, Tensor]:
        """The tensors that define the mass, keyed as in ``Trajectory.adapted`` (``inverse_mass_*``)."""
        raise NotImplementedError

    def check(self, y: Tensor) -> None:
        if self.dim != y[0].numel():
            raise ValueError(f"{type(self).__name__} has dimension {self.dim} but the state's event {tuple(y.shape[1:])} "
                             f"has {y[0].numel()} coordinates; build it for the flattened event")


class DenseMass(MassMatrix):
    """Dense inverse mass ``inverse_mass`` = Sigma [d, d] (symmetric positive definite), shared by all chains.

    Stores its Cholesky factor L (lower triangular, Sigma = L L^T); O(d^2) per chain and application.
    """

    def __init__(self, inverse_mass: Tensor, *, validate: bool = True) -> None:
        super().__init__()
        if inverse_mass.dim() != 2 or inverse_mass.shape[0] != inverse_mass.shape[1]:
            raise ValueError(f"DenseMass needs a square [d, d] inverse mass, got shape {tuple(inverse_mass.shape)}")
        cholesky, info = torch.linalg.cholesky_ex(inverse_mass)
        # The check reads one value on the host; warmup adaptation, whose estimate is positive definite by
        # construction (shrinkage towards the identity), skips it with validate=False.
        if validate and (bool(info != 0) or not bool(torch.isfinite(cholesky).all())):
            raise ValueError("DenseMass needs a symmetric positive-definite inverse mass (its Cholesky factorization "
                             "failed); add a small multiple of the identity")
        self.dim = inverse_mass.shape[0]
        self.register_buffer("sigma", inverse_mass.detach().clone())
        self.register_buffer("cholesky", cholesky.detach())

    @property
    def reference_dtype(self) -> torch.dtype:
        return self.sigma.dtype

    @property
    def reference_device(self) -> torch.device:
        return self.sigma.device

    def _sigma(self, x: Tensor) -> Tensor:
        return x @ self.sigma  # rows x^T Sigma = (Sigma x)^T, Sigma symmetric

    def _factor(self, x: Tensor) -> Tensor:
        return x @ self.cholesky.T  # rows (L x)^T

    def _factor_transpose(self, x: Tensor) -> Tensor:
        return x @ self.cholesky  # rows (L^T x)^T

    def _inverse_factor_transpose(self, x: Tensor) -> Tensor:
        # rows p^T with L^T p = x, i.e. p^T L = x^T: a right-sided triangular solve.
        return torch.linalg.solve_triangular(self.cholesky, x, upper=False, left=False)

    def _whiten(self, x: Tensor) -> Tensor:
        # rows w^T with L w = x, i.e. w^T L^T = x^T.
        return torch.linalg.solve_triangular(self.cholesky.T, x, upper=True, left=False)

    def log_det(self) -> Tensor:
        return 2.0 * self.cholesky.diagonal().log().sum()

    def cast(self, reference: Tensor) -> "DenseMass":
        copy = DenseMass(self.sigma.to(reference), validate=False)
        copy.cholesky = self.cholesky.to(reference)  # the factor of the original precision, not refactorized
        return copy

    def tensors(self) -> dict[str, Tensor]:
        return {"inverse_mass_matrix": self.sigma}

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LowRankMass(MassMatrix):
    """Sigma = D^{1/2} (I + U diag(lambda - 1) U^T) D^{1/2}: ``scale`` D^{1/2} [d] (positive), ``vectors`` U [d, k]
    (orthonormal columns), ``eigenvalues`` lambda [k] (positive). O(d k) per chain and application."""

    def __init__(self, scale: Tensor, vectors: Tensor, eigenvalues: Tensor, *, validate: bool = True) -> None:
        super().__init__()
        if scale.dim() != 1 or vectors.dim() != 2 or vectors.shape[0] != scale.shape[0] or \
                eigenvalues.shape != (vectors.shape[1],):
            raise ValueError(f"LowRankMass needs scale [d], vectors [d, k], eigenvalues [k]; got "
                             f"{tuple(scale.shape)}, {tuple(vectors.shape)}, {tuple(eigenvalues.shape)}")
        if validate and (not bool((scale > 0).all()) or not bool((eigenvalues > 0).all())):
            raise ValueError("LowRankMass needs positive scale and eigenvalues")
        self.dim, self.rank = scale.shape[0], vectors.shape[1]
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("vectors", vectors.detach().clone())
        self.register_buffer("eigenvalues", eigenvalues.detach().clone())

    @property
    def reference_dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def reference_device(self) -> torch.device:
        return self.scale.device

    def _power(self, x: Tensor, exponent: float) -> Tensor:
        """Rows of A^t x = x + U diag(lambda^t - 1) U^T x: two [C, d] x [d, k] products."""
        return x + ((x @ self.vectors) * (self.eigenvalues.pow(exponent) - 1.0)) @ self.vectors.T

    def _sigma(self, x: Tensor) -> Tensor:
        return self.scale * self._power(self.scale * x, 1.0)

    def _factor(self, x: Tensor) -> Tensor:
        return self.scale * self._power(x, 0.5)  # L = D^{1/2} A^{1/2}

    def _factor_transpose(self, x: Tensor) -> Tensor:
        return self._power(self.scale * x, 0.5)  # L^T = A^{1/2} D^{1/2}

    def _inverse_factor_transpose(self, x: Tensor) -> Tensor:
        return self._power(x, -0.5) / self.scale  # L^-T = D^{-1/2} A^{-1/2}

    def _whiten(self, x: Tensor) -> Tensor:
        return self._power(x / self.scale, -0.5)  # L^-1 = A^{-1/2} D^{-1/2}

    def log_det(self) -> Tensor:
        return 2.0 * self.scale.log().sum() + self.eigenvalues.log().sum()

    def cast(self, reference: Tensor) -> "LowRankMass":
        return LowRankMass(self.scale.to(reference), self.vectors.to(reference), self.eigenvalues.to(reference),
                           validate=False)

    def tensors(self) -> dict[str, Tensor]:
        return {"inverse_mass_scale": self.scale, "inverse_mass_vectors": self.vectors,
                "inverse_mass_eigenvalues": self.eigenvalues}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}"


InverseMass = Union[Tensor, MassMatrix]


def preconditioned_drift(grad: Tensor, inverse_mass: InverseMass) -> Tensor:
    """[C, *event] Sigma g for a diagonal tensor or a ``MassMatrix``."""
    if isinstance(inverse_mass, MassMatrix):
        return inverse_mass.preconditioned_drift(grad)
    return inverse_mass * grad


def propose(y: Tensor, drift: Tensor, step_size: Tensor, noise: Tensor, inverse_mass: InverseMass) -> Tensor:
    """MALA's y' = y - eta Sigma g + sqrt(2 eta) Sigma^{1/2} xi (``drift`` = Sigma g) for either representation."""
    if isinstance(inverse_mass, MassMatrix):
        return inverse_mass.propose(y, drift, step_size, noise)
    return y - step_size * drift + torch.sqrt(2.0 * step_size * inverse_mass) * noise


def proposal_log_density(
    point: Tensor, origin: Tensor, drift: Tensor, step_size: Tensor, inverse_mass: InverseMass
) -> Tensor:
    """[C] log N(point; origin - eta Sigma g, 2 eta Sigma), normalized, for either representation."""
    if isinstance(inverse_mass, MassMatrix):
        return inverse_mass.proposal_log_density(point, origin, drift, step_size)
    variance = (2.0 * step_size * inverse_mass).expand_as(point)  # per element (step size and mass both may be)
    residual = point - origin + step_size * drift
    log_density = residual.square() / variance + torch.log(math.pi * 2.0 * variance)
    return -0.5 * log_density.flatten(1).sum(dim=1)
