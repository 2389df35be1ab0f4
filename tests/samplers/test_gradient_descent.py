"""GradientDescent: exact iterates on a quadratic, momentum against torch.optim.SGD, step-size shapes,
[C, S] energies, the learnable step size."""
import pytest
import torch
from torch import nn

from samplers import CosineAnneal, GradientDescent

CURVATURE = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)


def quadratic(y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (CURVATURE * y.square()).sum(dim=1)


def test_iterates_are_exact_on_a_quadratic():
    """y_k = (1 - a h)^k y_0 per coordinate with curvature h; energies are the energies of the kept states."""
    y0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    trace = GradientDescent(0.2).run(quadratic, y0, num_steps=4)
    factors = (1 - 0.2 * CURVATURE) ** torch.arange(1, 5, dtype=torch.float64).view(4, 1, 1)
    torch.testing.assert_close(trace.states, factors * y0)
    torch.testing.assert_close(trace.energies, torch.stack([quadratic(s) for s in trace.states]))
    assert trace.info["accepted"].all() and (trace.info["acceptance_prob"] == 1).all()
    assert not trace.info["divergent"].any()


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_matches_torch_sgd(nesterov):
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    trace = GradientDescent(0.1, momentum=0.9, nesterov=nesterov).run(quadratic, y0, num_steps=6)
    parameter = nn.Parameter(y0.clone())
    optimizer = torch.optim.SGD([parameter], lr=0.1, momentum=0.9, nesterov=nesterov)
    for index in range(6):
        optimizer.zero_grad()
        quadratic(parameter).sum().backward()
        optimizer.step()
        torch.testing.assert_close(trace.states[index], parameter.detach())


def test_per_chain_and_per_element_step_sizes():
    y0 = torch.ones(2, 3, dtype=torch.float64)
    per_chain = GradientDescent(torch.tensor([0.1, 0.2], dtype=torch.float64)).run(quadratic, y0, num_steps=1)
    torch.testing.assert_close(per_chain.states[0], 1 - torch.tensor([[0.1], [0.2]], dtype=torch.float64) * CURVATURE)
    torch.testing.assert_close(per_chain.info["step_size"][0], torch.tensor([0.1, 0.2], dtype=torch.float64))
    per_element = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    trace = GradientDescent(per_element).run(quadratic, y0, num_steps=1)
    torch.testing.assert_close(trace.states[0], (1 - per_element * CURVATURE).expand(2, 3))
    torch.testing.assert_close(trace.info["step_size"][0], torch.full((2,), 0.2, dtype=torch.float64))


def test_per_position_energies_are_summed():
    """energy_fn -> [C, S]: each position descends its own energy, and the trajectory reports the sum."""
    y0 = torch.randn(2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    trace = GradientDescent(0.5).run(lambda y: 0.5 * y.square().sum(dim=2), y0, num_steps=2)
    torch.testing.assert_close(trace.states[-1], 0.25 * y0)
    torch.testing.assert_close(trace.energies[-1], 0.5 * (0.25 * y0).square().sum(dim=(1, 2)))


def test_schedule_is_applied_per_step():
    trace = GradientDescent(0.1, schedule=CosineAnneal(start_scale=1.0, end_scale=0.1)).run(
        quadratic, torch.ones(2, 3, dtype=torch.float64), num_steps=3
    )
    torch.testing.assert_close(trace.info["step_size"][:, 0], torch.tensor([0.1, 0.055, 0.01], dtype=torch.float64))


def test_learnable_step_size_is_a_parameter():
    fixed, learnable = GradientDescent(0.1), GradientDescent(0.1, learnable=True)
    assert list(fixed.parameters()) == [] and "step_size" in dict(fixed.named_buffers())
    assert [name for name, _ in learnable.named_parameters()] == ["step_size"]
    assert learnable.step_size.item() == pytest.approx(0.1)  # the raw value *is* the step size


def test_warmup_steps_are_not_kept():
    y0 = torch.ones(1, 3, dtype=torch.float64)
    trace = GradientDescent(0.1).run(quadratic, y0, num_steps=2, warmup=3)
    full = GradientDescent(0.1).run(quadratic, y0, num_steps=5)
    torch.testing.assert_close(trace.states, full.states[3:])
    assert trace.warmup_info["step_size"].shape == (3, 1)


def test_the_step_size_floor_is_the_samplers_own():
    """``min_step_size``: the step taken is max(step size, floor); the parameter itself is never edited, its
    gradient flows while it is above the floor, and without a floor a non-positive step is refused."""
    energy = lambda y: 0.5 * (y ** 2).sum(dim=1)  # noqa: E731  grad = y
    y0 = torch.ones(2, 3)
    sampler = GradientDescent(-1.0, learnable=True, min_step_size=0.1)
    out = sampler.run(energy, y0, num_steps=1)
    torch.testing.assert_close(out.final_state, 0.9 * y0)  # y - 0.1 * y
    assert float(sampler.step_size.detach()) == -1.0
    above = GradientDescent(0.5, learnable=True, min_step_size=0.1)
    above.run(energy, y0, num_steps=1, differentiable=True).final_state.sum().backward()
    assert float(above.step_size.grad) == pytest.approx(-6.0)  # d/da sum(y - a y) = -sum(y)
    with pytest.raises(ValueError, match="step_size must be finite and positive"):
        GradientDescent(-1.0).run(energy, y0, num_steps=1)
    with pytest.raises(ValueError, match="min_step_size must be None or > 0"):
        GradientDescent(1.0, min_step_size=0.0)
    follower = GradientDescent(2.0)
    follower.tie_step_size(sampler)  # one Parameter, and the floor it trains under
    assert follower.step_size is sampler.step_size and follower.min_step_size == 0.1
    follower.floor_step_size(0.5)
    assert follower.min_step_size == 0.1  # a floor already set is kept
    with pytest.raises(ValueError, match="learnable step size"):
        GradientDescent(1.0).tie_step_size(GradientDescent(1.0))
