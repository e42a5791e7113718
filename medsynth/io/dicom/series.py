"""DICOM series: group headers into series, check that each forms a volume, read its pixels.

Headers are parsed with pydicom (`headers`: it exposes the functional-group sequences of enhanced
multi-frame files); pixels are decoded with SimpleITK/GDCM, which handles the compressed transfer
syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) without optional plugins and applies each file's rescale
slope/intercept. The geometry (`geometry`) is computed from ImagePositionPatient/ImageOrientationPatient
of every slice, never from the first two slices only, so that gaps, tilt and mixed series are caught
instead of silently producing a wrong affine.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

import numpy as np

from medsynth.config import IoConfig
from medsynth.errors import one_line_reason
from medsynth.io.checks import UnsupportedContentError, frames_to_use
from medsynth.io.dicom.geometry import stack_geometry
from medsynth.io.dicom.headers import DicomHeader
from medsynth.io.sources import DicomLayout, Skipped, Source
from medsynth.io.volume import LPS_TO_RAS, SourceError, VolumeMeta

__all__ = ["read", "series_name", "sources_from_headers"]

# Modalities whose multi-frame files are stacks of slices. Others (US, XA, RF, ES...) are cine
# loops whose frames are time, and reading them as a volume would be wrong.
_VOLUMETRIC_MODALITIES = {"CT", "MR", "PT", "NM", "OT"}


def _four_d_text(stacks: list, shape: tuple[int, int, int]) -> str:
    return (
        f"4D series: {len(stacks)} images at each of {shape[2]} slice positions "
        f"({'×'.join(map(str, shape))}, e.g. time points or echoes)"
    )


def _common_dtype(dtypes: list[str]) -> str:
    """One dtype that holds every slice's values (slices of one series may rescale differently)."""
    kinds = set(dtypes)
    if len(kinds) == 1:
        return dtypes[0]
    return "float32" if "float32" in kinds else "int16"


def _check_pixels(name: str, header: DicomHeader) -> None:
    if header.samples_per_pixel != 1 or not header.photometric.startswith("MONOCHROME"):
        raise UnsupportedContentError(name, f"colour images ({header.photometric}) are not supported")


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
    sources = []
    for frame, label, extra in frames_to_use(name, len(geometry.stacks), _four_d_text(geometry.stacks, shape), io):
        stack = geometry.stacks[frame or 0]
        layout = DicomLayout(
            affine=tuple(map(tuple, geometry.affine.tolist())),
            modality=headers[0].modality,
            shape=shape,
            stored_dtype=_common_dtype([h.stored_dtype for h in headers]),
            float_pixels=any(h.float_pixels for h in headers),
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


def _tile_positions(header: DicomHeader) -> list[tuple[float, ...]]:
    """ImagePositionPatient of each tile of a mosaic, in tile order.

    A mosaic's ImagePositionPatient is that of a virtual image of the mosaic's size centred on the
    slice it starts from (dcm2niix and dicom2nifti read it so): move it by half the size difference
    along the rows and columns, then step along the slice axis, from the last tile when the tiles
    are stored last slice first."""
    mosaic = header.mosaic
    assert mosaic is not None and header.ipp and header.iop and header.pixel_spacing
    row_cosine, column_cosine = np.asarray(header.iop[:3]), np.asarray(header.iop[3:])
    row_spacing, column_spacing = header.pixel_spacing  # PixelSpacing = (between rows, between columns)
    first = (
        np.asarray(header.ipp)
        + row_cosine * column_spacing * (header.cols - mosaic.tile_cols) / 2.0
        + column_cosine * row_spacing * (header.rows - mosaic.tile_rows) / 2.0
    )
    step = np.cross(row_cosine, column_cosine) * mosaic.normal_sign * (header.slice_spacing or 1.0)
    n = mosaic.n_slices
    return [tuple(first + (n - 1 - k if mosaic.reversed else k) * step) for k in range(n)]


def _mosaic_sources(name: str, headers: list[DicomHeader], io: IoConfig) -> list[Source]:
    """Sources from the mosaic files of one series: each file is one 3D volume, so several files
    (time points) make a 4D series that follows `io.four_d`."""
    unique: dict[str, DicomHeader] = {}
    for header in headers:
        unique.setdefault(header.sop_uid, header)
    headers = sorted(unique.values(), key=lambda h: (h.sort_key, h.path))
    problem = next((h.mosaic_problem for h in headers if h.mosaic_problem), None)
    if problem:
        raise SourceError(name, problem)
    _check_pixels(name, headers[0])
    layouts = Counter((h.mosaic.n_slices, h.mosaic.tile_cols, h.mosaic.tile_rows) for h in headers if h.mosaic)
    if len(layouts) > 1:
        listed = ", ".join(f"{n} slices of {c}×{r}" for (n, c, r), _ in layouts.most_common())
        raise SourceError(name, f"mosaic files of one series disagree on their tiling ({listed})")
    if any(h.ipp is None or h.iop is None or h.pixel_spacing is None for h in headers):
        raise SourceError(
            name, "mosaic without ImagePositionPatient, ImageOrientationPatient or PixelSpacing: cannot be placed"
        )
    warnings = []
    if not headers[0].mosaic.order_known:
        warnings.append(
            "the headers do not say which way the mosaic's slices run (no CSA SliceNormalVector or protocol): "
            "assumed first tile first, along the row × column normal"
        )
    if headers[0].slice_spacing is None:
        raise SourceError(name, "mosaic without SpacingBetweenSlices or SliceThickness: its slices cannot be placed")
    positions, owners, keys = [], [], []
    for file_index, header in enumerate(headers):
        for tile, position in enumerate(_tile_positions(header)):
            positions.append(position)
            owners.append((file_index, tile))
            keys.append(header.sort_key)
    geometry = stack_geometry(
        name,
        positions,
        [headers[i].iop for i, _ in owners],
        [headers[i].pixel_spacing for i, _ in owners],
        keys,
        io.min_slices,
    )
    mosaic = headers[0].mosaic
    shape = (mosaic.tile_cols, mosaic.tile_rows, len(geometry.stacks[0]))
    sources = []
    for frame, label, extra in frames_to_use(name, len(geometry.stacks), _four_d_text(geometry.stacks, shape), io):
        stack = geometry.stacks[frame or 0]
        files = sorted({owners[i][0] for i in stack})
        if len(files) != 1:
            raise SourceError(name, "the slices of one volume come from several mosaic files; positions overlap")
        layout = DicomLayout(
            affine=tuple(map(tuple, geometry.affine.tolist())),
            frame_order=tuple(owners[i][1] for i in stack),
            modality=headers[0].modality,
            shape=shape,
            stored_dtype=headers[0].stored_dtype,
            mosaic=(mosaic.tile_rows, mosaic.tile_cols, mosaic.tiles_across),
        )
        sources.append(
            Source(
                kind="dicom",
                paths=(headers[files[0]].path,),
                name=label,
                frame=frame,
                dicom=layout,
                warnings=tuple(warnings + geometry.warnings + extra),
            )
        )
    return sources


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
    for frame, label, extra in frames_to_use(name, len(stacks), _four_d_text(stacks, shape), io):
        order = stacks[frame or 0]
        rescale = tuple(frame_rescale[i] for i in order) if frame_rescale else None
        layout = DicomLayout(
            affine=tuple(map(tuple, affine.tolist())),
            frame_order=tuple(order),
            frame_rescale=rescale,
            modality=header.modality,
            shape=shape,
            stored_dtype="float32" if frame_rescale else header.stored_dtype,
            float_pixels=header.float_pixels,
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
    mosaics = [h for h in headers if h.n_frames <= 1 and (h.mosaic or h.mosaic_problem)]
    single = [h for h in headers if h.n_frames <= 1 and not (h.mosaic or h.mosaic_problem)]
    mosaic_groups = _group_series(mosaics)
    groups = _group_series(single) + mosaic_groups + [[h] for h in multiframe]
    series_per_folder = Counter(os.path.dirname(g[0].path) for g in groups)
    for group in sorted(groups, key=lambda g: min(h.path for h in g)):
        name = series_name(root, group, series_per_folder[os.path.dirname(group[0].path)] > 1)
        if len(group) == 1 and group[0].n_frames <= 1:
            name = os.path.relpath(group[0].path, root)  # one file: name the file itself
        try:
            if any(group is g for g in mosaic_groups):
                sources += _mosaic_sources(name, group, io)
            elif len(group) == 1 and group[0].n_frames > 1:
                sources += _multiframe_sources(name, group[0], io)
            else:
                found, _ = _series_sources(name, group, io)
                sources += found
        except SourceError as exc:
            skipped.append(Skipped(exc.name, exc.reason))
    return sources, skipped


# ---------------------------------------------------------------------------------------------
# Reading pixels


def _read_frames(path: str, float_pixels: bool) -> np.ndarray:
    """(frames, rows, columns) float32 in real units (rescale applied) from one file."""
    if float_pixels:
        return _read_float_pixel_data(path)
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(path, sitk.sitkFloat32)
    except RuntimeError as exc:  # GDCM's message is on the last line, after SimpleITK's file/line noise
        raise SourceError(path, f"pixel data cannot be decoded ({one_line_reason(exc, 160, last=True)})") from None
    return sitk.GetArrayFromImage(image)  # (frames, rows, cols)


def _read_float_pixel_data(path: str) -> np.ndarray:
    """Float / Double Float Pixel Data (parametric maps), which GDCM cannot decode: pydicom can.
    The stored floats are the values (no rescale), except for parametric maps' optional Real World
    Value Mapping, which is not applied: the values read are those stored."""
    import pydicom

    try:
        pixels = pydicom.dcmread(path).pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoding failure is this file's problem, said in one line
        raise SourceError(path, f"float pixel data cannot be decoded ({one_line_reason(exc, 160)})") from None
    pixels = np.asarray(pixels, dtype=np.float32)
    return pixels[None] if pixels.ndim == 2 else pixels  # (frames, rows, cols)


def _untile(plane: np.ndarray, mosaic: tuple[int, int, int], order: tuple[int, ...]) -> np.ndarray:
    """(rows, cols) mosaic -> (x, y, z) volume of the tiles in `order` (tiles run row by row)."""
    tile_rows, tile_cols, across = mosaic
    tiles = [
        plane[
            (t // across) * tile_rows : (t // across + 1) * tile_rows,
            (t % across) * tile_cols : (t % across + 1) * tile_cols,
        ]
        for t in order
    ]
    return np.ascontiguousarray(np.stack(tiles, axis=0).transpose(2, 1, 0))  # (tile cols, tile rows, slices)


def read(source: Source) -> tuple[np.ndarray, np.ndarray, VolumeMeta]:
    """Voxels (x, y, z) float32 in real units (rescale applied) and the header-derived RAS+ affine."""
    layout = source.dicom
    assert layout is not None
    if layout.mosaic is not None:
        plane = _read_frames(source.paths[0], layout.float_pixels)  # (1, rows, cols): the whole mosaic
        array = _untile(plane[0], layout.mosaic, layout.frame_order or ())
    elif layout.frame_order is None:
        slices = []
        for path in source.paths:
            plane = _read_frames(path, layout.float_pixels)  # (1, rows, cols)
            if plane.ndim != 3 or plane.shape[0] != 1:
                raise SourceError(source.name, f"{os.path.basename(path)} holds {plane.shape[0]} frames, expected 1")
            slices.append(plane[0].T)  # (cols, rows) = (x, y)
        array = np.stack(slices, axis=2)  # (x, y, z)
    else:
        frames = _read_frames(source.paths[0], layout.float_pixels)  # (frames, rows, cols)
        array = np.ascontiguousarray(frames[list(layout.frame_order)].transpose(2, 1, 0))  # (x, y, z)
        if layout.frame_rescale:
            # GDCM applies one rescale to every frame; redo it per frame where the file's differ.
            applied_slope, applied_intercept = layout.frame_rescale[0]
            for z, (slope, intercept) in enumerate(layout.frame_rescale):
                stored = (array[:, :, z] - applied_intercept) / applied_slope
                array[:, :, z] = stored * slope + intercept
    if array.shape != layout.shape:
        raise SourceError(source.name, f"decoded shape {array.shape} differs from the headers' {layout.shape}")
    meta = VolumeMeta(
        reader="pydicom" if layout.float_pixels else "pydicom+SimpleITK",
        format="DICOM",
        modality=layout.modality,
        stored_dtype=layout.stored_dtype,
        n_files=len(source.paths),
        warnings=list(source.warnings),
    )
    return np.asarray(array, dtype=np.float32), np.asarray(layout.affine, dtype=np.float64), meta
