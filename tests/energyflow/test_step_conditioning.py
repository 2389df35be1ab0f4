"""Step conditioning through the EBT objective and inference: the state y_k is scored on step index k
(clamped to the last step embedding, or index 0 in "single" mode); a time-token EBT encodes its context
once per distinct index; the step embeddings and adaLN modulations train; unconditioned models are
untouched (their golden losses live in test_ebt_task.py and test_cli.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from architectures import EBT, TransformerConfig
from energyflow.inference import Decoding, ThinkingConfig, generate_ebt, think_on_cache, think_tokens
from energyflow.inference.text import encode as inference_encode
from energyflow.models import TextEBM, VectorSequenceEBM
from energyflow.objectives import ContrastiveTerm, EBTObjective, ReplayBuffer, SmoothL1
from samplers import GradientDescent

VOCAB, LENGTH, BATCH = 16, 6, 4


def text_model(conditioning=None, num_step_embeddings=16, seed=0) -> TextEBM:
    torch.manual_seed(seed)
    backbone = EBT(TransformerConfig(dim=32, num_layers=1, num_heads=2, max_seq_len=LENGTH + 8),
                   step_conditioning=conditioning, num_step_embeddings=num_step_embeddings)
    if conditioning == "adaln":  # move the zero-initialised modulation off zero so the index matters
        with torch.no_grad():
            for linear in backbone.step_modulation:
                linear.weight.normal_(0.0, 0.3)
                linear.bias.normal_(0.0, 0.3)
    return TextEBM(backbone, VOCAB)


def batch(seed=0):
    tokens = torch.randint(0, VOCAB, (BATCH, LENGTH + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


class Spy:
    """Records every ``model.encode`` / ``model.energy`` call (step index, output) on one model instance."""

    def __init__(self, model, monkeypatch):
        self.encodes, self.energies, self.graphs = [], [], {}
        encode, energy = model.encode, model.energy

        def spy_encode(inputs, step_index=None):
            self.encodes.append(step_index)
            cache = encode(inputs) if step_index is None else encode(inputs, step_index=step_index)
            self.graphs[step_index] = cache.keys[0].requires_grad  # built inside the autograd graph?
            return cache

        def spy_energy(context, y, step_index=None):
            out = energy(context, y) if step_index is None else energy(context, y, step_index=step_index)
            cached = getattr(context, "step_index", None)
            self.energies.append((step_index if step_index is not None else cached, out))
            return out

        monkeypatch.setattr(model, "encode", spy_encode)
        monkeypatch.setattr(model, "energy", spy_energy)

    @property
    def indices(self):
        return [index for index, _ in self.energies]


def run(objective, model, data, seed=0, **kwargs):
    return objective(model, *data, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_models_say_how_they_are_conditioned_and_clamp_indices():
    plain, adaln, token = text_model(), text_model("adaln", 3), text_model("time_token", 2)
    assert plain.step_conditioning is None and plain.num_step_embeddings == 0 and plain.step_index(5) is None
    assert adaln.step_conditioning == "adaln" and adaln.num_step_embeddings == 3
    assert [adaln.step_index(k) for k in range(6)] == [0, 1, 2, 2, 2, 2]
    assert [adaln.step_index(k, "single") for k in range(4)] == [0, 0, 0, 0]
    assert token.step_conditioning == "time_token" and [token.step_index(k) for k in range(4)] == [0, 1, 1, 1]
    vector = VectorSequenceEBM(EBT(TransformerConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=8),
                                   step_conditioning="adaln"), 3)
    assert vector.step_conditioning == "adaln" and vector.step_index(20) == 15
    with pytest.raises(ValueError, match="step_index_mode"):
        adaln.step_index(0, "every")
    with pytest.raises(ValueError, match="step_index_mode"):
        EBTObjective(GradientDescent(1.0), step_index_mode="every")


def test_time_token_model_energy_encodes_or_checks_the_index():
    model = text_model("time_token")
    tokens, _ = batch()
    y = torch.randn(BATCH, LENGTH, VOCAB, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = model.energy(model.encode(tokens, step_index=1), y)
        torch.testing.assert_close(model.energy(tokens, y, step_index=1), cached)
        torch.testing.assert_close(model.energy(model.encode(tokens, step_index=1), y, step_index=1), cached)
        assert not torch.allclose(model.energy(model.encode(tokens, step_index=0), y), cached)
    with pytest.raises(ValueError, match="encoded on step index 0"):
        model.energy(model.encode(tokens, step_index=0), y, step_index=1)
    with pytest.raises(ValueError, match="time-token EBT only"):
        text_model("adaln").encode(tokens, step_index=0)


def test_training_without_score_final_state_never_scores_y_K(monkeypatch):
    """By default training scores y_0 .. y_{K-1} only (y_K's energy is only a metric): for a time-token
    EBT that also means y_K's context is never encoded."""
    for conditioning in ("adaln", "time_token"):
        model = text_model(conditioning)
        spy = Spy(model, monkeypatch)
        run(EBTObjective(GradientDescent(5.0), num_steps=3), model, batch())
        assert spy.indices == [0, 1, 2]
        assert spy.encodes == ([None] if conditioning == "adaln" else [0, 1, 2])


def test_adaln_state_k_is_scored_on_index_k(monkeypatch):
    """Perturbing embedding row 1 changes E(y_1) but neither E(y_0) nor y_1 (a step-0 gradient)."""
    data = batch()
    model = text_model("adaln")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.backbone.step_embed.weight[1].add_(torch.randn(32, generator=torch.Generator().manual_seed(2)))
    spies = [Spy(model, monkeypatch), Spy(other, monkeypatch)]
    objective = EBTObjective(GradientDescent(5.0), score_final_state=True, num_steps=3)
    outs = [run(objective, m, data) for m in (model, other)]
    for spy in spies:
        assert spy.indices == [0, 1, 2, 3] and spy.encodes == [None]  # one shared context for adaLN
    (e0, e1, *_), (f0, f1, *_) = ([e for _, e in spy.energies] for spy in spies)
    assert torch.equal(e0, f0)  # index 0 untouched
    torch.testing.assert_close(outs[0].trajectory.states[0], outs[1].trajectory.states[0])  # y_1 = y_0 - a grad E_0
    assert not torch.allclose(e1, f1)  # E(y_1) reads row 1
    assert not torch.allclose(outs[0].trajectory.states[1], outs[1].trajectory.states[1])  # so does the step to y_2
    # The gradient that moves y_1 changes; the one that moves y_0 does not.
    y = torch.randn(BATCH, LENGTH, VOCAB, generator=torch.Generator().manual_seed(3), requires_grad=True)
    context = model.encode(data[0])
    grads = [[torch.autograd.grad(m.energy(context, y, step_index=k).sum(), y)[0] for k in (0, 1)]
             for m in (model, other)]
    assert torch.equal(grads[0][0], grads[1][0]) and not torch.allclose(grads[0][1], grads[1][1])


def test_single_mode_scores_every_state_on_index_zero(monkeypatch):
    for conditioning in ("adaln", "time_token"):
        model = text_model(conditioning)
        spy = Spy(model, monkeypatch)
        objective = EBTObjective(GradientDescent(5.0), score_final_state=True, num_steps=3, step_index_mode="single")
        run(objective, model, batch())
        assert spy.indices == [0, 0, 0, 0]
        assert spy.encodes == ([None] if conditioning == "adaln" else [0])


def test_time_token_encodes_each_distinct_index_once_and_trains_it(monkeypatch):
    model = text_model("time_token")  # 16 embeddings: y_0..y_2 on 0..2, the final y_3 on 3
    spy = Spy(model, monkeypatch)
    out = run(EBTObjective(GradientDescent(5.0, learnable=True), score_final_state=True, num_steps=3), model, batch())
    assert sorted(spy.encodes) == [0, 1, 2, 3] and spy.indices == [0, 1, 2, 3]
    assert spy.graphs == {0: True, 1: True, 2: True, 3: False}  # y_3's energy is only a metric
    out.loss.backward()
    table = model.backbone.step_embed.weight.grad
    assert all(table[k].abs().sum() > 0 for k in (0, 1, 2))  # the contexts of the descent stay in the graph
    assert table[3].abs().sum() == 0 and table[4:].abs().sum() == 0  # y_3 only feeds a metric
    assert model.token_embedding.weight.grad.abs().sum() > 0


def test_time_token_with_truncation_keeps_only_the_graph_steps_contexts_in_the_graph(monkeypatch):
    model = text_model("time_token")
    spy = Spy(model, monkeypatch)
    out = run(EBTObjective(GradientDescent(5.0), score_final_state=True, num_steps=3, detach_between_steps=False,
                           truncate=1),
              model, batch())
    out.loss.backward()
    assert spy.graphs == {0: False, 1: False, 2: True, 3: False}  # only y_2's step keeps a graph
    table = model.backbone.step_embed.weight.grad
    assert table[2].abs().sum() > 0 and table[:2].abs().sum() == 0 and table[3:].abs().sum() == 0


def test_evaluation_clamps_indices_past_the_table(monkeypatch):
    for conditioning in ("adaln", "time_token"):
        model = text_model(conditioning, num_step_embeddings=2)
        spy = Spy(model, monkeypatch)
        objective = EBTObjective(GradientDescent(5.0), num_steps=2).eval()
        out = run(objective, model, batch(), num_steps=5)  # 5 steps at evaluation, 2 embeddings
        assert spy.indices == [0, 1, 1, 1, 1, 1] and not out.loss.requires_grad
        assert spy.encodes == ([None] if conditioning == "adaln" else [0, 1])
        assert not any(spy.graphs.values())  # validation encodes without a graph


def test_training_reaches_the_step_embeddings_and_the_adaln_modulation():
    torch.manual_seed(0)
    fresh = TextEBM(EBT(TransformerConfig(dim=32, num_layers=1, num_heads=2, max_seq_len=LENGTH),
                        step_conditioning="adaln"), VOCAB)  # zero-initialised modulation
    for model in (fresh, text_model("adaln")):
        run(EBTObjective(GradientDescent(5.0, learnable=True), num_steps=2), model, batch()).loss.backward()
        for linear in model.backbone.step_modulation:  # trained even from its zero initialisation
            assert linear.weight.grad.abs().sum() > 0 and linear.bias.grad.abs().sum() > 0
    assert fresh.backbone.step_embed.weight.grad.abs().sum() == 0  # no signal through a zero modulation yet
    table = model.backbone.step_embed.weight.grad  # with a live modulation, the rows of y_0 and y_1 train
    assert table[0].abs().sum() > 0 and table[1].abs().sum() > 0 and table[2:].abs().sum() == 0


def test_contrastive_term_rescores_on_the_final_index(monkeypatch):
    for conditioning in ("adaln", "time_token"):
        model = text_model(conditioning)
        spy = Spy(model, monkeypatch)
        objective = EBTObjective(GradientDescent(5.0), score_final_state=True, num_steps=2, contrastive=ContrastiveTerm())
        out = run(objective, model, batch())
        assert spy.indices == [0, 1, 2, 2, 2]  # y_0, y_1, y_2 (metric), then ground truth and sg(y_2)
        assert all(energy.requires_grad for _, energy in spy.energies[-2:])
        out.loss.backward()
        if conditioning == "time_token":  # the final index's context is in the graph for the term
            assert sorted(spy.encodes) == [0, 1, 2]
            assert model.backbone.step_embed.weight.grad[2].abs().sum() > 0


def test_replay_buffer_rows_are_encoded_on_every_index(monkeypatch):
    model = text_model("time_token")
    objective = EBTObjective(GradientDescent(5.0), score_final_state=True, num_steps=2,
                             replay_buffer=ReplayBuffer(capacity=8, fraction=0.5))
    run(objective, model, batch(0))
    spy = Spy(model, monkeypatch)
    out = run(objective, model, batch(1), seed=1)
    assert out.metrics["replayed_fraction"] > 0 and sorted(spy.encodes) == [0, 1, 2]
    out.loss.backward()
    assert model.backbone.step_embed.weight.grad[:2].abs().sum() > 0


def test_vector_sequence_model_trains_with_step_conditioning():
    for conditioning in ("adaln", "time_token"):
        torch.manual_seed(0)
        model = VectorSequenceEBM(EBT(TransformerConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=8),
                                      step_conditioning=conditioning, num_step_embeddings=2), 3)
        context = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
        targets = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
        objective = EBTObjective(GradientDescent(0.5), num_steps=3, loss=SmoothL1())
        out = objective(model, context, targets, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        assert torch.isfinite(out.loss)
        if conditioning == "time_token":
            assert model.backbone.step_embed.weight.grad.abs().sum() > 0
        else:
            assert model.backbone.step_modulation[0].weight.grad.abs().sum() > 0


def test_unconditioned_model_is_called_exactly_as_before(monkeypatch):
    model = text_model()
    spy = Spy(model, monkeypatch)
    objective = EBTObjective(GradientDescent(5.0), score_final_state=True, num_steps=2, contrastive=ContrastiveTerm())
    run(objective, model, batch())
    assert spy.encodes == [None] and spy.indices == [None] * 5


def test_thinking_scores_each_state_on_its_clamped_index(monkeypatch):
    tokens, targets = batch()
    config = ThinkingConfig(num_steps=4, step_size=5.0)
    for conditioning in ("adaln", "time_token"):
        model = text_model(conditioning, num_step_embeddings=2)
        spy = Spy(model, monkeypatch)
        think_tokens(model, tokens, config, num_candidates=2, targets=targets, generator=torch.Generator())
        assert spy.indices == [0, 1, 1, 1, 1]
        assert spy.encodes == ([None] if conditioning == "adaln" else [0, 1])
        spy.energies.clear()
        think_tokens(model, tokens, config, generator=torch.Generator(), step_index_mode="single")
        assert spy.indices == [0] * 5
    with pytest.raises(ValueError, match="one context per step index"):
        think_on_cache(model, model.encode(tokens, step_index=0), LENGTH, config)
    with pytest.raises(ValueError, match="pass step_index"):
        inference_encode(model, tokens)


@pytest.mark.parametrize("conditioning", ["adaln", "time_token"])
def test_cached_generation_of_a_conditioned_ebt_equals_recomputing(conditioning):
    model = text_model(conditioning, num_step_embeddings=2)
    prompt = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(0))
    config = ThinkingConfig(num_steps=3, step_size=5.0)
    cached, recomputed = (generate_ebt(model, prompt, 4, config, Decoding(), num_candidates=2,
                                       generator=torch.Generator().manual_seed(1), use_cache=use_cache)
                          for use_cache in (True, False))
    assert torch.equal(cached.tokens, recomputed.tokens)
    torch.testing.assert_close(cached.energies, recomputed.energies, rtol=1e-4, atol=1e-4)


def test_hnet_context_with_adaln_trains_through_the_hnet_task():
    """A wrapped backbone (``HNetContextEBT.ebt``) reports its EBT's conditioning; adaLN keeps one H-Net pass."""
    from architectures.hnet import HNet, HNetConfig
    from architectures.hnet_ebt import HNetContextEBT
    from energyflow.tasks import HNetEBTLanguageModelTask

    torch.manual_seed(0)
    hnet = HNet(HNetConfig(dims=(8, 12), num_heads=(2, 2), encoder_layers=(1,), decoder_layers=(1,),
                           main_layers=1, compression=(2.0,), max_seq_len=16))
    ebt = EBT(TransformerConfig(dim=8, num_layers=1, num_heads=2, max_seq_len=16), step_conditioning="adaln",
              num_step_embeddings=2)
    model = TextEBM(HNetContextEBT(hnet, ebt), VOCAB)
    assert model.step_conditioning == "adaln" and model.num_step_embeddings == 2
    task = HNetEBTLanguageModelTask(model, EBTObjective(GradientDescent(5.0), num_steps=3))
    tokens, targets = batch()
    loss, _ = task.loss({"tokens": tokens, "targets": targets}, step=0, generator=torch.Generator())
    loss.backward()
    assert torch.isfinite(loss) and ebt.step_modulation[0].weight.grad.abs().sum() > 0


def test_verifier_scores_observed_text_on_the_last_trained_index(monkeypatch):
    """Observed text is a fully descended state: a step-conditioned EBT scores it on its last step embedding
    (index 0 in "single" mode), through a context encoded on that index for a time-token EBT; the ranking
    of continuations uses the same index and agrees with scoring each continuation on its own."""
    from energyflow.verifier import score_continuations, token_energies
    from energyflow.verifier.scoring import observed_state

    tokens = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(5))
    for conditioning in ("adaln", "time_token"):
        model = text_model(conditioning, num_step_embeddings=3)
        spy = Spy(model, monkeypatch)
        got = token_energies(model, tokens)
        assert [index for index, _ in spy.energies] == [2]
        assert spy.encodes == ([None] if conditioning == "adaln" else [2])
        single = token_energies(model, tokens, step_index_mode="single")
        assert [index for index, _ in spy.energies] == [2, 0]
        assert not torch.allclose(got, single)  # the index matters for this model
        with torch.no_grad():  # what the model itself gives on index 2, computed directly
            cache = model.encode(tokens[:, :-1], **({"step_index": 2} if conditioning == "time_token" else {}))
            expected = model.energy(cache, observed_state(tokens[:, 1:], VOCAB), step_index=2)
        torch.testing.assert_close(got, expected)
        prompt, continuations = tokens[0, :3], [tokens[0, 3:], tokens[1, 3:5]]
        scores = score_continuations(model, prompt, continuations)
        for row, continuation in enumerate(continuations):
            alone = token_energies(model, torch.cat((prompt, continuation))[None])[0, len(prompt) - 1:]
            torch.testing.assert_close(scores.token_energies[row], alone, rtol=1e-5, atol=1e-5)
