"""Generation: the cached EBT path equals recomputing both streams; the baseline's KV cache equals a full
pass; greedy, temperature and top-p decoding."""
import pytest
import torch

from architectures import TransformerConfig, TransformerPP
from energyflow.inference import Decoding, ThinkingConfig, generate_baseline, generate_ebt, next_token
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
