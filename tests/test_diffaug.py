"""DiffAugment in 3D: each transform does what it says, per volume, reproducibly and differentiably."""

from __future__ import annotations

import pytest
import torch

from medsynth.config import DIFF_AUGMENT_POLICIES, AugmentConfig, ConfigError
from medsynth.diffaug import diff_augment


def cube_batch(batch: int = 4, side: int = 16) -> torch.Tensor:
    """A bright textured cube in the middle of a background of -1: (B, 1, side, side, side)."""
    x = torch.full((batch, 1, side, side, side), -1.0)
    inner = torch.rand(batch, 1, side // 2, side // 2, side // 2, generator=torch.Generator().manual_seed(0))
    q = side // 4
    x[:, :, q : q + side // 2, q : q + side // 2, q : q + side // 2] = inner
    return x


def draw(policy: tuple[str, ...], x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return diff_augment(x, policy, torch.Generator().manual_seed(seed))


def test_no_policy_is_the_identity():
    x = cube_batch()
    assert torch.equal(draw((), x), x)


def test_translation_moves_each_volume_without_changing_its_content():
    x = cube_batch()
    y = draw(("translation",), x)
    # The cube stays inside the grid (shifts are at most 1/8 of a side), so it is only moved: the
    # same values, the same mass above the background.
    for original, moved in zip(x, y):
        assert torch.equal(torch.sort(original.flatten()).values, torch.sort(moved.flatten()).values)
    assert any(not torch.equal(a, b) for a, b in zip(x, y))
    shifts = {tuple(torch.nonzero(v[0] > -1).min(0).values.tolist()) for v in y}
    assert len(shifts) > 1  # each volume gets its own shift


def test_cutout_blanks_one_box_of_half_each_side_to_background():
    x = torch.rand(3, 1, 16, 16, 16)  # no background, so every blanked voxel shows
    y = draw(("cutout",), x)
    for original, cut in zip(x, y):
        blanked = (cut != original)[0]
        assert torch.all(cut[0][blanked] == -1.0)
        low, high = torch.nonzero(blanked).min(0).values, torch.nonzero(blanked).max(0).values
        assert (high - low + 1).tolist() == [8, 8, 8] and int(blanked.sum()) == 8**3  # one 8³ box


def test_contrast_scales_about_the_background_within_a_quarter():
    x = cube_batch()
    y = draw(("contrast",), x)
    background = x == -1.0
    assert torch.all(y[background] == -1.0)  # the background stays the background
    factors = ((y + 1) / (x + 1)).flatten(1)[:, ~background[0].flatten()]
    per_volume = factors.mean(1)
    assert torch.allclose(factors, per_volume[:, None], atol=1e-5)  # one factor per volume
    assert torch.all((per_volume >= 0.75) & (per_volume <= 1.25)) and per_volume.std() > 0


def test_all_policies_are_reproducible_and_differentiable():
    x = cube_batch().requires_grad_(True)
    y = draw(DIFF_AUGMENT_POLICIES, x, seed=7)
    assert torch.equal(y, draw(DIFF_AUGMENT_POLICIES, x, seed=7))  # the generator fixes every draw
    assert not torch.equal(y, draw(DIFF_AUGMENT_POLICIES, x, seed=8))
    (y * torch.linspace(0, 1, y.numel()).reshape(y.shape)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # G's gradient passes through


def test_works_on_packed_multichannel_input():
    x = cube_batch(batch=2).repeat(1, 2, 1, 1, 1)  # (B, 2, ...): two channels move together
    y = draw(("translation", "cutout", "contrast"), x)
    assert y.shape == x.shape and torch.equal(y[:, 0], y[:, 1])


def test_config_names_the_policies_and_refuses_others():
    assert AugmentConfig(diff_augment=" translation, contrast ").diff_augment_policy == ("translation", "contrast")
    with pytest.raises(ConfigError, match="unknown policy flip"):
        AugmentConfig(diff_augment="translation,flip")
