"""Parametrized descents (samplers.parametrization): the EBT reference's probability-space rule and the
logit-space rule, each against a hand-written float64 loop of its formula; second-order gradients through
the unrolled steps against central finite differences; Metropolis samplers refuse the image rule."""
import pytest
import torch

from samplers import MALA, GradientDescent, Langevin
from samplers.parametrization import Parametrization, SoftmaxParametrization

@pytest.fixture(autouse=True)
def float64():
    """Every test here runs in float64 (the hand-written loops are compared to 1e-12)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

V = 5


def energy_of_distribution(weight: torch.Tensor, target: torch.Tensor):
    """Per-position energy of a distribution ``u [C, S, V]``: ``0.5 |W u - t|^2 + sum(u^3)`` -> ``[C, S]``
    (non-linear in u, so the second-order terms are not trivially zero)."""
    return lambda u: 0.5 * (u @ weight.T - target).pow(2).sum(-1) + u.pow(3).sum(-1)


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, V, generator=g)
    target = torch.randn(4, generator=g)
    y0 = torch.randn(3, 2, V, generator=g)
    return weight, target, y0


def analytic_grad(weight, target, u):
    """dE/du of ``energy_of_distribution`` by hand."""
    return (u @ weight.T - target) @ weight + 3 * u.pow(2)


def test_probability_rule_equals_a_hand_written_float64_loop():
    weight, target, y0 = problem()
    step = 0.7
    trajectory = GradientDescent(step).run(energy_of_distribution(weight, target), y0, num_steps=3,
                                           parametrization=SoftmaxParametrization("probabilities"))
    y, expected = y0, []
    for _ in range(3):  # the reference's rule: p = softmax(y), next state p - a * dE/dp (the old y discarded)
        p = torch.softmax(y, dim=-1)
        y = p - step * analytic_grad(weight, target, p)
        expected.append(y)
    torch.testing.assert_close(trajectory.states, torch.stack(expected), rtol=1e-12, atol=1e-12)
    # the energy of a state is E(softmax(y)) under either rule
    energy = energy_of_distribution(weight, target)
    torch.testing.assert_close(trajectory.energies[-1], energy(torch.softmax(y, -1)).sum(-1), rtol=1e-12, atol=1e-12)


def test_logit_rule_equals_a_hand_written_float64_loop():
    weight, target, y0 = problem(1)
    step = 0.7
    trajectory = GradientDescent(step).run(energy_of_distribution(weight, target), y0, num_steps=3,
                                           parametrization=SoftmaxParametrization("logits"))
    y = y0
    for k in range(3):  # through the softmax: y - a * p * (g - <p, g>)
        p = torch.softmax(y, dim=-1)
        g = analytic_grad(weight, target, p)
        y = y - step * p * (g - (p * g).sum(-1, keepdim=True))
        torch.testing.assert_close(trajectory.states[k], y, rtol=1e-12, atol=1e-12)


def test_the_two_rules_differ_by_the_softmax_jacobian_near_uniform():
    """Near the uniform distribution the logit rule's step is ~1/V of the probability rule's (the issue's
    diagnosis): measured on the first step's displacement of the (shift-invariant) centred logits."""
    weight, target, _ = problem(2)
    y0 = torch.zeros(4, 2, V)
    moves = {}
    for space in ("probabilities", "logits"):
        state = GradientDescent(1e-3).run(energy_of_distribution(weight, target), y0, num_steps=1,
                                          parametrization=SoftmaxParametrization(space)).final_state
        centred = state - state.mean(-1, keepdim=True)
        moves[space] = centred.norm()
    assert float(moves["logits"] / moves["probabilities"]) == pytest.approx(1 / V, rel=1e-6)


@pytest.mark.parametrize("space", ["probabilities", "logits"])
@pytest.mark.parametrize("detach", [True, False])
def test_second_order_gradient_through_two_steps_matches_finite_differences(space, detach):
    """d loss(y_2) / d(weight, step size) through two differentiable steps vs central differences (float64).

    Without detaching this is the total derivative. Detached between steps, y_1 enters step 2 as a constant,
    so the gradient is the derivative of the loss of one step taken from the frozen y_1."""
    weight, target, y0 = problem(3)
    label = torch.tensor([[1, 3], [0, 4], [2, 2]])
    parametrization = SoftmaxParametrization(space)
    frozen = GradientDescent(0.9).run(energy_of_distribution(weight, target), y0, num_steps=1,
                                      parametrization=parametrization).final_state

    def loss_of(weight_value: torch.Tensor, step_value: float, start: torch.Tensor, num_steps: int):
        sampler = GradientDescent(step_value, learnable=True)
        trajectory = sampler.run(energy_of_distribution(weight_value, target), start, num_steps=num_steps,
                                 differentiable=True, detach_between_steps=detach, parametrization=parametrization)
        loss = torch.nn.functional.cross_entropy(trajectory.states[-1].flatten(0, 1), label.flatten())
        return loss, sampler.step_size

    def numeric_loss(weight_value: torch.Tensor, step_value: float) -> float:
        start, num_steps = (frozen, 1) if detach else (y0, 2)
        return float(loss_of(weight_value, step_value, start, num_steps)[0].detach())

    w = weight.clone().requires_grad_(True)
    loss, step_size = loss_of(w, 0.9, y0, 2)
    grad_w, grad_a = torch.autograd.grad(loss, (w, step_size))
    eps = 1e-6  # central differences in float64: truncation ~eps^2, rounding ~1e-16 / eps, both << rel 1e-6
    for index in [(0, 0), (1, 3), (3, 4)]:
        bump = torch.zeros_like(weight)
        bump[index] = eps
        numeric = (numeric_loss(weight + bump, 0.9) - numeric_loss(weight - bump, 0.9)) / (2 * eps)
        assert float(grad_w[index]) == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    numeric = (numeric_loss(weight, 0.9 + eps) - numeric_loss(weight, 0.9 - eps)) / (2 * eps)
    assert float(grad_a) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_state_space_is_the_composed_energy_for_any_sampler():
    """``descent_space='state'`` is exactly the energy composed with the map, so MALA (Metropolis-corrected)
    runs the same chain with it as on ``E(softmax(y))`` written by hand, draw for draw."""
    weight, target, y0 = problem(4)
    energy = energy_of_distribution(weight, target)
    runs = []
    for fn, parametrization in ((energy, SoftmaxParametrization("logits")),
                                (lambda y: energy(torch.softmax(y, -1)), None)):
        runs.append(MALA(0.05).run(fn, y0, num_steps=5, generator=torch.Generator().manual_seed(0),
                                   parametrization=parametrization).states)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_metropolis_samplers_refuse_the_image_rule_and_bad_names_are_refused():
    weight, target, y0 = problem(5)
    with pytest.raises(ValueError, match="Metropolis-corrected"):
        MALA(0.05).run(energy_of_distribution(weight, target), y0, num_steps=2,
                       parametrization=SoftmaxParametrization("probabilities"))
    with pytest.raises(ValueError, match="'probabilities'.*'logits'"):
        SoftmaxParametrization("simplex")
    with pytest.raises(ValueError, match="'state'.*'image'"):
        Parametrization("somewhere")


def test_langevin_and_momentum_take_their_step_from_the_image_point():
    """ULA with the image rule: y_1 = p - a g + sqrt(2 a) xi, the noise drawn as by the plain sampler;
    heavy-ball momentum accumulates dE/dp (the velocity is a direction, never mapped)."""
    weight, target, y0 = problem(6)
    energy = energy_of_distribution(weight, target)
    step = 0.3
    state = Langevin(step).run(energy, y0, num_steps=1, generator=torch.Generator().manual_seed(1),
                               parametrization=SoftmaxParametrization("probabilities")).final_state
    p = torch.softmax(y0, -1)
    noise = torch.randn(y0.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(state, p - step * analytic_grad(weight, target, p) + (2 * step) ** 0.5 * noise)
    trajectory = GradientDescent(step, momentum=0.5).run(energy, y0, num_steps=2,
                                                         parametrization=SoftmaxParametrization("probabilities"))
    g0 = analytic_grad(weight, target, p)
    y1 = p - step * g0
    p1 = torch.softmax(y1, -1)
    y2 = p1 - step * (0.5 * g0 + analytic_grad(weight, target, p1))
    torch.testing.assert_close(trajectory.states[-1], y2, rtol=1e-12, atol=1e-12)
