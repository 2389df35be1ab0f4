"""Image energy for denoising by descent: ``E(x)`` of a candidate image alone (the paper's bidirectional EBT).

The energy reads nothing but the candidate: the noisy image is only where the descent *starts*
(``energyflow.objectives.InputState``), so the model learns a landscape whose gradient steps lead noisy
images back to clean ones. The backbone is ``architectures.BidirectionalTransformer(mode="energy")``: a
DiT-style stack over patches with adaLN-Zero blocks driven by one learned condition vector (no timestep),
and the energy is the mean of per-patch scalars.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from architectures.bidirectional import BidirectionalTransformer


class ImageEBM(nn.Module):
    """The model protocol of ``energyflow.models`` for images ``[B, C, H, W]``: ``encode`` has no context to
    encode (``None``), ``energy(None, images) -> [B]``, ``candidate_shape(targets) = targets.shape``."""

    step_conditioning = None  # the paper's image EBT conditions on no optimization step

    def __init__(self, backbone: BidirectionalTransformer) -> None:
        super().__init__()
        if not isinstance(backbone, BidirectionalTransformer) or backbone.mode != "energy":
            raise ValueError("ImageEBM needs a BidirectionalTransformer(mode='energy') backbone (the denoiser mode "
                             "is the DiT baseline's: DiffusionDenoisingTask)")
        self.backbone = backbone

    @property
    def image_shape(self) -> tuple[int, int, int]:
        config = self.backbone.config
        return config.in_channels, config.image_size, config.image_size

    def encode(self, inputs: Optional[Tensor] = None) -> None:
        """No context: the energy is a function of the candidate image alone."""
        return None

    def energy(self, context: None, candidate: Tensor) -> Tensor:
        """``candidate [B, C, H, W]`` -> energies ``[B]`` (``context`` is ignored: there is none)."""
        return self.backbone(candidate)

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    def candidate_shape(self, targets: Tensor) -> tuple[int, ...]:
        return tuple(targets.shape)
