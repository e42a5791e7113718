"""Files nibabel reads: NIfTI-1 and -2 (nibabel is the reference for their sform/qform rules),
Analyze, FreeSurfer MGH/MGZ and MINC1/MINC2, all with nibabel's voxel-to-RAS+ affine as it stands.
NIfTI-1 is written here too, with a real affine, both qform and sform set, atomically.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import warnings
import zlib
from pathlib import Path

import numpy as np

from medsynth.atomic import atomic_write_bytes
from medsynth.errors import one_line_reason
from medsynth.io.checks import AccessDeniedError, FinalSourceError, UnsupportedContentError, check_declared_size
from medsynth.io.volume import SourceError, Volume, VolumeMeta, cast_for_storage, shear_degrees

# NIfTI and Analyze: SimpleITK follows the same standard, so it may stand in where nibabel cannot
# parse a header.
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr")
MGH_SUFFIXES = (".mgh", ".mgz")
MINC_SUFFIXES = (".mnc", ".mnc.gz")
# Formats only nibabel reads correctly. SimpleITK has no MGH reader, and its MINC reader returns
# MINC's RAS world coordinates as if they were ITK's LPS (unless ITK was built with
# ITK_MINC_IO_RAS_TO_LPS), which would flip left-right and front-back without a word.
NIBABEL_ONLY_SUFFIXES = MGH_SUFFIXES + MINC_SUFFIXES
# How the two MINC versions begin: MINC1 is NetCDF (read by nibabel's own copy of scipy's reader),
# MINC2 is HDF5 (read through h5py).
_NETCDF_MAGIC = (b"CDF\x01", b"CDF\x02")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_HDF5_MAGIC_OFFSETS = (0, 512, 1024, 2048)  # after a user block, if the file has one
_MINC2_NEEDS_H5PY = (
    "a MINC2 (HDF5) file needs the h5py package, which is not installed: "
    "pip install h5py (or convert it to NIfTI with mnc2nii from minc-tools)"
)
# NIFTI_XFORM_SCANNER_ANAT: the affine maps to scanner-based RAS+ millimetres.
_XFORM_SCANNER = 1


def format_name(path: str | Path) -> str:
    """The format of a file nibabel reads, by its name, for people: "NIfTI", "MGH" or "MINC"."""
    lower = str(path).lower()
    if lower.endswith(MGH_SUFFIXES):
        return "MGH"
    if lower.endswith(MINC_SUFFIXES):
        return "MINC"
    return "NIfTI"


def describe_error(exc: BaseException) -> str:
    """Turn a reader's exception into a short reason a person understands."""
    if isinstance(exc, PermissionError):
        return "cannot read: permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)) or "end-of-stream" in str(exc):
        return "truncated or corrupt compressed data"
    text = one_line_reason(exc, limit=None)  # nibabel's own wording, which names what is wrong
    if isinstance(exc, KeyError):  # a missing header field or variable, whose name alone says little
        return f"missing {text}"
    if "Expected" in text and "bytes" in text:
        return f"truncated: the file is shorter than its header says ({text})"
    return text[:200]


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.repairs: list[str] = []  # what nibabel logged: header fields it changed
        self.notes: list[str] = []  # what nibabel warned: assumptions it made while reading

    def emit(self, record: logging.LogRecord) -> None:
        self.repairs.append(record.getMessage())

    def messages(self) -> list[str]:
        return [f"header repaired: {m}" for m in dict.fromkeys(self.repairs)] + [
            f"nibabel: {m}" for m in dict.fromkeys(self.notes)
        ]


@contextlib.contextmanager
def _header_repairs():
    """nibabel repairs invalid header fields ("qform_code 1024 not valid; setting to 0") and logs
    the repair to stderr, and its MINC reader warns about what it assumes ("Invalid spacing
    declaration ... assuming regular"), both without a file name. Collect those messages instead,
    so that they become warnings on the source they belong to."""
    from nibabel import imageglobals

    logger = imageglobals.logger
    collector = _Collector()
    saved = logger.handlers[:]
    logger.handlers = [collector]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield collector
        collector.notes += [str(warning.message) for warning in caught]
    finally:
        logger.handlers = saved


def _load(path: Path):
    import nibabel as nib

    what = format_name(path)
    if what == "MINC":
        _check_minc_magic(path)
    try:
        return nib.load(str(path))
    except ImportError as exc:  # an optional package nibabel imports only for some files
        if exc.name == "h5py":
            raise FinalSourceError(str(path), _MINC2_NEEDS_H5PY) from None
        raise FinalSourceError(
            str(path), f"reading it needs the {exc.name or 'missing'} package, which is not installed"
        ) from None
    except Exception as exc:  # nibabel raises many types for junk input; all mean "not readable"
        reason = describe_error(exc)
        if isinstance(exc, PermissionError):
            raise AccessDeniedError(str(path), reason) from None
        if what == "MINC" and "vector_dimension" in reason:
            raise UnsupportedContentError(str(path), "vector (RGB) MINC voxels are not supported") from None
        kind = "NIfTI/Analyze" if what == "NIfTI" else what
        raise SourceError(str(path), f"not a readable {kind} image ({reason})") from None


def _check_minc_magic(path: Path) -> None:
    """A .mnc file must be NetCDF (MINC1) or HDF5 (MINC2); say so plainly when it is neither,
    instead of nibabel's "cannot work out file type". A .mnc.gz is left to nibabel (MINC1 only)."""
    if str(path).lower().endswith(".gz"):
        return
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HDF5_MAGIC_OFFSETS[-1] + len(_HDF5_MAGIC))
    except PermissionError:
        raise AccessDeniedError(str(path), "cannot read: permission denied") from None
    except OSError as exc:
        raise SourceError(str(path), f"cannot read ({exc.strerror})") from None
    is_hdf5 = any(head[at : at + len(_HDF5_MAGIC)] == _HDF5_MAGIC for at in _HDF5_MAGIC_OFFSETS)
    if head[:4] not in _NETCDF_MAGIC and not is_hdf5:
        raise FinalSourceError(str(path), "not a MINC file: neither MINC1 (NetCDF) nor MINC2 (HDF5) data")


def probe(path: Path, name: str) -> tuple[tuple[int, ...], list[str]]:
    """Read only the header: the stored shape and any warnings about geometry."""
    with _header_repairs() as collector:
        image = _load(path)
        shape, geometry = _probe_image(image, path, name)
    return shape, collector.messages() + geometry


def _stored_axes(image) -> tuple[list[int], list[int]]:
    """(spatial axes, other axes) of the stored array, each in stored order. NIfTI and MGH store
    the three spatial axes first and frames after them. MINC names its dimensions and usually
    stores time first ("time, zspace, yspace, xspace"); nibabel's affine then describes the
    spatial axes alone, in their stored order."""
    ndim = len(image.shape)
    # nibabel keeps MINC's dimension names only on its file object; NIfTI and MGH have none.
    names = getattr(getattr(image.dataobj, "minc_file", None), "_dim_names", None)
    if names is None or len(names) != ndim:
        return list(range(min(3, ndim))), list(range(3, ndim))
    spatial = [axis for axis, dim in enumerate(names) if str(dim).endswith("space")]
    return spatial, [axis for axis in range(ndim) if axis not in spatial]


def _probe_image(image, path: Path, name: str) -> tuple[tuple[int, ...], list[str]]:
    header = image.header
    dtype = header.get_data_dtype()
    if dtype.names is not None or dtype.kind == "c":
        raise UnsupportedContentError(
            name, f"{'RGB/structured' if dtype.names else 'complex'} voxels ({dtype}) are not supported"
        )
    stored = tuple(int(n) for n in image.shape)
    if any(n < 0 for n in stored):
        raise SourceError(name, f"negative dimension in the header ({stored})")
    spatial, other = _stored_axes(image)
    shape = tuple(stored[axis] for axis in spatial + other)  # space first, as discovery expects
    lower = path.name.lower()
    separate_voxels = lower.endswith(".hdr")  # the voxels live in the .img beside it
    check_declared_size(
        name,
        shape,
        dtype.itemsize,
        file_bytes=None if separate_voxels else path.stat().st_size,
        data_offset=int(getattr(image.dataobj, "offset", 0) or 0),
        # MINC2 is HDF5, whose datasets are usually zlib-compressed inside the file.
        compressed=lower.endswith((".gz", ".mgz") + MINC_SUFFIXES),
    )
    try:
        geometry = geometry_warnings(image)
    except Exception as exc:  # a header whose affine nibabel cannot even build (NaN quaternions...)
        raise SourceError(name, f"unusable geometry in the header ({describe_error(exc)})") from None
    return shape, geometry


def geometry_warnings(image) -> list[str]:
    import nibabel as nib

    found = []
    header = image.header
    # Only NIfTI has sform/qform codes; MGH and MINC always store their voxel-to-RAS matrix.
    if isinstance(header, nib.Nifti1Header) and int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        found.append("no sform or qform: the orientation is unknown and assumed RAS-like from voxel sizes")
    shear = shear_degrees(image.affine)
    if shear > 0.1:
        found.append(f"the affine is not orthogonal (axes sheared by {shear:.1f}°); resampling honours it")
    return found


def read(path: Path, name: str, frame: int | None) -> tuple[np.ndarray, np.ndarray, VolumeMeta]:
    """Voxels as float32 with the format's scaling applied (NIfTI's scl_slope/scl_inter, MINC's
    image-min/image-max), and nibabel's RAS+ affine, whose columns follow the array's axes."""
    with _header_repairs():  # already reported, as warnings, when the header was probed
        return _read(path, name, frame)


def _read(path: Path, name: str, frame: int | None) -> tuple[np.ndarray, np.ndarray, VolumeMeta]:
    image = _load(path)
    try:
        proxy = image.dataobj
        shape = tuple(int(n) for n in image.shape)
        _, other = _stored_axes(image)
        if other:
            # Drop singleton non-spatial axes; pick the frame along the one that is not.
            index: list[int | slice] = [slice(None)] * len(shape)
            for axis in other:
                index[axis] = frame if (shape[axis] > 1 and frame is not None) else 0
            data = np.asarray(proxy[tuple(index)], dtype=np.float32)
        else:
            data = np.asarray(proxy, dtype=np.float32)  # the proxy applies the format's scaling
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
