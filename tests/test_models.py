"""Generator and discriminator shapes for every supported size; initialisation; losses."""

from __future__ import annotations

import itertools

import pytest
import torch

from medsynth.config import ModelConfig
from medsynth.losses import discriminator_loss, generator_loss, gradient_penalty, r1_penalty
from medsynth.models import (
    Discriminator3d,
    Generator3d,
    NearestResizeConv3d,
    PhaseSplitConvTranspose3d,
    PixelShuffleUp3d,
    TrilinearResizeConv3d,
    binomial_blur,
    build_models,
    forward_flops,
    parameter_count,
    sample_latent,
)

TINY = ModelConfig(latent_dim=8, base_channels=1, max_channels=4, pack=1)


@pytest.mark.parametrize("side", [16, 32, 64, 128, 256])
def test_cubic_shapes(side):
    shape = (side, side, side)
    generator, discriminator = build_models(TINY, shape)
    with torch.no_grad():
        volume = generator(torch.randn(2, 8))
        assert volume.shape == (2, 1, *shape)
        assert volume.abs().max() <= 1.0  # tanh
        assert discriminator(volume).shape == (2,)


@pytest.mark.parametrize(
    "shape",
    [(128, 128, 64), (64, 32, 16), (16, 64, 32), (256, 128, 16)] + list(itertools.permutations((16, 32, 64)))[:2],
)
def test_non_cubic_shapes(shape):
    generator, discriminator = build_models(TINY, shape)
    with torch.no_grad():
        volume = generator(torch.randn(1, 8))
    assert volume.shape == (1, 1, *shape)
    assert discriminator(volume).shape == (1,)


def test_non_cubic_base_grid_follows_the_shortest_axis():
    generator = Generator3d(ModelConfig(base_grid=4), (128, 128, 64))
    assert generator.base_shape == (8, 8, 4)


def test_width_is_set_by_base_channels():
    narrow = Generator3d(ModelConfig(base_channels=8), (32, 32, 32))
    wide = Generator3d(ModelConfig(base_channels=16), (32, 32, 32))
    assert narrow.to_volume[1].in_channels == 8 and wide.to_volume[1].in_channels == 16
    assert sum(p.numel() for p in wide.parameters()) > 2 * sum(p.numel() for p in narrow.parameters())


def test_discriminator_structure_first_layer_without_norm_and_leaky_relu():
    discriminator = Discriminator3d(
        ModelConfig(base_channels=4, spectral_norm=False, discriminator_norm="batch", pack=1), (32, 32, 32)
    )
    layers = list(discriminator.features)
    assert isinstance(layers[0], torch.nn.Conv3d) and isinstance(layers[1], torch.nn.LeakyReLU)
    assert layers[1].negative_slope == 0.2
    assert isinstance(layers[3], torch.nn.BatchNorm3d)


def test_a_discriminator_stem_reads_the_packed_volumes_at_full_resolution():
    plain = Discriminator3d(ModelConfig(base_channels=4, pack=2), (32, 32, 32))
    stemmed = Discriminator3d(ModelConfig(base_channels=4, pack=2, discriminator_stem=6), (32, 32, 32))
    stem, first_strided = stemmed.features[0], stemmed.features[2]
    assert (stem.in_channels, stem.out_channels, stem.stride, stem.kernel_size) == (2, 6, (1, 1, 1), (3, 3, 3))
    assert first_strided.in_channels == 6 and first_strided.stride == (2, 2, 2)
    volumes = torch.randn(3, 2, 32, 32, 32)
    assert stemmed(volumes).shape == plain(volumes).shape == (3,)
    assert forward_flops(stemmed, volumes) > forward_flops(plain, volumes)


def test_the_last_doubling_can_interpolate_alone():
    generator = Generator3d(ModelConfig(base_channels=4, output_upsample="trilinear"), (32, 32, 32))
    assert type(generator.to_volume) is TrilinearResizeConv3d
    assert all(type(m) is not TrilinearResizeConv3d for m in generator.blocks)
    assert generator(torch.randn(2, 128)).shape == (2, 1, 32, 32, 32)


def test_generator_structure_resize_convolutions_batchnorm_relu():
    generator = Generator3d(ModelConfig(base_channels=4), (32, 32, 32))  # model.upsample=resize, the default
    first, norm, activation = generator.blocks[:3]
    assert isinstance(first, NearestResizeConv3d) and first[1].kernel_size == (3, 3, 3)
    assert isinstance(norm, torch.nn.BatchNorm3d) and isinstance(activation, torch.nn.ReLU)
    assert isinstance(generator.to_volume, NearestResizeConv3d)


def test_generator_structure_transposed_convolutions_batchnorm_relu():
    generator = Generator3d(ModelConfig(base_channels=4, upsample="transposed"), (32, 32, 32))
    first, norm, activation = generator.blocks[:3]
    assert isinstance(first, torch.nn.ConvTranspose3d) and first.stride == (2, 2, 2)
    assert isinstance(norm, torch.nn.BatchNorm3d) and isinstance(activation, torch.nn.ReLU)
    assert isinstance(generator.to_volume, torch.nn.ConvTranspose3d)  # computed as a convolution, same operator


def test_spectral_norm_option():
    discriminator = Discriminator3d(
        ModelConfig(base_channels=4, spectral_norm=True, discriminator_norm="none", pack=1), (16, 16, 16)
    )
    convs = [m for m in discriminator.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(hasattr(c, "parametrizations") for c in convs)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in discriminator.modules())
    with torch.no_grad():
        assert discriminator(torch.zeros(2, 1, 16, 16, 16)).shape == (2,)


def test_dcgan_initialisation():
    torch.manual_seed(0)
    for upsample in ("resize", "transposed"):
        generator = Generator3d(ModelConfig(base_channels=16, upsample=upsample), (32, 32, 32))
        conv = generator.blocks[0][1] if upsample == "resize" else generator.blocks[0]
        assert abs(conv.weight.std().item() - 0.02) < 0.002 and abs(conv.weight.mean().item()) < 0.002
    norm = generator.blocks[1]
    assert abs(norm.weight.mean().item() - 1.0) < 0.01 and norm.bias.abs().max() == 0


def test_flop_count_matches_the_arithmetic():
    config = ModelConfig(latent_dim=8, base_channels=2, max_channels=4, upsample="transposed")
    generator = Generator3d(config, (16, 16, 16))
    # Linear 8 -> 4*4^3 (2*8*256), 2 FLOPs per MAC. The transposed convolutions with few outputs,
    # ConvT 4->2 on 4^3 inputs and ConvT 2->1 on 8^3 inputs, run as 2^3 convolutions with 8x the
    # outputs over the grid padded by one (5^3 and 9^3 outputs).
    expected = 2 * 8 * 256 + 2 * 4 * 16 * 2**3 * 5**3 + 2 * 2 * 8 * 2**3 * 9**3
    assert forward_flops(generator, torch.zeros(1, 8)) == expected


def test_resize_costs_the_flops_of_transposed_at_the_same_width():
    """Computed as the transposed convolution it equals, resize-convolution costs what transposed
    does, plus the small, batch-independent cost of summing its taps (not 27/8 of it)."""
    flops = {
        upsample: forward_flops(Generator3d(ModelConfig(upsample=upsample), (32, 32, 32)), torch.zeros(8, 128))
        for upsample in ("transposed", "resize", "pixel_shuffle")
    }
    assert flops["transposed"] <= flops["resize"] < 1.05 * flops["transposed"]
    assert flops["pixel_shuffle"] > 3 * flops["transposed"]


def test_latent_priors():
    rng = torch.Generator().manual_seed(0)
    normal = sample_latent(4096, 8, "normal", rng, "cpu")
    uniform = sample_latent(4096, 8, "uniform", rng, "cpu")
    assert abs(normal.std().item() - 1.0) < 0.05
    assert uniform.min() >= -1 and uniform.max() <= 1 and abs(uniform.std().item() - 3**-0.5) < 0.05
    again = sample_latent(3, 8, "normal", torch.Generator().manual_seed(5), "cpu")
    assert torch.equal(again, sample_latent(3, 8, "normal", torch.Generator().manual_seed(5), "cpu"))


def test_non_saturating_losses_are_the_textbook_ones():
    real = torch.tensor([2.0, -1.0])
    fake = torch.tensor([0.5, -3.0])
    sigmoid = torch.sigmoid
    expected_d = -(torch.log(sigmoid(real)).mean() + torch.log(1 - sigmoid(fake)).mean())
    assert torch.allclose(discriminator_loss("non_saturating", real, fake), expected_d)
    assert torch.allclose(generator_loss("non_saturating", fake), -torch.log(sigmoid(fake)).mean())  # -log D(G(z))


def test_hinge_and_wasserstein_losses():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.0])
    assert torch.allclose(discriminator_loss("hinge", real, fake), torch.tensor((0 + 0.5) / 2 + (0 + 1) / 2))
    assert torch.allclose(generator_loss("hinge", fake), torch.tensor(1.0))
    assert torch.allclose(discriminator_loss("wgan_gp", real, fake), fake.mean() - real.mean())
    with pytest.raises(ValueError):
        discriminator_loss("nope", real, fake)


def test_r1_and_gradient_penalty():
    weight = torch.tensor(3.0)

    def critic(x):  # D(x) = 3 * sum(x): its input gradient has norm 3 * sqrt(voxels)
        return weight * x.flatten(1).sum(1)

    real = torch.randn(2, 1, 2, 2, 2, requires_grad=True)
    assert torch.allclose(r1_penalty(critic(real), real), torch.tensor(9.0 * 8))
    fake = torch.randn(2, 1, 2, 2, 2)
    expected = (3.0 * 8**0.5 - 1.0) ** 2
    assert torch.allclose(gradient_penalty(critic, real.detach(), fake), torch.tensor(expected))


def test_minibatch_std_has_finite_gradients_on_identical_volumes():
    """Real batches share their background exactly; std's gradient there is 0/0. Regression test
    for the NaN that stopped training within 25 steps."""
    discriminator = Discriminator3d(ModelConfig(base_channels=2, minibatch_std=True, pack=1), (16, 16, 16))
    volumes = torch.full((4, 1, 16, 16, 16), -1.0, requires_grad=True)
    logits = discriminator(volumes)
    (gradient,) = torch.autograd.grad(logits.sum(), volumes, create_graph=True)
    gradient.pow(2).sum().backward()  # the R1 double backward
    assert all(torch.isfinite(p.grad).all() for p in discriminator.parameters() if p.grad is not None)


def test_pacgan_discriminator_takes_packs():
    discriminator = Discriminator3d(ModelConfig(base_channels=2, pack=2), (16, 16, 16))
    assert discriminator(torch.zeros(3, 2, 16, 16, 16)).shape == (3,)


@pytest.mark.parametrize(("c_in", "c_out", "grid"), [(8, 1, (4, 4, 4)), (4, 3, (3, 5, 2)), (2, 2, (1, 2, 3))])
def test_phase_split_transposed_convolution_equals_the_plain_one(c_in, c_out, grid):
    """The generator's last layer is computed as one ordinary convolution (speed); it must be the
    same operator, values and gradients, with the same parameters."""
    torch.manual_seed(0)
    fast = PhaseSplitConvTranspose3d(c_in, c_out, kernel_size=4, stride=2, padding=1)
    plain = torch.nn.ConvTranspose3d(c_in, c_out, kernel_size=4, stride=2, padding=1)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, c_in, *grid, dtype=torch.float64, requires_grad=True)
    fast, plain = fast.double(), plain.double()
    out_fast, out_plain = fast(x), plain(x)
    assert out_fast.shape == out_plain.shape == (2, c_out, *(2 * n for n in grid))
    torch.testing.assert_close(out_fast, out_plain)
    upstream = torch.randn_like(out_plain)
    grads_fast = torch.autograd.grad(out_fast, [x, fast.weight, fast.bias], upstream)
    grads_plain = torch.autograd.grad(out_plain, [x, plain.weight, plain.bias], upstream)
    for got, expected in zip(grads_fast, grads_plain, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(("c_in", "c_out", "grid"), [(8, 1, (4, 4, 4)), (4, 3, (3, 5, 2)), (3, 12, (2, 3, 4))])
def test_resize_convolution_equals_upsampling_then_convolving(c_in, c_out, grid):
    """Resize-convolution is computed as a transposed convolution with summed taps (speed), by the
    phase split for few outputs and by torch's transposed convolution for many: it must equal
    nearest upsampling followed by the 3³ convolution, in values and in every gradient."""
    torch.manual_seed(0)
    layer = NearestResizeConv3d(c_in, c_out, bias=True).double()
    x = torch.randn(2, c_in, *grid, dtype=torch.float64, requires_grad=True)
    out_fast, out_naive = layer(x), layer.naive_forward(x)
    assert out_fast.shape == out_naive.shape == (2, c_out, *(2 * n for n in grid))
    torch.testing.assert_close(out_fast, out_naive)
    upstream = torch.randn_like(out_naive)
    parameters = [x, layer[1].weight, layer[1].bias]
    grads_fast = torch.autograd.grad(out_fast, parameters, upstream)
    grads_naive = torch.autograd.grad(out_naive, parameters, upstream)
    for got, expected in zip(grads_fast, grads_naive, strict=True):
        torch.testing.assert_close(got, expected)


def test_trilinear_resize_convolution_is_trilinear_upsampling_then_convolving():
    """The binomial filter after nearest upsampling is trilinear upsampling exactly; after the
    convolution instead of before, the same away from the faces (where the filter repeats edges and
    the convolution pads with zeros)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    trilinear = torch.nn.functional.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
    nearest = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    torch.testing.assert_close(binomial_blur(nearest), trilinear)
    layer = TrilinearResizeConv3d(3, 4, bias=True).double()
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    torch.testing.assert_close(layer(x)[inner], layer[1](trilinear)[inner])


@pytest.mark.parametrize("upsample", ["transposed", "resize", "trilinear", "pixel_shuffle"])
@pytest.mark.parametrize("shape", [(16, 16, 16), (32, 16, 16)])
def test_every_upsampling_builds_the_volume_shape(upsample, shape):
    config = ModelConfig(latent_dim=8, base_channels=2, max_channels=8, upsample=upsample)
    generator = Generator3d(config, shape)
    with torch.no_grad():
        volume = generator(torch.randn(2, 8))
    assert volume.shape == (2, 1, *shape) and volume.abs().max() <= 1


def test_pixel_shuffle_starts_free_of_checkerboard():
    """ICNR: at initialisation each 2×2×2 block of a sub-pixel layer's output is one value, as after
    nearest-neighbour upsampling, so the generator cannot start with a checkerboard."""
    torch.manual_seed(0)
    generator = Generator3d(ModelConfig(latent_dim=8, base_channels=2, upsample="pixel_shuffle"), (16, 16, 16))
    layer = generator.to_volume
    with torch.no_grad():
        out = layer(torch.randn(1, layer.conv.in_channels, 4, 5, 6))  # (1, 1, 8, 10, 12)
    corner = out[..., ::2, ::2, ::2]
    for dx, dy, dz in itertools.product((0, 1), repeat=3):
        torch.testing.assert_close(out[..., dx::2, dy::2, dz::2], corner)


def test_pixel_shuffle_places_each_channel_block_at_its_sub_voxel():
    layer = PixelShuffleUp3d(1, 1, bias=False)
    with torch.no_grad():
        layer.conv.weight.zero_()
        layer.conv.weight[5, 0, 1, 1, 1] = 1.0  # identity into phase 5 = (rx, ry, rz) = (1, 0, 1)
        out = layer(torch.arange(8.0).view(1, 1, 2, 2, 2))
    assert out[0, 0, 1, 0, 1] == 0 and out[0, 0, 3, 2, 3] == 7 and out[0, 0, 0, 0, 0] == 0


def test_generator_channels_set_the_generator_width_only():
    """model.generator_channels widens or narrows G alone (for comparisons at equal FLOPs)."""
    config = ModelConfig(latent_dim=8, base_channels=4, max_channels=64)
    narrow = ModelConfig(latent_dim=8, base_channels=4, max_channels=64, generator_channels=2)
    generator, discriminator = build_models(config, (16, 16, 16))
    narrow_generator, same_discriminator = build_models(narrow, (16, 16, 16))
    assert parameter_count(narrow_generator) < parameter_count(generator)
    assert parameter_count(same_discriminator) == parameter_count(discriminator)
    assert narrow_generator(torch.randn(2, 8)).shape == (2, 1, 16, 16, 16)
