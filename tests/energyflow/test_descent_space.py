"""The descent rule of text EBTs (``EBTObjective.descent_space``): the paper's probability-space update
against a hand-written float64 loop on a real TextEBM; its second-order gradients (to the weights and the
learnable step size) against central finite differences; thinking, self-verification and cached generation
under it against recomputation; a trained run reports, and evaluates with, the rule it trained with."""
import gin
import pytest
import torch

from architectures import EBT, TransformerConfig
from energyflow.cli import main
from energyflow.configurables import parse_recipe
from energyflow.runs import load_run
from energyflow.inference import Decoding, ThinkingConfig, generate_ebt, think_tokens
from energyflow.models import TextEBM, VectorSequenceEBM
from energyflow.objectives import EBTObjective
from energyflow.objectives.components import RandomNoise
from samplers import GradientDescent
from samplers.parametrization import SoftmaxParametrization

V = 11


def tiny_model(dtype=torch.float64, seed: int = 0, **config) -> TextEBM:
    torch.manual_seed(seed)
    model = TextEBM(EBT(TransformerConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=8, **config)), V)
    return model.to(dtype)


def tokens_and_targets(seed: int = 0):
    tokens = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def grad_wrt_probabilities(model, tokens, p, step_index=None):
    """dE/dp of the uncached model (both streams recomputed), by autograd, at p [B, S, V] (scored on
    ``step_index`` for a step-conditioned model)."""
    p = p.detach().requires_grad_(True)
    conditioning = {} if step_index is None else {"step_index": step_index}
    (grad,) = torch.autograd.grad(model(tokens, p, mapped=True, **conditioning).sum(), p)
    return grad


@pytest.mark.parametrize("conditioning", [None, "adaln", "time_token"])
def test_objective_states_equal_the_papers_formula_in_float64(conditioning):
    """Plain and both step-conditioned EBTs (state y_k scored on index min(k, 1) with a 2-row table)."""
    extra = {} if conditioning is None else {"step_conditioning": conditioning, "num_step_embeddings": 2}
    torch.manual_seed(0)
    config = TransformerConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=8)
    model = TextEBM(EBT(config, **extra), V).double()
    if conditioning == "adaln":  # move the zero-initialised modulation so the index matters
        with torch.no_grad():
            for linear in model.backbone.step_modulation:
                linear.weight.normal_(0, 0.1)
    tokens, targets = tokens_and_targets()
    step = 3.0
    objective = EBTObjective(GradientDescent(step), num_steps=3, initial_state=RandomNoise(0.5),
                             descent_space="probabilities").eval()
    out = objective(model, tokens, targets, generator=torch.Generator().manual_seed(0))
    y = 0.5 * torch.randn(2, 4, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k in range(3):  # p = softmax(y_k); y_{k+1} = p - a dE/dp
        p = torch.softmax(y, -1)
        y = p - step * grad_wrt_probabilities(model, tokens, p, None if conditioning is None else min(k, 1))
        torch.testing.assert_close(out.trajectory.states[k], y, rtol=1e-10, atol=1e-12)
    # the energy of a state, as scoring and verification read it, is E(softmax(y)) under either rule
    index = {} if conditioning is None else {"step_index": 1}
    torch.testing.assert_close(model(tokens, y, **index), model(tokens, torch.softmax(y, -1), mapped=True, **index))


@pytest.mark.parametrize("detach", [False, True])
def test_second_order_gradient_to_the_weights_and_step_size_matches_finite_differences(detach):
    """The unrolled objective (2 steps, loss at both) differentiated to a weight of every kind and to the
    learnable step size, against central differences of the same objective (float64). Detached between
    steps, y_1 is a constant of step 2, which the finite differences reproduce by freezing it."""
    model = tiny_model(seed=1)
    tokens, targets = tokens_and_targets(1)
    sampler = GradientDescent(2.0, learnable=True).double()  # a float32 step size would round the bump away
    objective = EBTObjective(sampler, num_steps=2, initial_state=RandomNoise(0.5), descent_space="probabilities",
                             detach_between_steps=detach)

    def loss(frozen=None) -> torch.Tensor:
        if frozen is None:
            return objective(model, tokens, targets, generator=torch.Generator().manual_seed(0)).loss
        # detached: loss(y_1) as computed, plus loss of one step from the frozen y_1 (y_1's own loss is
        # differentiated through step 1, which keeps its graph to the weights)
        first = objective(model, tokens, targets, generator=torch.Generator().manual_seed(0), num_steps=1).loss
        second = EBTObjective(sampler, num_steps=1, initial_state=lambda *a, **k: frozen,
                              descent_space="probabilities")(model, tokens, targets).loss
        return (first + second) / 2

    frozen = None
    if detach:
        with torch.no_grad():
            frozen = objective.eval()(model, tokens, targets, generator=torch.Generator().manual_seed(0),
                                      num_steps=1).final_state
        objective.train()
    checked = [model.backbone.head.proj.weight, model.candidate.projection.weight, model.token_embedding.weight,
               model.backbone.blocks[0].attn.qkv.weight, sampler.step_size]
    grads = torch.autograd.grad(loss(), checked)
    eps = 1e-6  # float64 central differences: truncation ~eps^2, rounding ~1e-16 / eps, both << rel 1e-5
    for parameter, grad in zip(checked, grads):
        index = tuple(0 for _ in parameter.shape) if parameter.dim() == 0 else (0,) * (parameter.dim() - 1) + (1,)
        with torch.no_grad():
            parameter[index] += eps
            plus = float(loss(frozen).detach())
            parameter[index] -= 2 * eps
            minus = float(loss(frozen).detach())
            parameter[index] += eps
        assert float(grad[index]) == pytest.approx((plus - minus) / (2 * eps), rel=1e-5, abs=1e-10)


def test_thinking_and_self_verification_under_the_papers_rule_equal_recomputation():
    model = tiny_model().eval()
    tokens, _ = tokens_and_targets(2)
    step, n = 5.0, 3
    config = ThinkingConfig(num_steps=3, step_size=step, parametrization=SoftmaxParametrization("probabilities"))
    verified = think_tokens(model, tokens, config, num_candidates=n, generator=torch.Generator().manual_seed(0))
    # the same starts, each descended by the formula on the uncached model
    y = torch.randn(2 * n, 4, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    repeated = tokens.repeat_interleave(n, dim=0)
    for _ in range(3):
        p = torch.softmax(y, -1)
        y = p - step * grad_wrt_probabilities(model, repeated, p)
    torch.testing.assert_close(verified.thinking.state, y, rtol=1e-10, atol=1e-12)
    energies = model(repeated, y).detach()  # [B*n, S], scored as states
    torch.testing.assert_close(verified.thinking.energies, energies, rtol=1e-10, atol=1e-12)
    best = energies.view(2, n, 4).argmin(dim=1)
    assert torch.equal(verified.index, best)


@pytest.mark.parametrize("num_candidates,noise", [(1, 0.0), (3, 0.5)])
def test_cached_generation_under_the_papers_rule_equals_recomputing_everything(num_candidates, noise):
    model = tiny_model(torch.float32).eval()
    prompt = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(0))
    config = ThinkingConfig(num_steps=3, step_size=5.0, noise_scale=noise,
                            parametrization=SoftmaxParametrization("probabilities"))
    runs = [generate_ebt(model, prompt, 4, config, Decoding("sample", temperature=0.8), num_candidates=num_candidates,
                         generator=torch.Generator().manual_seed(3), use_cache=use_cache)
            for use_cache in (True, False)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    torch.testing.assert_close(runs[0].energies, runs[1].energies, rtol=1e-4, atol=1e-4)


def test_the_two_rules_are_different_descents_of_the_same_energy():
    model = tiny_model()
    tokens, targets = tokens_and_targets(3)
    states = {}
    for space in ("probabilities", "logits", None):
        objective = EBTObjective(GradientDescent(3.0), num_steps=2, descent_space=space).eval()
        states[space] = objective(model, tokens, targets, generator=torch.Generator().manual_seed(0)).final_state
    assert not torch.allclose(states["probabilities"], states["logits"])
    # unset is the logit rule through the model's own softmax: the same numbers, bit for bit
    assert torch.equal(states["logits"], states[None])


def test_descent_space_refused_for_continuous_candidates_and_bad_names():
    with pytest.raises(ValueError, match="'probabilities'.*'logits'"):
        EBTObjective(GradientDescent(1.0), descent_space="simplex")
    torch.manual_seed(0)
    model = VectorSequenceEBM(EBT(TransformerConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=8)), 3)
    objective = EBTObjective(GradientDescent(1.0), descent_space="probabilities")
    context = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="reads its candidate as it is"):
        objective(model, context, torch.randn(2, 4, 3))


@pytest.fixture(scope="module")
def logit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("logit_run")
    gin.clear_config()
    parse_recipe("experiments/ebt_system1_debug.gin", ["Trainer.progress = False", f"OUT_DIR = '{out}'",
                                                       "DESCENT_SPACE = 'logits'", "NUM_STEPS = 3"])
    gin.get_configurable("launch")()
    gin.clear_config()
    return out


def test_a_run_records_reports_and_evaluates_with_its_rule(logit_run, capsys):
    assert "DESCENT_SPACE = 'logits'" in (logit_run / "operative_config.gin").read_text()
    result, _, _ = load_run(logit_run, device="cpu")
    objective = result.task.objective
    assert objective.descent_space == "logits" and result.task.describe() == {"descent": "logits"}
    assert main(["eval", str(logit_run), "--max-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "descent" in printed and "logits" in printed and "probabilities" not in printed
    gin.clear_config()


def test_adaptive_compute_under_the_papers_rule_freezes_positions_at_their_own_states():
    """Positions whose energy stops changing freeze; every position's reported energy is the energy of its
    returned state (scored as a state: E(softmax(y))), and frozen positions took fewer steps."""
    model = tiny_model().eval()
    tokens, _ = tokens_and_targets(4)
    config = ThinkingConfig(num_steps=12, step_size=2.0, energy_tolerance=0.05,
                            parametrization=SoftmaxParametrization("probabilities"))
    result = think_tokens(model, tokens, config, generator=torch.Generator().manual_seed(0)).thinking
    assert int(result.steps_used.min()) < 12, "the test needs positions that converge early"
    torch.testing.assert_close(result.energies, model(tokens, result.state).detach(), rtol=1e-10, atol=1e-12)
    fixed = think_tokens(model, tokens, ThinkingConfig(num_steps=12, step_size=2.0,
                                                       parametrization=SoftmaxParametrization("probabilities")),
                         generator=torch.Generator().manual_seed(0)).thinking
    # a position that never froze followed the fixed-budget descent exactly
    never = result.steps_used == 12
    assert bool(never.any())
    torch.testing.assert_close(result.state[never], fixed.state[never], rtol=1e-12, atol=1e-12)
