"""``scripts/compute_matched.py``: EBT thinking against the Transformer++'s best-of-N at matched compute, on
the quickstart's debug runs: the scores are the generations' own, the compute is the documented count."""
from __future__ import annotations

import json

import pytest
import torch


def test_match_scores_and_config_parsing(load_script):
    script = load_script("scripts/compute_matched.py")
    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    generated = torch.tensor([[1, 2, 0, 4], [0, 6, 7, 8]])
    share, prefix = script.match_scores(generated, truth)
    assert share == pytest.approx(6 / 8) and prefix == pytest.approx((2 + 0) / 2)
    assert script.parse_configs("2x1, 4x4,8") == [(2, 1), (4, 4), (8, 1)]
    with pytest.raises(SystemExit, match="STEPSxCANDIDATES"):
        script.parse_configs("twox1")


def test_a_tiny_comparison_scores_the_models_own_generations(tmp_path, load_script):
    from energyflow.cli import main
    from energyflow.inference import Decoding, generate_baseline
    from energyflow.runs import load_run

    runs = tmp_path / "runs"
    assert main(["train", "experiments/quickstart_debug.gin", "--out", str(runs), "--bind",
                 "Trainer.progress = False"]) == 0
    script = load_script("scripts/compute_matched.py")
    out = tmp_path / "cm.md"
    summary = script.main([str(runs), "--prompts", "4", "--prompt-len", "8", "--new", "4", "--ebt", "1x1,2x2",
                           "--best-of", "1,3", "--temperatures", "1", "--noise", "0.1", "--out", str(out)])
    table = summary["table"]
    assert set(table) == {"baseline|greedy|1", "baseline|T=1|1", "baseline|T=1|3", "ebt|greedy|1|1",
                          "ebt|greedy|2|2", "ebt|T=1|1|1", "ebt|T=1|2|2"}
    # compute relative to one greedy decoding: best-of-N costs N; the EBT's count (P + M - 1 + 2 M N K) / (P + M - 1)
    # at the EBT's own per-token cost
    assert table["baseline|T=1|3"]["flops"] == pytest.approx(3.0)
    assert table["ebt|T=1|2|2"]["flops"] / table["ebt|T=1|1|1"]["flops"] == pytest.approx((11 + 2 * 4 * 4) / (11 + 2 * 4))
    # the greedy Transformer++ row is its own greedy generation scored against the true continuation
    result, _, _ = load_run(runs / "baseline", device="cpu")
    windows = script.prompt_sets(torch.cat(result.validation_windows), 12,
                                 type("Args", (), {"prompts": 4})())["pydoc (held out)"]
    tokens = generate_baseline(result.task.eval().model, windows[:, :8], 4, Decoding()).tokens
    share, prefix = script.match_scores(tokens, windows[:, 8:])
    assert table["baseline|greedy|1"]["pydoc (held out)|accuracy"][0] == pytest.approx(share)
    assert table["baseline|greedy|1"]["pydoc (held out)|prefix"][0] == pytest.approx(prefix)
    assert "best of 3 by likelihood" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["sets"] == ["pydoc (held out)", "Python source (stdlib)"]
