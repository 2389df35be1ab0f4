"""A frozen autoencoder for latent-space models (the paper's video EBT predicts frozen autoencoder latents):
``frozen_autoencoder(run_dir)`` rebuilds the ``architectures.ConvAutoencoder`` an ``AutoencoderTask`` run trained,
from its newest checkpoint alone (the architecture travels in the weights' ``state_dict``; no gin, so it can be
called while another recipe is being built), with every parameter frozen."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from architectures.autoencoder import ConvAutoencoder

PREFIX = "model."


class FrozenAutoencoder(nn.Module):
    """A trained ``ConvAutoencoder`` whose weights never train: ``encode``/``decode`` run without a graph to the
    weights (``requires_grad=False``; gradients w.r.t. inputs still flow through ``decode``) and in eval mode.
    ``source`` says which run it came from."""

    def __init__(self, autoencoder: ConvAutoencoder, source: str = "") -> None:
        super().__init__()
        self.autoencoder, self.source = autoencoder, source
        for parameter in self.autoencoder.parameters():
            parameter.requires_grad_(False)
        self.autoencoder.eval()

    def train(self, mode: bool = True) -> "FrozenAutoencoder":
        super().train(mode)
        self.autoencoder.eval()  # frozen: always in inference mode
        return self

    @property
    def in_channels(self) -> int:
        return self.autoencoder.in_channels

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.autoencoder.latent_shape(height, width)

    def encode(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.autoencoder.encode(images)

    def decode(self, latents: Tensor) -> Tensor:
        with torch.no_grad():
            return self.autoencoder.decode(latents)


def frozen_autoencoder(run_dir: Union[str, Path]) -> FrozenAutoencoder:
    """The autoencoder of an ``AutoencoderTask`` run directory (its newest checkpoint), frozen."""
    from energyflow import checkpoint as ckpt

    run_dir = Path(run_dir)
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoints/: train the autoencoder first (energyflow train "
                                "recipes/experiments/video_autoencoder.gin --out DIR) and name that DIR")
    state = ckpt.load_checkpoint(latest, map_location="cpu")["task"]
    config = state.get(PREFIX + "_extra_state")
    if not isinstance(config, dict):
        raise ValueError(f"{latest} is not an autoencoder run (no {PREFIX}_extra_state with its architecture); give "
                         "the directory of a run trained with AutoencoderTask")
    autoencoder = ConvAutoencoder(**config)
    autoencoder.load_state_dict({key[len(PREFIX):]: value for key, value in state.items() if key.startswith(PREFIX)})
    return FrozenAutoencoder(autoencoder, source=str(run_dir))


def run_path(root: Union[str, Path], name: str) -> Path:
    """``root / name``: a sibling run's directory, for recipes (gin cannot join strings), e.g. the autoencoder a
    ``compare`` trained first: ``frozen_autoencoder.run_dir = @run_path()``, ``run_path.root = %OUT_DIR``."""
    return Path(root) / name
