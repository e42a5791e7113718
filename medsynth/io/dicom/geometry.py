"""Geometry of a stack of DICOM images: do they form a regular volume, and what is its affine.

Computed from the ImagePositionPatient and ImageOrientationPatient of every image, never from
the first two only, so that gaps, tilt and mixed acquisitions are caught rather than averaged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from medsynth.io.volume import LPS_TO_RAS, SourceError

_ORIENTATION_TOLERANCE = 1e-3  # direction cosines written with 4-6 decimals differ by ~1e-5
_POSITION_TOLERANCE_MM = 0.01  # two slices closer than this along the normal are at one position
_TILT_WARNING_DEGREES = 0.1


def _distinct(values: list[tuple[float, ...]], tolerance: float) -> list[tuple[tuple[float, ...], int]]:
    """Cluster near-equal tuples; return (representative, count) for each cluster."""
    clusters: list[list] = []
    for value in values:
        for cluster in clusters:
            if max(abs(a - b) for a, b in zip(cluster[0], value)) <= tolerance:
                cluster[1] += 1
                break
        else:
            clusters.append([value, 1])
    return [(tuple(c[0]), c[1]) for c in clusters]


@dataclass
class StackGeometry:
    stacks: list[list[int]]  # per 3D frame: image indices in spatial order
    affine: np.ndarray  # RAS+ (4, 4)
    warnings: list[str]


def stack_geometry(
    name: str,
    positions: list[tuple[float, ...]],
    orientations: list[tuple[float, ...]],
    pixel_spacings: list[tuple[float, ...]],
    sort_keys: list[tuple],
    min_slices: int,
) -> StackGeometry:
    """Check that N images form a regular 3D stack (or several identical stacks: 4D); find its affine.

    Raises SourceError naming the problem: disagreeing orientations or pixel spacings, duplicate
    positions, too few slices, missing slices, non-uniform spacing, positions off a straight line.
    Gantry tilt is kept exactly, as a sheared affine, and reported as a warning.
    """
    orientation_groups = _distinct(orientations, _ORIENTATION_TOLERANCE)
    if len(orientation_groups) > 1:
        counts = ", ".join(str(c) for _, c in orientation_groups)
        raise SourceError(
            name,
            f"slices disagree on orientation: {len(orientation_groups)} different ImageOrientationPatient "
            f"values ({counts} images); a localizer or several stacks under one series UID",
        )
    spacing_groups = _distinct(pixel_spacings, 1e-3)
    if len(spacing_groups) > 1:
        values = ", ".join(f"{s[0]:g}×{s[1]:g} mm" for s, _ in spacing_groups)
        raise SourceError(name, f"slices disagree on pixel spacing ({values})")
    iop = np.asarray(orientation_groups[0][0])
    row_cosine, column_cosine = iop[:3], iop[3:]
    normal = np.cross(row_cosine, column_cosine)
    ipp = np.asarray(positions, dtype=np.float64)  # (N, 3) LPS mm
    along = ipp @ normal

    # Group images by position along the normal.
    order = np.argsort(along, kind="stable")
    levels: list[list[int]] = []
    for index in order:
        if levels and abs(along[index] - along[levels[-1][0]]) <= _POSITION_TOLERANCE_MM:
            levels[-1].append(int(index))
        else:
            levels.append([int(index)])
    per_level = Counter(len(level) for level in levels)
    if len(per_level) > 1:
        most = max(per_level)
        raise SourceError(
            name,
            f"duplicate slice positions: {sum(1 for lv in levels if len(lv) > 1)} of {len(levels)} positions "
            f"hold more than one image (up to {most}); mixed acquisitions under one series UID",
        )
    n_frames = len(levels[0])
    n_slices = len(levels)
    if n_slices < min_slices:
        if n_slices == 1:
            raise SourceError(name, "a single slice is not a volume")
        raise SourceError(name, f"only {n_slices} slices: too few to form a volume (io.min_slices = {min_slices})")

    level_positions = np.array([along[level[0]] for level in levels])
    gaps = np.diff(level_positions)
    typical = float(np.median(gaps))
    tolerance = max(0.02, 0.01 * typical)
    if np.abs(gaps - typical).max() > tolerance:
        smallest = float(gaps.min())
        ratios = gaps / smallest
        if np.all(np.abs(ratios - np.round(ratios)) < 0.05) and ratios.max() > 1.5:
            missing = int(np.round(ratios).sum() - len(ratios))
            where = int(np.argmax(ratios))
            raise SourceError(
                name,
                f"{missing} missing slice{'s' if missing > 1 else ''}: the gap after slice {where + 1} of {n_slices} "
                f"is {gaps[where]:.2f} mm where the spacing is {smallest:.2f} mm",
            )
        raise SourceError(
            name, f"non-uniform slice spacing: gaps between slices range from {gaps.min():.3f} to {gaps.max():.3f} mm"
        )

    # Images at one position are frames of a 4D series; order them by time/echo/instance.
    for level in levels:
        level.sort(key=lambda i: (sort_keys[i], i))
    stacks = [[level[f] for level in levels] for f in range(n_frames)]

    first_stack = stacks[0]
    start = ipp[first_stack[0]]
    step = (ipp[first_stack[-1]] - start) / (n_slices - 1)  # the true slice step, tilt included
    expected = start + np.outer(np.arange(n_slices), step)
    off_line = float(np.linalg.norm(ipp[first_stack] - expected, axis=1).max())
    if off_line > tolerance:
        raise SourceError(name, f"slice positions do not lie on a straight line (up to {off_line:.2f} mm off)")

    warnings = []
    tilt = float(np.degrees(np.arccos(min(1.0, abs(step @ normal) / np.linalg.norm(step)))))
    if tilt > _TILT_WARNING_DEGREES:
        warnings.append(
            f"gantry tilt: slices are sheared by {tilt:.1f}°; kept exactly as a sheared affine, which resampling corrects"
        )
    row_spacing, column_spacing = spacing_groups[0][0]  # PixelSpacing = (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * column_spacing  # voxel axis i runs along a row (column index)
    lps[:3, 1] = column_cosine * row_spacing  # voxel axis j runs down a column (row index)
    lps[:3, 2] = step
    lps[:3, 3] = start
    return StackGeometry(stacks=stacks, affine=LPS_TO_RAS @ lps, warnings=warnings)
