"""Compiled thinking (``ThinkingConfig(compile=True)``): the same states, energies and losses as eager to float32
rounding, on a text EBT with its cached context; a failing compiler falls back to eager with one warning."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from energyflow.inference import ThinkingConfig, think_tokens
from energyflow.inference import compiled
from test_inference import tiny_text_ebm


def _think(model, tokens, targets, config):
    return think_tokens(model, tokens, config, targets=targets, generator=torch.Generator().manual_seed(0))


def test_compiled_thinking_equals_eager(monkeypatch):
    monkeypatch.setattr(compiled, "_compiled", None)
    monkeypatch.setattr(compiled, "_disabled", None)
    model = tiny_text_ebm()
    windows = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    config = ThinkingConfig(num_steps=3, step_size=200.0)
    eager = _think(model, windows[:, :-1], windows[:, 1:], config)
    counters.clear()
    fast = _think(model, windows[:, :-1], windows[:, 1:], replace(config, compile=True))
    assert compiled.compile_status() == "ready"
    # One traced graph, no breaks: a construct the tracer cannot take (an autograd.Function with a jvp rule, out=
    # into views) breaks the graph and leaves the "compiled" path slower than eager while its numbers stay equal.
    assert not counters["graph_break"], dict(counters["graph_break"])
    # float32 rounding, amplified by three steps of a large step size: a few parts in 1e5
    torch.testing.assert_close(fast.state, eager.state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.thinking.energy_trace, eager.thinking.energy_trace, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.thinking.records, eager.thinking.records, rtol=1e-5, atol=1e-5)


def test_a_failing_compiler_falls_back_to_eager_once(monkeypatch):
    monkeypatch.setattr(compiled, "_compiled", None)
    monkeypatch.setattr(compiled, "_disabled", None)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler on this machine")

    monkeypatch.setattr(torch, "compile", no_compiler)
    model = tiny_text_ebm()
    windows = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    config = ThinkingConfig(num_steps=2, step_size=200.0)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        fast = _think(model, windows[:, :-1], windows[:, 1:], replace(config, compile=True))
    assert compiled.compile_status().startswith("disabled")
    eager = _think(model, windows[:, :-1], windows[:, 1:], config)
    assert torch.equal(fast.state, eager.state)  # the eager path exactly
