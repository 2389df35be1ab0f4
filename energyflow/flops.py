"""Analytic FLOP counts of the Transformer++ and the text EBT, and the peak they are measured against (MFU).

A multiply-add is 2 FLOPs. Per token of a sequence of length ``S`` through ``L`` blocks of width ``d`` holding
``N`` parameters (attention and MLP matrices; norms and biases are negligible), the **forward** costs

    C(S) = 2 N + 2 L S d

``2 N`` for the matrix multiplies, ``2 L S d`` for the attention scores and the weighted values (``4 L d`` per
attended position, causal: on average ``S / 2`` positions). The vocabulary matrices add ``2 d V`` per token: the
Transformer++'s output head; the EBT's candidate projection (distribution ``[V]`` -> ``d``) at every descent
step. A backward pass costs twice its forward (the gradients of the activations and of the weights); a backward
to the *inputs* only (the EBT's descent gradient at inference) costs about one forward.

Training step, per token:
- Transformer++: ``3 (C + 2 d V)`` (forward + backward).
- EBT with ``K`` descent steps: the context stream's forward and backward, ``3 C``; per step the prediction
  stream's forward ``C + 2 d V``, its backward to the candidate (activation gradients only: ``C + 2 d V``), kept
  as a graph, and the loss's backward through both at twice their cost: ``6 (C + 2 d V)`` per step. In all
  ``3 C + 6 K (C + 2 d V)`` -- 15 C for ``K = 2`` at small ``V``, 5 Transformer++ passes: the arithmetic floor
  of the EBT's step. ``tests/energyflow/test_flops.py`` checks these counts against
  ``torch.utils.flop_counter.FlopCounterMode`` (which counts the attention's full square, not its causal half).
Inference: Transformer++ decoding ``C + 2 d V`` per token; EBT thinking, per step and candidate, a forward and
an input-gradient backward of the prediction stream, ``2 (C + 2 d V)``, plus the context stream once.

MFU = achieved model FLOPs per second / peak FLOPs per second. The peak: on CUDA the device's dense bf16 table
value (``CUDA_PEAKS``, by device name; ``None`` for an unknown device), on CPU a measured one
(``measured_cpu_peak``: the best of a few float32 matmuls at the current thread count), so CPU MFU says how close
a step runs to what this machine's BLAS reaches, not to a datasheet.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

# Dense bf16 tensor-core peaks (FLOP/s), from the vendors' datasheets (SXM parts; no sparsity).
CUDA_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
              "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


@dataclass(frozen=True)
class Shape:
    """What the count needs: block parameters ``N``, layers ``L``, width ``d``, vocabulary ``V``, context ``S``."""

    parameters: int
    layers: int
    width: int
    vocab: int
    context: int


def forward_per_token(shape: Shape) -> float:
    """``C(S)``: one token's forward through the blocks (no vocabulary matrices)."""
    return 2.0 * shape.parameters + 2.0 * shape.layers * shape.context * shape.width


def vocab_per_token(shape: Shape) -> float:
    return 2.0 * shape.width * shape.vocab


def transformer_train_per_token(shape: Shape) -> float:
    return 3.0 * (forward_per_token(shape) + vocab_per_token(shape))


def ebt_train_per_token(shape: Shape, descent_steps: int) -> float:
    prediction = forward_per_token(shape) + vocab_per_token(shape)
    return 3.0 * forward_per_token(shape) + 6.0 * descent_steps * prediction


def ebt_thinking_per_token(shape: Shape, steps: int, candidates: int = 1) -> float:
    """One prediction's thinking: the context once, then per step and candidate a forward and input backward."""
    prediction = forward_per_token(shape) + vocab_per_token(shape)
    return forward_per_token(shape) + 2.0 * steps * candidates * prediction


def shape_of(model: nn.Module, context: int) -> Optional[Shape]:
    """The ``Shape`` of a ``TransformerPP`` or ``TextEBM`` (``None`` for another model)."""
    network = getattr(model, "backbone", model)
    config, blocks = getattr(network, "config", None), getattr(network, "blocks", None)
    vocab = getattr(model, "vocab_size", None)
    if config is None or blocks is None or vocab is None:
        return None
    parameters = sum(p.numel() for p in blocks.parameters())
    return Shape(parameters, config.num_layers, config.dim, int(vocab), int(context))


@functools.lru_cache(maxsize=None)
def _cpu_peak(threads: int, size: int, repeats: int) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def measured_cpu_peak(size: int = 512, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` float32 ``size x size`` matmuls (after one warm-up) at the current
    number of threads: this machine's attainable peak for the MFU denominator on CPU (measured once per thread
    count and process, ~10 ms)."""
    return _cpu_peak(torch.get_num_threads(), size, repeats)


def cuda_peak(device: torch.device) -> Optional[float]:
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in CUDA_PEAKS.items() if key in name), None)


def device_peak(device: torch.device) -> Optional[float]:
    return cuda_peak(device) if device.type == "cuda" else measured_cpu_peak()
