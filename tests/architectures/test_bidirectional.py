import pytest
import torch

from architectures.bidirectional import BidirectionalConfig, BidirectionalTransformer
from architectures.heads import MeanPatchEnergyHead, QuadraticEnergyHead


def _config(**overrides) -> BidirectionalConfig:
    return BidirectionalConfig(**{"image_size": 8, "patch_size": 4, "in_channels": 2, "dim": 16, "num_layers": 2,
                                  "num_heads": 2, "mlp_ratio": 2.0, **overrides})


def _perturb(model: torch.nn.Module, std: float = 0.2) -> None:
    """Move every parameter off its (partly zero) init so the tests below are not trivially satisfied."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))


def test_energy_is_exactly_constant_at_adaln_zero_init():
    torch.manual_seed(0)
    model = BidirectionalTransformer(_config())
    energies = model(torch.randn(5, 2, 8, 8))
    assert energies.shape == (5,)
    assert torch.equal(energies, torch.full_like(energies, energies[0].item()))
    x = torch.randn(3, 4, 16)
    for block in model.blocks:  # adaLN-Zero: every block is the identity at init
        assert torch.equal(block(x, torch.randn(3, 16)), x)


def test_denoiser_outputs_zero_at_init_and_images_after_training_moves_it():
    torch.manual_seed(0)
    model = BidirectionalTransformer(_config(), mode="denoise")
    images, timesteps = torch.randn(3, 2, 8, 8), torch.tensor([1.0, 50.0, 99.0])
    assert torch.equal(model(images, timesteps), torch.zeros_like(images))
    _perturb(model)
    out = model(images, timesteps)
    assert out.shape == images.shape and out.abs().sum() > 0
    assert not torch.allclose(model(images, timesteps.flip(0)), out)  # the timestep conditions it


def test_patchify_round_trip():
    model = BidirectionalTransformer(_config(), mode="denoise")
    images = torch.randn(2, 2, 8, 8)
    patches = model._patchify(images)
    assert patches.shape == (2, 4, 2 * 16)
    torch.testing.assert_close(patches[0, 1], images[0, :, 0:4, 4:8].reshape(-1))  # row-major patch order
    torch.testing.assert_close(model._unpatchify(patches), images)


@pytest.mark.parametrize("mode", ["energy", "denoise"])
def test_invariant_to_batch_order(mode):
    torch.manual_seed(0)
    model = BidirectionalTransformer(_config(), mode=mode).double()
    _perturb(model)
    images = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    timesteps = torch.arange(6, dtype=torch.float64) * 10 if mode == "denoise" else None
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    out = model(images, timesteps)
    shuffled = model(images[perm], timesteps[perm] if timesteps is not None else None)
    torch.testing.assert_close(shuffled, out[perm])
    assert out.abs().sum() > 0


def test_odd_and_mismatched_image_sizes_are_rejected():
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        _config(image_size=10)
    model = BidirectionalTransformer(_config())
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        model(torch.randn(1, 2, 9, 8))
    with pytest.raises(ValueError, match="differs from the configured 8x8"):
        model(torch.randn(1, 2, 12, 12))
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\]"):
        model(torch.randn(1, 3, 8, 8))


def test_condition_and_mode_misuse_is_rejected():
    energy, denoiser = BidirectionalTransformer(_config()), BidirectionalTransformer(_config(), mode="denoise")
    images = torch.randn(2, 2, 8, 8)
    with pytest.raises(ValueError, match="no timestep"):
        energy(images, torch.zeros(2))
    with pytest.raises(ValueError, match="timesteps of shape"):
        denoiser(images)
    with pytest.raises(ValueError, match="mode must be"):
        BidirectionalTransformer(_config(), mode="classify")
    with pytest.raises(ValueError, match="head only applies"):
        BidirectionalTransformer(_config(), mode="denoise", head=QuadraticEnergyHead(16))


def test_timestep_width_and_attention_backend_knobs(no_fused_attention):
    model = BidirectionalTransformer(_config(attention_backend="math"), mode="denoise", timestep_dim=32)
    assert model.timestep_mlp[0].in_features == 32
    with torch.no_grad():  # "auto" would pick the (here refused) fused kernel; "math" must not
        assert model(torch.randn(2, 2, 8, 8), torch.tensor([1.0, 2.0])).shape == (2, 2, 8, 8)


def test_custom_head_and_presets_and_init():
    model = BidirectionalTransformer(_config(), head=MeanPatchEnergyHead(QuadraticEnergyHead(16)))
    assert (model(torch.randn(2, 2, 8, 8)) >= 0).all()
    config = BidirectionalConfig.from_preset("large", image_size=128, patch_size=16)
    assert (config.num_layers, config.num_heads, config.dim, config.num_patches) == (24, 16, 1536, 64)
    torch.manual_seed(0)
    normal = BidirectionalTransformer(_config(init="normal")).blocks[0].qkv.weight
    xavier = BidirectionalTransformer(_config(init="xavier")).blocks[0].qkv.weight
    assert normal.std() < 0.03 < xavier.std()


@pytest.mark.parametrize("mode", ["energy", "denoise"])
def test_second_order_gradients_float64(second_order, no_fused_attention, mode):
    torch.manual_seed(0)
    model = BidirectionalTransformer(_config(dim=8, num_layers=1, image_size=4, patch_size=2), mode=mode).double()
    _perturb(model)
    g = torch.Generator().manual_seed(2)
    y0, target = (torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    if mode == "energy":
        energy_fn = model
    else:  # a denoiser is no energy; any smooth scalar of its output exercises the same second-order graph
        timesteps = torch.tensor([3.0, 7.0], dtype=torch.float64)
        energy_fn = lambda y: model(y, timesteps).pow(2).flatten(1).sum(-1)  # noqa: E731
    second_order(model, energy_fn, y0, target, step_size=0.1)
