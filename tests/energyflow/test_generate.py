"""Generation: the cached EBT path equals recomputing both streams; the baseline's KV cache equals a full
pass; greedy, temperature and top-p decoding."""
import pytest
import torch

from architectures import TransformerConfig, TransformerPP
from energyflow.inference import (
    Decoding,
    ThinkingConfig,
    best_of_n_baseline,
    generate_baseline,
    generate_ebt,
    next_token,
)
from test_inference import tiny_text_ebm


@pytest.mark.parametrize("decoding,num_candidates,noise", [
    (Decoding(), 1, 0.0),
    (Decoding("sample", temperature=0.8, top_p=0.9), 3, 0.5),
])
def test_cached_ebt_generation_equals_recomputing_everything(decoding, num_candidates, noise):
    model = tiny_text_ebm()
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    config = ThinkingConfig(num_steps=3, step_size=200.0, noise_scale=noise)
    outputs = []
    for use_cache in (True, False):
        outputs.append(generate_ebt(model, prompt, 6, config, decoding, num_candidates=num_candidates,
                                    generator=torch.Generator().manual_seed(3), use_cache=use_cache))
    cached, recomputed = outputs
    assert cached.tokens.shape == (2, 6)
    assert torch.equal(cached.tokens, recomputed.tokens)
    torch.testing.assert_close(cached.energies, recomputed.energies, rtol=1e-4, atol=1e-4)


def test_baseline_kv_cache_equals_full_recomputation():
    torch.manual_seed(0)
    model = TransformerPP(TransformerConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=32), 256).eval()
    prompt = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(0))
    for decoding in (Decoding(), Decoding("sample", temperature=1.5, top_p=0.8)):
        runs = [generate_baseline(model, prompt, 8, decoding, generator=torch.Generator().manual_seed(1),
                                  use_cache=use_cache).tokens for use_cache in (True, False)]
        assert torch.equal(*runs)


def test_greedy_takes_the_argmax_and_low_temperature_sampling_agrees():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    greedy = next_token(logits, Decoding())
    assert torch.equal(greedy, logits.argmax(-1))
    cold = next_token(logits, Decoding("sample", temperature=1e-3), torch.Generator().manual_seed(0))
    assert torch.equal(cold, greedy)


def test_top_p_samples_only_from_the_nucleus():
    # Probabilities 0.5, 0.3, 0.15, 0.05: top_p = 0.7 keeps the first two (0.5 < 0.7 <= 0.8).
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, -1)
    tokens = next_token(logits, Decoding("sample", top_p=0.7), torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}
    # Renormalized nucleus: P(token 0) = 0.5 / 0.8; binomial standard error over 4000 draws, 5 sigma.
    share = float((tokens == 0).float().mean())
    assert abs(share - 0.625) < 5 * (0.625 * 0.375 / 4000) ** 0.5


def test_bad_decoding_and_prompts_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        Decoding("sample", top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Decoding("sample", temperature=0.0)
    with pytest.raises(ValueError, match="prompt"):
        generate_baseline(torch.nn.Identity(), torch.zeros(2, 0, dtype=torch.long), 3)


def _tiny_baseline():
    torch.manual_seed(0)
    return TransformerPP(TransformerConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=32), 256).eval()


def test_baseline_log_probs_are_the_models_own_probabilities_of_the_chosen_tokens():
    model = _tiny_baseline()
    prompt = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(0))
    out = generate_baseline(model, prompt, 5, Decoding("sample", temperature=2.0),
                            generator=torch.Generator().manual_seed(1))
    # Teacher-forced on its own continuation, the model's temperature-1 log-probabilities of the same tokens.
    sequence = torch.cat((prompt, out.tokens), dim=1)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(sequence[:, :-1]).float(), dim=-1)[:, prompt.shape[1] - 1:]
    expected = log_probs.gather(-1, out.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(out.log_probs, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.log_likelihood, expected.sum(1), rtol=1e-4, atol=1e-4)


def test_best_of_n_keeps_the_most_likely_of_the_same_draws():
    model = _tiny_baseline()
    prompt = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(0))
    decoding = Decoding("sample", temperature=1.5)
    best = best_of_n_baseline(model, prompt, 6, 5, decoding, generator=torch.Generator().manual_seed(2))
    # The same generator draws, unranked: the kept continuation is one of them and the likeliest.
    drawn = generate_baseline(model, prompt.repeat_interleave(5, dim=0), 6, decoding,
                              generator=torch.Generator().manual_seed(2))
    for row in range(2):
        candidates = drawn.log_likelihood[row * 5:(row + 1) * 5]
        index = int(candidates.argmax())
        assert torch.equal(best.tokens[row], drawn.tokens[row * 5 + index])
        assert float(best.log_likelihood[row]) == pytest.approx(float(candidates.max()))
    # One sample is plain decoding.
    single = best_of_n_baseline(model, prompt, 6, 1, decoding, generator=torch.Generator().manual_seed(2))
    plain = generate_baseline(model, prompt, 6, decoding, generator=torch.Generator().manual_seed(2))
    assert torch.equal(single.tokens, plain.tokens)


def test_best_of_n_refuses_greedy_repeats_and_bad_counts():
    model = _tiny_baseline()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="greedy"):
        best_of_n_baseline(model, prompt, 2, 4, Decoding())
    with pytest.raises(ValueError, match="num_samples"):
        best_of_n_baseline(model, prompt, 2, 0)
