import pytest
import torch

from architectures.transformer import PRESETS, KVCache, TransformerConfig, TransformerPP

VOCAB = 11


def _tiny(**overrides) -> TransformerConfig:
    return TransformerConfig(**{"dim": 16, "num_layers": 2, "num_heads": 2, "max_seq_len": 32, **overrides})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_the_paper_shapes(name):
    layers, heads, width = PRESETS[name]
    config = TransformerConfig.from_preset(name, max_seq_len=256)
    with torch.device("meta"):  # no memory: xl alone would be ~1e9 parameters
        model = TransformerPP(config, vocab_size=VOCAB)
    assert len(model.blocks) == layers
    block = model.blocks[0]
    assert block.attn.num_heads == heads
    assert block.attn.qkv.weight.shape == (3 * width, width)
    assert block.ffn.gate.weight.shape == (width, width)  # FFN hidden = width without a multiplier
    assert model.head.proj.weight.shape == (VOCAB, width)
    assert all(p.dim() != 1 or "norm" in n for n, p in model.named_parameters())  # no biases anywhere


def test_preset_table_matches_the_paper():
    assert PRESETS == {"4xs": (2, 2, 128), "3xs": (4, 4, 256), "xxs": (6, 6, 384), "xs": (12, 6, 384),
                       "small": (12, 12, 768), "medium": (24, 16, 1024), "large": (24, 16, 1536),
                       "xl": (24, 32, 2048)}


def test_ffn_width_options_and_bad_configs():
    assert _tiny().hidden == 16
    assert _tiny(ffn_multiplier=2.5).hidden == 40
    assert _tiny(ffn_multiplier=2.5, ffn_hidden=24).hidden == 24
    assert TransformerPP(_tiny(ffn_hidden=24), VOCAB).blocks[0].ffn.up.weight.shape == (24, 16)
    with pytest.raises(ValueError, match="unknown preset"):
        TransformerConfig.from_preset("huge")
    with pytest.raises(ValueError, match="even width"):
        TransformerConfig(dim=12, num_heads=4)


def test_init_scheme_is_configurable():
    torch.manual_seed(0)
    xavier = TransformerPP(_tiny(init="xavier"), VOCAB).blocks[0].attn.out.weight
    normal = TransformerPP(_tiny(init="normal"), VOCAB).blocks[0].attn.out.weight
    assert xavier.std() > 0.2 and 0.01 < normal.std() < 0.03  # xavier std for 16x16 is 1/4


def test_head_is_untied():
    model = TransformerPP(_tiny(), VOCAB)
    assert model.head.proj.weight.data_ptr() != model.embed.weight.data_ptr()


def test_causal_and_incremental_decoding_equals_full_pass():
    torch.manual_seed(0)
    model = TransformerPP(_tiny(), VOCAB).double()
    tokens = torch.randint(0, VOCAB, (3, 9))
    full = model(tokens)
    cache = KVCache()
    steps = [model(tokens[:, i:i + 1], cache) for i in range(9)]
    torch.testing.assert_close(torch.cat(steps, 1), full)
    assert cache.length == 9
    # A prompt chunk then single tokens gives the same too.
    cache = KVCache()
    chunked = torch.cat([model(tokens[:, :5], cache)] + [model(tokens[:, i:i + 1], cache) for i in range(5, 9)], 1)
    torch.testing.assert_close(chunked, full)
    # Causality: changing token 6 leaves logits 0..5 untouched.
    altered = tokens.clone()
    altered[:, 6] = (altered[:, 6] + 1) % VOCAB
    torch.testing.assert_close(model(altered)[:, :6], full[:, :6])
    assert not torch.allclose(model(altered)[:, 6], full[:, 6])


def test_incremental_decoding_under_no_grad_uses_the_fused_kernel_consistently():
    torch.manual_seed(0)
    model = TransformerPP(_tiny(), VOCAB)
    tokens = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache()
        steps = torch.cat([model(tokens[:, i:i + 1], cache) for i in range(6)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)  # float32 rounding


def test_bad_inputs_are_rejected():
    model = TransformerPP(_tiny(max_seq_len=8), VOCAB)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="vocab_size"):
        TransformerPP(_tiny(), 0)


def test_second_order_gradients_float64(second_order, no_fused_attention):
    # State = input embeddings; energy = logsumexp of the logits per position (a smooth scalar per chain).
    torch.manual_seed(0)
    model = TransformerPP(_tiny(dim=8, num_heads=2), VOCAB).double()
    y0 = torch.randn(2, 4, 8, dtype=torch.float64)
    target = torch.randn(2, 4, 8, dtype=torch.float64)
    energy_fn = lambda y: model.forward_embeddings(y).logsumexp(-1).sum(-1)  # noqa: E731
    second_order(model, energy_fn, y0, target)


def test_rope_theta_and_norm_eps_reach_the_layers():
    torch.manual_seed(0)
    base = TransformerPP(_tiny(), VOCAB)
    changed = TransformerPP(_tiny(rope_theta=100.0, norm_eps=1e-3), VOCAB)
    changed.load_state_dict(base.state_dict())
    assert changed.blocks[0].attn_norm.eps == 1e-3 and changed.head.norm.eps == 1e-3
    tokens = torch.randint(0, VOCAB, (1, 6))
    assert not torch.allclose(changed(tokens), base(tokens))


def test_attention_backend_can_be_forced(fused_calls):
    calls = fused_calls
    tokens = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        TransformerPP(_tiny(attention_backend="math"), VOCAB)(tokens)
    assert calls == []  # "math" even where "auto" would have chosen the fused kernel
    TransformerPP(_tiny(attention_backend="fused"), VOCAB)(tokens)
    assert len(calls) == 2  # "fused" even with a graph (first-order training of the baseline)


def test_attention_backend_override_trains_on_the_fused_kernel(fused_calls):
    """``TransformerPP(attention_backend='fused')`` (what the baseline recipe binds) runs the fused kernel even
    while a graph is built, gives the math path's logits and gradients to float32 rounding, and leaves the
    shared config alone."""
    config = _tiny()
    torch.manual_seed(0)
    math_model = TransformerPP(config, VOCAB)
    torch.manual_seed(0)
    fused_model = TransformerPP(config, VOCAB, attention_backend="fused")
    assert fused_model.config.attention_backend == "fused" and config.attention_backend == "auto"
    tokens = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (math_model, fused_model):
        before = len(fused_calls)
        logits = model(tokens)
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()))
        losses[-1].backward()
        assert len(fused_calls) - before == (config.num_layers if model is fused_model else 0)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(math_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="attention_backend must be"):
        TransformerPP(config, VOCAB, attention_backend="flash")
