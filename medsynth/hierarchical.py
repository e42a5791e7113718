"""The hierarchical model for high resolution (`model.hierarchical_slabs`), in the spirit of HA-GAN
(Sun et al. 2022): a full-resolution volume is trained without ever being made whole.

G is the DCGAN generator cut before its last two doublings. Its trunk (the projection of z and
every doubling but the last two) makes features for the whole volume at a quarter of the
resolution, (B, C, X/4, Y/4, Z/4). Two heads read them:

- the low-resolution head, one 3³ convolution and tanh: the whole volume at 1/4, (B, 1, X/4, Y/4, Z/4);
- the full-resolution head, the plain generator's own last two doublings: in training, one slab of
  the volume, 1/N of its last axis, at a random place; at sampling time, all N slabs.

D has two parts, through the Trainer's one `run_discriminator`: a DCGAN discriminator for the
low-resolution volume, against real volumes averaged 4×4×4, and one for the slab, which sees the
full-resolution slab beside the low-resolution volume's matching region (upsampled), so that it
judges the detail *given* the coarse anatomy, and the two heads must agree. The real slab is cut
at the same place as the fake one. The losses are the seed's, over both parts' logits.

Why slabs join without seams: the full-resolution head is convolutional, and in eval mode its
BatchNorms use running statistics, so each output voxel depends only on features within the head's
reach (`HALO`). A slab computed from its features plus that halo is exactly the matching part of
the head run over all features at once; `sample` therefore gets the whole volume slab by slab,
in the memory of one slab (tested against the head on all features).

Memory: in training nothing at full resolution is larger than a slab, so the step's peak falls
roughly with N (docs/benchmarks.md#memory). Paired (label) and conditional models are the plain
generator's only, for now.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medsynth.conditions import ConditionSpec
from medsynth.config import ConfigError, ModelConfig
from medsynth.models import Discriminator3d, Generator3d, channels_per_stage, initialise_dcgan, stage_count

if TYPE_CHECKING:
    from medsynth.data import CachedVolumeDataset, VolumeDraw

# The full-resolution head makes the last two doublings: the trunk's features are at 1/4.
FEATURE_SCALE = 4
# Feature voxels on each side of a slab that the head reads: each 2× step reads one input voxel on
# either side (transposed, resize and sub-pixel forms alike), and a voxel the first step gets wrong
# at the cut (zero padding) is two output voxels from what the second step needs.
HALO = 2


class SlabViews(NamedTuple):
    """What D judges of one batch, real or generated: the whole volume at 1/4 and one full-resolution
    slab of it, z from `start` to `start + s` (the volume's last axis)."""

    low: torch.Tensor  # (B, 1, X/4, Y/4, Z/4)
    slab: torch.Tensor  # (B, 1, X, Y, s)
    start: int

    def detach(self) -> SlabViews:
        return SlabViews(self.low.detach(), self.slab.detach(), self.start)

    def float(self) -> SlabViews:
        return SlabViews(self.low.float(), self.slab.float(), self.start)

    def requires_grad_(self, requires_grad: bool = True) -> SlabViews:
        return SlabViews(self.low.requires_grad_(requires_grad), self.slab.requires_grad_(requires_grad), self.start)


def check_hierarchical(
    config: ModelConfig, shape: tuple[int, int, int], label_classes: int = 0, conditions: ConditionSpec | None = None
) -> None:
    """Refuse, in one line naming the settings, what the hierarchical model cannot be built for."""
    slabs = config.hierarchical_slabs
    if label_classes or conditions:
        raise ConfigError(
            "model.hierarchical_slabs works with unlabeled, unconditional runs only (for now): "
            "drop --labels / --conditions or set model.hierarchical_slabs=0"
        )
    low_shape, (*_, depth) = view_shapes(shape, slabs)
    if (
        shape[-1] % slabs
        or depth % FEATURE_SCALE
        or min(depth, *shape[:2]) < 2 * config.base_grid
        or min(low_shape) < 2 * config.base_grid
        or stage_count(tuple(shape), config.base_grid) < 3
    ):
        raise ConfigError(
            f"model.hierarchical_slabs={slabs} does not fit the volume shape {list(shape)}: each slab "
            f"(the last axis / {slabs}) must be a multiple of {FEATURE_SCALE} and at least "
            f"{2 * config.base_grid} voxels, and the shape / {FEATURE_SCALE} at least {2 * config.base_grid} "
            "a side. Use fewer slabs or a larger plan.target_shape"
        )


def slab_depth(shape: tuple[int, ...], slabs: int) -> int:
    return shape[-1] // slabs


def view_shapes(shape: tuple[int, ...], slabs: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of what D judges for a volume shape: (the whole volume at 1/4, one slab)."""
    return tuple(n // FEATURE_SCALE for n in shape), (*shape[:2], slab_depth(shape, slabs))


def slab_starts(shape: tuple[int, ...], slabs: int) -> list[int]:
    """Where a training slab may start: every position on the feature grid from which it fits."""
    return list(range(0, shape[-1] - slab_depth(shape, slabs) + 1, FEATURE_SCALE))


def slab_tiling(shape: tuple[int, ...], slabs: int) -> range:
    """Where the slabs that make up a whole volume start, one after another along the last axis."""
    return range(0, shape[-1], slab_depth(shape, slabs))


def real_views(volumes: torch.Tensor, start: int, slabs: int) -> SlabViews:
    """Real volumes (B, 1, X, Y, Z) -> the views D compares with G's: the 4×4×4 average (what the
    low-resolution head learns to make) and the slab at `start`. Training reads the same views
    straight from the cache (`read_real_views`); this is their definition."""
    depth = slab_depth(volumes.shape[2:], slabs)
    low = F.avg_pool3d(volumes, FEATURE_SCALE)  # (B, 1, X/4, Y/4, Z/4)
    return SlabViews(low, volumes[..., start : start + depth].contiguous(), start)  # a copy: the whole may go


# x-planes of a real volume read at a time for its low-resolution view: a multiple of FEATURE_SCALE.
READ_PLANES = 16


def read_real_views(
    dataset: CachedVolumeDataset,
    draws: Sequence[VolumeDraw],
    start: int,
    shape: tuple[int, int, int],
    slabs: int,
    device: torch.device,
) -> SlabViews:
    """Real volumes, as the loader's draws from the cache -> the views `real_views` cuts from them,
    (B, 1, X/4, Y/4, Z/4) and (B, 1, X, Y, s) on `device`, in one pass over each file READ_PLANES
    x-planes at a time: each chunk is averaged 4×4×4 and gives its part of the slab. The same
    numbers as `real_views` on the whole augmented volumes (tested) without ever holding one: a
    batch of whole 256³ volumes, and its copies in the loader, was 0.25 GiB of a hierarchical step."""
    depth = slab_depth(shape, slabs)
    lows, slab_parts = [], []
    for draw in draws:
        low_chunks, slab_chunks = [], []
        for x in range(0, shape[0], READ_PLANES):
            planes = torch.from_numpy(dataset.read_planes(draw, x, min(x + READ_PLANES, shape[0])))[None, None]
            low_chunks.append(F.avg_pool3d(planes, FEATURE_SCALE))  # (1, 1, READ_PLANES / 4, Y/4, Z/4)
            slab_chunks.append(planes[..., start : start + depth].clone())  # (1, 1, READ_PLANES, Y, s)
        lows.append(torch.cat(low_chunks, dim=2))  # (1, 1, X/4, Y/4, Z/4)
        slab_parts.append(torch.cat(slab_chunks, dim=2))  # (1, 1, X, Y, s)
    low = torch.cat(lows).to(device, non_blocking=True)  # (B, 1, X/4, Y/4, Z/4)
    return SlabViews(low, torch.cat(slab_parts).to(device, non_blocking=True), start)  # slab (B, 1, X, Y, s)


def discriminator_inputs(views: SlabViews) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (the low-resolution volume (B, 1, X/4, Y/4, Z/4), the detail view (B, 2, X, Y, s)): the
    slab beside its region of the low-resolution volume, upsampled to it, so that D judges the
    detail given the coarse anatomy it must agree with."""
    depth = views.slab.shape[-1]
    region = views.low[..., views.start // FEATURE_SCALE : (views.start + depth) // FEATURE_SCALE]
    context = F.interpolate(region, scale_factor=FEATURE_SCALE, mode="trilinear", align_corners=False)
    return views.low, torch.cat([views.slab, context.to(views.slab.dtype)], dim=1)  # (B, 2, X, Y, s)


class HierarchicalGenerator3d(Generator3d):
    """z (B, latent_dim) -> volume (B, 1, X, Y, Z), as the plain generator, made slab by slab; in
    training (`slab_start` given) -> (the whole volume at 1/4, (B, 1, X/4, Y/4, Z/4); the slab at
    `slab_start`, (B, 1, X, Y, s)).

    The plain generator's modules, with the same names, and one more: `to_low_volume`."""

    def __init__(self, config: ModelConfig, shape: tuple[int, int, int]):
        super().__init__(config, shape)
        self.slabs = config.hierarchical_slabs
        stages = stage_count(self.shape, config.base_grid)
        feature_channels = channels_per_stage(config, stages, config.generator_channels)[1]  # at shape / 4
        self.to_low_volume = nn.Conv3d(feature_channels, 1, kernel_size=3, padding=1)
        initialise_dcgan(self.to_low_volume)
        self.trunk_doublings = len(self.blocks) // 3 - 1  # every doubling but the head's (the last block)

    def forward(
        self, z: torch.Tensor, codes: torch.Tensor | None = None, slab_start: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features, _ = self._features(z, None, self.trunk_doublings)  # (B, C, X/4, Y/4, Z/4)
        if slab_start is not None:
            low = torch.tanh(self.to_low_volume(features))  # (B, 1, X/4, Y/4, Z/4)
            return low, self.detail(features, slab_start)
        slabs = [self.detail(features, start) for start in slab_tiling(self.shape, self.slabs)]
        return torch.cat(slabs, dim=-1)  # (B, 1, X, Y, Z)

    def detail(self, features: torch.Tensor, start: int) -> torch.Tensor:
        """The full-resolution head on the slab z in [start, start + s) of the volume: features
        (B, C, X/4, Y/4, Z/4) -> (B, 1, X, Y, s), from the slab's features and a halo of `HALO`."""
        depth = slab_depth(self.shape, self.slabs)
        first = max(0, start // FEATURE_SCALE - HALO)
        last = min(features.shape[-1], (start + depth) // FEATURE_SCALE + HALO)
        x = self._run_block(len(self.blocks) - 3, features[..., first:last], None)  # (B, C', X/2, Y/2, 2·n)
        x = self._to_output(x)  # (B, 1, X, Y, 4·n)
        offset = start - FEATURE_SCALE * first
        return x[..., offset : offset + depth]  # (B, 1, X, Y, s)


class HierarchicalDiscriminator3d(nn.Module):
    """(packed low-resolution volumes (B, pack, X/4, Y/4, Z/4), packed detail views
    (B, pack · 2, X, Y, s)) -> logits (2B,): the low-resolution part's, then the detail part's."""

    def __init__(self, config: ModelConfig, shape: tuple[int, int, int]):
        super().__init__()
        low_shape, slab_shape = view_shapes(shape, config.hierarchical_slabs)
        self.low = Discriminator3d(config, low_shape)  # type: ignore[arg-type]
        self.detail = Discriminator3d(config, slab_shape, channels_per_volume=2)  # type: ignore[arg-type]

    def forward(self, low: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.low(low), self.detail(detail)])  # (2B,)
