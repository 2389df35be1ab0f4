"""The EBT with an H-Net context stream: the prediction stream reads the H-Net's cache exactly as in the
two-stream EBT, nothing leaks, and second-order gradients through unrolled descent are exact."""
from __future__ import annotations

import pytest
import torch

from architectures import hnet_ops as ops
from architectures.ebt import EBT, ContextCache
from architectures.hnet import HNet, HNetConfig, Router
from architectures.hnet_ebt import HNetContextCache, HNetContextEBT
from architectures.transformer import TransformerConfig
from tests.architectures.conftest import unrolled_loss

DIM = 8


def _model(stages: int = 1, seed: int = 0, step_conditioning=None) -> HNetContextEBT:
    torch.manual_seed(seed)
    if stages == 1:
        hnet_config = HNetConfig(dims=(DIM, 12), num_heads=(2, 2), encoder_layers=(1,), decoder_layers=(1,),
                                 main_layers=1, compression=(2.0,), max_seq_len=16)
    else:
        hnet_config = HNetConfig(dims=(DIM, DIM, 12), num_heads=(2, 2, 2), encoder_layers=(1, 1),
                                 decoder_layers=(1, 1), main_layers=1, compression=(2.0, 2.0), max_seq_len=16)
    hnet = HNet(hnet_config)
    with torch.no_grad():  # randomised routers: boundaries at about half the positions
        for router in (m for m in hnet.modules() if isinstance(m, Router)):
            router.query.weight.normal_()
            router.key.weight.normal_()
    ebt = EBT(TransformerConfig(dim=DIM, num_layers=2, num_heads=2, max_seq_len=16),
              step_conditioning=step_conditioning)
    return HNetContextEBT(hnet, ebt).double()


def _streams(batch: int = 2, length: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, length, DIM, generator=g, dtype=torch.float64) for _ in range(3))


def test_context_cache_has_the_ebt_layout_and_the_routing():
    model = _model(2)
    real, predicted, _ = _streams()
    cache = model.encode_context(real)
    assert isinstance(cache, ContextCache) and isinstance(cache, HNetContextCache)
    assert len(cache.keys) == 2 and cache.keys[0].shape == (2, 2, 6, DIM // 2) and cache.length == 6
    assert len(cache.routing) == 2 and cache.routing[0].ratio_loss.requires_grad
    energies = model.energies(cache, predicted)
    assert energies.shape == (2, 6)
    torch.testing.assert_close(model(real, predicted), energies)
    # Several candidates per input reuse one context: expand keeps the EBT's semantics.
    expanded = model.energies(cache.expand(3), predicted.repeat_interleave(3, dim=0))
    torch.testing.assert_close(expanded, energies.repeat_interleave(3, dim=0))


def test_adaln_step_conditioning_reuses_one_context():
    model = _model(1, step_conditioning="adaln")
    with torch.no_grad():  # move the zero-initialised modulation off zero so that the step matters
        for linear in model.ebt.step_modulation:
            linear.weight.normal_(std=0.2)
    real, predicted, _ = _streams()
    cache = model.encode_context(real)
    first, second = model.energies(cache, predicted, 0), model.energies(cache, predicted, 1)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(model(real, predicted, 1), second)


def test_no_leakage_from_later_context_or_other_predictions():
    model = _model(2)
    real, predicted, _ = _streams(length=8)
    base = model(real, predicted)
    for i in (0, 3, 6):
        later = real.clone()
        later[:, i + 1:] += 1.0
        other = predicted.clone()
        other[:, torch.arange(8) != i] += 1.0
        # Prediction i sees context bytes 0..i (it predicts byte i + 1) and only itself.
        torch.testing.assert_close(model(later, predicted)[:, : i + 1], base[:, : i + 1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model(real, other)[:, i], base[:, i], rtol=1e-12, atol=1e-12)


class FrozenReferenceStraightThrough:
    """``1 + c - c_0`` with ``c_0`` the confidence seen at the unperturbed parameters (per stage).

    The straight-through factor's gradient is by design not the derivative of its forward value (a
    constant 1), so finite differences cannot check it directly. This function has value 1 at the
    unperturbed parameters and the same derivative as the straight-through factor, and its finite
    differences *are* that derivative: with it in place the float64 check covers the whole H-Net.
    """

    def __init__(self, stages: int) -> None:
        self.stages, self.calls, self.references = stages, 0, {}

    def __call__(self, confidence: torch.Tensor) -> torch.Tensor:
        key = self.calls % self.stages  # stages call it in a fixed order in every forward pass
        self.calls += 1
        reference = self.references.setdefault(key, confidence.detach().clone())
        return 1 + (confidence - reference)


@pytest.mark.parametrize("stages", [1, 2])
def test_second_order_gradients_through_two_unrolled_steps_float64(second_order, no_fused_attention, stages,
                                                                   monkeypatch):
    model = _model(stages)
    real, y0, target = _streams(length=5, seed=3)
    energy_fn = lambda y: model(real, y)  # noqa: E731  (re-encodes: finite differences see every change)
    params = list(model.parameters())
    true_ste = torch.autograd.grad(unrolled_loss(energy_fn, y0, target, 0.5), params, allow_unused=True)
    monkeypatch.setattr(ops, "straight_through", FrozenReferenceStraightThrough(stages))
    frozen = torch.autograd.grad(unrolled_loss(energy_fn, y0, target, 0.5), params, allow_unused=True)
    for a, b in zip(true_ste, frozen):  # the surrogate changes no derivative at the unperturbed point
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    second_order(model, energy_fn, y0, target)
    # The router itself is trained through the unrolled descent.
    routers = [m for m in model.hnet.modules() if isinstance(m, Router)]
    by_name = dict(zip(params, true_ste))
    assert all(by_name[r.query.weight].abs().sum() > 0 for r in routers)


def test_mismatched_widths_and_time_token_are_rejected():
    hnet = HNet(HNetConfig(dims=(16, 16), num_heads=(2, 2), encoder_layers=(1,), decoder_layers=(1,),
                           main_layers=1, compression=(2.0,)))
    with pytest.raises(ValueError, match="must equal the EBT width"):
        HNetContextEBT(hnet, EBT(TransformerConfig(dim=DIM, num_layers=1, num_heads=2)))
    with pytest.raises(ValueError, match="time-token"):
        HNetContextEBT(hnet, EBT(TransformerConfig(dim=16, num_layers=1, num_heads=2), step_conditioning="time_token"))
