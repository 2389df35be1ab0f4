"""Energy models: cached == uncached energies, both candidate embeddings, continuous models, bad input."""
from __future__ import annotations

import pytest
import torch

from architectures import EBT, TransformerConfig
from energyflow.models import DistributionAdapter, GaussianEnergy, TextEBM, VectorSequenceEBM

VOCAB = 16


def tiny_config() -> TransformerConfig:
    return TransformerConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=16)


@pytest.mark.parametrize("candidate_embedding", ["linear", "tied"])
def test_cached_energy_equals_uncached(candidate_embedding):
    torch.manual_seed(0)
    model = TextEBM(EBT(tiny_config()), VOCAB, candidate_embedding=candidate_embedding)
    tokens = torch.randint(0, VOCAB, (3, 8))
    candidate = torch.randn(3, 8, VOCAB)
    cached = model.energy(model.encode(tokens), candidate)
    assert cached.shape == (3, 8)
    torch.testing.assert_close(cached, model(tokens, candidate), rtol=1e-4, atol=1e-5)
    # energy() also accepts raw tokens and encodes them itself.
    torch.testing.assert_close(model.energy(tokens, candidate), cached)


def test_candidate_embeddings_differ_in_parameters():
    """'linear' learns its own Linear(V, D); 'tied' reuses the token embedding (the expected embedding)."""
    linear = TextEBM(EBT(tiny_config()), VOCAB, candidate_embedding="linear")
    tied = TextEBM(EBT(tiny_config()), VOCAB, candidate_embedding="tied")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(linear) - count(tied) == VOCAB * 32
    probabilities = torch.zeros(1, 1, VOCAB)
    probabilities[..., 3] = 1.0
    # A (near) one-hot distribution embeds as that token's embedding row in the tied mode.
    one_hot_logits = probabilities * 50.0
    torch.testing.assert_close(tied.candidate(one_hot_logits)[0, 0], tied.token_embedding.weight[3])


def test_energy_depends_on_candidate_through_softmax():
    """The state is logits: adding a constant to every logit of a position leaves the energy unchanged."""
    torch.manual_seed(1)
    model = TextEBM(EBT(tiny_config()), VOCAB)
    cache = model.encode(torch.randint(0, VOCAB, (2, 5)))
    logits = torch.randn(2, 5, VOCAB, requires_grad=True)
    energy = model.energy(cache, logits)
    torch.testing.assert_close(model.energy(cache, logits + 3.0), energy, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(energy.sum(), logits)
    assert grad.abs().sum() > 0
    # softmax invariance makes every per-position gradient sum to zero over the vocabulary
    torch.testing.assert_close(grad.sum(-1), torch.zeros(2, 5), atol=1e-6, rtol=0)


def test_vector_sequence_model_cached_and_shapes():
    torch.manual_seed(2)
    model = VectorSequenceEBM(EBT(tiny_config()), feature_dim=5)
    context, candidate = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    energy = model.energy(model.encode(context), candidate)
    assert energy.shape == (2, 6)
    torch.testing.assert_close(model.energy(context, candidate), energy)
    assert model.candidate_shape(candidate) == (2, 6, 5)
    with pytest.raises(ValueError, match=r"context must be \[B, S, 5\]"):
        model.encode(torch.randn(2, 6, 4))


def test_gaussian_energy_matches_its_moments():
    torch.manual_seed(3)
    model = GaussianEnergy(2, init_scale=2.0)
    torch.testing.assert_close(model.covariance(), 4.0 * torch.eye(2))
    with torch.no_grad():
        model.location.copy_(torch.tensor([1.0, -1.0]))
        model.raw_factor.copy_(torch.tensor([[0.3, 0.0], [0.7, -0.2]]))
    y = torch.randn(4, 2)
    precision = torch.linalg.inv(model.covariance())
    diff = y - model.location
    expected = 0.5 * torch.einsum("ci,ij,cj->c", diff, precision, diff)
    torch.testing.assert_close(model(y), expected, rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_named():
    model = TextEBM(EBT(tiny_config()), VOCAB)
    with pytest.raises(ValueError, match="integer tensor"):
        model.encode(torch.randn(2, 4))
    with pytest.raises(ValueError, match="classes"):
        model.energy(torch.randint(0, VOCAB, (2, 4)), torch.randn(2, 4, VOCAB + 1))
    with pytest.raises(ValueError, match="'linear' or 'tied'"):
        DistributionAdapter(VOCAB, 32, mode="onehot")
    with pytest.raises(ValueError, match="GaussianEnergy expects"):
        GaussianEnergy(2)(torch.randn(3))
