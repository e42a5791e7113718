"""The `Volume`, the one in-memory image type of medsynth, its `VolumeMeta`, affine helpers, and the cast
of voxel values to the dtype a file stores them in."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medsynth.errors import SourceError

__all__ = [
    "LPS_TO_RAS",
    "SourceError",
    "Volume",
    "VolumeMeta",
    "cast_for_storage",
    "orientation_code",
    "voxel_spacing",
]


# ITK and DICOM describe space in LPS (x to the patient's left, y posterior); nibabel and NIfTI in
# RAS. The two differ by flipping the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class VolumeMeta:
    """What the pipeline needs to know about where a `Volume` came from, beyond its voxels and affine.

    No patient identifier is ever put in it: nothing from a DICOM header but the Modality, so it
    may be printed, logged and fingerprinted as it is.
    """

    source: str = ""  # the source's name for people (see `Source.name`); "" for a volume made in memory
    reader: str = ""  # what decoded the voxels: "nibabel", "SimpleITK" or "pydicom+SimpleITK"
    format: str = ""  # the file format, as the reader names it: "Nifti1", "NRRD", "DICOM"...
    modality: str | None = None  # the DICOM Modality ("CT", "MR"...); None where the format has no such field
    stored_dtype: str | None = None  # the dtype the file stores voxels in, before any scaling
    n_files: int | None = None  # DICOM only: how many files the voxels were read from
    warnings: list[str] = field(default_factory=list)  # one line each, without the source's name


@dataclass
class Volume:
    """A 3D scan: voxel values indexed (x, y, z) and the affine that places each voxel in RAS+ mm.

    `affine @ [i, j, k, 1]` is the world position of the centre of voxel (i, j, k), as in nibabel.
    """

    array: np.ndarray  # (X, Y, Z) float32
    affine: np.ndarray  # (4, 4) float64, voxel index -> RAS+ millimetres
    meta: VolumeMeta = field(default_factory=VolumeMeta)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ValueError(f"a Volume is 3D, got an array of shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return voxel_spacing(self.affine)

    @property
    def orientation(self) -> str:
        return orientation_code(self.affine)

    def __repr__(self) -> str:
        # For debuggers and logs: what identifies a scan at a glance, never the voxels themselves.
        # It must not raise, so a broken affine (NaN) shows as an unknown orientation.
        shape = "×".join(str(n) for n in self.shape)
        spacing = "×".join(f"{s:.4g}" for s in self.spacing)
        orientation = self.orientation if np.isfinite(self.affine).all() else "???"
        values = f"values {self.array.min():.6g} to {self.array.max():.6g}" if self.array.size else "no voxels"
        if self.meta.stored_dtype:
            values += f" (stored as {self.meta.stored_dtype})"
        source = f", from {self.meta.source!r}" if self.meta.source else ""
        return f"Volume({shape} voxels of {spacing} mm, {orientation}, {values}{source})"


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Length in mm of one step along each voxel axis (the column norms of the affine)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]


def orientation_code(affine: np.ndarray) -> str:
    """The world direction each voxel axis points to most, e.g. 'RAS' or 'PSR' (nibabel's axcodes)."""
    import nibabel.orientations as nio

    codes = nio.aff2axcodes(np.asarray(affine))
    return "".join(c if c is not None else "?" for c in codes)


def cast_for_storage(array: np.ndarray, dtype: str) -> np.ndarray:
    """Round and clip float voxels into an integer dtype's range (a silent wrap-around would turn
    bright voxels dark), or cast to a float dtype."""
    target = np.dtype(dtype)
    if target.kind in "iu":
        info = np.iinfo(target)
        return np.clip(np.round(array), info.min, info.max).astype(target)
    return np.asarray(array, dtype=target)


def shear_degrees(affine: np.ndarray) -> float:
    """Largest departure from 90 degrees between two voxel axes (0 for any rotation+zoom affine)."""
    columns = np.asarray(affine)[:3, :3]
    unit = columns / np.linalg.norm(columns, axis=0)
    worst = 0.0
    for a, b in ((0, 1), (0, 2), (1, 2)):
        cosine = abs(float(unit[:, a] @ unit[:, b]))
        worst = max(worst, 90.0 - float(np.degrees(np.arccos(min(1.0, cosine)))))
    return worst


def obliquity_degrees(affine: np.ndarray) -> float:
    """Largest angle between a voxel axis and the world axis it is closest to."""
    columns = np.asarray(affine)[:3, :3]
    unit = np.abs(columns / np.linalg.norm(columns, axis=0))
    return float(np.degrees(np.arccos(np.clip(unit.max(axis=0), -1.0, 1.0))).max())
