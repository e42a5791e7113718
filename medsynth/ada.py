"""Adaptive discriminator augmentation (ADA, Karras et al. 2020), in 3D and for anatomy.

With a hundred or so training scans D soon memorises them; its outputs on real scans drift
towards "certainly real", and G learns D's idiosyncrasies instead of anatomy. ADA shows D
augmented versions of everything it judges, real and generated alike (so G is never asked to make
augmented volumes), each transform applied to a volume with probability p. p is steered by a
measure of D's over-fitting, r = E[sign(D(real))]: above the target D is too sure of the real
scans and p rises, below it p falls. With p below about 0.8 the transforms do not leak: the
distribution of augmented reals still identifies the distribution of reals, so G's best answer is
still the un-augmented anatomy.

The transforms respect anatomy: left-right flips only along `augment.flip_axes` (never up/down),
isotropic scaling by 2^N(0, 0.2), translation by up to an eighth of each side (one resampling for
all three, so a volume is interpolated at most once), and an intensity gamma 2^N(0, 0.25) about
the background. All are differentiable, so G's gradient passes through them. A paired volume's
label channels move with its image and keep their one-hot values; only the image's intensity changes.
"""

from __future__ import annotations

from typing import TypedDict

import torch
import torch.nn.functional as F

from medsynth.models import empty_voxel


class AdaState(TypedDict):
    probability: float
    sign_sum: float  # sum of sign(D(real)) since the last adjustment
    sign_count: int


class AdaptiveAugment:
    """The augmentation probability, its controller, and the transforms it gates."""

    def __init__(self, target: float, images_to_full: int, interval: int, flip_axes: tuple[int, ...]):
        self.target = target
        self.images_to_full = images_to_full  # real images D must see for p to go from 0 to 1
        self.interval = interval  # D updates between adjustments
        self.flip_axes = flip_axes
        self.probability = 0.0
        self.sign_sum = 0.0
        self.sign_count = 0
        self._updates = 0

    # ------------------------------------------------------------------ the transforms

    def augment(self, volumes: torch.Tensor, generator: torch.Generator, label_classes: int = 0) -> torch.Tensor:
        """volumes (B, C, X, Y, Z) in [-1, 1], background -1 -> the same shape, each transform applied
        to each volume with probability p. At p = 0 the volumes are returned untouched.

        With a label map (its `label_classes` one-hot channels last, `models.empty_voxel`), the
        geometry moves the label channels with their image, by nearest neighbour, so a one-hot voxel
        stays one-hot (a label map never gains a value), with background shifted in; the gamma
        touches the image channels only."""
        if self.probability <= 0.0:
            return volumes
        batch, device = volumes.shape[0], volumes.device
        image_channels = volumes.shape[1] - label_classes

        def chosen() -> torch.Tensor:  # (B,) True where a transform applies to that volume
            return torch.rand(batch, generator=generator, device=device) < self.probability

        # Geometry: one affine per volume, in grid_sample's normalised coordinates [-1, 1].
        theta = torch.zeros(batch, 3, 4, device=device)
        theta[:, 0, 0] = theta[:, 1, 1] = theta[:, 2, 2] = 1.0
        for axis in self.flip_axes:
            # grid_sample's coordinates run (z, y, x) against the tensor's (X, Y, Z): axis a is row 2 - a.
            theta[:, 2 - axis, 2 - axis] = torch.where(chosen(), -1.0, 1.0)
        scale = torch.exp2(0.2 * torch.randn(batch, generator=generator, device=device))
        theta[:, :, :3] *= torch.where(chosen(), scale, torch.ones_like(scale))[:, None, None]
        shift = (torch.rand(batch, 3, generator=generator, device=device) * 2.0 - 1.0) * 0.25  # 1/8 side
        theta[:, :, 3] = torch.where(chosen()[:, None], shift, torch.zeros_like(shift))
        moved = (theta[:, :, :3] != torch.eye(3, device=device)).any(dim=(1, 2)) | (theta[:, :, 3] != 0).any(dim=1)
        if moved.any():
            grid = F.affine_grid(theta[moved], list(volumes[moved].shape), align_corners=False)
            selected = volumes[moved].float()  # (M, C, X, Y, Z)
            # Resample about the background: outside the volume is background (-1), not 0.
            resampled = (
                F.grid_sample(selected[:, :image_channels] + 1.0, grid, mode="bilinear", align_corners=False) - 1.0
            )
            if label_classes:
                # Nearest neighbour, about the background class: outside the volume is class 0.
                empty = empty_voxel(volumes.shape[1], label_classes, selected)[:, image_channels:]  # (1, K, 1, 1, 1)
                labels = F.grid_sample(selected[:, image_channels:] - empty, grid, mode="nearest", align_corners=False)
                resampled = torch.cat([resampled, labels + empty], dim=1)  # (M, C, X, Y, Z)
            volumes = volumes.clone()
            volumes[moved] = resampled.to(volumes.dtype)
        # Intensity: gamma about the background, on [0, 1], of the image only.
        gamma = torch.exp2(0.25 * torch.randn(batch, generator=generator, device=device))
        gamma = torch.where(chosen(), gamma, torch.ones_like(gamma)).view(batch, 1, 1, 1, 1).to(volumes.dtype)
        image = volumes[:, :image_channels]
        unit = (image + 1.0) * 0.5
        # The background (0 here) stays exactly background; pow's gradient at 0 would be infinite.
        corrected = torch.where(unit > 1e-6, unit.clamp_min(1e-6).pow(gamma), unit) * 2.0 - 1.0
        image = torch.where(gamma != 1.0, corrected, image)
        return torch.cat([image, volumes[:, image_channels:]], dim=1) if label_classes else image

    # ------------------------------------------------------------------ the controller

    def observe(self, real_logits: torch.Tensor) -> None:
        """Record D's verdicts on real packs (logits > 0: "real") from one D update."""
        self.sign_sum += float(torch.sign(real_logits.detach().float()).sum())
        self.sign_count += real_logits.numel()

    def adjust(self, images_per_update: int, reduce=None) -> None:
        """After `interval` D updates, move p by sign(r - target) · (images seen) / images_to_full.
        `reduce` sums (sign_sum, sign_count) over processes, so every rank steers the same p."""
        self._updates += 1
        if self._updates % self.interval:
            return
        total, count = reduce(self.sign_sum, self.sign_count) if reduce else (self.sign_sum, self.sign_count)
        if count:
            over_fitting = total / count  # r_t in [-1, 1]
            step = images_per_update * self.interval / self.images_to_full
            direction = 1.0 if over_fitting > self.target else -1.0
            self.probability = min(1.0, max(0.0, self.probability + direction * step))
        self.sign_sum, self.sign_count = 0.0, 0

    def state(self) -> AdaState:
        return AdaState(probability=self.probability, sign_sum=self.sign_sum, sign_count=self.sign_count)

    def load_state(self, state: AdaState, updates_done: int) -> None:
        self.probability = float(state["probability"])
        self.sign_sum = float(state["sign_sum"])
        self.sign_count = int(state["sign_count"])
        self._updates = updates_done
