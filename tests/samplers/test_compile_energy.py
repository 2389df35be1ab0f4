"""``samplers.compile_energy``: the energy-and-gradient through ``torch.compile`` equals eager autograd (to float32
rounding), serves every batch size from one compile, leaves second-order evaluations eager, and falls back to
eager with one warning where compilation fails."""
import warnings

import pytest
import torch

import samplers
from samplers import HMC
from samplers.energy import SEGMENT_STEPS, CompiledEnergy, energy_and_grad
from samplers.integrators import leapfrog
from samplers.zoo import Funnel

FUNNEL = Funnel(dim=5, scale=2.0)


@pytest.fixture(scope="module")
def compiled():
    return samplers.compile_energy(FUNNEL)


def test_equals_eager_for_every_batch_size(compiled):
    generator = torch.Generator().manual_seed(0)
    for num_chains in (64, 17, 3):  # one dynamic-shape compile serves all (delayed rejection's subsets)
        y = FUNNEL.initial_state(num_chains, generator)
        fast, eager = energy_and_grad(compiled, y), energy_and_grad(FUNNEL, y)
        torch.testing.assert_close(fast.energy, eager.energy, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.grad, eager.grad, rtol=1e-5, atol=1e-5)
        assert not fast.grad.requires_grad and not fast.energy.requires_grad
    assert compiled.disabled is None, compiled.disabled


def test_hmc_with_a_compiled_energy_follows_the_eager_chains(compiled):
    y0 = FUNNEL.initial_state(64, torch.Generator().manual_seed(1))
    runs = [HMC(0.2, 5, adapt_step_size=False, adapt_mass=False, delayed_rejection=4.0).run(
        energy, y0, num_steps=3, generator=torch.Generator().manual_seed(2)) for energy in (compiled, FUNNEL)]
    # Same randomness, the same arithmetic up to rounding: a few transitions stay together.
    torch.testing.assert_close(runs[0].states, runs[1].states, rtol=1e-4, atol=1e-4)
    assert torch.equal(runs[0].info["accepted"], runs[1].info["accepted"])


@pytest.mark.parametrize("num_steps", [1, SEGMENT_STEPS, SEGMENT_STEPS + 3])
def test_compiled_leapfrog_equals_the_eager_one(compiled, num_steps):
    # Whole segments and single steps (the remainder), a per-chain step size and a diagonal mass: the trajectory
    # is the eager leapfrog's to float32 rounding, and the inputs are left as they were.
    generator = torch.Generator().manual_seed(5)
    y = FUNNEL.initial_state(32, generator)
    momentum, grad = torch.randn(y.shape, generator=generator), energy_and_grad(FUNNEL, y).grad
    step_size, inverse_mass = 0.05 + 0.1 * torch.rand(32, 1, generator=generator), torch.rand(1, 5) + 0.5
    y_before, momentum_before = y.clone(), momentum.clone()
    runs = [leapfrog(y, momentum, grad, energy, step_size=step_size, num_steps=num_steps, inverse_mass=inverse_mass)
            for energy in (compiled, FUNNEL)]
    for fast, eager in zip(runs[0][:2] + runs[0][2][::2], runs[1][:2] + runs[1][2][::2]):  # y, p, energy, grad
        torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, y_before) and torch.equal(momentum, momentum_before)
    assert compiled.disabled is None, compiled.disabled


def test_second_order_and_validation_stay_eager(compiled):
    y = FUNNEL.initial_state(8, torch.Generator().manual_seed(3)).requires_grad_(True)
    evaluated = energy_and_grad(compiled, y, create_graph=True)
    assert evaluated.grad.requires_grad  # a graph for the differentiable mode: eager autograd
    with pytest.raises(ValueError, match="energy_fn returned shape"):
        energy_and_grad(samplers.compile_energy(lambda y: y.sum()), y.detach(), validate=True)


def test_falls_back_to_eager_with_one_warning(monkeypatch):
    def unavailable(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", unavailable)
    energy = samplers.compile_energy(FUNNEL)
    y = FUNNEL.initial_state(16, torch.Generator().manual_seed(4))
    with pytest.warns(RuntimeWarning, match="compile_energy: torch.compile is unavailable.*no C\\+\\+ compiler"):
        first = energy_and_grad(energy, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the later calls are silent and eager
        second = energy_and_grad(energy, y)
    eager = energy_and_grad(FUNNEL, y)
    assert torch.equal(first.grad, eager.grad) and torch.equal(second.energy, eager.energy)
    assert "no C++ compiler" in energy.disabled


def test_wrapping_is_idempotent_and_refuses_non_callables():
    once = samplers.compile_energy(FUNNEL)
    assert isinstance(once, CompiledEnergy) and samplers.compile_energy(once).energy_fn is FUNNEL
    with pytest.raises(TypeError, match="compile_energy needs a callable"):
        samplers.compile_energy(3.0)


def test_the_backend_comes_from_the_environment(monkeypatch):
    # aot_eager traces the same graph without generating code (the GPU suite's smoke run); an unknown backend falls
    # back to eager with the one warning, naming it.
    y = FUNNEL.initial_state(8, torch.Generator().manual_seed(6))
    eager = energy_and_grad(FUNNEL, y)
    monkeypatch.setenv("ENERGYFLOW_COMPILE_BACKEND", "aot_eager")
    assert samplers.energy.compile_backend() == "aot_eager"
    traced = energy_and_grad(samplers.compile_energy(FUNNEL), y)
    torch.testing.assert_close(traced.grad, eager.grad, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("ENERGYFLOW_COMPILE_BACKEND", "no_such_backend")
    unknown = samplers.compile_energy(FUNNEL)
    with pytest.warns(RuntimeWarning, match="compile_energy: torch.compile is unavailable.*no_such_backend"):
        assert torch.equal(energy_and_grad(unknown, y).grad, eager.grad)
