"""Verifier utilities: rank statistics (AUROC, Spearman), continuation scoring, per-token colouring."""
import html
import re

import pytest
import torch

from energyflow.verifier import (
    TokenValues,
    auroc,
    average_ranks,
    byte_pieces,
    score_continuations,
    spearman,
    to_html,
    to_rich,
    token_energies,
    write_html,
)
from test_inference import tiny_text_ebm


def test_average_ranks_share_ties():
    ranks = average_ranks(torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 1.0, 1.0]))
    assert ranks.tolist() == [6.0, 2.0, 4.5, 4.5, 7.0, 2.0, 2.0]


def test_auroc_exact_on_a_hand_computed_case_with_ties():
    # Pairs (positive, negative): (1,0) win, (1,1) tie = 1/2, (2,0) win, (2,1) win -> 3.5 / 4.
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.875, abs=1e-12)
    assert auroc(torch.tensor([2.0, 2.0]), torch.tensor([2.0])) == pytest.approx(0.5, abs=1e-12)


def test_auroc_is_one_on_separable_sets_and_zero_reversed():
    generator = torch.Generator().manual_seed(0)
    low, high = torch.rand(100, generator=generator), 2.0 + torch.rand(80, generator=generator)
    assert auroc(low, high) == 1.0
    assert auroc(high, low) == 0.0


def test_auroc_near_one_half_on_identically_distributed_sets():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=generator), torch.randn(1200, generator=generator)
    # Under the null, the Mann-Whitney AUROC has standard error sqrt((n1 + n2 + 1) / (12 n1 n2)); 4 of them.
    standard_error = ((1000 + 1200 + 1) / (12 * 1000 * 1200)) ** 0.5
    assert abs(auroc(a, b) - 0.5) < 4 * standard_error
    assert auroc(a, a.clone()) == pytest.approx(0.5, abs=1e-12)


def test_spearman_is_rank_based():
    x = torch.linspace(0.1, 5.0, 30)
    assert spearman(x, torch.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -x ** 3) == pytest.approx(-1.0)
    scipy_stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 5, (40,), generator=generator).float(), torch.randn(40, generator=generator)
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)


def test_rank_statistics_refuse_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([float("nan")]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="constant"):
        spearman(torch.ones(5), torch.arange(5.0))
    with pytest.raises(ValueError, match="paired"):
        spearman(torch.ones(5), torch.ones(4))


def test_continuation_scores_equal_the_energies_of_the_whole_sequence():
    model = tiny_text_ebm()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (5,), generator=generator)
    continuations = [torch.randint(0, 256, (length,), generator=generator) for length in (4, 1, 6)]
    scores = score_continuations(model, prompt, continuations)
    for continuation, energies in zip(continuations, scores.token_energies):
        whole = token_energies(model, torch.cat((prompt, continuation))[None])[0]
        torch.testing.assert_close(energies, whole[len(prompt) - 1:], rtol=1e-4, atol=1e-5)
    means = torch.stack([e.mean() for e in scores.token_energies])
    torch.testing.assert_close(scores.mean_energy, means)
    assert scores.order.tolist() == torch.argsort(means).tolist()


def test_byte_pieces_group_utf8_characters_and_take_the_hardest_byte():
    text = "aé€"
    pieces = byte_pieces(list(text.encode()), [0.0, 1.0, 2.0, 3.0, 5.0, 4.0])
    assert pieces.texts == ["a", "é", "€"]
    assert pieces.values == [0.0, 2.0, 5.0]


def test_html_export_contains_every_token_escaped(tmp_path):
    texts = ["<script>", "alert(1)", "</script>", " & ", '"q"', "'s", "\n", "é", "plain"]
    values = [float("nan")] + [float(i) for i in range(len(texts) - 1)]
    path = write_html(tmp_path / "out" / "tokens.html", TokenValues(texts, values), title="<t>")
    page = path.read_text(encoding="utf-8")
    spans = re.findall(r"<span[^>]*>(.*?)</span>", page, flags=re.DOTALL)
    assert spans == [html.escape(t, quote=True) for t in texts]
    assert "<script>" not in page and "&lt;t&gt;" in page
    assert page.count('title="energy') == len(texts) - 1  # the NaN token stays uncoloured
    assert not list(tmp_path.glob("out/*.tmp"))


def test_rich_text_keeps_the_text_and_colours_by_percentile():
    tokens = TokenValues(["lo", "mid", "hi"], [-3.0, 0.0, 7.0])
    text = to_rich(tokens)
    assert text.plain == "lomidhi"
    styles = [str(span.style) for span in text.spans]
    assert styles == ["black on rgb(80,200,80)", "black on rgb(255,200,60)", "black on rgb(255,50,60)"]
    assert "rgb(80,200,80)" in to_html(tokens) and "rgb(255,50,60)" in to_html(tokens)
