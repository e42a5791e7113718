"""DICOM headers: what medsynth needs from each file, parsed with pydicom (no pixels, no patient data)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsynth.errors import one_line_reason
from medsynth.io.checks import AccessDeniedError, IndexFileError, check_declared_size
from medsynth.io.volume import SourceError

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


def has_dicom_magic(path: str | Path) -> bool:
    """Part 10 files carry 'DICM' after a 128-byte preamble, whatever their name."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _floats(value, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(
            float(v) for v in (value if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") else [value])
        )
    except (TypeError, ValueError):
        return None
    return values if len(values) == n and all(np.isfinite(values)) else None


def _number(value, default=None):
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True)
class Mosaic:
    """A Siemens mosaic: one 2D image whose tiles, row by row, are the slices of a 3D volume."""

    n_slices: int
    tile_rows: int
    tile_cols: int
    tiles_across: int  # tiles per row (and per column) of the mosaic
    # The slice axis: +1 along ImageOrientationPatient's row x column cross product, -1 against it
    # (the CSA SliceNormalVector's side of it; +1 when there is none).
    normal_sign: int
    # The protocol's sSliceArray.ucImageNumbSag/Cor/Tra for the slices' main axis: the tiles are
    # stored last slice first.
    reversed: bool
    order_known: bool  # False when neither the CSA header nor the protocol says which way slices run


@dataclass
class DicomHeader:
    """What medsynth needs from one DICOM file's header. No patient identifiers are kept."""

    path: str
    series_uid: str
    sop_uid: str
    modality: str | None
    rows: int
    cols: int
    n_frames: int
    samples_per_pixel: int
    photometric: str
    ipp: tuple[float, ...] | None
    iop: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    slice_spacing: float | None  # SpacingBetweenSlices, else SliceThickness
    slope: float
    intercept: float
    series_number: str
    stored_dtype: str  # what the stored pixels are, after rescale: the dtype to write such data back in
    sort_key: tuple  # orders images at one position: temporal position, acquisition, echo, instance
    # Enhanced multi-frame files: per-frame geometry and rescale from the functional groups.
    frame_ipp: list[tuple[float, ...] | None] = field(default_factory=list)
    frame_iop: list[tuple[float, ...] | None] = field(default_factory=list)
    frame_rescale: list[tuple[float, float]] = field(default_factory=list)
    # Siemens mosaics: the tiling, or why it cannot be worked out.
    mosaic: Mosaic | None = None
    mosaic_problem: str | None = None
    # Float Pixel Data / Double Float Pixel Data (parametric maps): pydicom decodes these, GDCM cannot.
    float_pixels: bool = False


def _has_float_pixel_data(ds) -> bool:
    """Float and Double Float Pixel Data come with 32 or 64 BitsAllocated and, unlike integer pixel
    data, without BitsStored and PixelRepresentation (PS3.3 C.7.6.24, Floating Point Image Pixel)."""
    bits = int(_number(ds.get("BitsAllocated"), 16) or 16)
    return bits in (32, 64) and "PixelRepresentation" not in ds and "BitsStored" not in ds


def _stored_dtype(ds) -> str:
    if _has_float_pixel_data(ds):
        return "float32"
    slope = _number(ds.get("RescaleSlope"), 1.0)
    intercept = _number(ds.get("RescaleIntercept"), 0.0)
    if slope != 1.0 or (intercept is not None and intercept != int(intercept)):
        return "float32"
    bits = int(ds.get("BitsAllocated", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1 or (intercept or 0) < 0
    if bits <= 8 and not signed:
        return "uint8"
    return "int16" if signed else "uint16"


def _first_item(dataset, keyword: str):
    seq = dataset.get(keyword)
    return seq[0] if seq else None


def _siemens_headers(ds) -> tuple[dict, dict]:
    """The Siemens CSA header tags (from any private element of group 0029 that parses as one: the
    private creator is often stripped by anonymisers) and the ASCCONV protocol they carry."""
    import warnings

    with warnings.catch_warnings():  # nibabel.nicom warns on import that its DICOM readers are experimental
        warnings.simplefilter("ignore")
        from nibabel.nicom import ascconv, csareader

    tags: dict = {}
    protocol: dict = {}
    for element in ds.group_dataset(0x0029):
        value = element.value
        if not isinstance(value, bytes) or len(value) < 16 or element.tag.element < 0x1000:
            continue
        try:
            tags.update(csareader.read(value)["tags"])
        except Exception:  # noqa: BLE001 - not a CSA header (or a corrupt one): look no further in it
            continue
    text = next((item for item in (tags.get("MrPhoenixProtocol", {}).get("items") or []) if isinstance(item, str)), "")
    begin, end = text.find("### ASCCONV BEGIN"), text.find("### ASCCONV END ###")
    if begin >= 0 and end > begin:
        try:
            protocol, _ = ascconv.parse_ascconv(text[begin : end + len("### ASCCONV END ###")], str_delim='""')
        except Exception:  # noqa: BLE001 - an unparsable protocol only loses the fallbacks below
            protocol = {}
    return tags, protocol


def _csa_value(tags: dict, name: str) -> list | None:
    items = (tags.get(name) or {}).get("items") or []
    return items or None


def _mosaic_layout(ds, rows: int, cols: int, iop: tuple[float, ...] | None) -> tuple[Mosaic | None, str | None]:
    """Un-tiling a Siemens mosaic as dcm2niix and dicom2nifti do: the slice count from the CSA image
    header (NumberOfImagesInMosaic) or the protocol (sSliceArray.lSize); a square grid of
    ceil(sqrt(n)) tiles; the slice axis from the CSA SliceNormalVector; tiles stored last slice
    first where the protocol's ucImageNumb flag for the slices' main axis is set.
    Returns (layout, None) or (None, why it cannot be read)."""
    tags, protocol = _siemens_headers(ds)
    slice_array = protocol.get("sSliceArray", {}) if isinstance(protocol, dict) else {}
    count = _csa_value(tags, "NumberOfImagesInMosaic")
    n = int(_number(count[0], 0) or 0) if count else int(_number(slice_array.get("lSize"), 0) or 0)
    if n < 1:
        return None, (
            "Siemens mosaic (the slices of a volume tiled in one 2D image) without the private CSA header that "
            "gives its slice count (NumberOfImagesInMosaic, often removed by anonymisers), so it cannot be "
            "un-tiled; convert the scanner's original export with dcm2niix"
        )
    across = math.ceil(math.sqrt(n))
    if rows % across or cols % across:
        return (
            None,
            f"Siemens mosaic of {cols}×{rows} pixels does not divide into {across}×{across} tiles of {n} slices",
        )
    normal = np.cross(iop[:3], iop[3:]) if iop else np.array([0.0, 0.0, 1.0])
    slice_normal = _floats(_csa_value(tags, "SliceNormalVector"), 3)
    normal_sign = -1 if slice_normal is not None and float(np.dot(slice_normal, normal)) < 0 else 1
    # The main axis of the slice normal, in Siemens' sagittal/coronal/transverse (= LPS x/y/z) terms.
    main_axis = ("Sag", "Cor", "Tra")[int(np.argmax(np.abs(normal)))]
    flag = slice_array.get(f"ucImageNumb{main_axis}")
    reversed_order = bool(_number(flag, 0))
    known = slice_normal is not None or bool(slice_array)
    return Mosaic(n, rows // across, cols // across, across, normal_sign, reversed_order, known), None


class _BoundedFile:
    """A binary file whose read(n) never asks for more than is left in it.

    A buffered read(n) allocates n bytes before it reads, so a corrupt length field (one flipped
    byte made 2 read as 1 040 187 394) allocated 1 GiB for a 24 kB file."""

    def __init__(self, path: str):
        self._file = open(path, "rb")  # noqa: SIM115 - closed by read_header
        self._size = os.fstat(self._file.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self._file.read()
        return self._file.read(min(size, max(0, self._size - self._file.tell())))

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def read_header(path: str) -> DicomHeader:
    """Parse one file's header. Raises SourceError (with `path` as name) for non-image DICOM."""
    import pydicom
    from pydicom.errors import BytesLengthException, InvalidDicomError

    try:
        handle = _BoundedFile(path)
        try:
            ds = pydicom.dcmread(handle, stop_before_pixels=True, force=not has_dicom_magic(path))
        finally:
            handle.close()
    except PermissionError:
        raise AccessDeniedError(path, "cannot read: permission denied") from None
    except (InvalidDicomError, BytesLengthException, EOFError, OSError, *_CORRUPT_VALUE_ERRORS) as exc:
        raise SourceError(path, f"not a readable DICOM file ({one_line_reason(exc, 120)})") from None
    try:
        return _header_from_dataset(path, ds)
    except (BytesLengthException, *_CORRUPT_VALUE_ERRORS) as exc:
        # pydicom parses values lazily: a corrupt VR, length or value surfaces only when read.
        raise SourceError(path, f"corrupt DICOM header ({one_line_reason(exc, 120)})") from None


# What pydicom raises for values it cannot decode, found by fuzzing real files: an unknown VR
# raises a RuntimeError subclass, a non-transfer-syntax UID raises ValueError on .is_compressed,
# and a length that is not a multiple of the value size raises BytesLengthException.
_CORRUPT_VALUE_ERRORS = (
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    IndexError,
    RuntimeError,
    OverflowError,
)


def _header_from_dataset(path: str, ds) -> DicomHeader:
    if not has_dicom_magic(path) and "SOPClassUID" not in ds and "Rows" not in ds:
        raise SourceError(path, "not a DICOM file (no DICM marker and no image attributes)")
    sop_class = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta", {}), "MediaStorageSOPClassUID", ""))
    if sop_class == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise IndexFileError(path, "DICOMDIR index file, not an image")
    if "Rows" not in ds or "Columns" not in ds:
        kind = getattr(ds.get("SOPClassUID"), "name", None) or "no pixel data"
        raise SourceError(path, f"DICOM object without an image ({kind})")
    if "SeriesInstanceUID" not in ds:
        raise SourceError(path, "DICOM image without a SeriesInstanceUID, so it cannot be grouped into a series")

    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []

    def from_groups(frame_item, seq_keyword: str, keyword: str):
        """A functional-group value: per-frame first, then shared (DICOM PS3.3 C.7.6.16)."""
        for group in (frame_item, shared):
            item = _first_item(group, seq_keyword) if group is not None else None
            if item is not None and keyword in item:
                return item.get(keyword)
        return None

    measures = from_groups(per_frame[0] if per_frame else None, "PixelMeasuresSequence", "PixelSpacing")
    pixel_spacing = _floats(ds.get("PixelSpacing") or measures, 2)
    slice_spacing = _number(ds.get("SpacingBetweenSlices")) or _number(ds.get("SliceThickness"))
    if slice_spacing is None and (shared is not None or per_frame):
        first = per_frame[0] if per_frame else None
        slice_spacing = _number(from_groups(first, "PixelMeasuresSequence", "SpacingBetweenSlices")) or _number(
            from_groups(first, "PixelMeasuresSequence", "SliceThickness")
        )

    header = DicomHeader(
        path=path,
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.get("SOPInstanceUID", path)),
        modality=str(ds.get("Modality", "") or "").strip().upper() or None,
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        n_frames=int(_number(ds.get("NumberOfFrames"), 1) or 1),
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip(),
        ipp=_floats(ds.get("ImagePositionPatient"), 3),
        iop=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing,
        slope=_number(ds.get("RescaleSlope"), 1.0) or 1.0,
        intercept=_number(ds.get("RescaleIntercept"), 0.0) or 0.0,
        series_number=str(ds.get("SeriesNumber", "") or ""),
        stored_dtype=_stored_dtype(ds),
        sort_key=(
            _number(ds.get("TemporalPositionIdentifier"), 0),
            _number(ds.get("AcquisitionNumber"), 0),
            _number(ds.get("EchoNumbers"), 0),
            _number(ds.get("InstanceNumber"), 0),
        ),
    )
    header.float_pixels = _has_float_pixel_data(ds)
    image_type = ds.get("ImageType") or []
    image_type = [str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type)]
    if "MOSAIC" in image_type and header.n_frames <= 1:
        header.mosaic, header.mosaic_problem = _mosaic_layout(ds, header.rows, header.cols, header.iop)
    # From the header alone, before SimpleITK allocates anything for the pixels.
    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    compressed = bool(getattr(transfer_syntax, "is_compressed", False))
    bits = int(_number(ds.get("BitsAllocated"), 16) or 16)
    check_declared_size(
        path,
        (header.cols, header.rows, header.n_frames),
        itemsize=max(1, bits // 8) * max(1, header.samples_per_pixel),
        file_bytes=None if compressed else os.path.getsize(path),  # encapsulated: any ratio is possible
    )
    if header.n_frames > 1 and per_frame:
        for item in per_frame:
            header.frame_ipp.append(_floats(from_groups(item, "PlanePositionSequence", "ImagePositionPatient"), 3))
            header.frame_iop.append(
                _floats(from_groups(item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6) or header.iop
            )
            slope = _number(from_groups(item, "PixelValueTransformationSequence", "RescaleSlope"), header.slope)
            intercept = _number(
                from_groups(item, "PixelValueTransformationSequence", "RescaleIntercept"), header.intercept
            )
            header.frame_rescale.append((slope or 1.0, intercept or 0.0))
    return header
