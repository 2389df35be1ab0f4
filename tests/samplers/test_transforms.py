"""Stability transforms with every kind of sampler, and the refusal of detailed-balance breakers."""
import pytest
import torch

from samplers import HMC, MALA, ClampGradient, ClampState, Detach, GradientDescent, Langevin, LangevinNoise


def steep(y: torch.Tensor) -> torch.Tensor:
    return 50.0 * y.square().sum(dim=1)  # gradient 100 y


def test_absolute_gradient_clamp():
    y0 = torch.ones(2, 3, dtype=torch.float64)
    trace = GradientDescent(0.1, transforms=[ClampGradient(2.0)]).run(steep, y0, num_steps=1)
    torch.testing.assert_close(trace.states[0], y0 - 0.1 * 2.0)


def test_gradient_clamp_relative_to_the_step_size():
    """Bound max_value / a: no element moves more than max_value per step, whatever the step size."""
    y0 = torch.ones(2, 3, dtype=torch.float64)
    step_size = torch.tensor([0.1, 0.01], dtype=torch.float64)
    trace = GradientDescent(step_size, transforms=[ClampGradient(0.05, relative_to_step_size=True)]).run(
        steep, y0, num_steps=1)
    torch.testing.assert_close(trace.states[0], y0 - 0.05)


def test_state_clamp_with_langevin(generator):
    trace = Langevin(0.5, transforms=[ClampState(-0.2, 0.3)]).run(steep, torch.zeros(16, 3), num_steps=20,
                                                                 generator=generator)
    assert trace.states.min() >= -0.2 and trace.states.max() <= 0.3
    assert (trace.states == 0.3).any() and (trace.states == -0.2).any()


def test_langevin_noise_scale(generator):
    """On a flat energy, k steps of injected noise have variance k sigma^2 (4000 x 2 draws: 5% is > 3 sd)."""
    flat = lambda y: 0.0 * y.sum(dim=1)  # noqa: E731
    trace = GradientDescent(0.1, transforms=[LangevinNoise(0.3)]).run(flat, torch.zeros(4000, 2), num_steps=4,
                                                                       generator=generator)
    assert abs(trace.states[-1].var() / (4 * 0.09) - 1) < 0.05


def test_detach_transform_equals_detach_between_steps():
    energy_weight = torch.tensor(2.0, requires_grad=True)
    energy = lambda y: energy_weight * y.pow(4).sum(dim=1)  # noqa: E731
    y0 = torch.ones(2, 2, dtype=torch.float32)
    by_flag = GradientDescent(0.01).run(energy, y0, num_steps=3, differentiable=True, detach_between_steps=True)
    by_transform = GradientDescent(0.01, transforms=[Detach()]).run(energy, y0, num_steps=3, differentiable=True)
    torch.testing.assert_close(by_flag.states, by_transform.states)
    (a,) = torch.autograd.grad(by_flag.final_state.sum(), energy_weight)
    (b,) = torch.autograd.grad(by_transform.final_state.sum(), energy_weight)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("make_sampler", [lambda t: MALA(0.1, transforms=t), lambda t: HMC(0.1, 3, transforms=t)])
@pytest.mark.parametrize("transform", [ClampState(-1.0, 1.0), LangevinNoise(0.1)])
def test_metropolis_samplers_refuse_state_transforms(make_sampler, transform):
    with pytest.raises(ValueError, match="detailed balance"):
        make_sampler([transform])


def test_metropolis_samplers_accept_gradient_clamp_and_detach(generator):
    for sampler in (MALA(0.1, transforms=[ClampGradient(1.0), Detach()]), HMC(0.1, 3, transforms=[ClampGradient(1.0)])):
        trace = sampler.run(steep, torch.zeros(2, 3), num_steps=3, generator=generator)
        assert torch.isfinite(trace.states).all()


@pytest.mark.parametrize("make", [lambda: ClampGradient(0.0), lambda: ClampState(), lambda: ClampState(1.0, 0.0),
                                  lambda: LangevinNoise(-1.0)])
def test_bad_arguments(make):
    with pytest.raises(ValueError):
        make()


def test_transforms_must_be_transform_objects():
    with pytest.raises(TypeError, match="Transform"):
        GradientDescent(0.1, transforms=[lambda g: g])
