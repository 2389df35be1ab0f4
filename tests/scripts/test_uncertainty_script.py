"""``scripts/uncertainty_vs_baseline.py``: the Transformer++'s free uncertainty signals, checked where their values
are known (a model whose logits are all zero predicts the uniform distribution over the 256 bytes)."""
from __future__ import annotations

import math

import torch

from architectures import TransformerConfig, TransformerPP


def test_the_free_signals_of_a_uniform_predictor(load_script):
    script = load_script("scripts/uncertainty_vs_baseline.py")
    model = TransformerPP(TransformerConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=8), 256)
    with torch.no_grad():
        model.head.proj.weight.zero_()  # every logit 0: the uniform distribution
    tokens = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(0))
    signals = script.baseline_signals(model, tokens)
    assert all(values.shape == (3, 7) for values in signals.values())
    torch.testing.assert_close(signals["Transformer++ entropy"], torch.full((3, 7), math.log(256), dtype=torch.float64))
    torch.testing.assert_close(signals["Transformer++ NLL of the observed byte"],
                               torch.full((3, 7), math.log(256), dtype=torch.float64))
    torch.testing.assert_close(signals["Transformer++ 1 - max probability"],
                               torch.full((3, 7), 1 - 1 / 256, dtype=torch.float64))
    torch.testing.assert_close(signals["Transformer++ -logsumexp(logits)"],
                               torch.full((3, 7), -math.log(256), dtype=torch.float64))
