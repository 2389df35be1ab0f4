"""H-Net: learned dynamic chunking of a byte sequence (Hwang, Wang, Gu, 2025), pure PyTorch.

One stage: encoder over its input positions -> router (boundary probabilities, hard boundaries at
``p > 0.5``) -> chunk layer (keep the boundary positions) -> main network over chunks (a Transformer, or the
next stage) -> dechunking (EMA over chunks weighted by the boundary probabilities, then every position takes
its chunk's vector) -> straight-through confidence factor plus a zero-initialised residual from the encoder
-> decoder. The published code runs Mamba-2 / flash-attn kernels with no double backward; here every mixer
is the shared causal ``TransformerBlock`` (math attention path under autograd), so the whole model is
twice differentiable, as energy-based training needs. See ``architectures/hnet_ops.py`` for the tensor
operations and ``docs/hnet.md`` for the design.

Widths grow with depth (``dims`` outermost first); a stage pads its chunks to the inner width with a
learned vector and keeps the first ``dim`` features of the inner output, as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

from architectures import hnet_ops as ops
from architectures.heads import LMHead
from architectures.hnet_stack import CausalStack, StackCache
from architectures.layers import AttentionBackend, InitScheme, init_linear, zero_init

EMAImplementation = Literal["vectorized", "scan"]


@dataclass
class HNetConfig:
    """Sizes of an H-Net with ``S = len(encoder_layers)`` stages (1 or 2).

    ``dims``/``num_heads``: ``S + 1`` entries, outermost (bytes) first, the main network last; widths must
    not decrease. ``encoder_layers``/``decoder_layers``/``compression``: one entry per stage; ``compression``
    is the target N (one boundary every N positions of that stage's input). The FFN hidden width is
    ``ffn_multiplier * dim`` (``dim`` when ``None``, as in the paper's text scripts).
    """

    dims: tuple[int, ...] = (256, 384)
    num_heads: tuple[int, ...] = (4, 6)
    encoder_layers: tuple[int, ...] = (2,)
    decoder_layers: tuple[int, ...] = (2,)
    main_layers: int = 4
    compression: tuple[float, ...] = (6.0,)
    ffn_multiplier: Optional[float] = None
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init: InitScheme = "xavier"
    attention_backend: AttentionBackend = "auto"
    ema: EMAImplementation = "vectorized"

    def __post_init__(self) -> None:
        for name in ("dims", "num_heads", "encoder_layers", "decoder_layers", "compression"):
            setattr(self, name, tuple(getattr(self, name)))
        stages = len(self.encoder_layers)
        if stages not in (1, 2):
            raise ValueError(f"an H-Net has 1 or 2 stages (len(encoder_layers)), got {stages}")
        expected = {"decoder_layers": stages, "compression": stages, "dims": stages + 1, "num_heads": stages + 1}
        for name, count in expected.items():
            if len(getattr(self, name)) != count:
                raise ValueError(f"{name} needs {count} entries for {stages} stage(s), got {getattr(self, name)}")
        for dim, heads in zip(self.dims, self.num_heads):
            if dim % heads or (dim // heads) % 2:
                raise ValueError(f"width {dim} must split into {heads} heads of even width (RoPE); "
                                 "pick widths divisible by 2 * num_heads")
        if any(inner < outer for outer, inner in zip(self.dims, self.dims[1:])):
            raise ValueError(f"dims must not decrease from the outer to the inner stages, got {self.dims}")
        if self.ema not in ("vectorized", "scan"):
            raise ValueError(f"ema must be 'vectorized' or 'scan', got {self.ema!r}")

    @property
    def num_stages(self) -> int:
        return len(self.encoder_layers)

    def stack(self, level: int, num_layers: int) -> CausalStack:
        """A causal stack at nesting ``level`` (0 = bytes)."""
        dim = self.dims[level]
        hidden = dim if self.ffn_multiplier is None else int(round(self.ffn_multiplier * dim))
        return CausalStack(dim, self.num_heads[level], num_layers, hidden, norm_eps=self.norm_eps,
                           rope_theta=self.rope_theta, backend=self.attention_backend)


class Router(nn.Module):
    """Boundary probabilities from the cosine of consecutive projected states; projections start as identity
    (so initially a boundary marks a turn of the encoder's own representation)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.query.weight.copy_(torch.eye(self.query.weight.shape[0]))
            self.key.weight.copy_(torch.eye(self.key.weight.shape[0]))

    def forward(self, h: Tensor) -> Tensor:  # [B, L, D] -> [B, L]
        return ops.boundary_probabilities(self.query(h), self.key(h))

    def step(self, h: Tensor, previous: Tensor, count: Tensor) -> Tensor:
        """``h, previous [B, D]`` (this and the previous position), ``count [B]`` positions seen -> ``p [B]``."""
        p = ops.boundary_probabilities(torch.stack((self.query(previous), self.query(h)), 1),
                                       torch.stack((self.key(previous), self.key(h)), 1))[:, 1]
        return torch.where(count == 0, torch.ones_like(p), p)


@dataclass
class StageState:
    """Incremental-decoding state of one stage: its stacks' caches, the inner state, the last encoder output
    (for the router), the current chunk's smoothed vector and the number of positions seen, per row."""

    encoder: StackCache
    decoder: StackCache
    inner: Union[StackCache, "StageState"]
    previous: Tensor  # [B, D] encoder output at the last position
    smoothed: Tensor  # [B, D] EMA output of the current chunk
    count: Tensor  # [B]


class HNetStage(nn.Module):
    """Stage ``level`` of an H-Net: ``forward(x [B, L, D], valid [B, L]) -> (y [B, L, D], routing stats)``."""

    def __init__(self, config: HNetConfig, level: int = 0) -> None:
        super().__init__()
        self.config, self.level = config, level
        dim, inner_dim = config.dims[level], config.dims[level + 1]
        self.encoder = config.stack(level, config.encoder_layers[level])
        self.router = Router(dim)
        last = level + 1 == config.num_stages
        self.inner = config.stack(level + 1, config.main_layers) if last else HNetStage(config, level + 1)
        self.pad = nn.Parameter(torch.zeros(inner_dim - dim)) if inner_dim > dim else None
        self.residual = nn.Linear(dim, dim, bias=False)
        self.decoder = config.stack(level, config.decoder_layers[level])

    def reset_special_parameters(self) -> None:
        """Identity router, zero residual (after a model-wide init pass that would overwrite them)."""
        self.router.reset_parameters()
        zero_init(self.residual)
        if isinstance(self.inner, HNetStage):
            self.inner.reset_special_parameters()

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, list[ops.RoutingStats]]:
        h = self.encoder(x)  # [B, L, D]
        p = self.router(h)  # [B, L]
        b = (p > 0.5) & valid  # p_0 = 1 and valid[:, 0] holds: every row starts a chunk at 0
        chunks = ops.chunk(h, p, b)
        inner_out, inner_stats = self._inner(self._widen(chunks.vectors), chunks.valid)
        ema = ops.ema_vectorized if self.config.ema == "vectorized" else ops.ema_scan
        smoothed = ema(inner_out[..., : h.shape[-1]], chunks.probabilities)  # [B, M, D]
        factor = ops.straight_through(ops.confidence(p, b)).unsqueeze(-1).to(h.dtype)
        y = ops.dechunk(smoothed, chunks.index) * factor + self.residual(h)
        stats = ops.routing_stats(p, b, valid, self.config.compression[self.level])
        return self.decoder(y), [stats, *inner_stats]

    def _inner(self, x: Tensor, valid: Tensor) -> tuple[Tensor, list[ops.RoutingStats]]:
        if isinstance(self.inner, HNetStage):
            return self.inner(x, valid)
        return self.inner(x), []

    def _widen(self, x: Tensor) -> Tensor:  # [..., D] -> [..., D_inner]
        if self.pad is None:
            return x
        return torch.cat((x, self.pad.to(x.dtype).expand(*x.shape[:-1], -1)), dim=-1)

    def init_state(self, batch: int, like: Tensor) -> StageState:
        """An empty state for ``batch`` rows (dtype and device of ``like``)."""
        zeros = like.new_zeros(batch, self.config.dims[self.level])
        inner = (self.inner.init_state(batch, like) if isinstance(self.inner, HNetStage)
                 else StackCache.empty(batch, like.device))
        empty = StackCache.empty(batch, like.device)
        return StageState(empty, empty, inner, zeros, zeros, torch.zeros(batch, dtype=torch.long, device=like.device))

    def step(self, x: Tensor, state: StageState, active: Tensor) -> tuple[Tensor, StageState]:
        """One position ``x [B, 1, D]``; only ``active [B]`` rows advance. Equals ``forward`` position by
        position: a boundary sends the position to the inner network and restarts the EMA's chunk."""
        h, encoder = self.encoder.step(x, state.encoder, active)
        p = self.router.step(h[:, 0], state.previous, state.count)  # [B]
        b = (p > 0.5) & active
        inner_out, inner = self.inner.step(self._widen(h), state.inner, b)  # commits only where b
        update = p.unsqueeze(-1) * inner_out[:, 0, : h.shape[-1]] + (1 - p.unsqueeze(-1)) * state.smoothed
        smoothed = torch.where(b.unsqueeze(-1), update, state.smoothed)  # [B, D]
        factor = ops.straight_through(ops.confidence(p, b)).unsqueeze(-1).to(h.dtype)
        y = (smoothed * factor).unsqueeze(1) + self.residual(h)
        out, decoder = self.decoder.step(y, state.decoder, active)
        keep = active.unsqueeze(-1)
        previous = torch.where(keep, h[:, 0], state.previous)
        return out, StageState(encoder, decoder, inner, previous, smoothed, state.count + active.long())


class HNet(nn.Module):
    """The backbone over embeddings: ``forward(x [B, L, D0]) -> (y [B, L, D0], [RoutingStats per stage])``."""

    def __init__(self, config: HNetConfig) -> None:
        super().__init__()
        self.config = config
        self.stage = HNetStage(config, 0)
        init_linear(self, config.init)
        self.stage.reset_special_parameters()

    def forward(self, x: Tensor) -> tuple[Tensor, list[ops.RoutingStats]]:
        if x.dim() != 3 or x.shape[-1] != self.config.dims[0] or x.shape[1] == 0:
            raise ValueError(f"H-Net input must be [B, L, {self.config.dims[0]}] with L >= 1, got {tuple(x.shape)}")
        if x.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_seq_len={self.config.max_seq_len}; "
                             "raise HNetConfig.max_seq_len")
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return self.stage(x, valid)

    def init_state(self, batch: int, like: Tensor) -> StageState:
        return self.stage.init_state(batch, like)

    def step(self, x: Tensor, state: StageState) -> tuple[Tensor, StageState]:
        """Incremental decoding: the next position ``x [B, 1, D0]`` -> ``([B, 1, D0], state)``."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"step takes one position per row, [B, 1, D], got {tuple(x.shape)}")
        if int(state.count.max()) >= self.config.max_seq_len:
            raise ValueError(f"decoding past max_seq_len={self.config.max_seq_len}; raise it or start a new state")
        return self.stage.step(x, state, torch.ones(x.shape[0], dtype=torch.bool, device=x.device))


class HNetLM(nn.Module):
    """Byte-level causal language model with an H-Net backbone: ``forward(tokens [B, L]) -> logits [B, L, V]``.

    ``forward_with_routing`` also returns the per-stage ``RoutingStats`` (whose ``ratio_loss`` a task adds).
    """

    def __init__(self, config: HNetConfig, vocab_size: int = 256) -> None:
        super().__init__()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.config, self.vocab_size = config, vocab_size
        self.embed = nn.Embedding(vocab_size, config.dims[0])
        self.backbone = HNet(config)
        self.head = LMHead(config.dims[0], vocab_size, norm_eps=config.norm_eps)
        init_linear(self.embed, config.init)
        init_linear(self.head, config.init)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.forward_with_routing(tokens)[0]

    def forward_with_routing(self, tokens: Tensor) -> tuple[Tensor, list[ops.RoutingStats]]:
        _check_tokens(tokens)
        h, routing = self.backbone(self.embed(tokens))
        return self.head(h), routing

    def init_state(self, batch: int) -> StageState:
        return self.backbone.init_state(batch, self.embed.weight)

    def step(self, tokens: Tensor, state: StageState) -> tuple[Tensor, StageState]:
        """The next byte ``tokens [B, 1]`` -> ``(logits [B, 1, V], state)``; equals ``forward`` position-wise."""
        _check_tokens(tokens)
        h, state = self.backbone.step(self.embed(tokens), state)
        return self.head(h), state


def _check_tokens(tokens: Tensor) -> None:
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an integer tensor [B, L], got {tuple(tokens.shape)} {tokens.dtype}")
