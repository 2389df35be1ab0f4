"""Autoregressive Energy-Based Transformer backbone with a cached context (real) stream.

Two streams of length ``S``: real embeddings of tokens ``0..S-1`` and predicted embeddings for positions
``1..S``. Real tokens attend causally to real tokens; prediction ``i`` attends to real tokens ``0..i`` and to
itself only. RoPE puts real ``j`` at ``j`` and prediction ``i`` at ``i + 1``. Energy ``i`` is a head on the
final hidden state of prediction ``i``.

The real stream never depends on the predictions, so ``encode_context`` computes each layer's real keys and
values once (inside the autograd graph) and ``energies`` runs only the prediction stream against them:
per layer, one ``S x L`` score matrix plus a diagonal self-score, instead of a ``2S x 2S`` attention.
``forward(real, predicted)`` is the reference whole-sequence formulation; both agree to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from architectures.heads import LinearEnergyHead, reinit_heads
from architectures.layers import (AttentionBackend, TransformerBlock, attention_bias, attention_with_self, causal_mask, init_linear,
                                  modulate, softmax_dtype, zero_init)
from architectures.transformer import TransformerConfig, build_blocks

StepIndex = Union[int, Tensor, None]
StepConditioning = Literal["adaln", "time_token", None]
Modulation = tuple[Tensor, Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class ContextCache:
    """Per-layer real-stream keys/values ``[B, H, prefix + L, Dh]`` (rotated), kept in the autograd graph.

    ``prefix`` counts non-token entries in front (1 for the time-token variant, whose ``step_index`` the
    cache then carries); ``length`` is the number of real tokens ``L``.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    prefix: int = 0
    step_index: StepIndex = None

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] - self.prefix

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def expand(self, n: int) -> "ContextCache":
        """Repeat each batch row ``n`` times (rows ``b*n .. b*n+n-1`` copy row ``b``): ``n`` candidates each."""
        if n < 1:
            raise ValueError(f"expand needs n >= 1 candidates per input, got {n}")
        repeat = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        step = self.step_index
        if isinstance(step, Tensor) and step.dim() == 1:
            step = repeat(step)
        return ContextCache(tuple(map(repeat, self.keys)), tuple(map(repeat, self.values)), self.prefix, step)

    def as_leaves(self) -> "ContextCache":
        """A copy whose keys/values are detached leaves that collect gradients (``.grad``).

        Lets training call ``backward`` once per optimisation step (holding one step's graph at a time, not
        K) and then send the accumulated gradient through the context once with ``backward_from``.
        """
        leaf = lambda t: t.detach().requires_grad_(True)  # noqa: E731
        return ContextCache(tuple(map(leaf, self.keys)), tuple(map(leaf, self.values)), self.prefix,
                            self.step_index)

    def backward_from(self, leaves: "ContextCache") -> None:
        """Backpropagate the gradients gathered on ``leaves`` (from ``as_leaves``) through this cache's graph."""
        pairs = [(t, leaf.grad) for t, leaf in zip(self.keys + self.values, leaves.keys + leaves.values)
                 if leaf.grad is not None]
        if not pairs:
            raise ValueError("no gradient reached the leaf cache; call backward on a loss that used it first")
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


class EBT(nn.Module):
    """Autoregressive EBT: ``energies(encode_context(real), predicted) -> [B, S]`` (lower is better).

    ``step_conditioning``: ``None``; ``"adaln"`` (a step embedding modulates the prediction stream's norms,
    zero-initialised so it starts as the unconditioned model; the context stays shared across steps); or
    ``"time_token"`` (the paper's variant: a step embedding prepended to the real stream, so the context
    must be encoded once per distinct step index via ``encode_context(real, step_index=k)``).
    ``context_attention``: the real stream's self-attention kernel. ``"fused"`` (default): the fused SDPA kernel,
    which has no double backward -- the real stream never needs one (the descent differentiates w.r.t. the
    candidate only; the second-order graph reaches the context through its cached keys/values), and in float64
    every outer gradient equals the math path's to rounding (``tests/architectures/test_ebt.py``); 0.4-2% faster
    per training step and 47 MiB less at xxs (``benchmarks/train_step.py``). ``"auto"``: the math path whenever a
    graph is built, as before.
    ``query_block``: the prediction stream's queries go against the cached context in causal blocks of this
    many (``attention_with_self``), each block against only the keys it can see: at S = 256 two blocks, 3.6%
    off the xxs training step (steps interleaved in one process, ``docs/performance.md``); equal to the
    unblocked attention to rounding. At S <= query_block (the quickstart's 64) nothing changes.
    """

    def __init__(self, config: TransformerConfig, head: Optional[nn.Module] = None, *,
                 step_conditioning: StepConditioning = None, num_step_embeddings: int = 16,
                 context_attention: AttentionBackend = "fused", query_block: int = 128) -> None:
        super().__init__()
        if context_attention not in ("auto", "math", "fused"):
            raise ValueError(f"context_attention must be 'auto', 'math' or 'fused', got {context_attention!r}")
        # The real stream is differentiated once only (the descent's gradient is w.r.t. the candidate, which
        # never flows through it; the second-order graph reaches it only through its cached keys/values), so
        # its self-attention may use the fused kernel, whose backward has no derivative of its own.
        self.context_attention = context_attention
        if not isinstance(query_block, int) or isinstance(query_block, bool) or query_block < 1:
            raise ValueError(f"query_block must be an int >= 1 (prediction queries per causal block), got "
                             f"{query_block!r}")
        self.query_block = query_block
        if step_conditioning not in ("adaln", "time_token", None):
            raise ValueError(f"step_conditioning must be None, 'adaln' or 'time_token', got {step_conditioning!r}")
        self.config, self.step_conditioning = config, step_conditioning
        self.blocks = build_blocks(config)
        self.head = head if head is not None else LinearEnergyHead(config.dim, norm_eps=config.norm_eps)
        if step_conditioning is not None:
            self.step_embed = nn.Embedding(num_step_embeddings, config.dim)
        if step_conditioning == "adaln":
            self.step_modulation = nn.ModuleList(nn.Linear(config.dim, 4 * config.dim) for _ in self.blocks)
        init_linear(self, config.init, embedding_std=config.embedding_std)
        if step_conditioning == "adaln":
            for linear in self.step_modulation:
                zero_init(linear)
        reinit_heads(self.head)

    # ----------------------------------------------------------------------------------------- context
    def encode_context(self, real: Tensor, *, cache: Optional[ContextCache] = None,
                       step_index: StepIndex = None) -> ContextCache:
        """Real-stream keys/values for ``real [B, T, D]``; with ``cache``, continue it by ``T`` tokens."""
        self._check_input("real", real, cache.batch_size if cache is not None else None)
        past_len, prefix = (cache.length, cache.prefix) if cache is not None else (0, 0)
        self._check_length(past_len + real.shape[1])
        positions = torch.arange(past_len, past_len + real.shape[1], device=real.device)
        x = real
        if self.step_conditioning == "time_token":
            step_index = self._time_token_step(cache, step_index)
            if cache is None:  # the time token sits just before real token 0
                x = torch.cat((self._step_vector(step_index, real).unsqueeze(1), real), dim=1)
                positions = torch.cat((positions.new_full((1,), -1), positions))
                prefix = 1
        elif step_index is not None:
            raise ValueError("step_index only conditions the context in the 'time_token' variant; "
                             "pass it to energies() for 'adaln', or drop it")
        keys, values = self._encode_layers(x, positions, cache)
        return ContextCache(tuple(keys), tuple(values), prefix, step_index)

    def _encode_layers(self, x: Tensor, positions: Tensor,
                       cache: Optional[ContextCache]) -> tuple[list[Tensor], list[Tensor]]:
        mask = attention_bias(causal_mask(x.shape[1], x.shape[1] + (cache.keys[0].shape[2] if cache else 0),
                                          x.device), softmax_dtype(x))
        keys, values = [], []
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            past = (cache.keys[index], cache.values[index]) if cache is not None else None
            if index < last:
                backend = None if self.context_attention == "auto" else self.context_attention
                x, (k, v) = block(x, positions, mask, past, backend=backend)
            else:  # the last layer's real outputs feed nothing: only its keys/values are needed
                _, k, v = block.attn.project(block.attn_norm(x), positions)
                if past is not None:
                    k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
            keys.append(k)
            values.append(v)
        return keys, values

    # -------------------------------------------------------------------------------------- predictions
    def energies(self, cache: ContextCache, predicted: Tensor, step_index: StepIndex = None) -> Tensor:
        """Energies ``[B, S]`` of ``predicted [B, S, D]``, the candidates for the last ``S`` cached positions
        (``S = cache.length`` scores every position; ``S = 1`` only the next token)."""
        self._check_input("predicted", predicted, cache.batch_size)
        num_pred, length = predicted.shape[1], cache.length
        if num_pred > length:
            raise ValueError(f"{num_pred} predictions but only {length} context tokens; predictions are for the "
                             "last S context positions, so S must be <= the context length")
        modulations = self._modulations(step_index, predicted)
        positions = torch.arange(length - num_pred + 1, length + 1, device=predicted.device)
        mask = attention_bias(causal_mask(num_pred, cache.keys[0].shape[2], predicted.device),
                              softmax_dtype(predicted))
        h, offset = predicted, cache.keys[0].shape[2] - num_pred  # the mask is causal_mask(S, keys)
        for index, block in enumerate(self.blocks):
            h = _prediction_block(block, h, cache.keys[index], cache.values[index], positions, mask, offset,
                                  modulations[index] if modulations else None, self.query_block)
        return self.head(h)

    def forward(self, real: Tensor, predicted: Tensor, step_index: StepIndex = None) -> Tensor:
        """Reference formulation: both streams as one ``2S``-token sequence (``+1`` with a time token)."""
        self._check_input("real", real, None)
        self._check_input("predicted", predicted, real.shape[0])
        if predicted.shape[1] != real.shape[1]:
            raise ValueError(f"forward needs as many predictions as real tokens, got {predicted.shape[1]} and "
                             f"{real.shape[1]}; use encode_context + energies to score a suffix")
        self._check_length(real.shape[1])
        length = real.shape[1]
        stream, positions = torch.cat((real, predicted), 1), torch.cat((torch.arange(length),
                                                                         torch.arange(1, length + 1)))
        modulations, prefix = None, 0
        if self.step_conditioning == "time_token":
            if step_index is None:
                raise ValueError("the time-token EBT needs step_index (the optimisation step being scored)")
            stream = torch.cat((self._step_vector(step_index, real).unsqueeze(1), stream), 1)
            positions, prefix = torch.cat((torch.tensor([-1]), positions)), 1
        else:
            modulations = self._modulations(step_index, predicted)
        positions = positions.to(real.device)
        mask = attention_bias(_two_stream_mask(prefix, length, real.device), softmax_dtype(stream))
        for index, block in enumerate(self.blocks):
            mod = _pad_rows(modulations[index], prefix + length, length) if modulations else None
            stream, _ = block(stream, positions, mask, modulation=mod)
        return self.head(stream[:, prefix + length:])

    # ---------------------------------------------------------------------------------------- helpers
    def _modulations(self, step_index: StepIndex, like: Tensor) -> Optional[list[Modulation]]:
        """Per-layer adaLN ``(shift, scale) x 2``, each ``[B, 1, D]``, or ``None`` without adaLN."""
        if self.step_conditioning == "time_token":
            if step_index is not None:
                raise ValueError("the time-token EBT is conditioned through its context: encode it with "
                                 "encode_context(real, step_index=k) and call energies without step_index")
            return None
        if self.step_conditioning is None:
            if step_index is not None:
                raise ValueError("this EBT has no step conditioning; build it with step_conditioning='adaln' "
                                 "or 'time_token' to use step_index")
            return None
        if step_index is None:
            raise ValueError("the adaLN-conditioned EBT needs step_index (the optimisation step being scored)")
        cond = F.silu(self._step_vector(step_index, like)).unsqueeze(1)  # [B or 1, 1, D]
        return [tuple(linear(cond).chunk(4, dim=-1)) for linear in self.step_modulation]

    def _step_vector(self, step_index: StepIndex, like: Tensor) -> Tensor:
        """Step embedding ``[B, D]`` for an int or a per-row ``[B]`` index (``B = like.shape[0]``)."""
        count = self.step_embed.num_embeddings
        if isinstance(step_index, int):
            if not 0 <= step_index < count:
                raise ValueError(f"step_index {step_index} outside [0, {count}); raise num_step_embeddings or "
                                 "reuse the last trained index for extra inference steps")
            step_index = torch.tensor([step_index], device=like.device)
        vector = self.step_embed(step_index.reshape(-1).to(like.device)).to(like.dtype)
        return vector.expand(like.shape[0], -1)

    def _time_token_step(self, cache: Optional[ContextCache], step_index: StepIndex) -> StepIndex:
        if cache is None:
            if step_index is None:
                raise ValueError("the time-token EBT encodes one context per step: pass step_index=k")
            return step_index
        if step_index is not None:
            raise ValueError("an extended time-token cache keeps its own step_index; do not pass another")
        return cache.step_index

    def _check_input(self, name: str, x: Tensor, batch: Optional[int]) -> None:
        if x.dim() != 3 or x.shape[-1] != self.config.dim or x.shape[1] == 0:
            raise ValueError(f"{name} must be [B, S, D] with S >= 1 and D={self.config.dim}, got {tuple(x.shape)}")
        if batch is not None and x.shape[0] != batch:
            raise ValueError(f"{name} has batch {x.shape[0]} but the context has {batch}; "
                             "use cache.expand(n) for n candidates per input")

    def _check_length(self, length: int) -> None:
        if length > self.config.max_seq_len:
            raise ValueError(f"context length {length} exceeds max_seq_len={self.config.max_seq_len}; "
                             "raise max_seq_len in the TransformerConfig")


def _prediction_block(block: TransformerBlock, h: Tensor, k_ctx: Tensor, v_ctx: Tensor, positions: Tensor,
                      mask: Tensor, causal_offset: int, modulation: Optional[Modulation], query_block: int) -> Tensor:
    """One block on the prediction stream ``h [B,S,D]``: attend to the cached context and to itself."""
    shift_a, scale_a, shift_f, scale_f = modulation if modulation is not None else (None,) * 4
    q, k, v = block.attn.split_heads(modulate(block.attn_norm(h), shift_a, scale_a))
    # Prediction i's query and its own key share position i + 1, so the self-score needs no rotation.
    rotated_q = block.attn.rope(q, positions)
    h = h + block.attn.merge(attention_with_self(rotated_q, k_ctx, v_ctx, k, v, mask, q_self=q,
                                                 causal_offset=causal_offset, query_block=query_block))
    return h + block.ffn(modulate(block.ffn_norm(h), shift_f, scale_f))


def _two_stream_mask(prefix: int, length: int, device: torch.device) -> Tensor:
    """``[T, T]`` mask over ``prefix`` + real + predicted tokens (``T = prefix + 2 * length``)."""
    context = prefix + length
    total = context + length
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[:context, :context] = causal_mask(context, context, device)
    mask[context:, :context] = causal_mask(length, context, device)  # prediction i sees context <= prefix + i
    mask[context:, context:] = torch.eye(length, dtype=torch.bool, device=device)  # and itself only
    return mask


def _pad_rows(modulation: Modulation, rows: int, length: int) -> Modulation:
    """Zero modulation on the first ``rows`` (context) tokens so adaLN touches only the ``length``
    predictions: each ``[B or 1, 1, D]`` becomes ``[B or 1, rows + length, D]``."""
    return tuple(torch.cat((m.new_zeros(m.shape[0], rows, m.shape[2]), m.expand(-1, length, -1)), dim=1)
                 for m in modulation)
