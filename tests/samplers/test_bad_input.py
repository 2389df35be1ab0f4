"""Bad input fails at entry with an error that names the problem and the fix; a chain that wanders into a
non-finite region is handled per chain (see also test_hmc / test_mala / test_langevin); a run whose adapted
step size diverges warns."""
import warnings

import pytest
import torch

from samplers import HMC, MALA, NUTS, GradientDescent, Langevin, PyroNUTS, SamplerWarning

SAMPLERS = {
    "gradient_descent": lambda step_size=0.1: GradientDescent(step_size),
    "langevin": lambda step_size=0.1: Langevin(step_size),
    "mala": lambda step_size=0.1: MALA(step_size),
    "hmc": lambda step_size=0.1: HMC(step_size, 2),
    "nuts": lambda step_size=0.1: NUTS(step_size, max_tree_depth=2),
}
Y0 = torch.zeros(4, 3)
# The batched samplers above and pyro's NUTS (one chain at a time; tiny trees keep it fast).
WITH_NUTS = {**SAMPLERS, "pyro_nuts": lambda step_size=0.1: PyroNUTS(step_size, max_tree_depth=2)}


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


@pytest.mark.parametrize("name", WITH_NUTS)
@pytest.mark.parametrize("y0,fix", [(torch.zeros(3), r"For one chain of 3 values use y0\[None\] \(shape \(1, 3\)\); "
                                                     r"for 3 chains of one value each, y0\[:, None\] \(shape \(3, 1\)\)"),
                                    (torch.tensor(0.0), r"For one chain of one value use y0.reshape\(1, 1\)")])
def test_start_without_a_chain_dimension(name, y0, fix):
    shape = str(tuple(y0.shape)).replace("(", r"\(").replace(")", r"\)")
    message = rf"initial state y0 must be \[C, \*event\].*got shape {shape}\. {fix}"
    with pytest.raises(ValueError, match=message):
        WITH_NUTS[name]().run(energy_fn, y0, num_steps=2)


weight = torch.tensor(2.0, requires_grad=True)
INDEPENDENT = {  # energies that ignore their input, and what the error says it saw
    "constant": (lambda y: torch.ones(y.shape[0]), "its output has no autograd graph at all"),
    "detached": (lambda y: energy_fn(y.detach()), "its output has no autograd graph at all"),
    "no_grad": (lambda y: torch.no_grad()(energy_fn)(y), "its output has no autograd graph at all"),
    "item": (lambda y: torch.tensor([float(e.item()) for e in energy_fn(y)]), "its output has no autograd graph at all"),
    "numpy": (lambda y: torch.from_numpy(energy_fn(y).detach().numpy()), "its output has no autograd graph at all"),
    "parameters_only": (lambda y: weight * torch.ones(y.shape[0]), "its graph reaches other tensors .* but not y"),
}


@pytest.mark.parametrize("name", WITH_NUTS)
@pytest.mark.parametrize("energy", INDEPENDENT)
def test_energy_that_does_not_depend_on_the_state(name, energy):
    fn, observed = INDEPENDENT[energy]
    message = rf"energy_fn\(y\) does not depend on the state y through autograd \({observed}\).*no y.detach\(\)"
    with pytest.raises(ValueError, match=message):
        WITH_NUTS[name]().run(fn, Y0, num_steps=2)


@pytest.mark.parametrize("name", ["gradient_descent", "langevin"])
def test_energy_that_does_not_depend_on_the_state_in_differentiable_mode(name):
    for fn, observed in INDEPENDENT.values():
        with pytest.raises(ValueError, match=rf"does not depend on the state y through autograd \({observed}\)"):
            SAMPLERS[name]().run(fn, Y0, num_steps=2, differentiable=True)


SCALES = torch.logspace(0, 4, 4, dtype=torch.float64)  # curvatures 1 .. 1e4: a stiff Gaussian


def stiff_energy(y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (SCALES * y.square()).sum(dim=1)


METROPOLIS = {"hmc": lambda step_size: HMC(step_size, 5), "mala": lambda step_size: MALA(step_size)}


@pytest.mark.parametrize("name", METROPOLIS)
@pytest.mark.parametrize("thin", [1, 5])
def test_a_warmup_adapted_into_divergence_warns(name, thin):
    """A 3-step warmup from a step size 500 times too large for the stiffest direction: every kept transition
    diverges. The rate counts every transition, thinned away or not."""
    y0 = torch.zeros(8, 4, dtype=torch.float64)
    sampler = METROPOLIS[name](5.0)
    message = (rf"{sampler.__class__.__name__}: 400 of 400 post-warmup transitions diverged \(100.0%, above the 1%"
               r".*8 of 8 chains.*longer warmup \(this run had 3\), a higher target_accept .* smaller initial step_size")
    with pytest.warns(SamplerWarning, match=message):
        trace = sampler.run(stiff_energy, y0, num_steps=50, warmup=3, thin=thin, generator=torch.Generator().manual_seed(0))
    assert trace.num_divergent().sum() == 400 // thin  # the run still returns its (flagged) draws


@pytest.mark.parametrize("name", METROPOLIS)
def test_healthy_runs_do_not_warn(name):
    """The same stiff Gaussian with a 40-step warmup adapts cleanly; a fixed step size without warmup is the
    caller's own choice (its divergences are in info["divergent"], unwarned)."""
    y0 = torch.zeros(8, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplerWarning)
        adapted = METROPOLIS[name](5.0).run(stiff_energy, y0, num_steps=50, warmup=40,
                                            generator=torch.Generator().manual_seed(0))
        fixed = METROPOLIS[name](5.0).run(stiff_energy, y0, num_steps=50, generator=torch.Generator().manual_seed(0))
    assert adapted.num_divergent().sum() == 0
    assert fixed.num_divergent().sum() == 400
