"""NIfTI through nibabel, the reference for NIfTI's sform/qform rules: NIfTI-1, NIfTI-2 (and
Analyze/MGH) read, NIfTI-1 written with a real affine, both qform and sform set, atomically.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import zlib
from pathlib import Path

import numpy as np

from medsynth.atomic import atomic_write_bytes
from medsynth.errors import one_line_reason
from medsynth.io.checks import AccessDeniedError, UnsupportedContentError, check_declared_size
from medsynth.io.volume import SourceError, Volume, VolumeMeta, cast_for_storage, shear_degrees

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".mgh", ".mgz")
# NIFTI_XFORM_SCANNER_ANAT: the affine maps to scanner-based RAS+ millimetres.
_XFORM_SCANNER = 1


def describe_error(exc: BaseException) -> str:
    """Turn a reader's exception into a short reason a person understands."""
    if isinstance(exc, PermissionError):
        return "cannot read: permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)) or "end-of-stream" in str(exc):
        return "truncated or corrupt compressed data"
    text = one_line_reason(exc, limit=None)  # nibabel's own wording, which names what is wrong
    if "Expected" in text and "bytes" in text:
        return f"truncated: the file is shorter than its header says ({text})"
    return text[:200]


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _header_repairs():
    """nibabel repairs invalid header fields ("qform_code 1024 not valid; setting to 0") and logs
    the repair to stderr, without a file name. Collect those messages instead, so that they become
    warnings on the source they belong to."""
    from nibabel import imageglobals

    logger = imageglobals.logger
    collector = _Collector()
    saved = logger.handlers[:]
    logger.handlers = [collector]
    try:
        yield collector.messages
    finally:
        logger.handlers = saved


def _load(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for junk input; all mean "not readable"
        reason = describe_error(exc)
        if isinstance(exc, PermissionError):
            raise AccessDeniedError(str(path), reason) from None
        raise SourceError(str(path), f"not a readable NIfTI/Analyze image ({reason})") from None


def probe(path: Path, name: str) -> tuple[tuple[int, ...], list[str]]:
    """Read only the header: the stored shape and any warnings about geometry."""
    with _header_repairs() as repairs:
        image = _load(path)
        shape, warnings = _probe_image(image, path, name)
    return shape, [f"header repaired: {message}" for message in dict.fromkeys(repairs)] + warnings


def _probe_image(image, path: Path, name: str) -> tuple[tuple[int, ...], list[str]]:
    header = image.header
    dtype = header.get_data_dtype()
    if dtype.names is not None or dtype.kind == "c":
        raise UnsupportedContentError(
            name, f"{'RGB/structured' if dtype.names else 'complex'} voxels ({dtype}) are not supported"
        )
    shape = tuple(int(n) for n in image.shape)
    if any(n < 0 for n in shape):
        raise SourceError(name, f"negative dimension in the header ({shape})")
    separate_voxels = path.name.lower().endswith(".hdr")  # the voxels live in the .img beside it
    check_declared_size(
        name,
        shape,
        dtype.itemsize,
        file_bytes=None if separate_voxels else path.stat().st_size,
        data_offset=int(getattr(image.dataobj, "offset", 0) or 0),
        compressed=path.name.lower().endswith((".gz", ".mgz")),
    )
    try:
        warnings = geometry_warnings(image)
    except Exception as exc:  # a header whose affine nibabel cannot even build (NaN quaternions...)
        raise SourceError(name, f"unusable geometry in the header ({describe_error(exc)})") from None
    return shape, warnings


def geometry_warnings(image) -> list[str]:
    warnings = []
    header = image.header
    if "sform_code" in header and int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        warnings.append("no sform or qform: the orientation is unknown and assumed RAS-like from voxel sizes")
    shear = shear_degrees(image.affine)
    if shear > 0.1:
        warnings.append(f"the affine is not orthogonal (axes sheared by {shear:.1f}°); resampling honours it")
    return warnings


def read(path: Path, name: str, frame: int | None) -> tuple[np.ndarray, np.ndarray, VolumeMeta]:
    """Voxels as float32 (x, y, z) with scl_slope/scl_inter applied, and nibabel's RAS+ affine."""
    with _header_repairs():  # already reported, as warnings, when the header was probed
        return _read(path, name, frame)


def _read(path: Path, name: str, frame: int | None) -> tuple[np.ndarray, np.ndarray, VolumeMeta]:
    image = _load(path)
    try:
        proxy = image.dataobj
        shape = tuple(int(n) for n in image.shape)
        if len(shape) > 3:
            # Squeeze singleton trailing axes; pick the frame along the one non-singleton axis.
            index: list[int | slice] = [slice(None)] * 3
            for n in shape[3:]:
                index.append(frame if (n > 1 and frame is not None) else 0)
            data = np.asarray(proxy[tuple(index)], dtype=np.float32)
        else:
            data = np.asarray(proxy, dtype=np.float32)  # the proxy applies scl_slope / scl_inter
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(name, describe_error(exc)) from None
    meta = VolumeMeta(
        reader="nibabel",
        format=type(image).__name__.replace("Image", ""),
        stored_dtype=image.get_data_dtype().newbyteorder("=").name,
        warnings=geometry_warnings(image),
    )
    return data, np.asarray(image.affine, dtype=np.float64), meta


def compress(data: bytes, level: int = 1) -> bytes:
    """Standard gzip, from python-isal's igzip (3-5x faster than zlib at level 1, measured in
    benchmarks/sample_throughput.py); plain gzip where isal is not installed."""
    try:
        from isal import igzip

        return igzip.compress(data, compresslevel=min(level, 3), mtime=0)
    except ImportError:
        return gzip.compress(data, compresslevel=level, mtime=0)


def write_nifti(
    volume: Volume, path: str | Path, dtype: str = "float32", description: str = "", compresslevel: int = 1
) -> Path:
    """Write `volume` as NIfTI-1 (`.nii` or `.nii.gz`), never under its final name until complete.

    gzip level 1: higher levels cost about 3x the time for files under 0.5% smaller
    (benchmarks/sample_throughput.py).
    """
    import nibabel as nib

    path = Path(path)
    image = nib.Nifti1Image(cast_for_storage(volume.array, dtype), volume.affine)
    image.header.set_qform(volume.affine, code=_XFORM_SCANNER)
    image.header.set_sform(volume.affine, code=_XFORM_SCANNER)
    image.header.set_xyzt_units("mm", "sec")
    if description:
        image.header["descrip"] = description.encode("ascii", "replace")[:79]
    data = image.to_bytes()
    if path.name.endswith(".gz"):
        data = compress(data, compresslevel)
    return atomic_write_bytes(path, data)
