"""Adaptive discriminator augmentation: anatomy-preserving transforms and the p controller."""

from __future__ import annotations

import pytest
import torch

from medsynth.ada import AdaptiveAugment


def corner_blob(side: int = 16) -> torch.Tensor:
    """(1, 1, side, side, side): background -1, a bright cube in the +x +y +z octant."""
    volume = torch.full((1, 1, side, side, side), -1.0)
    volume[..., 10:14, 10:14, 10:14] = 1.0
    return volume


def centroid(volume: torch.Tensor) -> torch.Tensor:
    weights = (volume[0, 0] + 1.0).clamp_min(0)
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in volume.shape[2:]), indexing="ij")
    return torch.stack([(g * weights).sum() / weights.sum() for g in grids])


def test_at_probability_zero_nothing_changes():
    ada = AdaptiveAugment(0.6, 1000, 4, flip_axes=(0,))
    volume = corner_blob()
    assert ada.augment(volume, torch.Generator().manual_seed(0)) is volume


def test_flips_only_left_right_and_keep_the_background():
    """p = 1: every volume is flipped along x, scaled, shifted and gamma-corrected, but never
    turned upside down or front to back: anatomy stays anatomy."""
    ada = AdaptiveAugment(0.6, 1000, 4, flip_axes=(0,))
    ada.probability = 1.0
    generator = torch.Generator().manual_seed(0)
    centre = 7.5
    for _ in range(20):
        out = ada.augment(corner_blob(), generator)
        x, y, z = centroid(out)
        assert x < centre < y and centre < z  # mirrored in x only
        assert out[..., :2, :2, :2].max() == pytest.approx(-1.0, abs=1e-5)  # far corner is still background
        assert out.min() >= -1.0 - 1e-5 and out.max() <= 1.0 + 1e-5


def test_gradients_pass_through_the_augmentation():
    ada = AdaptiveAugment(0.6, 1000, 4, flip_axes=(0,))
    ada.probability = 1.0
    volume = corner_blob().repeat(4, 1, 1, 1, 1).requires_grad_(True)
    ada.augment(volume * 0.9, torch.Generator().manual_seed(1)).sum().backward()
    assert volume.grad is not None and volume.grad.abs().sum() > 0


def test_controller_raises_p_when_d_is_too_sure_of_the_reals_and_lowers_it_otherwise():
    ada = AdaptiveAugment(target=0.6, images_to_full=64, interval=2, flip_axes=(0,))
    sure = torch.ones(4)  # logits > 0 on every real pack: r = 1 > 0.6
    for _ in range(4):
        ada.observe(sure)
        ada.adjust(images_per_update=8)
    assert ada.probability == pytest.approx(2 * 8 * 2 / 64)  # two adjustments of 16 images / 64
    for _ in range(20):
        ada.observe(-sure)  # r = -1 < 0.6
        ada.adjust(images_per_update=8)
    assert ada.probability == 0.0  # clamped


def test_state_round_trip():
    ada = AdaptiveAugment(0.6, 64, 2, flip_axes=(0,))
    ada.observe(torch.ones(3))
    ada.probability = 0.25
    other = AdaptiveAugment(0.6, 64, 2, flip_axes=(0,))
    other.load_state(ada.state(), updates_done=1)
    assert other.state() == ada.state()
