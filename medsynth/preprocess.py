"""Pure array functions that turn a scan into what the model sees, and back.

The chain is: reorient to RAS (axis permutations and flips, lossless) -> resample to the plan's
spacing (trilinear, anti-aliased when shrinking) -> crop or pad to the plan's shape around the
foreground -> map the intensity window to [-1, 1]. Each step takes and returns an (array, affine)
pair, so world coordinates are tracked exactly through the chain, and `denormalise` is the exact
inverse of `normalise` for values inside the window.

A label map takes its image's geometric steps with nearest-neighbour rules (`resample_label`,
`resample_label_to_grid`, and `crop_or_pad` with fill 0): every output voxel copies one input voxel
or is background, so a label map never gains a value and is never smoothed.

Orientation arithmetic uses `nibabel.orientations` (pure numpy, no file I/O); resampling uses torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Bump when any function here changes its output: it is part of every cache key.
PREPROCESS_VERSION = 5
# Bump when a label function here changes its output: it is part of every label map's cache key.
LABEL_PREPROCESS_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Orientation


def reorient_to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip voxel axes so they point as close as possible to R, A, S.

    No interpolation happens: every voxel keeps its value and its world position.
    """
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return array, affine
    ras = nio.apply_orientation(array, ornt)
    ras_affine = affine @ nio.inv_ornt_aff(ornt, array.shape)
    return np.ascontiguousarray(ras), ras_affine


# ---------------------------------------------------------------------------------------------
# Resampling


def _gaussian_kernel(sigma: float):
    import torch

    radius = max(1, int(np.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _smooth(volume, sigmas: tuple[float, float, float]):
    """Separable Gaussian blur of a (1, 1, X, Y, Z) tensor; sigma in voxels per axis, 0 = none."""
    import torch.nn.functional as F

    for axis, sigma in enumerate(sigmas):
        if sigma <= 0.0:
            continue
        kernel = _gaussian_kernel(sigma)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = kernel.numel() // 2  # F.pad lists last axis first
        volume = F.conv3d(F.pad(volume, pad, mode="replicate"), kernel.reshape(shape))
    return volume


def resampled_grid(
    affine: np.ndarray, shape: tuple[int, ...], spacing: tuple[float, float, float], deoblique: bool
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The output grid (affine, shape) that covers the input's field of view at `spacing`.

    With `deoblique`, output axes are the world's R, A, S axes; otherwise they keep the input's voxel
    axis directions. The output is centred on the centre of the input's field of view.
    """
    columns = affine[:3, :3]
    axes = np.eye(3) if deoblique else columns / np.linalg.norm(columns, axis=0)
    # The 8 corners (voxel edges) of the input field of view, in the output axes' coordinates.
    n = np.asarray(shape[:3], dtype=np.float64)
    corners = np.array([[i, j, k] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5) for k in (-0.5, n[2] - 0.5)])
    world = corners @ columns.T + affine[:3, 3]
    local = np.linalg.solve(axes, world.T).T
    extent = local.max(axis=0) - local.min(axis=0)
    out_shape = tuple(int(max(1, np.ceil(e / s - 1e-3))) for e, s in zip(extent, spacing))
    centre = affine[:3, :3] @ ((n - 1) / 2) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = axes * np.asarray(spacing)
    out[:3, 3] = centre - out[:3, :3] @ ((np.asarray(out_shape) - 1) / 2)
    return out, out_shape  # type: ignore[return-value]


def resample_to_grid(
    array: np.ndarray,
    affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: tuple[int, int, int],
    fill: float,
    antialias: bool = True,
) -> np.ndarray:
    """Trilinear resampling of `array` (placed by `affine`) onto an arbitrary target grid.

    Works for any affines, including oblique and sheared (gantry tilt) ones. When the target is
    coarser than the input along an axis, the input is first blurred with a Gaussian of
    sigma = (f - 1) / 2 input voxels (f = the shrink factor), as scikit-image does, so the result
    is not aliased. Points outside the input take `fill`.
    """
    import torch
    import torch.nn.functional as F

    # Each output voxel step, expressed in input voxel steps.
    steps = np.linalg.solve(affine[:3, :3], target_affine[:3, :3])
    shrink = np.linalg.norm(steps, axis=1)  # input voxels per output voxel, per input axis
    volume = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32) - np.float32(fill))[None, None]
    if antialias and (shrink > 1.0).any():
        volume = _smooth(volume, tuple(max(0.0, (f - 1.0) / 2.0) for f in shrink))  # type: ignore[arg-type]

    # Continuous input index of every output voxel centre.
    mapping = np.linalg.solve(affine, target_affine)  # output index -> input index
    axes = [torch.arange(n, dtype=torch.float64) for n in target_shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (X', Y', Z', 3)
    index = grid @ torch.from_numpy(mapping[:3, :3]).T + torch.from_numpy(mapping[:3, 3])
    # grid_sample wants coordinates in [-1, 1] (align_corners=True: -1 and 1 are the end voxel
    # centres) ordered (W, H, D); our array is (X, Y, Z) = (D, H, W), so reverse the last axis.
    sizes = torch.tensor([max(n - 1, 1) for n in array.shape], dtype=torch.float64)
    normalised = (2.0 * index / sizes - 1.0).flip(-1).to(torch.float32)
    out = F.grid_sample(volume, normalised[None], mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy() + np.float32(fill)  # (X', Y', Z')


def resample(
    array: np.ndarray,
    affine: np.ndarray,
    spacing: tuple[float, float, float],
    deoblique: bool = True,
    fill: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample to `spacing` mm, covering the same field of view. Returns (array, affine)."""
    target_affine, target_shape = resampled_grid(affine, array.shape, spacing, deoblique)
    if np.allclose(target_affine, affine, atol=1e-6) and tuple(target_shape) == array.shape:
        return array, affine
    fill = float(array.min()) if fill is None else fill
    return resample_to_grid(array, affine, target_affine, target_shape, fill), target_affine


def resample_label_to_grid(
    labels: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, target_shape: tuple[int, int, int]
) -> np.ndarray:
    """Nearest-neighbour resampling of a label map (placed by `affine`) onto any target grid.

    Each output voxel takes the value of the input voxel whose extent holds its centre, or 0
    (background) outside the input: no value is ever made up, and nothing is smoothed, whatever the
    zoom. The same function maps a label map from the model's grid back to a scan's grid.
    Coordinates are float64 and rounding is numpy's, so ties do not depend on a GPU kernel.
    """
    mapping = np.linalg.solve(affine, target_affine)  # output index -> input index
    shape = np.asarray(labels.shape[:3])
    out = np.zeros(target_shape, dtype=labels.dtype)
    j, k = np.meshgrid(np.arange(target_shape[1]), np.arange(target_shape[2]), indexing="ij")  # (Y', Z') each
    plane = mapping[:3, 1:3] @ np.stack([j.ravel(), k.ravel()]) + mapping[:3, 3:4]  # (3, Y'*Z') at i = 0
    for i in range(target_shape[0]):  # one x-plane at a time: memory stays at one plane of indices
        nearest = np.floor(plane + mapping[:3, 0:1] * i + 0.5).astype(np.int64)  # (3, Y'*Z')
        inside = ((nearest >= 0) & (nearest < shape[:, None])).all(axis=0)
        values = np.zeros(nearest.shape[1], dtype=labels.dtype)
        values[inside] = labels[nearest[0, inside], nearest[1, inside], nearest[2, inside]]
        out[i] = values.reshape(target_shape[1], target_shape[2])
    return out


def resample_label(
    labels: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float], deoblique: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """`resample` for a label map: the same output grid (`resampled_grid`), nearest neighbour,
    background 0 where the grid reaches past the input. Returns (labels, affine)."""
    target_affine, target_shape = resampled_grid(affine, labels.shape, spacing, deoblique)
    if np.allclose(target_affine, affine, atol=1e-6) and tuple(target_shape) == labels.shape:
        return labels, affine
    return resample_label_to_grid(labels, affine, target_affine, target_shape), target_affine


# ---------------------------------------------------------------------------------------------
# Foreground, crop and pad


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that best splits `values` into two classes (Otsu 1979), on a histogram that
    ignores the top 0.1% so a few bright outliers cannot pull it up."""
    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(values.min()), float(np.percentile(values, 99.9))
    if high <= low:
        return low
    hist, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = sum_low / weight_low
        mean_high = (sum_low[-1] - sum_low) / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    between = np.nan_to_num(between[:-1])
    # Empty bins between two well-separated classes all score the same; take the middle of that
    # plateau rather than its first bin, which would sit right on the edge of the darker class.
    best = np.flatnonzero(between >= between.max() * (1.0 - 1e-9))
    return float(edges[1:][best[len(best) // 2]])


# Hounsfield units: anything denser than this is body (or table), not air.
CT_FOREGROUND_HU = -500.0


def _open_mask(mask: np.ndarray) -> np.ndarray:
    """Morphological opening (erode, then dilate) with a 3x3x3 cube: removes specks of background
    noise above threshold, which would otherwise stretch the foreground box to the field of view.

    A cube is separable, so each step is three 1D passes of neighbour ANDs (ORs); beyond the
    array's edge counts as neither, so edge voxels are not eroded merely for being at the edge.
    """

    def passes(m: np.ndarray, combine) -> np.ndarray:
        for axis in range(m.ndim):
            out = m.copy()
            head = [slice(None)] * m.ndim
            tail = [slice(None)] * m.ndim
            head[axis], tail[axis] = slice(1, None), slice(None, -1)
            combine(out[tuple(head)], m[tuple(tail)], out=out[tuple(head)])
            combine(out[tuple(tail)], m[tuple(head)], out=out[tuple(tail)])
            m = out
        return m

    return passes(passes(mask, np.logical_and), np.logical_or)


def foreground_mask(array: np.ndarray, modality: str) -> np.ndarray:
    """Voxels that belong to the subject: above -500 HU for CT, above Otsu's threshold otherwise,
    with isolated specks removed."""
    threshold = CT_FOREGROUND_HU if modality == "ct" else otsu_threshold(array)
    return _open_mask(array > threshold)


def foreground_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive (low, high) voxel corners of the mask's bounding box, or None if the mask is empty."""
    if not mask.any():
        return None
    low, high = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        low.append(int(present[0]))
        high.append(int(present[-1]))
    return np.asarray(low), np.asarray(high)


def crop_or_pad(
    array: np.ndarray,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    centre: np.ndarray,
    fill: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut or pad `array` to `shape` so that voxel index `centre` lands at the centre of the output."""
    start = np.round(np.asarray(centre, dtype=np.float64) - (np.asarray(shape) - 1) / 2.0).astype(int)
    out = np.full(shape, fill, dtype=array.dtype)
    source_slices, target_slices = [], []
    for axis in range(3):
        lo = max(start[axis], 0)
        hi = min(start[axis] + shape[axis], array.shape[axis])
        if hi <= lo:
            source_slices.append(slice(0, 0))
            target_slices.append(slice(0, 0))
            continue
        source_slices.append(slice(lo, hi))
        target_slices.append(slice(lo - start[axis], hi - start[axis]))
    out[tuple(target_slices)] = array[tuple(source_slices)]
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]  # world position of output voxel 0
    return out, shifted


# ---------------------------------------------------------------------------------------------
# Intensity


@dataclass(frozen=True)
class IntensityWindow:
    """The intensity range, in the scan's own units, that maps to [-1, 1]."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"an intensity window needs low < high, got [{self.low}, {self.high}]")


def percentile_window(array: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float]) -> IntensityWindow:
    """MRI window: the low percentile of all voxels (the background level) and the high percentile
    of foreground voxels (so the field of view's share of background does not move it)."""
    low = float(np.percentile(array, percentiles[0]))
    foreground = array[mask] if mask.any() else array.ravel()
    high = float(np.percentile(foreground, percentiles[1]))
    if high <= low:  # a flat volume; keep the window valid and let the plan flag it
        high = low + 1.0
    return IntensityWindow(low, high)


def normalise(array: np.ndarray, window: IntensityWindow) -> np.ndarray:
    """Map [low, high] linearly to [-1, 1]; values outside the window are clipped."""
    scaled = (np.asarray(array, dtype=np.float32) - np.float32(window.low)) * np.float32(
        2.0 / (window.high - window.low)
    )
    return np.clip(scaled - np.float32(1.0), -1.0, 1.0)


def denormalise(array: np.ndarray, window: IntensityWindow) -> np.ndarray:
    """Exact inverse of `normalise` inside the window: [-1, 1] back to the scan's units."""
    unit = (np.asarray(array, dtype=np.float64) + 1.0) / 2.0
    return unit * (window.high - window.low) + window.low
