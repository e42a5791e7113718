"""Differentiable augmentation for the discriminator (DiffAugment, Zhao et al. 2020), in 3D.

With a hundred training scans, D soon memorises every one of them, and G then chases D's
idiosyncrasies instead of anatomy: samples lose diversity. Showing D randomly shifted, cut-out
and contrast-jittered versions of *both* real and generated volumes, through operations G's
gradient can pass, stops the memorising without teaching G to make shifted or cut-out volumes,
because G's output is augmented the same way before D sees it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medsynth.config import DIFF_AUGMENT_POLICIES
from medsynth.models import empty_voxel


def _translation(x: torch.Tensor, generator: torch.Generator, label_classes: int, ratio: float = 0.125) -> torch.Tensor:
    """Shift each volume by up to `ratio` of each side, filling with the background (-1; class 0 in
    label channels). Label channels move with their image: the same shift, by whole voxels."""
    batch, _, *sides = x.shape
    pad = max(int(s * ratio) for s in sides)
    image_channels = x.shape[1] - label_classes
    padded = F.pad(x[:, :image_channels], [pad] * 6, value=-1.0)  # (B, C_image, X+2p, Y+2p, Z+2p)
    if label_classes:
        empty = empty_voxel(x.shape[1], label_classes, x)[:, image_channels:]  # (1, K, 1, 1, 1)
        padded = torch.cat([padded, F.pad(x[:, image_channels:] - empty, [pad] * 6) + empty], dim=1)
    padded = padded.permute(0, 2, 3, 4, 1)  # (B, X+2p, Y+2p, Z+2p, C)
    index = []
    for axis, side in enumerate(sides):
        limit = int(side * ratio)
        shift = torch.randint(-limit, limit + 1, (batch,), generator=generator, device=x.device)
        shape = [batch, 1, 1, 1]
        shape[1 + axis] = side
        index.append((torch.arange(side, device=x.device)[None, :] + pad - shift[:, None]).reshape(shape))
    rows = torch.arange(batch, device=x.device).reshape(batch, 1, 1, 1)
    return padded[rows, index[0], index[1], index[2]].permute(0, 4, 1, 2, 3)  # (B, C, X, Y, Z)


def _cutout(x: torch.Tensor, generator: torch.Generator, label_classes: int, ratio: float = 0.5) -> torch.Tensor:
    """Blank one random box of half the size per axis in each volume (set it to background), in
    its label channels too (class 0), so the label map never marks anatomy the image lacks."""
    batch, _, *sides = x.shape
    inside = torch.ones(batch, 1, *sides, dtype=torch.bool, device=x.device)
    for axis, side in enumerate(sides):
        size = max(1, int(side * ratio))
        start = torch.randint(0, side - size + 1, (batch,), generator=generator, device=x.device)
        shape = [batch, 1, 1, 1, 1]
        shape[2 + axis] = side
        position = torch.arange(side, device=x.device)[None, :] - start[:, None]  # (B, side)
        inside = inside & ((position >= 0) & (position < size)).reshape(shape)
    empty = empty_voxel(x.shape[1], label_classes, x) if label_classes else torch.full_like(x, -1.0)
    return torch.where(inside, empty, x)


def _contrast(x: torch.Tensor, generator: torch.Generator, label_classes: int) -> torch.Tensor:
    """Scale intensities about the background (-1) by a factor in [0.75, 1.25] per volume: the
    image channels only, since a label map has no intensity."""
    factor = 0.75 + 0.5 * torch.rand(x.shape[0], 1, 1, 1, 1, generator=generator, device=x.device)
    if not label_classes:
        return (x + 1.0) * factor - 1.0
    image_channels = x.shape[1] - label_classes
    return torch.cat([(x[:, :image_channels] + 1.0) * factor - 1.0, x[:, image_channels:]], dim=1)


_TRANSFORMS = {"translation": _translation, "cutout": _cutout, "contrast": _contrast}
assert set(_TRANSFORMS) == set(DIFF_AUGMENT_POLICIES)  # the config validates names against that list


def diff_augment(
    x: torch.Tensor, policy: tuple[str, ...], generator: torch.Generator, label_classes: int = 0
) -> torch.Tensor:
    """Apply `policy` (names from config.DIFF_AUGMENT_POLICIES, in order) to a (B, C, X, Y, Z)
    batch, differentiably. Every volume gets its own random draw. The last `label_classes`
    channels, when any, are a label map's one-hot channels (`models.empty_voxel`): translation
    and cutout move or blank them with the image; contrast leaves them be."""
    for name in policy:
        x = _TRANSFORMS[name](x, generator, label_classes)
    return x
