"""The ratio loss steers the learned chunking: on space-separated words the boundary fraction converges to
the target 1/N, and without the loss it does not track the target."""
from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from architectures.hnet import HNetConfig, HNetLM


STEPS, TAIL = 120, 40
# Per-step fractions over 8 x 32 bytes fluctuate with sd ~0.05 around their level and are autocorrelated over
# a few steps (ESS of the 40-step tail ~10), so the tail mean's standard error is ~0.016: 0.05 is ~3 SE.
TOLERANCE = 0.05


def space_separated_words(generator: torch.Generator, batch: int, length: int) -> torch.Tensor:
    """``[batch, length + 1]`` bytes of random 3-7 letter words over ``a-h``, one space between words."""
    rows = []
    for _ in range(batch):
        text = ""
        while len(text) <= length:
            size = int(torch.randint(3, 8, (1,), generator=generator))
            letters = torch.randint(0, 8, (size,), generator=generator)
            text += "".join("abcdefgh"[int(i)] for i in letters) + " "
        rows.append(list(text[: length + 1].encode()))
    return torch.tensor(rows)


def tail_boundary_fraction(weight: float, compression: float) -> float:
    """Train a tiny one-stage H-Net LM with ``CE + weight * ratio loss``; mean fraction of the last steps."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    config = HNetConfig(dims=(16, 16), num_heads=(2, 2), encoder_layers=(1,), decoder_layers=(1,), main_layers=1,
                        compression=(compression,), max_seq_len=64)
    model = HNetLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    fractions = []
    for _ in range(STEPS):
        data = space_separated_words(generator, 8, 32)
        logits, routing = model.forward_with_routing(data[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten()) + weight * routing[0].ratio_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        fractions.append(float(routing[0].boundary_fraction))
    return statistics.mean(fractions[-TAIL:])


@pytest.mark.parametrize("compression", [2.0, 6.0])
def test_boundary_fraction_converges_to_the_target(compression):
    assert abs(tail_boundary_fraction(1.0, compression) - 1.0 / compression) < TOLERANCE


def test_boundary_fraction_does_not_track_the_target_without_the_ratio_loss():
    # Same seeds and data as the converging run at N = 2; only the loss weight differs.
    assert abs(tail_boundary_fraction(0.0, 2.0) - 0.5) > 3 * TOLERANCE
