"""DICOM: group files into series, check that they form a volume, work out its geometry, read it.

Headers are parsed with pydicom (it exposes the functional-group sequences of enhanced multi-frame
files); pixels are decoded with SimpleITK/GDCM, which handles the compressed transfer syntaxes
(JPEG, JPEG-LS, JPEG 2000, RLE) without optional plugins and applies each file's rescale
slope/intercept. The geometry is computed here from ImagePositionPatient/ImageOrientationPatient of
every slice, never from the first two slices only, so that gaps, tilt and mixed series are caught
instead of silently producing a wrong affine.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsynth.config import IoConfig
from medsynth.io.sources import DicomLayout, Skipped, Source
from medsynth.io.volume import LPS_TO_RAS, SourceError

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Modalities whose multi-frame files are stacks of slices. Others (US, XA, RF, ES...) are cine
# loops whose frames are time, and reading them as a volume would be wrong.
_VOLUMETRIC_MODALITIES = {"CT", "MR", "PT", "NM", "OT"}
_ORIENTATION_TOLERANCE = 1e-3  # direction cosines written with 4-6 decimals differ by ~1e-5
_POSITION_TOLERANCE_MM = 0.01  # two slices closer than this along the normal are at one position
_TILT_WARNING_DEGREES = 0.1


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


def _stored_dtype(ds) -> str:
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


def read_header(path: str) -> DicomHeader:
    """Parse one file's header. Raises SourceError (with `path` as name) for non-image DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not has_dicom_magic(path))
    except PermissionError:
        raise SourceError(path, "cannot read: permission denied") from None
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(
            path, f"not a readable DICOM file ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
        ) from None
    if not has_dicom_magic(path) and "SOPClassUID" not in ds and "Rows" not in ds:
        raise SourceError(path, "not a DICOM file (no DICM marker and no image attributes)")
    sop_class = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta", {}), "MediaStorageSOPClassUID", ""))
    if sop_class == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise SourceError(path, "DICOMDIR index file, not an image")
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


# ---------------------------------------------------------------------------------------------
# Geometry of a stack of images


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


# ---------------------------------------------------------------------------------------------
# From headers to sources


def _apply_four_d(
    name: str, n_frames: int, n_slices: int, shape_text: str, io: IoConfig
) -> list[tuple[int | None, str, list[str]]]:
    """(frame, display name, warnings) for each volume a series yields under the 4D policy."""
    if n_frames == 1:
        return [(None, name, [])]
    if io.four_d == "skip":
        raise SourceError(
            name,
            f"4D: {n_frames} images at each of {n_slices} slice positions ({shape_text}, e.g. time points or "
            "echoes); set io.four_d=split to use each as a volume, or io.four_d=first",
        )
    if io.four_d == "first":
        return [(0, name, [f"4D series with {n_frames} frames: using the first (io.four_d=first)"])]
    return [(f, f"{name} [frame {f}]", []) for f in range(n_frames)]


def _common_dtype(dtypes: list[str]) -> str:
    """One dtype that holds every slice's values (slices of one series may rescale differently)."""
    kinds = set(dtypes)
    if len(kinds) == 1:
        return dtypes[0]
    return "float32" if "float32" in kinds else "int16"


def _check_pixels(name: str, header: DicomHeader) -> None:
    if header.samples_per_pixel != 1 or not header.photometric.startswith("MONOCHROME"):
        raise SourceError(name, f"colour images ({header.photometric}) are not supported")


def _series_sources(name: str, headers: list[DicomHeader], io: IoConfig) -> tuple[list[Source], list[str]]:
    """Sources from the single-frame files of one series, plus notes on dropped duplicates."""
    notes = []
    unique: dict[str, DicomHeader] = {}
    for header in headers:
        unique.setdefault(header.sop_uid, header)
    if len(unique) < len(headers):
        notes.append(f"{len(headers) - len(unique)} duplicate file(s) with the same SOP Instance UID ignored")
    headers = sorted(unique.values(), key=lambda h: h.path)
    _check_pixels(name, headers[0])
    sizes = Counter((h.cols, h.rows) for h in headers)
    if len(sizes) > 1:
        listed = ", ".join(f"{c}×{r} ({n} files)" for (c, r), n in sizes.most_common())
        raise SourceError(name, f"mixed image sizes within one series: {listed}")
    if len(headers) == 1:
        raise SourceError(name, "a single slice is not a volume")
    lacking = [h for h in headers if h.ipp is None or h.iop is None or h.pixel_spacing is None]
    if lacking:
        raise SourceError(
            name,
            f"{len(lacking)} of {len(headers)} files lack ImagePositionPatient, ImageOrientationPatient or "
            "PixelSpacing, so the slices cannot be placed in space",
        )
    geometry = stack_geometry(
        name,
        [h.ipp for h in headers],
        [h.iop for h in headers],
        [h.pixel_spacing for h in headers],
        [h.sort_key for h in headers],
        io.min_slices,
    )
    n_slices = len(geometry.stacks[0])
    shape = (headers[0].cols, headers[0].rows, n_slices)
    shape_text = "×".join(map(str, shape))
    sources = []
    for frame, label, extra in _apply_four_d(name, len(geometry.stacks), n_slices, shape_text, io):
        stack = geometry.stacks[frame or 0]
        layout = DicomLayout(
            affine=tuple(map(tuple, geometry.affine.tolist())),
            modality=headers[0].modality,
            shape=shape,
            stored_dtype=_common_dtype([h.stored_dtype for h in headers]),
        )
        sources.append(
            Source(
                kind="dicom",
                paths=tuple(headers[i].path for i in stack),
                name=label,
                frame=frame,
                dicom=layout,
                warnings=tuple(notes + geometry.warnings + extra),
            )
        )
    return sources, notes


def _multiframe_sources(name: str, header: DicomHeader, io: IoConfig) -> list[Source]:
    _check_pixels(name, header)
    n = header.n_frames
    warnings: list[str] = []
    frame_rescale = None
    if (
        header.frame_ipp
        and all(p is not None for p in header.frame_ipp)
        and all(o is not None for o in header.frame_iop)
    ):
        if header.pixel_spacing is None:
            raise SourceError(name, "multi-frame file without PixelSpacing")
        geometry = stack_geometry(
            name,
            header.frame_ipp,
            header.frame_iop,
            [header.pixel_spacing] * n,
            [(i,) for i in range(n)],
            io.min_slices,
        )
        stacks, affine = geometry.stacks, geometry.affine
        warnings += geometry.warnings
        if len(set(header.frame_rescale)) > 1:
            frame_rescale = header.frame_rescale
    else:
        if header.modality not in _VOLUMETRIC_MODALITIES:
            raise SourceError(
                name,
                f"multi-frame {header.modality or 'DICOM'} image without per-frame positions: its {n} frames are "
                "probably time, not slices",
            )
        if n < io.min_slices:
            raise SourceError(name, f"only {n} frames: too few to form a volume (io.min_slices = {io.min_slices})")
        iop = np.asarray(header.iop if header.iop else (1, 0, 0, 0, 1, 0), dtype=np.float64)
        spacing = header.pixel_spacing or (1.0, 1.0)
        step = header.slice_spacing or 1.0
        missing = [
            what
            for what, value in (
                ("ImageOrientationPatient", header.iop),
                ("ImagePositionPatient", header.ipp),
                ("PixelSpacing", header.pixel_spacing),
                ("slice spacing", header.slice_spacing),
            )
            if value is None
        ]
        warnings.append(
            f"no per-frame geometry and no {', '.join(missing)}: placed with identity orientation and "
            f"{spacing[1]:g}×{spacing[0]:g}×{step:g} mm voxels; its world position is unknown"
            if missing
            else "no per-frame positions: frames assumed evenly spaced along the slice normal"
        )
        normal = np.cross(iop[:3], iop[3:])
        lps = np.eye(4)
        lps[:3, 0] = iop[:3] * spacing[1]
        lps[:3, 1] = iop[3:] * spacing[0]
        lps[:3, 2] = normal * step
        lps[:3, 3] = header.ipp if header.ipp else (0.0, 0.0, 0.0)
        stacks, affine = [list(range(n))], LPS_TO_RAS @ lps
    n_slices = len(stacks[0])
    shape = (header.cols, header.rows, n_slices)
    sources = []
    for frame, label, extra in _apply_four_d(name, len(stacks), n_slices, "×".join(map(str, shape)), io):
        order = stacks[frame or 0]
        rescale = tuple(frame_rescale[i] for i in order) if frame_rescale else None
        layout = DicomLayout(
            affine=tuple(map(tuple, affine.tolist())),
            frame_order=tuple(order),
            frame_rescale=rescale,
            modality=header.modality,
            shape=shape,
            stored_dtype="float32" if frame_rescale else header.stored_dtype,
        )
        sources.append(
            Source(
                kind="dicom",
                paths=(header.path,),
                name=label,
                frame=frame,
                dicom=layout,
                warnings=tuple(warnings + extra),
            )
        )
    return sources


def _group_series(headers: list[DicomHeader]) -> list[list[DicomHeader]]:
    """Group single-frame files by SeriesInstanceUID.

    A series spread over several folders is joined. But when the folders hold copies of the same
    instances (the same SOP Instance UIDs, e.g. an export unpacked twice), each folder stays its
    own source, so copies are not merged into a stack of duplicate slices.
    """
    by_uid: dict[str, list[DicomHeader]] = defaultdict(list)
    for header in headers:
        by_uid[header.series_uid].append(header)
    groups = []
    for members in by_uid.values():
        by_folder: dict[str, list[DicomHeader]] = defaultdict(list)
        for header in members:
            by_folder[os.path.dirname(header.path)].append(header)
        if len(by_folder) == 1:
            groups.append(members)
            continue
        seen: set[str] = set()
        overlap = False
        for folder_members in by_folder.values():
            uids = {h.sop_uid for h in folder_members}
            if uids & seen:
                overlap = True
            seen |= uids
        if overlap:
            groups.extend(by_folder.values())
        else:
            groups.append(members)
    return groups


def series_name(root: str, headers: list[DicomHeader], several_in_folder: bool) -> str:
    folders = sorted({os.path.dirname(h.path) for h in headers})
    rel = os.path.relpath(folders[0], root)
    rel = "." if rel == "." else rel
    if len(folders) > 1:
        rel += f" (+{len(folders) - 1} folders)"
    if len(headers) == 1 and headers[0].n_frames > 1:
        return os.path.relpath(headers[0].path, root)
    if not several_in_folder:
        return f"{rel}/"
    label = (
        f"series {headers[0].series_number}" if headers[0].series_number else f"series …{headers[0].series_uid[-8:]}"
    )
    return f"{rel}/ [{label}]"


def sources_from_headers(root: str, headers: list[DicomHeader], io: IoConfig) -> tuple[list[Source], list[Skipped]]:
    sources: list[Source] = []
    skipped: list[Skipped] = []
    multiframe = [h for h in headers if h.n_frames > 1]
    single = [h for h in headers if h.n_frames <= 1]
    groups = _group_series(single) + [[h] for h in multiframe]
    series_per_folder = Counter(os.path.dirname(g[0].path) for g in groups)
    for group in sorted(groups, key=lambda g: min(h.path for h in g)):
        name = series_name(root, group, series_per_folder[os.path.dirname(group[0].path)] > 1)
        if len(group) == 1 and group[0].n_frames <= 1:
            name = os.path.relpath(group[0].path, root)  # one file: name the file itself
        try:
            if len(group) == 1 and group[0].n_frames > 1:
                sources += _multiframe_sources(name, group[0], io)
            else:
                found, _ = _series_sources(name, group, io)
                sources += found
        except SourceError as exc:
            skipped.append(Skipped(exc.name, exc.reason))
    return sources, skipped


# ---------------------------------------------------------------------------------------------
# Reading pixels


def _read_file_float(path: str):
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(path, sitk.sitkFloat32)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise SourceError(
            path, f"pixel data cannot be decoded ({lines[-1][:160] if lines else 'unknown error'})"
        ) from None


def read(source: Source) -> tuple[np.ndarray, np.ndarray, dict]:
    """Voxels (x, y, z) float32 in real units (rescale applied) and the header-derived RAS+ affine."""
    import SimpleITK as sitk

    layout = source.dicom
    assert layout is not None
    if layout.frame_order is None:
        slices = []
        for path in source.paths:
            image = _read_file_float(path)
            plane = sitk.GetArrayFromImage(image)  # (1, rows, cols)
            if plane.ndim != 3 or plane.shape[0] != 1:
                raise SourceError(source.name, f"{os.path.basename(path)} holds {plane.shape[0]} frames, expected 1")
            slices.append(plane[0].T)  # (cols, rows) = (x, y)
        array = np.stack(slices, axis=2)  # (x, y, z)
    else:
        image = _read_file_float(source.paths[0])
        frames = sitk.GetArrayFromImage(image)  # (frames, rows, cols)
        array = np.ascontiguousarray(frames[list(layout.frame_order)].transpose(2, 1, 0))  # (x, y, z)
        if layout.frame_rescale:
            # GDCM applies one rescale to every frame; redo it per frame where the file's differ.
            applied_slope, applied_intercept = layout.frame_rescale[0]
            for z, (slope, intercept) in enumerate(layout.frame_rescale):
                stored = (array[:, :, z] - applied_intercept) / applied_slope
                array[:, :, z] = stored * slope + intercept
    if array.shape != layout.shape:
        raise SourceError(source.name, f"decoded shape {array.shape} differs from the headers' {layout.shape}")
    meta = {
        "reader": "pydicom+SimpleITK",
        "format": "DICOM",
        "modality": layout.modality,
        "stored_dtype": layout.stored_dtype,
        "n_files": len(source.paths),
        "warnings": list(source.warnings),
    }
    return np.asarray(array, dtype=np.float32), np.asarray(layout.affine, dtype=np.float64), meta
