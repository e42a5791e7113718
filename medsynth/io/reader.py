"""Read a discovered `Source` into a `Volume`, with the same checks for every format."""

from __future__ import annotations

from pathlib import Path

from medsynth.io import dicom, itk, nifti
from medsynth.io.checks import check_affine, check_finite
from medsynth.io.sources import Source
from medsynth.io.volume import SourceError, Volume


def read_volume(source: Source) -> Volume:
    """The source's voxels in real units, (x, y, z) float32, with a RAS+ affine.

    Raises SourceError with a one-line reason for anything unusable: unreadable or truncated data,
    NaN/Inf voxels, a singular affine.
    """
    if source.kind == "dicom":
        array, affine, meta = dicom.read(source)
    else:
        # The reader was chosen when the header was probed (nibabel first, SimpleITK as the
        # fallback). There is no second fallback here: once a reader understands the header, a
        # failure reading voxels is real damage (SimpleITK, for one, zero-fills truncated .gz data).
        read = nifti.read if source.kind == "nifti" else itk.read
        array, affine, meta = read(Path(source.paths[0]), source.name, source.frame)
        meta.warnings = list(dict.fromkeys(list(source.warnings) + meta.warnings))
    if array.ndim != 3:
        raise SourceError(source.name, f"expected a 3D volume after frame selection, got shape {array.shape}")
    check_finite(source.name, array)
    check_affine(source.name, affine)
    meta.source = source.name
    return Volume(array=array, affine=affine, meta=meta)
