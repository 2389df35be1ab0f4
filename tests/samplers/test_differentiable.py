"""Differentiable mode: gradcheck through the unrolled steps, equality with hand-unrolled loops (full,
truncated, detached between steps), the EBT-shaped use, the cost of a run, and the refusals."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from samplers import HMC, MALA, NUTS, ClampGradient, PyroNUTS, GradientDescent, Langevin, LangevinNoise, RandomizedStepSize


class QuarticEnergy(nn.Module):
    """E(y) = sum_i w_i (y_i - m_i)^2 / 2 + (y_i^4) / 4: non-quadratic, so second-order terms matter."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.center = nn.Parameter(torch.randn(dim, generator=generator, dtype=torch.float64))
        self.weight = nn.Parameter(torch.rand(dim, generator=generator, dtype=torch.float64) + 0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.weight * (y - self.center).square() + 0.25 * y.pow(4)).sum(dim=-1)


Y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
TARGET = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def hand_unrolled(energy, step_size, num_steps, *, keep_from=0, detach=False):
    """The definition: y_{k+1} = y_k - a grad E(y_k) with create_graph; steps before ``keep_from`` without a
    graph; ``detach`` starts every step from sg(y_k)."""
    y, states = Y0, []
    for index in range(num_steps):
        keep = index >= keep_from
        y_in = y.detach().requires_grad_(True) if (detach or not keep or not y.requires_grad) else y
        (grad,) = torch.autograd.grad(energy(y_in).sum(), y_in, create_graph=keep)
        y = y_in - step_size * grad if keep else (y_in - step_size * grad).detach()
        states.append(y)
    return torch.stack(states)


def loss_of(states):
    return ((states - TARGET) ** 2).sum()  # a task loss on every step, as in EBT training


def gradients(loss, module, sampler):
    return torch.autograd.grad(loss, [*module.parameters(), sampler.step_size])


@pytest.mark.parametrize("options,keep_from,detach", [({}, 0, False), ({"truncate": 2}, 3, False),
                                                       ({"detach_between_steps": True}, 0, True)])
def test_matches_the_hand_unrolled_loop(options, keep_from, detach):
    energy, sampler = QuarticEnergy(), GradientDescent(0.1, learnable=True).double()
    trace = sampler.run(energy, Y0, num_steps=5, differentiable=True, **options)
    expected_states = hand_unrolled(energy, sampler.step_size, 5, keep_from=keep_from, detach=detach)
    torch.testing.assert_close(trace.states, expected_states)
    ours = gradients(loss_of(trace.states), energy, sampler)
    reference = gradients(loss_of(expected_states), energy, sampler)
    for got, want in zip(ours, reference, strict=True):
        torch.testing.assert_close(got, want)
    if options:  # truncation / detaching really changes the gradient
        full = hand_unrolled(energy, sampler.step_size, 5)
        assert not torch.allclose(gradients(loss_of(full), energy, sampler)[0], ours[0])


def test_truncation_keeps_only_the_last_k_steps_in_the_graph():
    energy, sampler = QuarticEnergy(), GradientDescent(0.1, learnable=True).double()
    trace = sampler.run(energy, Y0, num_steps=5, differentiable=True, truncate=2)
    parameters = [*energy.parameters(), sampler.step_size]
    early = torch.autograd.grad(trace.states[:3].sum(), parameters, retain_graph=True, allow_unused=True)
    assert all(g is None or (g == 0).all() for g in early)
    late = torch.autograd.grad(trace.states[3].sum(), parameters)
    assert all((g != 0).any() for g in late)


def test_gradcheck_through_the_steps():
    """float64 gradcheck of a loss on the final state w.r.t. the energy's parameters and the step size."""
    energy, sampler = QuarticEnergy(), GradientDescent(0.1, learnable=True).double()

    def final_loss(center, weight, step_size):
        parameters = {"center": center, "weight": weight}
        energy_fn = lambda y: functional_call(energy, parameters, (y,))  # noqa: E731
        trace = functional_call(sampler, {"step_size": step_size}, (energy_fn, Y0),
                                {"num_steps": 3, "differentiable": True})
        return ((trace.final_state - TARGET) ** 2).sum()

    inputs = (energy.center.detach().clone().requires_grad_(), energy.weight.detach().clone().requires_grad_(),
              torch.tensor(0.1, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(final_loss, inputs)


def test_langevin_matches_its_hand_unrolled_loop():
    energy = QuarticEnergy()
    trace = Langevin(0.05, temperature=0.5).run(energy, Y0, num_steps=3, differentiable=True,
                                                generator=torch.Generator().manual_seed(4))
    generator, y = torch.Generator().manual_seed(4), Y0.requires_grad_(False)
    for _ in range(3):
        y_in = y if y.requires_grad else y.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(y_in).sum(), y_in, create_graph=True)
        y = y_in - 0.05 * grad + (2 * 0.05 * 0.5) ** 0.5 * torch.randn(y.shape, generator=generator, dtype=y.dtype)
    torch.testing.assert_close(trace.final_state, y)
    ours = torch.autograd.grad(trace.final_state.sum(), list(energy.parameters()))
    for got, want in zip(ours, torch.autograd.grad(y.sum(), list(energy.parameters())), strict=True):
        torch.testing.assert_close(got, want)


def test_one_forward_and_one_backward_per_step():
    """K steps: K energy+gradient evaluations for y_0..y_{K-1} and one forward for y_K's energy."""
    energy, calls = QuarticEnergy(), []

    def counting(y):
        calls.append(y.requires_grad)
        return energy(y)

    GradientDescent(0.1, learnable=True).double().run(counting, Y0, num_steps=4, differentiable=True)
    assert len(calls) == 5


def test_ebt_shaped_run_trains_everything():
    """y0: random logits [B, S, V]; energy [B, S]; randomized step, relative gradient clamp and learnable
    Langevin noise, as an EBT recipe would compose them. Every learnable reaches a finite gradient."""
    generator = torch.Generator().manual_seed(5)
    head = nn.Linear(6, 1)
    energy_fn = lambda logits: head(torch.softmax(logits, dim=-1)).squeeze(-1)  # noqa: E731
    noise = LangevinNoise(0.1, learnable=True)
    sampler = GradientDescent(2.0, learnable=True, schedule=RandomizedStepSize(2.0),
                              transforms=[ClampGradient(0.5, relative_to_step_size=True), noise])
    trace = sampler.run(energy_fn, torch.randn(2, 5, 6, generator=generator), num_steps=2, differentiable=True,
                        generator=generator)
    assert trace.states.shape == (2, 2, 5, 6) and trace.energies.shape == (2, 2)
    loss = nn.functional.cross_entropy(trace.states.flatten(0, 2), torch.zeros(20, dtype=torch.long))
    loss.backward()
    for parameter in [head.weight, sampler.step_size, noise.scale]:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0


@pytest.mark.parametrize("sampler", [MALA(0.1), HMC(0.1, 3)])
def test_metropolis_samplers_refuse(sampler):
    with pytest.raises(ValueError, match="not differentiable"):
        sampler.run(QuarticEnergy(), Y0, num_steps=2, differentiable=True)


def test_truncate_and_detach_need_differentiable():
    with pytest.raises(ValueError, match="differentiable=True"):
        GradientDescent(0.1).run(QuarticEnergy(), Y0, num_steps=3, truncate=1)
    with pytest.raises(ValueError, match="differentiable=True"):
        GradientDescent(0.1).run(QuarticEnergy(), Y0, num_steps=3, detach_between_steps=True)


def test_differentiable_run_keeps_its_graph_under_an_outer_no_grad():
    energy, sampler = QuarticEnergy(), GradientDescent(0.1, learnable=True).double()
    with torch.no_grad():
        trace = sampler.run(energy, Y0, num_steps=2, differentiable=True)
    assert trace.final_state.requires_grad


def test_non_differentiable_run_builds_no_graph():
    energy, sampler = QuarticEnergy(), GradientDescent(0.1, learnable=True).double()
    trace = sampler.run(energy, Y0, num_steps=3)
    assert not trace.states.requires_grad and not trace.energies.requires_grad


@pytest.mark.parametrize("sampler_class", [GradientDescent, Langevin])
def test_final_energy_value_drops_only_the_last_energys_graph(sampler_class):
    """``final_energy="value"``: E(y_T) is evaluated under no_grad (the energy function sees grad mode off
    once, on the last call) and carries no graph; the states, the other energies and every gradient of a loss
    on the states are exactly those of the default run."""
    energy = QuarticEnergy()
    grad_modes = []

    def energy_fn(y):
        grad_modes.append(torch.is_grad_enabled())
        return energy(y)

    def run(final_energy):
        sampler = sampler_class(0.05).double()
        generator = torch.Generator().manual_seed(3)
        trace = sampler.run(energy_fn, Y0, num_steps=3, differentiable=True, generator=generator,
                            final_energy=final_energy)
        loss = (trace.states - TARGET).square().sum()
        return trace, torch.autograd.grad(loss, list(energy.parameters()), retain_graph=True)

    (default, default_grads), calls = run("graph"), len(grad_modes)
    lean, lean_grads = run("value")
    assert grad_modes[:calls] == [True] * calls and grad_modes[calls:] == [True] * (calls - 1) + [False]
    def last_energy_grad(trace):  # a stacked row always has a grad_fn: ask what reaches the parameters
        grads = torch.autograd.grad(trace.energies[-1].sum(), list(energy.parameters()), allow_unused=True,
                                    retain_graph=True)
        return sum(0.0 if g is None else float(g.abs().sum()) for g in grads)

    assert last_energy_grad(default) > 0 and last_energy_grad(lean) == 0.0
    torch.testing.assert_close(lean.states, default.states, rtol=0, atol=0)
    torch.testing.assert_close(lean.energies, default.energies, rtol=0, atol=0)
    for lean_grad, default_grad in zip(lean_grads, default_grads):
        torch.testing.assert_close(lean_grad, default_grad, rtol=0, atol=0)


def test_final_energy_graph_default_keeps_a_loss_on_the_last_energy():
    """By default a loss on E(y_T) reaches the energy's parameters through y_T (matches the hand-unrolled loop)."""
    energy = QuarticEnergy()
    trace = GradientDescent(0.05).double().run(energy, Y0, num_steps=2, differentiable=True)
    got = torch.autograd.grad(trace.energies[-1].sum(), energy.center)[0]
    expected = torch.autograd.grad(energy(hand_unrolled(energy, 0.05, 2)[-1]).sum(), energy.center)[0]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("sampler_class", [GradientDescent, Langevin])
def test_final_energy_skip_never_scores_the_last_state(sampler_class):
    """``final_energy="skip"``: the energy function is called T times instead of T + 1 (never at y_T),
    ``energies[-1]`` is NaN, the last step is not flagged divergent for it, and the states, the other
    energies and every gradient of a loss on the states equal the default run's exactly."""
    energy = QuarticEnergy()
    calls = []

    def energy_fn(y):
        calls.append(y.detach().clone())
        return energy(y)

    def run(final_energy):
        calls.clear()
        sampler = sampler_class(0.05).double()
        trace = sampler.run(energy_fn, Y0, num_steps=3, differentiable=True,
                            generator=torch.Generator().manual_seed(3), final_energy=final_energy)
        loss = (trace.states - TARGET).square().sum()
        return trace, torch.autograd.grad(loss, list(energy.parameters())), len(calls)

    default, default_grads, default_calls = run("graph")
    skipped, skipped_grads, skipped_calls = run("skip")
    assert (default_calls, skipped_calls) == (4, 3)  # y_0, y_1, y_2 (+ y_3 by default)
    assert not any(torch.equal(y, skipped.states[-1].detach()) for y in calls)
    assert torch.isnan(skipped.energies[-1]).all() and torch.isfinite(default.energies[-1]).all()
    assert not skipped.info["divergent"].any()
    torch.testing.assert_close(skipped.states, default.states, rtol=0, atol=0)
    torch.testing.assert_close(skipped.energies[:-1], default.energies[:-1], rtol=0, atol=0)
    for got, want in zip(skipped_grads, default_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_final_energy_skip_still_flags_a_non_finite_last_state():
    steep = lambda y: 1e300 * y.square().sum(-1)  # noqa: E731  one step of size 1 overflows float64
    trace = GradientDescent(1.0).double().run(steep, Y0, num_steps=2, final_energy="skip")
    assert not torch.isfinite(trace.states[-1]).all(dim=-1).any()
    assert trace.info["divergent"][-1].all()  # the unscored last state itself is non-finite: a divergence


def test_final_energy_skip_is_refused_by_metropolis_samplers_and_bad_values_are_named():
    energy = QuarticEnergy()
    with pytest.raises(ValueError, match="accept/reject test"):
        MALA(0.1).double().run(energy, Y0, num_steps=2, final_energy="skip")
    with pytest.raises(ValueError, match="final_energy must be 'graph', 'value' or 'skip'"):
        GradientDescent(0.1).double().run(energy, Y0, num_steps=2, final_energy=False)
    with pytest.raises(ValueError, match="PyroNUTS needs the energy of every state"):
        PyroNUTS().run(energy, Y0.float(), num_steps=2, final_energy="skip")
    with pytest.raises(ValueError, match="NUTS needs the energy of its last proposal"):
        NUTS().run(energy, Y0.float(), num_steps=2, final_energy="skip")
