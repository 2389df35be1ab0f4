"""Shared checks for the architecture tests: a float64 second-order (unrolled descent) gradient check."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import Tensor, nn


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on shared cores: extra intra-op threads only contend (the samplers and energyflow tests do the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """Counts calls of the fused ``scaled_dot_product_attention`` kernel (one entry per call)."""
    calls: list = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def unrolled_loss(energy_fn: Callable[[Tensor], Tensor], y0: Tensor, target: Tensor, step_size: float,
                  num_steps: int = 2) -> Tensor:
    """Squared error of the state after ``num_steps`` descent steps ``y <- y - a * dE/dy`` (create_graph)."""
    y = y0.detach().requires_grad_(True)
    for _ in range(num_steps):
        (grad,) = torch.autograd.grad(energy_fn(y).sum(), y, create_graph=True)
        y = y - step_size * grad
    return (y - target).pow(2).sum()


def check_second_order(model: nn.Module, energy_fn: Callable[[Tensor], Tensor], y0: Tensor, target: Tensor, *,
                       step_size: float = 0.5, num_directions: int = 3, eps: float = 1e-5) -> None:
    """Compare d loss / d params (through two unrolled steps) with central finite differences along random
    (unit) parameter directions, in float64. Truncation error is O(eps^2) ~ 1e-10 and rounding ~ 1e-16 / eps, so a
    1e-6 relative tolerance is tight; a dropped second-order term (e.g. from a fused attention kernel
    without double backward) changes the gradient by far more."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = unrolled_loss(energy_fn, y0, target, step_size)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(num_directions):
        direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
        norm = torch.sqrt(sum(d.pow(2).sum() for d in direction))
        direction = [d / norm for d in direction]  # unit length keeps the O(eps^2) truncation error small
        analytic = sum((g * d).sum() for g, d in zip(grads, direction))
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(eps * d)
        plus = unrolled_loss(energy_fn, y0, target, step_size).detach()
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(2 * eps * d)
        minus = unrolled_loss(energy_fn, y0, target, step_size).detach()
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(eps * d)
        numeric = (plus - minus) / (2 * eps)
        torch.testing.assert_close(analytic.detach(), numeric, rtol=1e-6, atol=1e-9)
    # The check must not be vacuous: the parameters really move the unrolled loss.
    assert float(sum(g.abs().sum() for g in grads)) > 1e-6


@pytest.fixture
def no_fused_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any call to the fused kernel fail, proving the math path is what runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("fused scaled_dot_product_attention ran on a path that needs second-order grads")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse)


@pytest.fixture
def second_order():
    return check_second_order
