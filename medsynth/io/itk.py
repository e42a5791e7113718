"""Formats SimpleITK reads (NRRD, MetaImage, and NIfTI as a fallback), converted to medsynth's frame.

ITK stores arrays (z, y, x) and describes space in LPS. Both are converted here, at the boundary:
arrays become (x, y, z) and affines RAS+.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsynth.errors import one_line_reason
from medsynth.io.checks import UnsupportedContentError, check_declared_size
from medsynth.io.volume import LPS_TO_RAS, SourceError, VolumeMeta

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def _itk_reason(exc: BaseException) -> str:
    # SimpleITK errors are multi-line with file/line noise; the last line carries the message.
    text = one_line_reason(exc, limit=None, last=True)
    for noise in ("sitk::ERROR:", "ITK ERROR:"):
        text = text.replace(noise, "").strip()
    return text[:200]


def affine_from_itk(origin, spacing, direction) -> np.ndarray:
    """RAS+ affine from ITK's LPS origin, spacing and row-major direction matrix (3D part only)."""
    dim = len(origin)
    direction = np.asarray(direction, dtype=np.float64).reshape(dim, dim)[:3, :3]
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(spacing, dtype=np.float64)[:3]  # scale each column
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)[:3]
    return LPS_TO_RAS @ lps


def affine_to_itk(affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """Inverse of `affine_from_itk` for an affine without shear: (origin, spacing, direction) in LPS."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return tuple(lps[:3, 3]), tuple(spacing), tuple(direction.ravel())


def probe(path: Path, name: str) -> tuple[tuple[int, ...], list[str]]:
    """Header only: the shape in (x, y, z[, t]) order. Multi-component images are refused."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise SourceError(name, f"SimpleITK cannot read it ({_itk_reason(exc)})") from None
    if reader.GetNumberOfComponents() > 1:
        raise UnsupportedContentError(
            name, f"{reader.GetNumberOfComponents()}-component (RGB or vector) pixels are not supported"
        )
    shape = tuple(int(n) for n in reader.GetSize())
    check_declared_size(name, shape, itemsize=4)  # formats differ in where voxels live: count only
    return shape, []


def image_to_volume_parts(image, frame: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A SimpleITK image (3D, or 4D with `frame`) as a float32 (x, y, z) array and a RAS+ affine."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)  # (z, y, x) or (t, z, y, x)
    if array.ndim == 4:
        array = array[frame or 0]
    elif array.ndim != 3:
        raise ValueError(f"expected a 3D or 4D image, got {array.ndim}D")
    array = np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32)  # (x, y, z)
    affine = affine_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return array, affine


def read(path: Path, name: str, frame: int | None) -> tuple[np.ndarray, np.ndarray, VolumeMeta]:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise SourceError(name, f"SimpleITK cannot read it ({_itk_reason(exc)})") from None
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise UnsupportedContentError(name, "multi-component (RGB or vector) pixels are not supported")
    stored = str(sitk.GetArrayViewFromImage(image).dtype)  # a view: only its dtype is read
    try:
        array, affine = image_to_volume_parts(image, frame)
    except ValueError as exc:
        raise SourceError(name, str(exc)) from None
    meta = VolumeMeta(reader="SimpleITK", format=Path(path).suffix.lstrip(".").upper(), stored_dtype=stored)
    return array, affine, meta
