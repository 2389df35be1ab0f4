"""The H-Net tensor operations: chunking, the two EMAs, dechunking, the straight-through factor, the ratio loss."""
from __future__ import annotations

import pytest
import torch

from architectures import hnet_ops as ops
from architectures.hnet import Router


def _boundaries(generator: torch.Generator, batch: int = 3, length: int = 12) -> torch.Tensor:
    b = torch.rand(batch, length, generator=generator) < 0.35
    b[:, 0] = True
    return b


def test_chunk_packs_ragged_rows_to_the_front():
    b = torch.tensor([[1, 0, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    h = torch.arange(10.0).view(2, 5, 1)
    chunks = ops.chunk(h, torch.rand(2, 5), b)
    assert chunks.vectors.shape == (2, 3, 1)  # M = the most chunks in any row
    assert chunks.vectors[0, :, 0].tolist() == [0.0, 2.0, 3.0]
    assert chunks.vectors[1, 0, 0] == 5.0
    assert chunks.valid.tolist() == [[True, True, True], [True, False, False]]
    assert chunks.index.tolist() == [[0, 0, 1, 2, 2], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize("with_exact_ones", [False, True])
def test_vectorized_ema_equals_the_scan_values_and_gradients(with_exact_ones):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.rand(3, 9, generator=g, dtype=torch.float64)
    p[:, 0] = 1.0  # the first chunk's probability is always 1
    if with_exact_ones:  # P = 1 inside the sequence must not produce NaN (log 0) in either pass
        p[:, 4] = 1.0
    p.requires_grad_(True)
    scan, vectorized = ops.ema_scan(z, p), ops.ema_vectorized(z, p)
    torch.testing.assert_close(vectorized, scan, rtol=1e-12, atol=1e-12)
    weights = torch.randn(scan.shape, generator=g, dtype=torch.float64)
    grads_scan = torch.autograd.grad((scan * weights).sum(), (z, p))
    grads_vec = torch.autograd.grad((vectorized * weights).sum(), (z, p))
    assert all(torch.isfinite(grad).all() for grad in grads_vec)
    torch.testing.assert_close(grads_vec[0], grads_scan[0], rtol=1e-10, atol=1e-10)
    # d/dP at an interior P = 1 exactly is the one term the clamped log drops (documented; a measure-zero
    # event, since the router's only exact 1 is the constant p_0, whose decay never enters the sum).
    interior = [k for k in range(9) if not (with_exact_ones and k == 4)]
    torch.testing.assert_close(grads_vec[1][:, interior], grads_scan[1][:, interior], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ema", [ops.ema_scan, ops.ema_vectorized])
def test_dechunk_of_chunk_returns_h_at_the_boundaries_when_probabilities_are_one(ema):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 12, 4, generator=g)
    b = _boundaries(g)
    chunks = ops.chunk(h, torch.ones(3, 12), b)
    restored = ops.dechunk(ema(chunks.vectors, chunks.probabilities), chunks.index)
    assert torch.equal(restored[b], h[b])
    # Between boundaries every position holds its chunk's first vector (a causal copy, no look-ahead).
    first_of_chunk = torch.where(b, torch.arange(12), torch.zeros((), dtype=torch.long)).cummax(dim=1).values
    assert torch.equal(restored, h.gather(1, first_of_chunk.unsqueeze(-1).expand(-1, -1, 4)))


def test_straight_through_is_the_identity_forward_and_passes_gradient_to_the_router():
    g = torch.Generator().manual_seed(2)
    router = Router(6)
    with torch.no_grad():
        router.query.weight.add_(0.3 * torch.randn(6, 6, generator=g))
    h = torch.randn(2, 10, 6, generator=g)
    values = torch.randn(2, 10, 6, generator=g)
    p = router(h)
    factor = ops.straight_through(ops.confidence(p, p > 0.5))
    out = values * factor.unsqueeze(-1)
    assert torch.equal(factor, torch.ones_like(factor)) and torch.equal(out, values)
    out.sum().backward()
    assert router.query.weight.grad.abs().sum() > 0 and router.key.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("compression", [2.0, 3.0, 6.0])
def test_ratio_loss_is_one_at_target_and_pushes_g_towards_it(compression):
    target = torch.tensor(1.0 / compression, dtype=torch.float64)
    assert float(ops.ratio_loss(target, target, compression)) == pytest.approx(1.0, abs=1e-12)
    for fraction, sign in ((0.5 * target, -1.0), (min(2.0 * target, 0.95), 1.0)):
        g = target.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(ops.ratio_loss(torch.as_tensor(fraction), g, compression), g)
        # Too few boundaries (F < 1/N): dL/dG < 0, so descent raises the probabilities; too many: lowers them.
        assert sign * float(grad) > 0
    with pytest.raises(ValueError, match="compression N must be > 1"):
        ops.ratio_loss(target, target, 1.0)


def test_routing_stats_ignore_padding_positions():
    p = torch.tensor([[1.0, 0.2, 0.9, 0.4], [1.0, 0.8, 0.3, 0.3]])
    b = p > 0.5
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    stats = ops.routing_stats(p, b, valid, 3.0)
    assert float(stats.boundary_fraction) == pytest.approx(4 / 6)
    assert float(stats.mean_probability) == pytest.approx((1.0 + 0.2 + 0.9 + 0.4 + 1.0 + 0.8) / 6)
    assert not stats.boundary_fraction.requires_grad


def test_vectorized_ema_keeps_its_weights_in_float32_for_bfloat16_inputs():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 200, 8, generator=g)
    p = 0.002 + 0.01 * torch.rand(2, 200, generator=g)  # long memories: many small decays to accumulate
    p[:, 0] = 1.0
    reference = ops.ema_scan(z.double(), p.double())
    low = ops.ema_vectorized(z.bfloat16(), p)
    assert low.dtype == torch.bfloat16
    # Only z and the final matmul are rounded to bf16 (error ~0.01 here); bf16 weights (log-decays summed in
    # bf16) measured 0.03-0.06 on this input.
    torch.testing.assert_close(low.double(), reference, rtol=0.0, atol=0.02)
