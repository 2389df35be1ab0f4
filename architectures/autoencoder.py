"""A small convolutional autoencoder for frames or images: ``encode [B, C, H, W] -> [B, c, H/4, W/4]``,
``decode`` back (tanh: values in [-1, 1]). The paper's video EBT predicts frozen autoencoder latents; this is
that autoencoder at CPU scale, trained first by the same trainer and frozen afterwards.

Two stride-2 convolutions down (4x4 kernels), a 3x3 to ``latent_channels``; the mirror image up. Its
architecture travels in its ``state_dict`` (``get_extra_state``), so a frozen copy can be rebuilt from a
checkpoint alone (``energyflow.models.frozen_autoencoder``).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class ConvAutoencoder(nn.Module):
    def __init__(self, in_channels: int = 1, latent_channels: int = 4, width: int = 32) -> None:
        super().__init__()
        if min(in_channels, latent_channels, width) < 1:
            raise ValueError(f"in_channels, latent_channels and width must be >= 1, got {in_channels}, "
                             f"{latent_channels}, {width}")
        self.in_channels, self.latent_channels, self.width = in_channels, latent_channels, width
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, latent_channels, 3, padding=1))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, 2 * width, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(width, in_channels, 4, stride=2, padding=1), nn.Tanh())

    def _check(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.in_channels or images.shape[-1] % 4 or images.shape[-2] % 4:
            raise ValueError(f"the autoencoder takes [B, {self.in_channels}, H, W] with H and W multiples of 4, got "
                             f"{tuple(images.shape)}")

    def encode(self, images: Tensor) -> Tensor:
        self._check(images)
        return self.encoder(images)

    def decode(self, latents: Tensor) -> Tensor:
        return self.decoder(latents)

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.latent_channels, height // 4, width // 4

    def get_extra_state(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "latent_channels": self.latent_channels, "width": self.width}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mine = self.get_extra_state()
        if dict(state) != mine:
            raise ValueError(f"this checkpoint's autoencoder is {dict(state)}, the model built is {mine}")
