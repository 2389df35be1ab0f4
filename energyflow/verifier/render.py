"""Per-token uncertainty as colour: in the terminal (``rich``) and as a standalone HTML page.

Colours come from each token's rank among the text's values (its percentile), not from raw energies,
so one extreme token does not wash out the rest: green = among the lowest energies (confident), yellow =
middling, red = among the highest (uncertain). Tokens without a value (e.g. the first token, which
nothing predicts) stay uncoloured.
"""
from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from rich.text import Text

from energyflow.verifier.metrics import average_ranks


@dataclass
class TokenValues:
    """Displayed pieces of text and one value per piece (``nan`` = no value)."""

    texts: list[str]
    values: list[float]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.values):
            raise ValueError(f"{len(self.texts)} token texts but {len(self.values)} values; give one value per token")


def byte_pieces(token_ids: Sequence[int], values: Sequence[float]) -> TokenValues:
    """Byte-level tokens -> UTF-8 characters: a multi-byte character is one piece whose value is the
    largest of its bytes' (its hardest byte)."""
    if len(token_ids) != len(values):
        raise ValueError(f"{len(token_ids)} tokens but {len(values)} values; give one value per token")
    texts, merged, group, group_values = [], [], bytearray(), []
    for token, value in zip(token_ids, values):
        if group and (token & 0xC0) != 0x80:  # a new lead byte closes the previous character
            texts.append(group.decode("utf-8", errors="replace"))
            merged.append(_nanmax(group_values))
            group, group_values = bytearray(), []
        group.append(int(token))
        group_values.append(float(value))
    if group:
        texts.append(group.decode("utf-8", errors="replace"))
        merged.append(_nanmax(group_values))
    return TokenValues(texts, merged)


def _nanmax(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else float("nan")


def percentiles(values: Sequence[float]) -> list[Optional[float]]:
    """Each value's rank among the non-NaN values, scaled to [0, 1] (ties share their mean rank)."""
    known = [i for i, v in enumerate(values) if not math.isnan(v)]
    out: list[Optional[float]] = [None] * len(values)
    if not known:
        return out
    ranks = average_ranks(torch.tensor([values[i] for i in known], dtype=torch.float64))
    scale = max(len(known) - 1, 1)
    for i, rank in zip(known, ranks.tolist()):
        out[i] = (rank - 1.0) / scale
    return out


def colour(fraction: float) -> tuple[int, int, int]:
    """0 -> green, 0.5 -> yellow, 1 -> red (RGB 0..255)."""
    fraction = min(max(fraction, 0.0), 1.0)
    if fraction < 0.5:
        return int(round(80 + 350 * fraction)), 200, 80
    return 255, int(round(200 - 300 * (fraction - 0.5))), 60


def to_rich(tokens: TokenValues) -> Text:
    """A ``rich.text.Text`` with every piece on a background coloured by its percentile."""
    text = Text()
    for piece, fraction in zip(tokens.texts, percentiles(tokens.values)):
        if fraction is None:
            text.append(piece)
        else:
            red, green, blue = colour(fraction)
            text.append(piece, style=f"black on rgb({red},{green},{blue})")
    return text


def to_html(tokens: TokenValues, *, title: str = "per-token energy") -> str:
    """A standalone HTML page; every piece is escaped, its value in a hover title."""
    spans = []
    for piece, value, fraction in zip(tokens.texts, tokens.values, percentiles(tokens.values)):
        escaped = html.escape(piece, quote=True)
        if fraction is None:
            spans.append(f"<span>{escaped}</span>")
        else:
            red, green, blue = colour(fraction)
            spans.append(f'<span style="background: rgb({red},{green},{blue})" title="energy {value:.4f}">'
                         f"{escaped}</span>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title></head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            "<p>Background: the token's energy percentile within this text: green = low (confident), "
            "red = high (uncertain). Hover for the value.</p>\n"
            "<pre style=\"white-space: pre-wrap; font-family: monospace\">" + "".join(spans) + "</pre>\n"
            "</body></html>\n")


def write_html(path: Union[str, Path], tokens: TokenValues, *, title: str = "per-token energy") -> Path:
    """Write ``to_html`` atomically (a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(to_html(tokens, title=title), encoding="utf-8")
    os.replace(temporary, path)
    return path
