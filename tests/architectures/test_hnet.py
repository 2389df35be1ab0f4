"""The H-Net model: causality, incremental decoding, initialisation, gradients, configuration errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from architectures.hnet import HNet, HNetConfig, HNetLM, HNetStage, Router


def tiny_config(stages: int = 1, **overrides) -> HNetConfig:
    if stages == 1:
        sizes = dict(dims=(16, 24), num_heads=(2, 2), encoder_layers=(1,), decoder_layers=(1,), compression=(3.0,))
    else:
        sizes = dict(dims=(16, 16, 24), num_heads=(2, 2, 2), encoder_layers=(1, 1), decoder_layers=(1, 1),
                     compression=(2.0, 2.0))
    return HNetConfig(**{**sizes, "main_layers": 1, "max_seq_len": 64, **overrides})


def tiny_lm(stages: int = 1, *, seed: int = 0, dtype=torch.float32, **overrides) -> HNetLM:
    """A tiny LM whose routers are randomised so that boundaries fall at about half the positions (the
    identity-initialised router of an untrained model marks few boundaries, which would test little)."""
    torch.manual_seed(seed)
    model = HNetLM(tiny_config(stages, **overrides)).to(dtype)
    with torch.no_grad():
        for router in (m for m in model.modules() if isinstance(m, Router)):
            router.query.weight.normal_()
            router.key.weight.normal_()
    return model


def record_routing(model: HNetLM) -> list:
    """Forward hooks that store each stage's per-position probabilities ``[B, L]`` on every call."""
    calls: list = []
    for router in (m for m in model.modules() if isinstance(m, Router)):
        router.register_forward_hook(lambda module, args, output: calls.append(output.detach()))
    return calls


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
def test_causality_bit_identical_float32(stages, grad):
    """Math attention path (what runs under autograd, and here forced without it too): bit-identical."""
    model = tiny_lm(stages, attention_backend="math")
    _check_causality(model, grad, exact=True)


@pytest.mark.parametrize("stages", [1, 2])
def test_causality_on_the_fused_inference_path(stages):
    """The fused kernel (the no-graph default) blocks keys by the key count, which is the data-dependent
    chunk count, so later bytes may perturb earlier outputs in the last float32 bits (never more):
    routing, being computed at fixed byte-level shapes, stays bit-identical."""
    _check_causality(tiny_lm(stages), False, exact=False)


def _check_causality(model: HNetLM, grad: bool, exact: bool) -> None:
    routing = record_routing(model)
    tokens = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(3))
    with torch.set_grad_enabled(grad):
        base = model(tokens)
    base_routing = list(routing)
    chunk_counts_changed = False
    for t in (0, 7, 19, 33, 46):
        routing.clear()
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(0, 256, changed[:, t + 1:].shape, generator=torch.Generator().manual_seed(t))
        with torch.set_grad_enabled(grad):
            out = model(changed)
        if exact:
            assert torch.equal(out[:, : t + 1], base[:, : t + 1])
        else:
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=1e-5, atol=1e-5)
        # Stage 0 positions are bytes; an inner stage's are chunks, of which those starting at <= t are fixed.
        outer_b, base_b = routing[0] > 0.5, base_routing[0] > 0.5
        assert torch.equal(routing[0][:, : t + 1], base_routing[0][:, : t + 1])
        assert torch.equal(outer_b[:, : t + 1], base_b[:, : t + 1])
        if len(routing) == 2 and exact:
            fixed = int(base_b[:, : t + 1].sum(1).min())
            assert torch.equal(routing[1][:, :fixed], base_routing[1][:, :fixed])
        chunk_counts_changed |= not torch.equal(outer_b.sum(1), base_b.sum(1))
    assert chunk_counts_changed  # the main network really ran on other chunk counts (shapes) meanwhile


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("ema,grad", [("vectorized", True), ("scan", True), ("vectorized", False)])
def test_incremental_decoding_equals_the_full_forward_pass(stages, ema, grad):
    model = tiny_lm(stages, dtype=torch.float64, ema=ema)
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(4))
    with torch.set_grad_enabled(grad):  # no grad: the fused attention kernel with the masked cache
        full, routing = model.forward_with_routing(tokens)
        state, steps = model.init_state(3), []
        for t in range(tokens.shape[1]):
            logits, state = model.step(tokens[:, t : t + 1], state)
            steps.append(logits)
    assert all(0.2 < float(stats.boundary_fraction) < 0.8 for stats in routing)  # rows diverge: a real test
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="one position per row"):
        model.step(tokens[:, :2], model.init_state(3))


@pytest.mark.parametrize("stages", [1, 2])
def test_scan_and_vectorized_ema_give_the_same_model(stages):
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    vectorized = tiny_lm(stages, dtype=torch.float64, ema="vectorized")(tokens)
    scan = tiny_lm(stages, dtype=torch.float64, ema="scan")(tokens)
    torch.testing.assert_close(vectorized, scan, rtol=1e-10, atol=1e-10)


def test_initialisation_identity_router_zero_residual_and_pad():
    model = HNetLM(tiny_config(2, dims=(16, 24, 32)))
    stages = [m for m in model.modules() if isinstance(m, HNetStage)]
    assert len(stages) == 2
    for stage in stages:
        eye = torch.eye(stage.router.query.weight.shape[0])
        assert torch.equal(stage.router.query.weight, eye) and torch.equal(stage.router.key.weight, eye)
        assert torch.equal(stage.residual.weight, torch.zeros_like(stage.residual.weight))
        assert stage.pad is not None and stage.pad.shape == (8,)
    # Equal widths need no pad.
    assert HNetStage(tiny_config(1, dims=(16, 16)), 0).pad is None


@pytest.mark.parametrize("stages", [1, 2])
def test_router_projections_get_gradient_from_the_language_model_loss_alone(stages):
    model = tiny_lm(stages)
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(6))
    logits = model(tokens[:, :-1])  # no ratio loss anywhere in this graph
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert len(routers) == stages
    for router in routers:
        assert router.query.weight.grad.abs().sum() > 0 and router.key.weight.grad.abs().sum() > 0
    assert all(stage.pad.grad.abs().sum() > 0 for stage in model.modules() if isinstance(stage, HNetStage)
               and stage.pad is not None)


def test_routing_stats_per_stage():
    model = tiny_lm(2)
    routing = record_routing(model)
    _, stats = model.forward_with_routing(torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(7)))
    assert len(stats) == 2
    outer = routing[0]
    assert float(stats[0].boundary_fraction) == pytest.approx(float((outer > 0.5).float().mean()))
    assert float(stats[0].mean_probability.detach()) == pytest.approx(float(outer.mean()))
    assert stats[0].ratio_loss.requires_grad and stats[1].ratio_loss.requires_grad


def test_bad_configurations_and_inputs_are_rejected():
    with pytest.raises(ValueError, match="1 or 2 stages"):
        HNetConfig(dims=(16, 16, 16, 16), num_heads=(2,) * 4, encoder_layers=(1, 1, 1), decoder_layers=(1, 1, 1),
                   compression=(2.0,) * 3)
    with pytest.raises(ValueError, match="dims needs 2 entries"):
        HNetConfig(dims=(16,), num_heads=(2,), encoder_layers=(1,), decoder_layers=(1,), compression=(6.0,))
    with pytest.raises(ValueError, match="must not decrease"):
        tiny_config(1, dims=(24, 16))
    with pytest.raises(ValueError, match="even width"):
        tiny_config(1, dims=(18, 24))
    with pytest.raises(ValueError, match="ema must be"):
        tiny_config(1, ema="cumsum")
    with pytest.raises(ValueError, match="at least one layer"):
        HNetLM(tiny_config(1, main_layers=0))
    model = HNet(tiny_config(1))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 65, 16))
    with pytest.raises(ValueError, match=r"\[B, L, 16\]"):
        model(torch.zeros(1, 5, 8))
    with pytest.raises(ValueError, match="integer tensor"):
        HNetLM(tiny_config(1))(torch.zeros(1, 5))


def test_config_fields_reach_every_stack():
    config = tiny_config(2, ffn_multiplier=2.0, rope_theta=500.0, norm_eps=1e-3, init="normal")
    model = HNet(config)
    stacks = [m for m in model.modules() if m.__class__.__name__ == "CausalStack"]
    assert len(stacks) == 5  # 2 encoders, 2 decoders, 1 main network
    for stack in stacks:
        block = stack.blocks[0]
        dim = block.ffn.gate.in_features
        assert block.ffn.gate.out_features == 2 * dim
        assert stack.norm.eps == 1e-3 and block.attn_norm.eps == 1e-3
        head_dim = block.attn.rope.inv_freq.shape[0] * 2
        expected = torch.tensor(500.0 ** (-2 / head_dim), dtype=torch.float64)
        torch.testing.assert_close(block.attn.rope.inv_freq[1], expected)
    weights = torch.cat([s.blocks[0].attn.qkv.weight.detach().flatten() for s in stacks])
    assert abs(float(weights.std()) - 0.02) < 0.002  # "normal": N(0, 0.02), not xavier
