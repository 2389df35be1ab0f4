"""Transformer++ (Llama-style) baseline: RoPE, pre-RMSNorm, SwiGLU, no biases, untied LM head, KV cache."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import Tensor, nn

from architectures.heads import LMHead
from architectures.layers import (AttentionBackend, InitScheme, TransformerBlock, attention_bias, causal_mask,
                                  init_linear, softmax_dtype)

# (layers, heads, width), named as in the paper.
PRESETS: dict[str, tuple[int, int, int]] = {
    "4xs": (2, 2, 128), "3xs": (4, 4, 256), "xxs": (6, 6, 384), "xs": (12, 6, 384),
    "small": (12, 12, 768), "medium": (24, 16, 1024), "large": (24, 16, 1536), "xl": (24, 32, 2048),
}


@dataclass
class TransformerConfig:
    """Size and numerics of a Llama-style stack. ``ffn_hidden`` wins over ``ffn_multiplier``; with neither,
    the FFN hidden width equals ``dim`` (as in the paper's text scripts)."""

    dim: int = 384
    num_layers: int = 6
    num_heads: int = 6
    ffn_hidden: Optional[int] = None
    ffn_multiplier: Optional[float] = None
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init: InitScheme = "xavier"
    embedding_std: float = 0.02
    attention_backend: AttentionBackend = "auto"

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.num_layers <= 0 or self.num_heads <= 0:
            raise ValueError(f"dim, num_layers and num_heads must be positive, got {self.dim}, "
                             f"{self.num_layers}, {self.num_heads}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim={self.dim} must split into num_heads={self.num_heads} heads of even width "
                             "(RoPE rotates pairs); pick a dim divisible by 2 * num_heads")

    @property
    def hidden(self) -> int:
        """The resolved SwiGLU hidden width."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.ffn_multiplier is not None:
            return int(round(self.ffn_multiplier * self.dim))
        return self.dim

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TransformerConfig":
        """A config sized as the paper's preset ``name`` (see ``PRESETS``); other fields by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        layers, heads, width = PRESETS[name]
        return cls(**{"dim": width, "num_layers": layers, "num_heads": heads, **overrides})


def build_blocks(config: TransformerConfig) -> nn.ModuleList:
    """The ``num_layers`` pre-norm blocks shared by the Transformer++ and the EBT."""
    return nn.ModuleList(
        TransformerBlock(config.dim, config.num_heads, config.hidden, norm_eps=config.norm_eps,
                         rope_theta=config.rope_theta, backend=config.attention_backend)
        for _ in range(config.num_layers)
    )


@dataclass
class KVCache:
    """Per-layer keys/values ``[B, H, L, Dh]`` of every token seen so far; extended in place by ``forward``."""

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def past(self, layer: int) -> Optional[tuple[Tensor, Tensor]]:
        return (self.keys[layer], self.values[layer]) if layer < len(self.keys) else None

    def store(self, layer: int, kv: tuple[Tensor, Tensor]) -> None:
        if len(self.keys) <= layer:
            self.keys.append(kv[0])
            self.values.append(kv[1])
        else:
            self.keys[layer], self.values[layer] = kv


class TransformerPP(nn.Module):
    """Causal language model: ``forward(tokens [B,S], cache=None) -> logits [B,S,V]``.

    With a ``KVCache`` (start from ``KVCache()``), tokens continue the cached sequence and the cache grows;
    feeding a sequence token by token gives the same logits as one full pass.
    ``attention_backend`` (optional) overrides ``config.attention_backend`` for this model only: the baseline
    recipe binds ``'fused'``, since a language model trains with first-order gradients (``'auto'`` would
    pick the double-differentiable math path whenever a graph is built).
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, *,
                 attention_backend: Optional[AttentionBackend] = None) -> None:
        super().__init__()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if attention_backend is not None:
            if attention_backend not in ("auto", "math", "fused"):
                raise ValueError(f"attention_backend must be 'auto', 'math' or 'fused', got {attention_backend!r}")
            config = replace(config, attention_backend=attention_backend)
        self.config, self.vocab_size = config, vocab_size
        self.embed = nn.Embedding(vocab_size, config.dim)
        self.blocks = build_blocks(config)
        self.head = LMHead(config.dim, vocab_size, norm_eps=config.norm_eps)
        init_linear(self, config.init, embedding_std=config.embedding_std)

    def forward(self, tokens: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [B, S], got {tuple(tokens.shape)} {tokens.dtype}")
        return self.forward_embeddings(self.embed(tokens), cache)

    def forward_embeddings(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        """The stack on input embeddings ``x [B,S,D]`` (continuous inputs) -> logits ``[B,S,V]``."""
        offset = cache.length if cache is not None else 0
        length = x.shape[1]
        if offset + length > self.config.max_seq_len:
            raise ValueError(f"sequence length {offset + length} exceeds max_seq_len={self.config.max_seq_len}; "
                             "raise max_seq_len in the config or start a new cache")
        positions = torch.arange(offset, offset + length, device=x.device)
        mask = attention_bias(causal_mask(length, offset + length, x.device), softmax_dtype(x))
        for index, block in enumerate(self.blocks):
            x, kv = block(x, positions, mask, cache.past(index) if cache is not None else None)
            if cache is not None:
                cache.store(index, kv)
        return self.head(x)


class ContinuousTransformerPP(TransformerPP):
    """The Transformer++ over continuous vectors (e.g. video frames): ``forward(x [B,S,F], cache=None) ->
    [B,S,F]``, a linear input projection, the same causal stack and KV cache, and the head (RMSNorm + linear)
    regressing ``F`` values per position instead of vocabulary logits."""

    def __init__(self, config: TransformerConfig, feature_dim: int, *,
                 attention_backend: Optional[AttentionBackend] = None) -> None:
        super().__init__(config, feature_dim, attention_backend=attention_backend)
        del self.embed  # no vocabulary: the input is projected
        self.feature_dim = feature_dim
        self.input_projection = nn.Linear(feature_dim, self.config.dim, bias=False)
        init_linear(self.input_projection, self.config.init)

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.feature_dim or not x.is_floating_point():
            raise ValueError(f"x must be a float tensor [B, S, {self.feature_dim}], got {tuple(x.shape)} {x.dtype}")
        return self.forward_embeddings(self.input_projection(x), cache)
