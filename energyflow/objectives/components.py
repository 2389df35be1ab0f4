"""Small composable pieces of the EBT objective: initial states, step counts, label smoothing, task losses.

Each is a plain object with one job, so a recipe swaps any of them with a one-line gin binding.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor


class RandomNoise:
    """Initial state y_0 ~ scale * N(0, I) (for text: random logits, softmax-normalized by the model)."""

    def __init__(self, scale: float = 1.0):
        if scale < 0:
            raise ValueError(f"RandomNoise scale must be >= 0, got {scale}")
        self.scale = float(scale)

    def __call__(
        self, shape: Sequence[int], *, device: torch.device, dtype: torch.dtype, generator: Optional[torch.Generator]
    ) -> Tensor:
        return self.scale * torch.randn(tuple(shape), device=device, dtype=dtype, generator=generator)


class Zeros:
    """Initial state y_0 = 0 (for text: the uniform distribution after the softmax)."""

    def __call__(
        self, shape: Sequence[int], *, device: torch.device, dtype: torch.dtype, generator: Optional[torch.Generator]
    ) -> Tensor:
        return torch.zeros(tuple(shape), device=device, dtype=dtype)


class InputState:
    """Initial state y_0 = the input itself, plus ``jitter * N(0, I)`` if ``jitter > 0`` (image denoising: the
    descent starts at the noisy image; a jitter re-draws the start for best-of-N self-verification). The
    objective hands it the batch's inputs (``takes_inputs``); they must have the candidate's shape."""

    takes_inputs = True

    def __init__(self, jitter: float = 0.0):
        if jitter < 0:
            raise ValueError(f"InputState jitter must be >= 0, got {jitter}")
        self.jitter = float(jitter)

    def __call__(
        self, shape: Sequence[int], *, device: torch.device, dtype: torch.dtype, generator: Optional[torch.Generator],
        inputs: Tensor,
    ) -> Tensor:
        if tuple(inputs.shape) != tuple(shape):
            raise ValueError(f"InputState starts the descent at the input, but the input {tuple(inputs.shape)} and the "
                             f"candidate {tuple(shape)} differ in shape; use RandomNoise or Zeros for this model")
        state = inputs.detach().to(device=device, dtype=dtype)
        if self.jitter > 0:
            state = state + self.jitter * torch.randn(tuple(shape), device=device, dtype=dtype, generator=generator)
        return state.clone()


class RandomNumSteps:
    """Draw the number of optimization steps uniformly from [low, high] for each training step.

    The draw depends only on (``seed``, training step): every micro-batch and every process of one optimizer
    step runs the same count (so metric names agree when they are averaged), and a resumed run draws what
    the uninterrupted run drew. Evaluation uses ``eval_num_steps`` (default ``high``): the paper's System 2
    recipe trains on 2-3 steps and evaluates at 3.
    """

    def __init__(self, low: int, high: int, eval_num_steps: Optional[int] = None, seed: int = 0):
        if not 1 <= low <= high:
            raise ValueError(f"RandomNumSteps needs 1 <= low <= high, got low={low}, high={high}")
        self.low, self.high, self.seed = int(low), int(high), int(seed)
        self.eval_num_steps = int(high if eval_num_steps is None else eval_num_steps)

    def __call__(self, step: int, training: bool) -> int:
        if not training:
            return self.eval_num_steps
        return random.Random(self.seed * 1_000_003 + step).randint(self.low, self.high)


def resolve_num_steps(num_steps: Union[int, RandomNumSteps], step: int, training: bool) -> int:
    """``num_steps`` is an int or a callable like :class:`RandomNumSteps`."""
    return int(num_steps) if isinstance(num_steps, int) else num_steps(step, training)


class LinearLabelSmoothing:
    """Label smoothing that falls linearly from ``start`` at the first step to ``end`` at the last.

    Soft targets early in the chain ask less of a prediction that has had little optimization; the last
    step is supervised with (by default) exact targets.
    """

    def __init__(self, start: float = 0.1, end: float = 0.0):
        for name, value in (("start", start), ("end", end)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"LinearLabelSmoothing {name} must be in [0, 1), got {value}")
        self.start, self.end = float(start), float(end)

    def __call__(self, step_index: int, num_steps: int) -> float:
        if num_steps == 1:
            return self.end
        fraction = step_index / (num_steps - 1)
        return self.start + (self.end - self.start) * fraction


def _at_least_float32(x: Tensor) -> Tensor:
    """Losses in float32 (bf16 states under autocast) or float64 (kept for float64 gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()


class _StateCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits ``[N, V]`` against ``targets [N]`` with label smoothing ``eps`` (the same value
    as ``F.cross_entropy``), saving only the logits for backward: the EBT's states are kept alive by the
    descent's graph anyway, so the loss at each step costs no extra ``[B, S, V]`` tensor (``F.cross_entropy``
    saves its log-softmax, one more full-vocabulary tensor per step, two with the float32 copy under bf16).
    Forward and backward run over row chunks, so the softmax is never materialized whole. The backward is first
    order (the outer loss is differentiated once); differentiating it again is refused."""

    CHUNK = 1 << 24  # elements of logits per chunk (64 MiB of float32)

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, eps: float) -> Tensor:
        rows, vocab = logits.shape
        step = max(1, _StateCrossEntropy.CHUNK // max(vocab, 1))
        total = torch.zeros((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32,
                            device=logits.device)
        for start in range(0, rows, step):
            chunk = _at_least_float32(logits[start:start + step])
            log_z = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(-1, targets[start:start + step, None]).squeeze(-1)
            nll = log_z - picked
            if eps:
                nll = (1.0 - eps) * nll + eps * (log_z - chunk.mean(dim=-1))
            total = total + nll.sum()
        ctx.save_for_backward(logits, targets)
        ctx.eps = eps
        return (total / rows).to(_at_least_float32(logits[:1]).dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        logits, targets = ctx.saved_tensors
        rows, vocab = logits.shape
        step = max(1, _StateCrossEntropy.CHUNK // max(vocab, 1))
        grad = torch.empty_like(logits)
        scale = grad_output / rows
        for start in range(0, rows, step):
            chunk = _at_least_float32(logits[start:start + step])
            part = torch.softmax(chunk, dim=-1)
            if ctx.eps:
                part = part - ctx.eps / vocab
            part.scatter_add_(-1, targets[start:start + step, None],
                              torch.full_like(part[:, :1], -(1.0 - ctx.eps)))
            grad[start:start + step] = (part * scale).to(logits.dtype)
        return grad, None, None


class CrossEntropy:
    """Task loss for a state of logits [B, S, V] against token targets [B, S] (mean over positions).

    ``fused`` (default): ``_StateCrossEntropy``, which saves no tensor beyond the state itself (the same value and
    gradient as ``F.cross_entropy`` to rounding; ``benchmarks/vocab_scale.py`` measures the EBT's step memory);
    ``fused=False``: ``F.cross_entropy``."""

    supports_label_smoothing = True

    def __init__(self, target_logit: float = 20.0, fused: bool = True):
        # The contrastive term needs the ground truth as a *state*: logits whose softmax is the one-hot
        # target to float32 precision (exp(-20) ~ 2e-9 mass off target per token).
        self.target_logit = float(target_logit)
        self.fused = bool(fused)

    def __call__(self, state: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        if state.dim() != target.dim() + 1 or state.shape[:-1] != target.shape:
            raise ValueError(
                f"CrossEntropy expects logits [B, S, V] and targets [B, S]; got {tuple(state.shape)} and "
                f"{tuple(target.shape)}"
            )
        if self.fused:
            return _StateCrossEntropy.apply(state.flatten(0, -2), target.flatten(), float(label_smoothing))
        logits = _at_least_float32(state).flatten(0, -2)
        return F.cross_entropy(logits, target.flatten(), label_smoothing=label_smoothing)

    def target_state(self, target: Tensor, like: Tensor) -> Tensor:
        """[B, S, V] logits representing the ground truth."""
        return F.one_hot(target, like.shape[-1]).to(like.dtype) * self.target_logit


class _RegressionLoss:
    supports_label_smoothing = False

    def _check(self, state: Tensor, target: Tensor, label_smoothing: float) -> None:
        if label_smoothing:
            raise ValueError(f"{type(self).__name__} is a regression loss: label smoothing does not apply")
        if state.shape != target.shape:
            raise ValueError(
                f"{type(self).__name__}: state {tuple(state.shape)} and target {tuple(target.shape)} differ"
            )

    def target_state(self, target: Tensor, like: Tensor) -> Tensor:
        return target.to(like.dtype)


class SmoothL1(_RegressionLoss):
    """Smooth-L1 between a continuous state and its target (the paper's video and image loss)."""

    def __init__(self, beta: float = 1.0):
        self.beta = float(beta)

    def __call__(self, state: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        self._check(state, target, label_smoothing)
        return F.smooth_l1_loss(_at_least_float32(state), _at_least_float32(target), beta=self.beta)


class MeanSquaredError(_RegressionLoss):
    """Mean squared error between a continuous state and its target."""

    def __call__(self, state: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        self._check(state, target, label_smoothing)
        return F.mse_loss(_at_least_float32(state), _at_least_float32(target))
