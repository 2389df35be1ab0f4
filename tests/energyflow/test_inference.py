"""The inference-time descent loop: think longer, accept only if lower, adaptive compute, noise, records."""
import pytest
import torch

from architectures import EBT, TransformerConfig
from energyflow.inference import ThinkingConfig, think, think_tokens
from energyflow.models import TextEBM
from samplers import ClampGradient, GradientDescent, LangevinNoise


def quadratic(centre: torch.Tensor):
    """Per-position energy 0.5 * |y_s - centre_s|^2 over a state [C, S, D] -> [C, S]."""
    return lambda y: 0.5 * (y - centre).pow(2).sum(-1)


def bumpy(y: torch.Tensor) -> torch.Tensor:
    """[C, S, D] -> [C, S]: a quadratic bowl with ripples, so a large step overshoots on some positions."""
    return (0.5 * y.pow(2) + torch.sin(5.0 * y)).sum(-1)


def tiny_text_ebm(seed: int = 0) -> TextEBM:
    torch.manual_seed(seed)
    config = TransformerConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=32)
    return TextEBM(EBT(config), vocab_size=256).eval()


def test_plain_thinking_equals_the_gradient_descent_sampler():
    y0 = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    energy_fn = bumpy
    ours = think(energy_fn, y0, ThinkingConfig(num_steps=6, step_size=0.05))
    reference = GradientDescent(0.05).run(energy_fn, y0, num_steps=6)
    torch.testing.assert_close(ours.state, reference.final_state)
    torch.testing.assert_close(ours.energy_trace[1:].sum(-1), reference.energies)
    assert ours.steps_run == 6 and bool((ours.steps_used == 6).all())


def test_accept_if_lower_never_increases_any_position_energy():
    y0 = torch.randn(4, 8, 3, generator=torch.Generator().manual_seed(1))
    config = dict(num_steps=10, step_size=0.6)  # large enough to overshoot the ripples
    plain = think(bumpy, y0, ThinkingConfig(**config))
    assert bool((plain.energy_trace[1:] > plain.energy_trace[:-1]).any()), "the test needs overshooting steps"
    guarded = think(bumpy, y0, ThinkingConfig(**config, accept_if_lower=True))
    assert bool((guarded.energy_trace[1:] <= guarded.energy_trace[:-1]).all())
    # Not only the bookkeeping: the returned state's true energy is no higher anywhere.
    assert bool((bumpy(guarded.state) <= bumpy(y0) + 1e-6).all())
    assert float(bumpy(guarded.state).mean()) < float(bumpy(y0).mean())


def test_accept_if_lower_on_an_ebt_holds_per_position():
    model = tiny_text_ebm()
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    # A huge step and noise make most proposals worse; the guard must keep every position's energy monotone.
    config = ThinkingConfig(num_steps=5, step_size=2000.0, noise_scale=2.0, accept_if_lower=True)
    result = think_tokens(model, tokens, config, generator=generator).thinking
    assert bool((result.energy_trace[1:] <= result.energy_trace[:-1]).all())
    recomputed = model.energy(model.encode(tokens), result.state).detach()
    torch.testing.assert_close(recomputed, result.energies, rtol=1e-5, atol=1e-5)


def test_adaptive_stopping_spends_fewer_steps_on_easy_positions():
    # Positions 0-3 start 0.01 from their minimum (easy), 4-7 start 10 away (hard); each step halves the gap.
    centre = torch.zeros(2, 8, 3)
    y0 = torch.full((2, 8, 3), 10.0)
    y0[:, :4] = 0.01
    budget = 40
    config = ThinkingConfig(num_steps=budget, step_size=0.5, energy_tolerance=1e-6)
    result = think(quadratic(centre), y0, config)
    easy, hard = result.steps_used[:, :4].float(), result.steps_used[:, 4:].float()
    assert float(easy.max()) < float(hard.min())
    assert float(result.mean_steps()) < budget
    fixed = think(quadratic(centre), y0, ThinkingConfig(num_steps=budget, step_size=0.5))
    # Stopping early costs almost nothing in the energy reached: every frozen position is within tolerance.
    assert float((result.energies - fixed.energies).abs().max()) < 1e-5


def test_gradient_tolerance_freezes_flat_positions_and_frozen_positions_never_move():
    centre = torch.zeros(1, 4, 2)
    y0 = torch.tensor([[[1e-4, 0.0], [1.0, 1.0], [1e-4, 1e-4], [3.0, 0.0]]])
    result = think(quadratic(centre), y0, ThinkingConfig(num_steps=5, step_size=0.1, grad_tolerance=1e-2))
    assert result.steps_used.tolist() == [[1, 5, 1, 5]]
    # After its one step a frozen position keeps that state: 0.9 * y0 (one step of size 0.1 on curvature 1).
    torch.testing.assert_close(result.state[0, 0], 0.9 * y0[0, 0])


def test_check_every_exits_early_with_the_same_result():
    centre = torch.zeros(2, 3, 2)
    y0 = torch.ones(2, 3, 2)
    config = dict(num_steps=100, step_size=0.5, energy_tolerance=1e-4)
    full = think(quadratic(centre), y0, ThinkingConfig(**config))
    early = think(quadratic(centre), y0, ThinkingConfig(**config, check_every=4))
    assert full.steps_run == 100 and early.steps_run < 20 and early.steps_run % 4 == 0
    torch.testing.assert_close(early.state, full.state)
    torch.testing.assert_close(early.steps_used, full.steps_used)


def test_noise_scale_adds_gaussian_noise_of_that_scale():
    # A flat energy has zero gradient, so after T steps y = y0 + sigma * sum of T standard normals.
    flat = lambda y: 0.0 * y.sum(-1)  # noqa: E731
    y0 = torch.zeros(64, 50, 1)
    sigma, steps = 0.3, 4
    result = think(flat, y0, ThinkingConfig(num_steps=steps, step_size=1.0, noise_scale=sigma),
                   generator=torch.Generator().manual_seed(0))
    samples = result.state.flatten()
    expected_var = steps * sigma ** 2
    # Independent draws: var of the sample variance is 2 var^2 / (n - 1); 5 standard errors.
    assert abs(float(samples.var()) - expected_var) < 5 * expected_var * (2 / (len(samples) - 1)) ** 0.5
    again = think(flat, y0, ThinkingConfig(num_steps=steps, step_size=1.0, noise_scale=sigma),
                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.state, result.state)


def test_transforms_apply_to_every_step():
    centre = torch.zeros(1, 1, 1)
    y0 = torch.full((1, 1, 1), 10.0)
    clamped = think(quadratic(centre), y0, ThinkingConfig(num_steps=3, step_size=1.0, transforms=(ClampGradient(0.5),)))
    torch.testing.assert_close(clamped.state, torch.full((1, 1, 1), 8.5))  # moves 0.5 per step


def test_records_follow_every_state():
    centre = torch.zeros(2, 3, 2)
    y0 = torch.ones(2, 3, 2)
    record = lambda y: y.abs().sum(-1)  # noqa: E731
    result = think(quadratic(centre), y0, ThinkingConfig(num_steps=3, step_size=0.25), record=record)
    assert result.records.shape == (4, 2, 3)
    torch.testing.assert_close(result.records[0], record(y0))
    torch.testing.assert_close(result.records[-1], record(result.state))


def test_energies_of_shape_c_are_supported():
    y0 = torch.ones(3, 2)
    result = think(lambda y: 0.5 * y.pow(2).sum(-1), y0, ThinkingConfig(num_steps=2, step_size=0.5))
    torch.testing.assert_close(result.state, 0.25 * y0)
    assert result.energy_trace.shape == (3, 3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_steps=-1, step_size=1.0), "num_steps"),
    (dict(num_steps=1, step_size=1.0, energy_tolerance=0.0), "energy_tolerance"),
    (dict(num_steps=1, step_size=1.0, check_every=0), "check_every"),
    (dict(num_steps=1, step_size=1.0, transforms=(LangevinNoise(1.0),)), "noise_scale"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ThinkingConfig(**kwargs)


def test_bad_state_and_step_size_are_refused():
    with pytest.raises(ValueError, match="step_size"):
        think(bumpy, torch.ones(1, 2, 1), ThinkingConfig(num_steps=1, step_size=-1.0))
    with pytest.raises(ValueError, match="index the state"):
        think(lambda y: y.sum(-1).sum(-1, keepdim=True).expand(-1, 5), torch.ones(1, 2, 1),
              ThinkingConfig(num_steps=1, step_size=1.0))


def test_thinking_config_takes_the_learned_step_size_and_clamps_but_not_training_noise():
    from energyflow.inference import thinking_config
    from energyflow.objectives.unrolled import EBTObjective

    sampler = GradientDescent(5.0, learnable=True, transforms=(ClampGradient(1.0), LangevinNoise(3.0)))
    config = thinking_config(EBTObjective(sampler), num_steps=7, noise_scale=0.5)
    assert config.num_steps == 7 and float(config.step_size) == 5.0 and config.noise_scale == 0.5
    assert [type(t) for t in config.transforms] == [ClampGradient]
    assert not config.step_size.requires_grad  # a copy: thinking never trains the step size
    evaluation = EBTObjective(GradientDescent(2.0), eval_sampler=GradientDescent(0.5))
    assert float(thinking_config(evaluation, num_steps=1).step_size) == 0.5
    assert float(thinking_config(evaluation, num_steps=1, step_size=9.0).step_size) == 9.0
