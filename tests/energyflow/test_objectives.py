"""The EBT objective: each trick, toggled, shows its effect on a tiny text EBT."""
from __future__ import annotations

import pytest
import torch

from architectures import EBT, TransformerConfig
from energyflow.models import TextEBM
from energyflow.objectives import (ContrastiveTerm, CrossEntropy, EBTObjective, LinearLabelSmoothing,
                                   RandomNoise, RandomNumSteps, ReplayBuffer, Zeros)
from samplers import ClampGradient, ClampState, GradientDescent, LangevinNoise, RandomizedStepSize, WarmupLangevinNoise

VOCAB, LENGTH, BATCH = 16, 6, 4


@pytest.fixture(scope="module")
def model() -> TextEBM:
    torch.manual_seed(0)
    return TextEBM(EBT(TransformerConfig(dim=32, num_layers=1, num_heads=2, max_seq_len=LENGTH)), VOCAB)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (BATCH, LENGTH + 1), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1], tokens[:, 1:]


def run(objective, model, batch, seed=0, **kwargs):
    return objective(model, *batch, generator=torch.Generator().manual_seed(seed), **kwargs)


def grads(loss, params, retain_graph=False):
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph)


def test_per_step_losses_and_summary_metrics(model, batch):
    out = run(EBTObjective(GradientDescent(2.0, learnable=True), num_steps=3), model, batch)
    metrics = out.metrics
    assert [f"loss_step_{k}" for k in (1, 2, 3)] == [k for k in metrics if k.startswith("loss_step")]
    stacked = torch.stack([metrics[f"loss_step_{k}"] for k in (1, 2, 3)])
    torch.testing.assert_close(out.loss.detach(), stacked.mean())  # loss at every step, averaged
    assert metrics["initial_loss"] == metrics["loss_step_1"] and metrics["final_loss"] == metrics["loss_step_3"]
    assert metrics["step_size"] == 2.0 and metrics["num_steps"] == 3.0
    # The paper's gap, between the first and the last step: E(y_0) - E(y_2) for 3 steps (y_3 is not scored).
    torch.testing.assert_close(metrics["energy_gap"], metrics["initial_energy"] - metrics["last_step_energy"])
    assert "final_energy" not in metrics and "final_energy_gap" not in metrics
    assert all(not v.requires_grad for v in metrics.values())


def test_loss_on_last_step_only(model, batch):
    out = run(EBTObjective(GradientDescent(2.0), num_steps=3, loss_on_last_step_only=True), model, batch)
    torch.testing.assert_close(out.loss.detach(), out.metrics["final_loss"])


def test_initial_state_noise_versus_zeros(model, batch):
    """Zeros makes the chain deterministic (only the initial state is random here); noise depends on the seed."""
    zeros = EBTObjective(GradientDescent(2.0), num_steps=2, initial_state=Zeros())
    torch.testing.assert_close(run(zeros, model, batch, seed=0).final_state, run(zeros, model, batch, seed=1).final_state)
    noise = EBTObjective(GradientDescent(2.0), num_steps=2, initial_state=RandomNoise(2.0))
    assert not torch.allclose(run(noise, model, batch, seed=0).final_state, run(noise, model, batch, seed=1).final_state)
    draw = RandomNoise(2.0)((20000,), device=torch.device("cpu"), dtype=torch.float32,
                            generator=torch.Generator().manual_seed(0))
    assert abs(float(draw.std()) - 2.0) < 0.05  # sd of the sample sd ~ 2 / sqrt(2 * 20000) = 0.01


def test_learnable_step_size_gets_a_gradient_and_fixed_does_not(model, batch):
    learnable = EBTObjective(GradientDescent(2.0, learnable=True), num_steps=2)
    (grad,) = grads(run(learnable, model, batch).loss, [learnable.sampler.step_size])
    assert grad is not None and grad != 0
    fixed = EBTObjective(GradientDescent(2.0), num_steps=2)
    assert not any(p is fixed.sampler.step_size for p in fixed.parameters())


def test_truncation_keeps_only_the_last_steps_graph(model, batch):
    out = run(EBTObjective(GradientDescent(2.0), num_steps=3, truncate=1, detach_between_steps=False), model, batch)
    params = list(model.parameters())
    first = grads(out.trajectory.states[0].sum(), params, retain_graph=True)
    last = grads(out.trajectory.states[-1].sum(), params)
    # (the states are stacked, so the first state's gradient reaches the weights only as exact zeros)
    assert all(g is None or not g.any() for g in first) and any(g is not None and g.any() for g in last)


def test_no_detach_backpropagates_through_the_whole_chain(model, batch):
    """With detach, loss(y_2) reaches the weights only through step 2's gradient; without, also through y_1."""
    params = list(model.parameters())
    outs = {flag: run(EBTObjective(GradientDescent(2.0), num_steps=2, loss_on_last_step_only=True,
                                   detach_between_steps=flag), model, batch) for flag in (True, False)}
    torch.testing.assert_close(outs[True].loss, outs[False].loss)  # same forward values
    detached, full = grads(outs[True].loss, params), grads(outs[False].loss, params)
    difference = sum(float((a - b).abs().sum()) for a, b in zip(detached, full) if a is not None)
    assert difference > 1e-6


def test_langevin_noise_changes_the_trajectory(model, batch):
    plain = run(EBTObjective(GradientDescent(2.0), num_steps=2, initial_state=Zeros()), model, batch)
    noisy = run(EBTObjective(GradientDescent(2.0, transforms=[LangevinNoise(0.5)]), num_steps=2,
                             initial_state=Zeros()), model, batch)
    assert not torch.allclose(plain.final_state, noisy.final_state)
    assert noisy.metrics["langevin_noise"] == 0.5


def test_langevin_noise_learnable_only_after_warmup(model, batch):
    noise = WarmupLangevinNoise(0.5, learnable_after_step=10)
    objective = EBTObjective(GradientDescent(2.0, transforms=[noise]), num_steps=2)
    (before,) = grads(run(objective, model, batch, step=9).loss, [noise.scale])
    (after,) = grads(run(objective, model, batch, step=10).loss, [noise.scale])
    assert before == 0 and after != 0


def test_randomized_step_size_is_per_element(model, batch):
    """RandomizedStepSize(2) draws per element from U(a/2, 2a): the state's update varies across elements."""
    constant = run(EBTObjective(GradientDescent(2.0), num_steps=1, initial_state=Zeros()), model, batch)
    randomized = run(EBTObjective(GradientDescent(2.0, schedule=RandomizedStepSize(2.0)), num_steps=1,
                                  initial_state=Zeros()), model, batch)
    ratio = randomized.final_state / constant.final_state  # y_1 = -a * g: the ratio is the drawn multiplier
    finite = ratio[constant.final_state.abs() > 1e-6]
    assert finite.min() >= 0.5 - 1e-4 and finite.max() <= 2.0 + 1e-4 and finite.std() > 0.1


def test_randomized_number_of_steps(model, batch):
    objective = EBTObjective(GradientDescent(2.0), num_steps=RandomNumSteps(1, 3, eval_num_steps=2))
    counts = {int(run(objective, model, batch, step=s).metrics["num_steps"]) for s in range(12)}
    assert counts == {1, 2, 3}
    assert run(objective, model, batch, step=5).metrics == run(objective, model, batch, step=5).metrics  # per step
    objective.eval()
    assert run(objective, model, batch, step=0).metrics["num_steps"] == 2


def test_gradient_and_state_clamps(model, batch):
    """ClampGradient relative to the step size bounds each update by max_value; ClampState bounds the state."""
    relative = run(EBTObjective(GradientDescent(50.0, transforms=[ClampGradient(0.01, relative_to_step_size=True)]),
                                num_steps=1, initial_state=Zeros()), model, batch)
    assert relative.final_state.abs().max() <= 0.01 + 1e-6
    clamped = run(EBTObjective(GradientDescent(1e4, transforms=[ClampState(-0.5, 0.5)]), num_steps=2), model, batch)
    assert clamped.final_state.abs().max() <= 0.5
    free = run(EBTObjective(GradientDescent(1e4), num_steps=2), model, batch)
    assert free.final_state.abs().max() > 0.5


def test_label_smoothing_schedule(model, batch):
    schedule = LinearLabelSmoothing(start=0.2, end=0.0)
    assert [schedule(k, 3) for k in range(3)] == pytest.approx([0.2, 0.1, 0.0])
    assert schedule(0, 1) == 0.0
    plain = run(EBTObjective(GradientDescent(2.0), num_steps=3), model, batch).metrics
    smooth = run(EBTObjective(GradientDescent(2.0), num_steps=3, label_smoothing=schedule), model, batch).metrics
    assert smooth["loss_step_1"] != plain["loss_step_1"]  # soft targets early ...
    torch.testing.assert_close(smooth["loss_step_3"], plain["loss_step_3"])  # ... exact at the last step


def test_contrastive_term_changes_gradients(model, batch):
    params = list(model.parameters())
    base = EBTObjective(GradientDescent(2.0), num_steps=2)
    contrast = EBTObjective(GradientDescent(2.0), num_steps=2, contrastive=ContrastiveTerm(weight=1.0))
    plain_out, contrast_out = run(base, model, batch), run(contrast, model, batch)
    assert "contrastive" in contrast_out.metrics
    plain, with_term = grads(plain_out.loss, params), grads(contrast_out.loss, params)
    assert sum(float((a - b).abs().sum()) for a, b in zip(plain, with_term) if a is not None) > 1e-6


def test_replay_buffer_supplies_initial_states(model, batch):
    buffer = ReplayBuffer(capacity=8, fraction=0.5)
    objective = EBTObjective(GradientDescent(2.0), num_steps=2, replay_buffer=buffer)
    first = run(objective, model, batch, seed=0)
    assert first.metrics["replayed_fraction"] == 0 and len(buffer) == BATCH
    inputs, _, stored = buffer._fields
    torch.testing.assert_close(stored[:BATCH], first.final_state)  # the final states were stored ...
    fresh = torch.zeros(BATCH, LENGTH, VOCAB)
    mixed_inputs, _, mixed_state, count = buffer.mix(*batch, fresh, torch.Generator().manual_seed(0))
    assert count == BATCH // 2
    for row in range(BATCH - count, BATCH):  # ... and come back as initial states, with their own contexts
        match = [(stored[i] == mixed_state[row]).all() and (inputs[i] == mixed_inputs[row]).all() for i in range(BATCH)]
        assert any(match)
    second = run(objective, model, batch, seed=1)
    assert second.metrics["replayed_fraction"] == 0.5 and len(buffer) == 2 * BATCH


def test_evaluation_has_no_graph_and_uses_the_eval_sampler(model, batch):
    train_sampler = GradientDescent(2.0, learnable=True, transforms=[LangevinNoise(1.0)])
    objective = EBTObjective(train_sampler, eval_sampler=GradientDescent(1.0), num_steps=2)
    assert objective.eval_sampler.step_size is train_sampler.step_size  # validation uses the learned value
    objective.eval()
    out = run(objective, model, batch)
    assert not out.loss.requires_grad and "langevin_noise" not in out.metrics
    assert out.metrics["step_size"] == 2.0


def _recording(model, monkeypatch):
    """Make ``model.energy`` record (grad mode, candidate) per call; returns the list and the real method."""
    calls, energy = [], model.energy

    def recording_energy(context, candidate):
        calls.append((torch.is_grad_enabled(), candidate.detach().clone()))
        return energy(context, candidate)

    monkeypatch.setattr(model, "energy", recording_energy)
    return calls, energy


def test_training_never_scores_the_final_state_by_default(model, batch, monkeypatch):
    """No loss uses E(y_K), so training runs K energy forwards (all with a graph), not K + 1; the metrics
    say so (no ``final_energy``) and the energies they do report are those of y_0 .. y_{K-1}."""
    calls, energy = _recording(model, monkeypatch)
    out = run(EBTObjective(GradientDescent(2.0, learnable=True), num_steps=3), model, batch)
    assert [grad for grad, _ in calls] == [True, True, True]  # y_0, y_1, y_2; never y_3
    assert not any(torch.equal(candidate, out.final_state) for _, candidate in calls)
    assert out.loss.requires_grad and "final_energy" not in out.metrics
    with torch.no_grad():
        context = model.encode(batch[0])
        expected = [energy(context, candidate).mean() for _, candidate in calls]
    torch.testing.assert_close(out.metrics["initial_energy"], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["last_step_energy"], expected[2], rtol=1e-5, atol=1e-5)


def test_score_final_state_scores_y_K_without_a_graph_and_evaluation_always_does(model, batch, monkeypatch):
    """``score_final_state=True``: one more forward, at y_K and under no_grad; ``final_energy`` equals E(y_K)
    recomputed (up to the fused vs math attention kernel) and ``final_energy_gap`` = E(y_0) - E(y_K). The
    losses are those of the default objective exactly. Evaluation scores y_K either way."""
    calls, energy = _recording(model, monkeypatch)
    out = run(EBTObjective(GradientDescent(2.0, learnable=True), num_steps=3, score_final_state=True), model, batch)
    assert [grad for grad, _ in calls] == [True, True, True, False]
    with torch.no_grad():
        final_energy = energy(model.encode(batch[0]), out.final_state).mean()
    torch.testing.assert_close(out.metrics["final_energy"], final_energy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["final_energy_gap"], out.metrics["initial_energy"] - final_energy,
                               rtol=1e-5, atol=1e-5)
    default = run(EBTObjective(GradientDescent(2.0, learnable=True), num_steps=3), model, batch)
    assert torch.equal(out.loss, default.loss)
    objective = EBTObjective(GradientDescent(2.0), num_steps=3).eval()
    calls.clear()
    out = run(objective, model, batch)
    assert len(calls) == 4 and {"final_energy", "final_energy_gap"} <= set(out.metrics)


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="regression loss"):
        from energyflow.objectives import SmoothL1

        EBTObjective(GradientDescent(1.0), loss=SmoothL1(), label_smoothing=LinearLabelSmoothing())
    with pytest.raises(ValueError, match="num_steps"):
        EBTObjective(GradientDescent(1.0), num_steps=0)
    with pytest.raises(ValueError, match="low <= high"):
        RandomNumSteps(3, 2)
    with pytest.raises(ValueError, match="CrossEntropy expects"):
        CrossEntropy()(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("loss", ["smooth_l1", "mse"])
def test_continuous_candidates_learn_with_a_regression_loss(loss):
    """The same objective over vectors (e.g. video latents): a few updates lower the descent's final loss."""
    from energyflow.models import VectorSequenceEBM
    from energyflow.objectives import MeanSquaredError, SmoothL1

    torch.manual_seed(0)
    model = VectorSequenceEBM(EBT(TransformerConfig(dim=32, num_layers=1, num_heads=2, max_seq_len=LENGTH)), 3)
    loss_fn = SmoothL1() if loss == "smooth_l1" else MeanSquaredError()
    objective = EBTObjective(GradientDescent(1.0, learnable=True), num_steps=2, loss=loss_fn, initial_state=Zeros(),
                             contrastive=ContrastiveTerm(weight=0.01))
    sequence = torch.randn(8, LENGTH + 1, 3, generator=torch.Generator().manual_seed(0)).cumsum(1) * 0.3
    inputs, targets = sequence[:, :-1], sequence[:, 1:]
    optimizer = torch.optim.Adam(list(model.parameters()) + list(objective.parameters()), lr=3e-3)
    losses = []
    for step in range(15):
        out = objective(model, inputs, targets, generator=torch.Generator().manual_seed(step), step=step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.metrics["final_loss"]))
    assert losses[-1] < 0.8 * losses[0]
    torch.testing.assert_close(loss_fn.target_state(targets, inputs), targets)


def test_outer_gradient_matches_finite_differences_in_float64():
    """d loss / d (step size, a weight) through two unrolled steps (second order) against central differences.

    Without detaching between steps the outer gradient is the exact derivative of the loss (with detaching it
    is, by design, a truncated one).

    float64 with eps 1e-6: truncation ~ eps^2 and rounding ~ 1e-16 / eps, so 1e-5 relative is tight; a dropped
    second-order term (a fused attention kernel, a detached gradient) changes the derivative by far more.
    """
    torch.manual_seed(0)
    model = TextEBM(EBT(TransformerConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=4)), 8).double()
    objective = EBTObjective(GradientDescent(3.0, learnable=True), num_steps=2, detach_between_steps=False).double()
    tokens = torch.randint(0, 8, (2, 5), generator=torch.Generator().manual_seed(1))
    weight = model.candidate.projection.weight
    parameters = [objective.sampler.step_size, weight]

    def loss() -> torch.Tensor:
        return objective(model, tokens[:, :-1], tokens[:, 1:], generator=torch.Generator().manual_seed(2)).loss

    analytic = torch.autograd.grad(loss(), parameters)
    eps = 1e-6
    for parameter, grad, index in ((parameters[0], analytic[0], ()), (weight, analytic[1], (3, 5))):
        with torch.no_grad():
            parameter[index] += eps
            plus = float(loss())
            parameter[index] -= 2 * eps
            minus = float(loss())
            parameter[index] += eps
        assert float(grad[index]) == pytest.approx((plus - minus) / (2 * eps), rel=1e-5, abs=1e-9)
