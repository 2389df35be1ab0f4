"""The text EBT's candidate map as one autograd node (``energyflow.models.text.softmax_embedding``): the values and
the first, second and third derivatives of ``softmax(y) @ E`` in float64 (chunked over rows, as at a large
vocabulary), what it saves for backward, the outer gradient of a two-step descent against the plain map, and the
default by vocabulary size."""
from __future__ import annotations

import pytest
import torch

import energyflow.models.text as text
from architectures import EBT, TransformerConfig
from energyflow.models import TextEBM
from energyflow.models.text import RECOMPUTE_FROM_VOCAB, softmax_embedding
from energyflow.objectives import EBTObjective, RandomNoise
from energyflow.tasks import EBTLanguageModelTask
from samplers import GradientDescent


@pytest.fixture
def small_chunks(monkeypatch):
    """Rows of 7 classes in chunks of 2 rows: every loop runs over several chunks and a ragged last one."""
    monkeypatch.setattr(text, "CHUNK_ELEMENTS", 14)


def _inputs(rows=5, vocab=7, dim=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, vocab, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    return y, weight


def _plain(y, weight):
    return torch.softmax(y, dim=-1) @ weight


def _inner_gradient(fn):
    """What a descent step differentiates: dE/dy of a nonlinear energy of the embedding, with its graph."""
    def gradient(y, weight):
        h = fn(y, weight)
        return torch.autograd.grad((h * torch.sin(h)).sum(), y, create_graph=True)[0]
    return gradient


def test_first_second_and_third_derivatives_are_exact(small_chunks):
    y, weight = _inputs()
    assert torch.autograd.gradcheck(softmax_embedding, (y, weight))
    assert torch.autograd.gradgradcheck(softmax_embedding, (y, weight))
    # the inner gradient's own second derivative: the third derivative of the map (smaller: 3 rows, 2 chunks)
    assert torch.autograd.gradgradcheck(_inner_gradient(softmax_embedding), _inputs(rows=3, dim=2))


def test_matches_the_plain_formula_at_every_order(small_chunks):
    y, weight = _inputs(rows=6, vocab=7, dim=4, seed=1)
    logits = y.detach().reshape(2, 3, 7).requires_grad_()  # [B, S, V] as the model calls it
    torch.testing.assert_close(softmax_embedding(logits, weight), _plain(logits, weight), rtol=1e-13, atol=1e-13)
    outer = []
    for fn in (softmax_embedding, _plain):
        g = _inner_gradient(fn)(y, weight)
        state = y - 0.3 * g  # a descent step, then a loss on the state and on the gradient
        loss = (torch.log_softmax(state, -1)[:, 0]).sum() + (g ** 2).sum()
        outer.append((g.detach(), *torch.autograd.grad(loss, (y, weight))))
    for ours, reference in zip(*outer):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-13)


def test_saves_only_the_logits_and_the_weight():
    """A create_graph gradient through the map keeps no [N, V] tensor but the logits themselves (the plain map
    keeps the probabilities and dE/dp, the softmax's backward inputs)."""
    y, weight = _inputs(rows=8, vocab=11, dim=3)

    def saved_storages(fn):
        storages = set()

        def pack(tensor):
            if tensor.shape[-1] == 11 and tensor.numel() == y.numel():
                storages.add(tensor.untyped_storage().data_ptr())
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            _inner_gradient(fn)(y, weight)
        return storages

    logits = {y.untyped_storage().data_ptr()}
    assert saved_storages(softmax_embedding) == logits
    plain = saved_storages(_plain)  # the probabilities and dE/dp, each [N, V]
    assert len(plain) == 2 and not plain & logits


def test_the_inner_gradient_skips_the_weight_gradient(monkeypatch):
    """autograd.grad(E, y) does not compute softmax(y)^T g (the engine will not use it); backward() does."""
    calls = []
    original = torch.Tensor.addmm_

    def counting_addmm(self, *args, **kwargs):
        calls.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", counting_addmm)
    y, weight = _inputs()
    h = softmax_embedding(y, weight)
    torch.autograd.grad(h.pow(2).sum(), y)
    assert calls == []
    softmax_embedding(y, weight).pow(2).sum().backward()
    assert calls == [weight.shape] and weight.grad is not None


def test_a_two_step_descent_trains_to_the_same_gradients(small_chunks):
    """The EBT objective (learnable step size, second-order outer gradient) in float64, both candidate maps, linear
    and tied embeddings: the same loss and the same gradient for every parameter."""
    for embedding in ("linear", "tied"):
        results = []
        for recompute in (False, True):
            torch.manual_seed(0)
            model = TextEBM(EBT(TransformerConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=8)), 37,
                            candidate_embedding=embedding, recompute_probabilities=recompute)
            objective = EBTObjective(GradientDescent(20.0, learnable=True), num_steps=2, initial_state=RandomNoise(1.0))
            task = EBTLanguageModelTask(model, objective).double()
            windows = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(1))
            loss, _ = task.loss({"tokens": windows[:, :-1], "targets": windows[:, 1:]}, step=0,
                                generator=torch.Generator().manual_seed(0))
            loss.backward()
            results.append([loss.detach()] + [p.grad for p in task.parameters() if p.grad is not None])
        assert len(results[0]) == len(results[1]) > 10
        for ours, reference in zip(results[1], results[0]):
            torch.testing.assert_close(ours, reference, rtol=1e-11, atol=1e-13)


def test_under_autocast_the_matmuls_run_in_its_dtype():
    y, weight = (t.detach().float().requires_grad_() for t in _inputs(rows=4, vocab=9, dim=5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, reference = softmax_embedding(y, weight), torch.softmax(y, -1) @ weight
        grads = [torch.autograd.grad(h.float().pow(2).sum(), (y, weight)) for h in (ours, reference)]
    assert ours.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(ours, reference)
    for a, b in zip(*grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # bf16 matmuls: ~3 significant digits


def test_default_follows_the_vocabulary_size():
    config = TransformerConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=8)
    assert not TextEBM(EBT(config), 256).candidate.recompute_probabilities
    assert TextEBM(EBT(config), RECOMPUTE_FROM_VOCAB).candidate.recompute_probabilities
    assert TextEBM(EBT(config), 256, recompute_probabilities=True).candidate.recompute_probabilities
    with pytest.raises(TypeError, match="recompute_probabilities must be True, False or None"):
        TextEBM(EBT(config), 256, recompute_probabilities="yes")
    with pytest.raises(ValueError, match="logits"):
        softmax_embedding(torch.zeros(2, 5), torch.zeros(4, 3))
