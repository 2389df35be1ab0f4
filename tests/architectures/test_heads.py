import pytest
import torch

from architectures.heads import LinearEnergyHead, LMHead, MeanPatchEnergyHead, QuadraticEnergyHead, reinit_heads


def test_linear_head_is_a_bias_free_readout_after_a_norm():
    torch.manual_seed(0)
    head = LinearEnergyHead(6)
    h = torch.randn(2, 3, 6)
    assert head(h).shape == (2, 3) and head.proj.bias is None
    torch.testing.assert_close(head(h), head(3.0 * h), rtol=1e-4, atol=1e-5)  # the norm removes the scale
    plain = LinearEnergyHead(6, norm=False)
    torch.testing.assert_close(plain(h), h @ plain.proj.weight[0])


def test_zero_head_starts_at_zero_and_survives_a_model_wide_init():
    head = LinearEnergyHead(4, zero=True)
    assert torch.count_nonzero(head.proj.weight) == 0
    torch.nn.init.normal_(head.proj.weight)
    reinit_heads(torch.nn.Sequential(head))
    assert torch.count_nonzero(head.proj.weight) == 0


def test_quadratic_head_formula_and_rank():
    torch.manual_seed(0)
    head = QuadraticEnergyHead(5, rank=3, norm=False)
    h = torch.randn(4, 5)
    torch.testing.assert_close(head(h), 0.5 * (h @ head.proj.weight.T).pow(2).sum(-1))
    assert head.proj.weight.shape == (3, 5)
    assert (QuadraticEnergyHead(5)(h) >= 0).all()


def test_mean_patch_head_averages_per_patch_scalars():
    torch.manual_seed(0)
    per_patch = LinearEnergyHead(4)
    head = MeanPatchEnergyHead(per_patch)
    h = torch.randn(2, 7, 4)
    torch.testing.assert_close(head(h), per_patch(h).mean(-1))
    with pytest.raises(ValueError, match="patch features"):
        head(torch.randn(7, 4))


def test_lm_head_shapes():
    head = LMHead(4, 9)
    assert head(torch.randn(2, 3, 4)).shape == (2, 3, 9) and head.proj.bias is None
