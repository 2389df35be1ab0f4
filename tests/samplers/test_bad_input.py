"""Bad input fails at entry with an error that names the problem and the fix; a chain that wanders into a
non-finite region is handled per chain (see also test_hmc / test_mala / test_langevin)."""
import pytest
import torch

from samplers import HMC, MALA, GradientDescent, Langevin

SAMPLERS = {
    "gradient_descent": lambda step_size=0.1: GradientDescent(step_size),
    "langevin": lambda step_size=0.1: Langevin(step_size),
    "mala": lambda step_size=0.1: MALA(step_size),
    "hmc": lambda step_size=0.1: HMC(step_size, 2),
}
Y0 = torch.zeros(4, 3)


def energy_fn(y: torch.Tensor) -> torch.Tensor:
    return 0.5 * y.square().sum(dim=1)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("wrong", [lambda y: energy_fn(y).sum(), lambda y: energy_fn(y)[:2],
                                   lambda y: y.square().unsqueeze(-1)])
def test_wrong_energy_shape(name, wrong):
    with pytest.raises(ValueError, match=r"energy_fn returned shape .* expected \[C\]"):
        SAMPLERS[name]().run(wrong, Y0, num_steps=2)


@pytest.mark.parametrize("name", SAMPLERS)
def test_step_size_that_does_not_broadcast(name):
    message = r"step_size of shape \(5,\) does not broadcast to the state of shape \(4, 3\)"
    with pytest.raises(ValueError, match=message):
        SAMPLERS[name](torch.ones(5)).run(energy_fn, Y0, num_steps=2)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_energy_at_the_start(name, bad_value):
    def energy(y):
        return energy_fn(y) + torch.tensor([0.0, bad_value, 0.0, 0.0])

    with pytest.raises(ValueError, match=r"non-finite energy at the initial state for chains \[1\]"):
        SAMPLERS[name]().run(energy, Y0, num_steps=2)


@pytest.mark.parametrize("name", SAMPLERS)
def test_non_positive_step_size(name):
    with pytest.raises(ValueError, match="step_size must be finite and positive"):
        SAMPLERS[name](torch.tensor([0.1, -0.1, 0.1, 0.1])).run(energy_fn, Y0, num_steps=2)


def test_per_element_step_size_cannot_be_adapted():
    with pytest.raises(ValueError, match="per-element step size"):
        HMC(torch.full((4, 3), 0.1)).run(energy_fn, Y0, num_steps=2, warmup=5)
    trace = HMC(torch.full((4, 3), 0.1), adapt_step_size=False).run(energy_fn, Y0, num_steps=2, warmup=5)
    assert trace.states.shape == (2, 4, 3)


@pytest.mark.parametrize("kwargs,match", [({"num_steps": 0}, "num_steps"), ({"num_steps": 2, "warmup": -1}, "warmup"),
                                          ({"num_steps": 2, "thin": 3}, "thin"),
                                          ({"num_steps": 2, "differentiable": True, "truncate": 3}, "truncate")])
def test_bad_run_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientDescent(0.1).run(energy_fn, Y0, **kwargs)


@pytest.mark.parametrize("y0,error", [([[0.0, 1.0]], TypeError), (torch.zeros(2, 3, dtype=torch.long), TypeError),
                                      (torch.zeros(0, 3), ValueError)])
def test_bad_initial_state(y0, error):
    with pytest.raises(error, match="initial state"):
        GradientDescent(0.1).run(energy_fn, y0, num_steps=2)


def test_bad_sampler_arguments():
    for make, match in [(lambda: HMC(0.1, 0), "num_leapfrog_steps"), (lambda: MALA(0.1, target_accept=1.0), "target"),
                        (lambda: GradientDescent(0.1, momentum=1.0), "momentum"),
                        (lambda: GradientDescent(0.1, nesterov=True), "nesterov"),
                        (lambda: HMC(max_energy_error=0.0), "max_energy_error")]:
        with pytest.raises(ValueError, match=match):
            make()


def test_bad_inverse_mass_and_temperature():
    with pytest.raises(ValueError, match="inverse_mass must be finite and positive"):
        HMC(inverse_mass=torch.tensor([1.0, 0.0, 1.0])).run(energy_fn, Y0, num_steps=2)
    with pytest.raises(ValueError, match="inverse_mass of shape"):
        HMC(inverse_mass=torch.ones(2)).run(energy_fn, Y0, num_steps=2)
    with pytest.raises(ValueError, match="temperature"):
        Langevin(0.1, temperature=-1.0).run(energy_fn, Y0, num_steps=2)
