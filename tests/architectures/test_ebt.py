import pytest
import torch

from architectures.ebt import EBT
from architectures.heads import QuadraticEnergyHead
from architectures.transformer import TransformerConfig

DIM = 16


def _ebt(step_conditioning=None, dtype=torch.float64, seed=0, **overrides) -> EBT:
    torch.manual_seed(seed)
    config = TransformerConfig(**{"dim": DIM, "num_layers": 2, "num_heads": 2, "max_seq_len": 16, **overrides})
    model = EBT(config, step_conditioning=step_conditioning).to(dtype)
    if step_conditioning == "adaln":  # move the zero-initialised modulation off zero so it matters
        for linear in model.step_modulation:
            torch.nn.init.normal_(linear.weight, std=0.2)
    return model


def _streams(batch=2, length=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, length, DIM, generator=g, dtype=dtype),
            torch.randn(batch, length, DIM, generator=g, dtype=dtype))


def _cached(model, real, predicted, step=None):
    if model.step_conditioning == "time_token":
        return model.energies(model.encode_context(real, step_index=step), predicted)
    return model.energies(model.encode_context(real), predicted, step)


@pytest.mark.parametrize("conditioning,step", [(None, None), ("adaln", 3), ("time_token", 2)])
def test_cached_path_equals_full_computation_float32(conditioning, step):
    model = _ebt(conditioning, dtype=torch.float32)
    real, predicted = _streams(dtype=torch.float32)
    full = model(real, predicted, step)
    assert full.shape == (2, 6)
    torch.testing.assert_close(_cached(model, real, predicted, step), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["cached", "full"])
def test_no_leakage(path):
    model = _ebt()
    real, predicted = _streams(length=5)
    energy = (lambda r, p: _cached(model, r, p)) if path == "cached" else model
    base = energy(real, predicted)
    for j in range(5):
        bumped_real, bumped_pred = real.clone(), predicted.clone()
        bumped_real[:, j] += 1.0
        bumped_pred[:, j] += 1.0
        after_real, after_pred = energy(bumped_real, predicted), energy(real, bumped_pred)
        for i in range(5):
            real_changed = not torch.equal(after_real[:, i], base[:, i])
            pred_changed = not torch.equal(after_pred[:, i], base[:, i])
            assert real_changed == (j <= i), f"energy {i} vs real token {j}"
            assert pred_changed == (j == i), f"energy {i} vs prediction {j}"


def test_incremental_context_equals_encoding_from_scratch():
    for conditioning, step in [(None, None), ("time_token", 1)]:
        model = _ebt(conditioning)
        real, predicted = _streams(length=7)
        whole = model.encode_context(real, step_index=step)
        cache = model.encode_context(real[:, :3], step_index=step)
        for t in range(3, 7):
            cache = model.encode_context(real[:, t:t + 1], cache=cache)
            # Generation: score only the newest position against the grown cache.
            torch.testing.assert_close(model.energies(cache, predicted[:, t:t + 1]), model(real[:, :t + 1],
                                       predicted[:, :t + 1], step)[:, -1:])
        assert cache.length == 7 and cache.prefix == (1 if conditioning else 0)
        for a, b in zip(cache.keys + cache.values, whole.keys + whole.values):
            torch.testing.assert_close(a, b)


def test_expand_scores_several_candidates_per_input():
    model = _ebt()
    real, _ = _streams(batch=2)
    candidates = torch.randn(6, 6, DIM, dtype=torch.float64)  # 3 candidates for each of 2 inputs
    expanded = model.energies(model.encode_context(real).expand(3), candidates)
    torch.testing.assert_close(expanded, model(real.repeat_interleave(3, 0), candidates))
    with pytest.raises(ValueError, match="expand"):
        model.energies(model.encode_context(real), candidates)


def test_parameter_gradients_flow_through_the_cache_and_match_the_full_path():
    model = _ebt()
    real, predicted = _streams()
    cached_grads = torch.autograd.grad(_cached(model, real, predicted).square().sum(), list(model.parameters()))
    full_grads = torch.autograd.grad(model(real, predicted).square().sum(), list(model.parameters()))
    for a, b in zip(cached_grads, full_grads):
        torch.testing.assert_close(a, b)
    # The last block's FFN only transforms predictions; its first attention sees the context: both nonzero.
    assert cached_grads[0].abs().sum() > 0


def test_adaln_starts_unconditioned_and_only_touches_predictions():
    plain, adaln = _ebt(), _ebt("adaln")
    for linear in adaln.step_modulation:
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    adaln.load_state_dict(plain.state_dict(), strict=False)
    real, predicted = _streams()
    torch.testing.assert_close(adaln(real, predicted, 0), plain(real, predicted))
    conditioned = _ebt("adaln")
    cache = conditioned.encode_context(real)  # one context serves every step index
    first, later = conditioned.energies(cache, predicted, 0), conditioned.energies(cache, predicted, 5)
    assert not torch.allclose(first, later)
    per_row = conditioned.energies(cache, predicted, torch.tensor([0, 5]))
    torch.testing.assert_close(per_row, torch.stack((first[0], later[1])))


def test_time_token_context_depends_on_the_step():
    model = _ebt("time_token")
    real, predicted = _streams()
    zero, one = model.encode_context(real, step_index=0), model.encode_context(real, step_index=1)
    assert not torch.allclose(zero.keys[0], one.keys[0])
    assert not torch.allclose(model.energies(zero, predicted), model.energies(one, predicted))
    with pytest.raises(ValueError, match="encode_context"):
        model.energies(zero, predicted, 1)
    with pytest.raises(ValueError, match="step_index=k"):
        model.encode_context(real)
    with pytest.raises(ValueError, match="keeps its own"):
        model.encode_context(real[:, :1], cache=zero, step_index=1)


def test_step_index_misuse_is_rejected():
    real, predicted = _streams()
    with pytest.raises(ValueError, match="no step conditioning"):
        _ebt().energies(_ebt().encode_context(real), predicted, 1)
    with pytest.raises(ValueError, match="needs step_index"):
        _ebt("adaln")(real, predicted)
    with pytest.raises(ValueError, match="outside"):
        _ebt("adaln")(real, predicted, 16)
    torch.manual_seed(0)
    few = EBT(TransformerConfig(dim=DIM, num_layers=1, num_heads=2), step_conditioning="adaln",
              num_step_embeddings=4).double()
    assert few.step_embed.num_embeddings == 4
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        few(real, predicted, 4)
    with pytest.raises(ValueError, match="step_conditioning"):
        EBT(TransformerConfig(dim=DIM, num_layers=1, num_heads=2), step_conditioning="film")


def test_bad_shapes_are_rejected():
    model = _ebt()
    real, predicted = _streams()
    cache = model.encode_context(real[:, :3])
    with pytest.raises(ValueError, match="context length"):
        model.energies(cache, predicted)
    with pytest.raises(ValueError, match=r"\[B, S, D\]"):
        model.encode_context(real[..., :4])
    with pytest.raises(ValueError, match="max_seq_len"):
        model.encode_context(torch.randn(1, 17, DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="as many predictions"):
        model(real, predicted[:, :2])
    with pytest.raises(ValueError, match="n >= 1"):
        cache.expand(0)


def test_energy_head_is_interchangeable():
    torch.manual_seed(0)
    config = TransformerConfig(dim=DIM, num_layers=1, num_heads=2)
    model = EBT(config, head=QuadraticEnergyHead(DIM)).double()
    real, predicted = _streams()
    energies = model.energies(model.encode_context(real), predicted)
    assert energies.shape == (2, 6) and (energies >= 0).all()


@pytest.mark.parametrize("conditioning,path", [(None, "cached"), (None, "full"), ("adaln", "cached"),
                                               ("time_token", "cached")])
def test_second_order_gradients_float64(second_order, request, conditioning, path):
    """Against finite differences. The uncached path must never reach the fused kernel (refused here); the
    cached path runs its context stream on it (``EBT.context_attention = "fused"``, first order only), which
    would raise if anything differentiated it twice -- and the finite differences confirm the outer gradient."""
    if path == "full":
        request.getfixturevalue("no_fused_attention")
    model = _ebt(conditioning, dim=8, max_seq_len=8)
    g = torch.Generator().manual_seed(3)
    real, y0, target = (torch.randn(2, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    step = None if conditioning is None else 1
    if path == "full":
        energy_fn = lambda y: model(real, y, step)  # noqa: E731
    else:  # the context is re-encoded per evaluation so that finite differences see the parameter change
        energy_fn = lambda y: _cached(model, real, y, step)  # noqa: E731
    second_order(model, energy_fn, y0, target)


def test_per_step_backward_through_leaf_cache_equals_one_backward_of_the_summed_loss():
    model = _ebt()
    real, y0 = _streams()
    target = torch.randn_like(y0)

    def step_losses(cache):
        y = y0
        for _ in range(3):  # state detached between steps: each step's loss needs only its own graph
            y = y.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(model.energies(cache, y).sum(), y, create_graph=True)
            y = y - 0.5 * grad
            yield (y - target).pow(2).sum()

    sum(step_losses(model.encode_context(real))).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    cache = model.encode_context(real)
    leaves = cache.as_leaves()
    for loss in step_losses(leaves):
        loss.backward()
    cache.backward_from(leaves)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)
    with pytest.raises(ValueError, match="no gradient"):
        cache.backward_from(cache.as_leaves())


def _outer_gradients(conditioning, **backbone_settings):
    """float64 training loss and every parameter's outer gradient of a 4xs System 1 EBT (2 steps) on one batch."""
    from energyflow.models import TextEBM
    from energyflow.objectives import EBTObjective, RandomNoise
    from energyflow.tasks import EBTLanguageModelTask
    from samplers import GradientDescent

    torch.manual_seed(0)
    config = TransformerConfig.from_preset("4xs", max_seq_len=32)
    backbone = EBT(config, step_conditioning=conditioning, **backbone_settings)
    task = EBTLanguageModelTask(TextEBM(backbone, 64), EBTObjective(GradientDescent(50.0, learnable=True),
                                                                    num_steps=2, initial_state=RandomNoise(1.0)))
    task = task.double()
    windows = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(0))
    loss, _ = task.loss({"tokens": windows[:, :-1], "targets": windows[:, 1:]}, step=0,
                        generator=torch.Generator().manual_seed(0))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in task.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("conditioning", [None, "adaln", "time_token"])
def test_the_fused_context_stream_keeps_every_outer_gradient_float64(conditioning):
    """The real stream is differentiated once (the descent differentiates w.r.t. the candidate only), so its
    self-attention may run the fused kernel, which has no double backward: were it ever differentiated twice,
    this would raise. In float64 the training loss and every parameter's outer gradient, second-order terms
    included, equal the math path's to rounding."""
    math_loss, math_grads = _outer_gradients(conditioning, context_attention="math")
    fused_loss, fused_grads = _outer_gradients(conditioning, context_attention="fused")
    assert torch.allclose(fused_loss, math_loss, rtol=1e-12, atol=0)
    assert math_grads.keys() == fused_grads.keys() and "objective.sampler.step_size" in math_grads
    for name, grad in math_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("conditioning", [None, "adaln", "time_token"])
def test_causal_query_blocks_keep_the_loss_and_every_outer_gradient_float64(conditioning):
    """The prediction stream's queries in causal blocks (``EBT.query_block``) against one block: in float64 the
    training loss and every parameter's outer gradient, second order included, agree to rounding; the time
    token shifts the causal offset by its prefix."""
    whole_loss, whole_grads = _outer_gradients(conditioning, query_block=1000)
    blocked_loss, blocked_grads = _outer_gradients(conditioning, query_block=3)  # 16 predictions: blocks of 3, 3, 3, 3, 3 and 1
    assert torch.allclose(blocked_loss, whole_loss, rtol=1e-12, atol=0)
    assert whole_grads.keys() == blocked_grads.keys()
    for name, grad in whole_grads.items():
        torch.testing.assert_close(blocked_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("query_block", [0, -2, 2.5, True])
def test_a_bad_query_block_is_refused_by_name(query_block):
    with pytest.raises(ValueError, match="query_block must be an int >= 1"):
        EBT(TransformerConfig(dim=DIM, num_layers=1, num_heads=2, max_seq_len=16), query_block=query_block)
