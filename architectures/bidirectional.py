"""DiT-style bidirectional Transformer over image patches with adaLN-Zero blocks.

Two uses:
- ``mode="energy"`` (image EBT): no timestep; a learned condition vector drives the adaLN modulation;
  per-patch scalars are averaged into one energy per sample: ``forward(images [B,C,H,W]) -> [B]``.
- ``mode="denoise"`` (diffusion baseline): a sinusoidal timestep embedding is the condition and the output
  is one patch per token, reassembled: ``forward(images, timesteps [B]) -> [B,C,H,W]``.
Blocks follow DiT: LayerNorm without affine, attention and GELU MLP with biases, fixed 2-D sin-cos position
embedding, zero-initialised modulation and final layer, so each block starts as the identity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from architectures.heads import LinearEnergyHead, MeanPatchEnergyHead, reinit_heads
from architectures.layers import AttentionBackend, InitScheme, attention, init_linear, modulate, zero_init
from architectures.transformer import PRESETS


@dataclass
class BidirectionalConfig:
    """Square images of side ``image_size`` cut into ``patch_size`` patches (the side must divide)."""

    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    dim: int = 384
    num_layers: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    init: InitScheme = "xavier"
    attention_backend: AttentionBackend = "auto"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; "
                             "pad or crop the images, or pick a patch size that divides the side")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BidirectionalConfig":
        """Size ``name`` from the paper's presets (layers/heads/width); image fields by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        layers, heads, width = PRESETS[name]
        return cls(**{"dim": width, "num_layers": layers, "num_heads": heads, **overrides})


class AdaLNZeroBlock(nn.Module):
    """DiT block: ``x + gate * sublayer(norm(x) * (1 + scale) + shift)`` for attention and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Linear(dim, 6 * dim)

    def attend(self, x: Tensor) -> Tensor:  # [B, N, D] -> [B, N, D], every patch sees every patch
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, None, backend=self.backend)  # [B, H, N, Dh]
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:  # x [B,N,D], cond [B,D]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(F.silu(cond)).unsqueeze(1).chunk(6, -1)
        x = x + gate_a * self.attend(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features ``[B] -> [B, dim]`` of (possibly fractional) timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``[grid * grid, dim]`` (half the width per axis)."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs dim divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def axis(values: Tensor) -> Tensor:
        angles = values.reshape(-1, 1) * freqs
        return torch.cat((angles.sin(), angles.cos()), dim=1)

    return torch.cat((axis(rows), axis(cols)), dim=1).float()


class BidirectionalTransformer(nn.Module):
    """DiT-style backbone; see the module docstring for the two modes."""

    def __init__(self, config: BidirectionalConfig, *, mode: Literal["energy", "denoise"] = "energy",
                 head: Optional[nn.Module] = None, timestep_dim: int = 256) -> None:
        super().__init__()
        if mode not in ("energy", "denoise"):
            raise ValueError(f"mode must be 'energy' or 'denoise', got {mode!r}")
        if head is not None and mode == "denoise":
            raise ValueError("head only applies to mode='energy'; the denoiser outputs patches")
        self.config, self.mode, self.timestep_dim = config, mode, timestep_dim
        dim, patch_dim = config.dim, config.in_channels * config.patch_size ** 2
        self.patch_embed = nn.Linear(patch_dim, dim)
        self.register_buffer("pos_embed", sincos_2d(dim, config.image_size // config.patch_size), persistent=False)
        self.blocks = nn.ModuleList(AdaLNZeroBlock(dim, config.num_heads, config.mlp_ratio, config.attention_backend)
                                    for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(dim, 2 * dim)
        if mode == "energy":
            self.condition = nn.Parameter(torch.empty(dim))
            self.head = head if head is not None else MeanPatchEnergyHead(LinearEnergyHead(dim, norm=False, zero=True))
        else:
            self.timestep_mlp = nn.Sequential(nn.Linear(timestep_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            self.head = nn.Linear(dim, patch_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        init_linear(self, self.config.init)
        for block in self.blocks:
            zero_init(block.modulation)  # adaLN-Zero: every block starts as the identity
        zero_init(self.final_modulation)
        if self.mode == "energy":
            nn.init.normal_(self.condition, std=0.02)
            reinit_heads(self.head)
        else:
            zero_init(self.head)
            for linear in (self.timestep_mlp[0], self.timestep_mlp[2]):
                nn.init.normal_(linear.weight, std=0.02)  # as DiT initialises its timestep MLP

    def forward(self, images: Tensor, timesteps: Optional[Tensor] = None) -> Tensor:
        """``images [B,C,H,W]`` -> energies ``[B]`` (energy mode) or patches ``[B,C,H,W]`` (denoise mode)."""
        self._check_images(images)
        cond = self._condition(images, timesteps)
        x = self.patch_embed(self._patchify(images)) + self.pos_embed.to(images.dtype)
        for block in self.blocks:
            x = block(x, cond)
        shift, scale = self.final_modulation(F.silu(cond)).unsqueeze(1).chunk(2, dim=-1)
        x = modulate(self.final_norm(x), shift, scale)  # [B, N, D]
        if self.mode == "energy":
            return self.head(x)
        return self._unpatchify(self.head(x))

    def _condition(self, images: Tensor, timesteps: Optional[Tensor]) -> Tensor:
        batch = images.shape[0]
        if self.mode == "energy":
            if timesteps is not None:
                raise ValueError("the energy backbone has no timestep; call it as model(images)")
            return self.condition.to(images.dtype).expand(batch, -1)
        if timesteps is None or timesteps.shape != (batch,):
            raise ValueError(f"the denoiser needs timesteps of shape [{batch}], got "
                             f"{None if timesteps is None else tuple(timesteps.shape)}")
        return self.timestep_mlp(timestep_embedding(timesteps, self.timestep_dim).to(images.dtype))

    def _check_images(self, images: Tensor) -> None:
        c, side, p = self.config.in_channels, self.config.image_size, self.config.patch_size
        if images.dim() != 4 or images.shape[1] != c:
            raise ValueError(f"images must be [B, {c}, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by patch_size={p}; pad or crop to a "
                             f"multiple of {p}")
        if (height, width) != (side, side):
            raise ValueError(f"image size {height}x{width} differs from the configured {side}x{side} (the position "
                             "embedding is fixed); resize the images or set image_size")

    def _patchify(self, images: Tensor) -> Tensor:  # [B,C,H,W] -> [B, N, C*p*p]
        p = self.config.patch_size
        batch, channels, height, width = images.shape
        x = images.reshape(batch, channels, height // p, p, width // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // p) * (width // p), channels * p * p)

    def _unpatchify(self, patches: Tensor) -> Tensor:  # [B, N, C*p*p] -> [B,C,H,W]
        p, c, side = self.config.patch_size, self.config.in_channels, self.config.image_size
        grid = side // p
        x = patches.reshape(patches.shape[0], grid, grid, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(patches.shape[0], c, side, side)
