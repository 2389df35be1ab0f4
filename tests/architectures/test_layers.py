import pytest
import torch
from torch import nn

from architectures.layers import (RMSNorm, RotaryEmbedding, SelfAttention, SwiGLU, _GatedSiLU, attention, attention_bias,
                                  attention_with_self, causal_mask, init_linear, select_backend, zero_init)


def _qkv(seed=0, batch=2, heads=2, length=5, head_dim=4, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, head_dim, generator=g, dtype=dtype, requires_grad=requires_grad)
            for _ in range(3)]


def test_rmsnorm_unit_rms_and_gain():
    norm = RMSNorm(6, eps=0.0)
    x = torch.randn(3, 6, dtype=torch.float64) * 5
    norm.double()
    torch.testing.assert_close(norm(x).pow(2).mean(-1), torch.ones(3, dtype=torch.float64))
    with torch.no_grad():
        norm.weight.fill_(2.0)
    torch.testing.assert_close(norm(x).pow(2).mean(-1), torch.full((3,), 4.0, dtype=torch.float64))


def _composite_rmsnorm(x, weight, eps):
    """The textbook formula, differentiated by autograd op by op: the reference for the fused node."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_rmsnorm_first_and_second_derivatives_equal_the_composite_formula():
    """RMSNorm's hand-derived backward-of-backward against autograd's own on the textbook formula.

    Float64, a non-trivial upstream gradient and a gain that is not 1: every term of the second derivative
    (through the normalizer r(x) and n = x r) must match to rounding, or EBT training would silently lose
    second-order terms.
    """
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(7, eps=1e-3).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(7, generator=g, dtype=torch.float64) + 0.5)
    x0 = torch.randn(3, 4, 7, generator=g, dtype=torch.float64) * 2
    upstream = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    probe = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)

    def second_order(fn):
        x = x0.clone().requires_grad_(True)
        (grad_x,) = torch.autograd.grad((fn(x) * upstream).sum(), x, create_graph=True)
        outer = torch.autograd.grad((grad_x * probe).sum(), (x, norm.weight))
        return (grad_x.detach(), *outer)

    fused = second_order(norm)
    composite = second_order(lambda x: _composite_rmsnorm(x, norm.weight, norm.eps))
    for got, want in zip(fused, composite):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_rmsnorm_gradcheck_and_gradgradcheck():
    norm = RMSNorm(5, eps=1e-2).double()
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    assert torch.autograd.gradgradcheck(norm, (x,))


def test_rmsnorm_third_derivative_equals_the_composite_formula():
    """A third derivative (create_graph through the hand-written second-order node) stays exact."""
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(5, eps=1e-3).double()
    x0 = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    up1, up2 = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) for _ in range(2))

    def third_order(fn):
        x = x0.clone().requires_grad_(True)
        (g1,) = torch.autograd.grad((fn(x) * up1).sum(), x, create_graph=True)
        (g2,) = torch.autograd.grad((g1 * g1 * up2).sum(), x, create_graph=True)
        return torch.autograd.grad(g2.pow(2).sum(), x)[0]

    torch.testing.assert_close(third_order(norm), third_order(lambda x: _composite_rmsnorm(x, norm.weight, norm.eps)),
                               rtol=1e-9, atol=1e-10)


def test_rmsnorm_low_precision_input_is_normalised_in_float32():
    norm = RMSNorm(6)
    x = (torch.randn(4, 6, generator=torch.Generator().manual_seed(0)) * 300).to(torch.bfloat16)
    expected = _composite_rmsnorm(x.float(), 1.0, norm.eps).to(torch.bfloat16) * norm.weight
    # Statistics in float32, rounded to bfloat16 once: at most one bfloat16 ulp (2^-7 relative) apart.
    torch.testing.assert_close(norm(x), expected, rtol=2**-7, atol=0)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    def score(pq, pk):
        return (rope(q, torch.tensor([pq])) * rope(k, torch.tensor([pk]))).sum()
    torch.testing.assert_close(score(3, 1), score(10, 8))
    torch.testing.assert_close(score(0, -1), score(7, 6))  # negative positions (the EBT's time token) work
    assert not torch.allclose(score(3, 1), score(3, 2))
    # Per-batch positions [B, T] rotate each row by its own positions.
    x = torch.randn(2, 1, 3, 8, dtype=torch.float64)
    per_row = rope(x, torch.tensor([[0, 1, 2], [5, 6, 7]]))
    torch.testing.assert_close(per_row[1:], rope(x[1:], torch.tensor([5, 6, 7])))


def _composite_rope(x, positions, inv_freq):
    """The textbook rotation (half-split layout), left to autograd's generic graph."""
    angles = positions.to(x.dtype).unsqueeze(-1) * inv_freq.to(x.dtype)
    angles = angles.unsqueeze(1) if angles.dim() == 3 else angles  # [B, T] positions: one rotation per row
    cos, sin = angles.cos(), angles.sin()
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


@pytest.mark.parametrize("positions", [torch.arange(1, 6), torch.tensor([[0, 1, 2, 3, 4], [7, 3, 9, 2, 5]])])
def test_rope_rotation_node_equals_the_composite_formula_to_third_order(positions):
    """The one-node rotation (its backward the rotation by the opposite angle) against autograd on the formula:
    values, first, second and third derivatives. Same products and two-term sums, so float64 agrees to the
    last bit in practice; the tolerance only leaves room for a differently ordered sum."""
    g = torch.Generator().manual_seed(3)
    rope = RotaryEmbedding(6)
    x0 = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    up1, up2 = (torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64) for _ in range(2))

    def orders(fn):
        x = x0.clone().requires_grad_(True)
        y = fn(x)
        (g1,) = torch.autograd.grad((y.sin() * up1).sum(), x, create_graph=True)
        (g2,) = torch.autograd.grad((g1 * g1 * up2).sum(), x, create_graph=True)
        (g3,) = torch.autograd.grad(g2.pow(2).sum(), x)
        return y, g1, g2, g3

    for ours, reference in zip(orders(lambda x: rope(x, positions)),
                               orders(lambda x: _composite_rope(x, positions, rope.inv_freq))):
        torch.testing.assert_close(ours, reference, rtol=1e-14, atol=1e-14)


def test_rope_backward_is_the_inverse_rotation():
    """The rotation is orthogonal: its vector-Jacobian product of the output is the input back."""
    rope, positions = RotaryEmbedding(8), torch.arange(4)
    x = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    y = rope(x, positions)
    (back,) = torch.autograd.grad(y, x, grad_outputs=y.detach())
    torch.testing.assert_close(back, x.detach(), rtol=1e-14, atol=1e-14)


def test_rope_rejects_odd_head_width():
    with pytest.raises(ValueError, match="even head width"):
        RotaryEmbedding(5)


def test_swiglu_is_bias_free_and_gated():
    ffn = SwiGLU(4, 6)
    assert all(layer.bias is None for layer in (ffn.gate, ffn.up, ffn.down))
    x = torch.randn(2, 4)
    expected = ffn.down(torch.nn.functional.silu(ffn.gate(x)) * ffn.up(x))
    torch.testing.assert_close(ffn(x), expected)


def _gate_orders(gate, a0, u0, up1, up2, third=True):
    """Value, first, second (and third) derivatives of ``gate(a, u)`` w.r.t. both inputs, float64."""
    a, u = a0.clone().requires_grad_(True), u0.clone().requires_grad_(True)
    y = gate(a, u)
    first = torch.autograd.grad((y.sin() * up1).sum(), (a, u), create_graph=True)
    second = torch.autograd.grad((first[0] * first[1] * up2 + first[0].square()).sum(), (a, u), create_graph=third)
    if not third:  # the second-order backward without a graph: the fused silu_backward path
        return (y, *first, *second)
    third_order = torch.autograd.grad((second[0].pow(2) + second[0] * second[1]).sum(), (a, u))
    return (y, *first, *second, *third_order)


@pytest.mark.parametrize("third", [False, True])
def test_gated_silu_node_equals_the_composite_formula_to_third_order(third):
    """The one-node gate silu(a) * u against autograd on the formula (wide inputs, so silu's curvature matters):
    values and every derivative to third order, w.r.t. both a and u, through both of its backward's branches
    (no graph: fused silu_backward; a graph: differentiable ops). Float64, relative to each result's scale:
    different but equivalent formulas, so agreement is to rounding (1e-18-1e-15 seen), not bit for bit."""
    g = torch.Generator().manual_seed(0)
    a0, u0 = (3 * torch.randn(3, 4, 7, generator=g, dtype=torch.float64) for _ in range(2))
    up1, up2 = (torch.randn(3, 4, 7, generator=g, dtype=torch.float64) for _ in range(2))
    ours = _gate_orders(lambda a, u: _GatedSiLU.apply(a, u)[0], a0, u0, up1, up2, third)
    reference = _gate_orders(lambda a, u: torch.nn.functional.silu(a) * u, a0, u0, up1, up2, third)
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12 * theirs.abs().max().item())


def test_gated_silu_first_order_is_pytorchs_bit_for_bit():
    """Without a graph (a Transformer++ step) the gate's gradients are PyTorch's own, to the last bit."""
    g = torch.Generator().manual_seed(1)
    a, u, upstream = (torch.randn(4, 9, 16, generator=g) for _ in range(3))
    grads = []
    for gate in (lambda a, u: _GatedSiLU.apply(a, u)[0], lambda a, u: torch.nn.functional.silu(a) * u):
        leaves = a.clone().requires_grad_(True), u.clone().requires_grad_(True)
        gate(*leaves).backward(upstream)
        grads.append([leaf.grad for leaf in leaves])
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(*grads))


def test_math_and_fused_attention_agree():
    q, k, v = _qkv()
    mask = causal_mask(5, 5)
    torch.testing.assert_close(attention(q, k, v, mask, backend="math"), attention(q, k, v, mask, backend="fused"))


def test_auto_backend_picks_math_whenever_a_graph_is_built():
    q, k, v = _qkv(requires_grad=True)
    assert select_backend("auto", q, k, v) == "math"
    with torch.no_grad():
        assert select_backend("auto", q, k, v) == "fused"
    assert select_backend("auto", *(t.detach() for t in (q, k, v))) == "fused"
    with pytest.raises(ValueError, match="backend"):
        select_backend("flash", q)


def test_auto_attention_is_double_differentiable(no_fused_attention):
    # The fixture makes the fused kernel raise, so this passes only if "auto" chose the math path.
    q, k, v = _qkv(batch=1, heads=1, length=3, head_dim=2, requires_grad=True)
    mask = causal_mask(3, 3)
    assert torch.autograd.gradgradcheck(lambda a, b, c: attention(a, b, c, mask), (q, k, v))


def test_fused_path_runs_without_a_graph(fused_calls):
    calls = fused_calls
    q, k, v = _qkv()
    with torch.no_grad():
        attention(q, k, v, None)
    assert calls == [1]


def test_attention_with_self_equals_masked_two_stream_attention():
    q, k_self, v_self = _qkv(seed=1)
    _, k_ctx, v_ctx = _qkv(seed=2, length=7)
    ctx_mask = causal_mask(5, 7)  # query s sees context keys <= s + 2
    full_mask = torch.cat((ctx_mask, torch.eye(5, dtype=torch.bool)), dim=1)
    expected = attention(q, torch.cat((k_ctx, k_self), 2), torch.cat((v_ctx, v_self), 2), full_mask, backend="math")
    torch.testing.assert_close(attention_with_self(q, k_ctx, v_ctx, k_self, v_self, ctx_mask), expected)


@pytest.mark.parametrize("queries,keys,block", [(5, 5, 1), (5, 5, 2), (5, 7, 2), (5, 7, 3), (6, 9, 4)])
def test_causal_query_blocks_equal_the_whole_attention_to_second_order(queries, keys, block):
    """Blocks skip only keys of weight exactly zero: float64 forward, gradient and the gradient of a gradient
    norm (the EBT's second order) equal the unblocked attention's to rounding (1e-12: a few ulps of sums)."""
    q, k_self, v_self = _qkv(seed=11, length=queries, requires_grad=True)
    _, k_ctx, v_ctx = _qkv(seed=12, length=keys, requires_grad=True)
    mask, inputs = causal_mask(queries, keys), (q, k_ctx, v_ctx, k_self, v_self)

    def second_order(**blocks):
        out = attention_with_self(*inputs, mask, **blocks)
        (grad_q,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
        return [out, *torch.autograd.grad(grad_q.pow(2).sum() + out.sum(), inputs)]

    blocked, whole = second_order(causal_offset=keys - queries, query_block=block), second_order()
    for got, expected in zip(blocked, whole):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_each_causal_block_scores_only_the_keys_it_can_see(monkeypatch):
    import architectures.layers as layers

    seen, attend = [], layers._attend_with_self
    monkeypatch.setattr(layers, "_attend_with_self", lambda q, k_ctx, *rest: seen.append(
        (q.shape[2], k_ctx.shape[2])) or attend(q, k_ctx, *rest))
    q, k_self, v_self = _qkv(seed=14, length=7)
    _, k_ctx, v_ctx = _qkv(seed=15, length=9)
    attention_with_self(q, k_ctx, v_ctx, k_self, v_self, causal_mask(7, 9), causal_offset=2, query_block=3)
    assert seen == [(3, 5), (3, 8), (1, 9)]  # (queries, keys): query i sees keys < 2 + i + 1
    seen.clear()
    attention_with_self(q, k_ctx, v_ctx, k_self, v_self, causal_mask(7, 9))  # no promise of causality: one block
    assert seen == [(7, 9)]


def test_attention_with_self_rejects_a_query_block_below_one():
    q, k, v = _qkv(seed=13)
    with pytest.raises(ValueError, match="query_block must be >= 1"):
        attention_with_self(q, k, v, k, v, causal_mask(5, 5), causal_offset=0, query_block=0)


@pytest.mark.parametrize("backend", ["math", "fused"])
def test_additive_bias_equals_boolean_mask(backend):
    q, k, v = _qkv(seed=3)
    mask = causal_mask(5, 5)
    expected = attention(q, k, v, mask, backend=backend)
    torch.testing.assert_close(attention(q, k, v, attention_bias(mask, torch.float64), backend=backend), expected)
    # A per-batch mask [B, 1, T, T] cannot ride in the batched GEMM: the unfused branch must agree too.
    per_batch = mask.expand(2, 1, 5, 5)
    torch.testing.assert_close(attention(q, k, v, per_batch, backend=backend), expected)


def test_low_precision_attention_keeps_float32_logits():
    q, k, v = _qkv(seed=4, dtype=torch.float32)
    mask = causal_mask(5, 5)
    expected = attention(q, k, v, mask, backend="math")
    low = attention(*(t.bfloat16() for t in (q, k, v)), mask, backend="math")
    assert low.dtype == torch.bfloat16
    # bf16 inputs carry ~3 significant digits; the logits and softmax stay in float32.
    torch.testing.assert_close(low.float(), expected, atol=3e-2, rtol=3e-2)


def test_attention_bias_rejects_a_float_mask():
    with pytest.raises(ValueError, match="boolean mask"):
        attention_bias(torch.zeros(2, 2))


def test_attention_with_self_is_double_differentiable():
    q, k_self, v_self = _qkv(seed=5, batch=1, heads=1, length=3, head_dim=2, requires_grad=True)
    _, k_ctx, v_ctx = _qkv(seed=6, batch=1, heads=1, length=3, head_dim=2, requires_grad=True)
    mask = causal_mask(3, 3)
    assert torch.autograd.gradgradcheck(
        lambda *t: attention_with_self(*t, mask), (q, k_ctx, v_ctx, k_self, v_self))


def test_attention_with_self_fully_masked_row_attends_to_itself():
    q, k_self, v_self = _qkv(seed=7)
    _, k_ctx, v_ctx = _qkv(seed=8, length=4)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[0] = False  # query 0 sees no context at all
    out = attention_with_self(q * 50, k_ctx, v_ctx, k_self, v_self, mask)  # large scores test the shift
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, 0], v_self[:, :, 0])


def test_self_score_may_skip_the_shared_rotation():
    q, k_self, v_self = _qkv(seed=9, head_dim=8)
    _, k_ctx, v_ctx = _qkv(seed=10, length=7, head_dim=8)
    rope, positions = RotaryEmbedding(8), torch.arange(3, 8)
    mask = causal_mask(5, 7)
    rotated_q = rope(q, positions)
    expected = attention_with_self(rotated_q, k_ctx, v_ctx, rope(k_self, positions), v_self, mask)
    torch.testing.assert_close(attention_with_self(rotated_q, k_ctx, v_ctx, k_self, v_self, mask, q_self=q), expected)
    # Without q_self the unrotated key would be scored against the rotated query: a different result.
    assert not torch.allclose(attention_with_self(rotated_q, k_ctx, v_ctx, k_self, v_self, mask), expected)


def test_causal_mask_with_offset():
    mask = causal_mask(2, 4)
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_self_attention_with_past_equals_full_sequence():
    torch.manual_seed(0)
    layer = SelfAttention(8, 2).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    full, _ = layer(x, torch.arange(6), causal_mask(6, 6))
    head, past = layer(x[:, :4], torch.arange(4), causal_mask(4, 4))
    tail, _ = layer(x[:, 4:], torch.arange(4, 6), causal_mask(2, 6), past)
    torch.testing.assert_close(torch.cat((head, tail), 1), full)


def test_init_schemes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    init_linear(model, "xavier")
    bound = (6 / 128) ** 0.5
    assert model[0].weight.abs().max() <= bound and model[0].weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(model[0].bias) == 0
    init_linear(model, "normal", std=0.02)
    assert 0.015 < model[1].weight.std() < 0.025
    zero_init(model[1])
    assert torch.count_nonzero(model[1].weight) == 0
    with pytest.raises(ValueError, match="init scheme"):
        init_linear(model, "kaiming")


def _small_block():
    """RMSNorm -> SwiGLU -> rotation -> attention with self (every hand-derived node), float64, as a function of
    one sequence ``x [T, 8]`` to a scalar."""
    torch.manual_seed(0)
    norm, ffn, rope = RMSNorm(8).double(), SwiGLU(8, 12).double(), RotaryEmbedding(4)

    def block(x):
        length = x.shape[0]
        q = rope(ffn(norm(x)).reshape(1, length, 2, 4).transpose(1, 2), torch.arange(length))
        k = 0.5 * q
        return attention_with_self(q, k, k, q, q, causal_mask(length, length)).square().sum()

    return block


def test_torch_func_transforms_compose_with_the_hand_derived_nodes():
    """torch.func.grad, jacrev of grad (a Hessian, reverse over reverse) and vmap through every hand-derived node
    (setup_context form, generated vmap rules) equal plain autograd, float64 (1e-17 seen). A node left in the old
    form fails here with PyTorch's "must override the setup_context staticmethod"."""
    block = _small_block()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(block(x), x, create_graph=True)
    torch.testing.assert_close(torch.func.grad(block)(x.detach()), grad, rtol=1e-13, atol=1e-15)
    hessian = torch.stack([torch.autograd.grad(g, x, retain_graph=True)[0] for g in grad.flatten()]).view(5, 8, 5, 8)
    torch.testing.assert_close(torch.func.jacrev(torch.func.grad(block))(x.detach()), hessian, rtol=1e-12, atol=1e-14)
    batch = torch.randn(3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(block)(batch), torch.stack([block(row) for row in batch]))
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(block))(batch),
                               torch.stack([torch.func.grad(block)(row) for row in batch]), rtol=1e-13, atol=1e-15)


def test_torch_func_grad_of_an_ebt_energy_equals_autograd():
    from architectures import EBT, TransformerConfig

    torch.manual_seed(1)
    ebt = EBT(TransformerConfig(dim=16, num_layers=2, num_heads=2, max_seq_len=8)).double()
    cache = ebt.encode_context(torch.randn(2, 6, 16, dtype=torch.float64))
    energy = lambda predicted: ebt.energies(cache, predicted).sum()  # noqa: E731
    predicted = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(energy(predicted), predicted)
    torch.testing.assert_close(torch.func.grad(energy)(predicted.detach()), expected, rtol=1e-13, atol=1e-15)


# torch.func.jvp loads PyTorch's forward-mode decompositions through torch.jit.script, which warns as deprecated
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_through_the_hand_derived_nodes():
    """Each node's jvp rule: torch.func.jvp equals the gradient's inner product, torch.func.hessian (forward over
    reverse) equals jacrev of grad, and jacrev of hessian (a third derivative) equals reverse mode three times,
    float64 (1e-16-1e-15 seen). Nested forward mode, whose second-order terms the rules do not carry, is refused
    with a message that names the reverse-mode alternative, not answered wrongly."""
    block = _small_block()
    x = torch.randn(5, 8, dtype=torch.float64)
    tangent = torch.randn_like(x)
    _, directional = torch.func.jvp(block, (x,), (tangent,))
    torch.testing.assert_close(directional, (torch.func.grad(block)(x) * tangent).sum(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(torch.func.hessian(block)(x), torch.func.jacrev(torch.func.grad(block))(x),
                               rtol=1e-12, atol=1e-14)
    small = x[:3]
    torch.testing.assert_close(torch.func.jacrev(torch.func.hessian(block))(small),
                               torch.func.jacrev(torch.func.jacrev(torch.func.grad(block)))(small), rtol=1e-11, atol=1e-13)
    with pytest.raises(NotImplementedError, match="jacrev"):
        torch.func.jacfwd(torch.func.hessian(block))(small)
