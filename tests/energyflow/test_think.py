"""Thinking sweeps (loss vs steps and samples) and their plots."""
import builtins
import io
import json

import pytest
import torch

from energyflow import plots
from energyflow.inference import ThinkingConfig, think_tokens
from energyflow.inference.commands import sweep_table, write_sweep
from energyflow.inference.sweep import thinking_sweep
from test_inference import tiny_text_ebm


def _windows(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 9), generator=generator, dtype=torch.uint8) for _ in range(2)]


def test_sweep_prefixes_equal_shorter_runs_and_selection_lowers_energy():
    model = tiny_text_ebm()
    windows = _windows()
    config = ThinkingConfig(num_steps=1, step_size=300.0)
    sweep = thinking_sweep(model, windows, config, steps=[1, 3], samples=[1, 4], device=torch.device("cpu"))
    assert len(sweep.loss[1]) == 4 and len(sweep.energy[4]) == 4
    # The loss after 1 step of the 3-step run equals a separate 1-step run from the same seed.
    generator = torch.Generator().manual_seed(0)
    losses = []
    for window in windows:
        tokens, targets = window[:, :-1].long(), window[:, 1:].long()
        verified = think_tokens(model, tokens, config, targets=targets, generator=generator)
        losses.append(float(verified.thinking.records[-1].mean()))
    assert sweep.loss_at(1, 1) == pytest.approx(sum(losses) / 2, rel=1e-5)
    # Best of 4 by energy can only lower the mean chosen energy below one sample's at the same step, on
    # average over many positions (each position picks the minimum of 4 draws from one distribution).
    assert sweep.energy[4][3] < sweep.energy[1][3]
    assert sweep.mean_steps[1] == 3.0
    assert sweep.verification_gain(4, 3) == pytest.approx(sweep.loss[1][3] - sweep.loss[4][3])
    mean, standard_error = sweep.paired_difference((1, 1), (1, 3))
    assert mean == pytest.approx(sweep.loss[1][1] - sweep.loss[1][3], rel=1e-5)
    per_window = torch.tensor(sweep.window_loss[1][1]) - torch.tensor(sweep.window_loss[1][3])
    assert len(per_window) == 4 and standard_error == pytest.approx(float(per_window.std() / 2.0), rel=1e-5)


def test_sweep_with_adaptive_stopping_reports_fewer_steps_and_pads_its_trace():
    model = tiny_text_ebm()
    config = ThinkingConfig(num_steps=1, step_size=300.0, energy_tolerance=1e9, check_every=1)
    sweep = thinking_sweep(model, _windows(), config, steps=[1, 4], samples=[1], device=torch.device("cpu"))
    # A huge tolerance freezes every position after its first step; the loop exits and the trace is padded.
    assert sweep.mean_steps[1] == 1.0
    assert sweep.loss[1][1] == sweep.loss[1][4]


def test_sweep_outputs_table_json_and_plots(tmp_path):
    model = tiny_text_ebm()
    sweep = thinking_sweep(model, _windows(), ThinkingConfig(num_steps=1, step_size=300.0), steps=[1, 2],
                           samples=[1, 2], device=torch.device("cpu"))
    sweep.baseline_loss = 5.5
    paths = write_sweep(sweep, tmp_path)
    assert [p.name for p in paths] == ["think.json", "loss_vs_steps.png", "verification_gain.png",
                                      "energy_vs_step.png"]
    for path in paths[1:]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(paths[0].read_text())
    assert saved["baseline_loss"] == 5.5 and saved["loss"]["2"] == sweep.loss[2]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(sweep_table(sweep))
    text = console.export_text()
    assert "Transformer++" in text and "5.5000" in text and f"{sweep.loss_at(2, 2):.4f}" in text


def test_plots_refuse_mismatched_series_and_explain_a_missing_matplotlib(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="series"):
        plots.line_plot(tmp_path / "x.png", [1, 2], {"a": [1.0]}, xlabel="x", ylabel="y", title="t")
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"energyflow\[plot\]"):
        plots.energy_vs_step(tmp_path / "e.png", {1: [0.0, 1.0]})


def test_spread_batches_cover_the_whole_set_and_refuse_too_little_text():
    from energyflow.inference.sweep import spread_batches

    windows = torch.arange(10).view(10, 1).expand(10, 3)
    batches = spread_batches(windows, 2, 2)
    assert [b[:, 0].tolist() for b in batches] == [[0, 3], [6, 9]]
    with pytest.raises(ValueError, match="cannot fill"):
        spread_batches(windows, 3, 4)


def test_every_gain_in_the_table_carries_its_paired_standard_error_and_progress_counts_every_batch():
    from rich.console import Console

    from energyflow.monitor import progress_bar

    model = tiny_text_ebm()
    calls = []
    windows = _windows() + _windows(1)
    sweep = thinking_sweep(model, windows, ThinkingConfig(num_steps=1, step_size=300.0), steps=[1, 4],
                           samples=[1, 2], device=torch.device("cpu"), advance=calls.append)
    assert calls == [1] * (len(windows) * 2)  # one call per batch per sample count
    console = Console(width=300, record=True)
    console.print(sweep_table(sweep))
    text = console.export_text()
    steps_gain, steps_error = sweep.paired_difference((1, 1), (1, 4))
    samples_gain, samples_error = sweep.paired_difference((1, 4), (2, 4))
    assert f"{steps_gain:+.4f} ± {steps_error:.4f}" in text
    assert f"{samples_gain:+.4f} ± {samples_error:.4f}" in text
    assert "over the 8 windows (paired by window)" in text
    # the bar itself: advanced to its total on a terminal, a no-op when disabled
    terminal = Console(file=io.StringIO(), force_terminal=True, width=120)
    with progress_bar("think", 3, console=terminal) as advance:
        for _ in range(3):
            advance()
    with progress_bar("think", 3, enabled=False) as advance:
        advance()
