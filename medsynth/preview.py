"""PNG montages of three orthogonal mid-slices, for people and for logs.

Written with numpy and zlib alone (a PNG is a zlib stream with a small header), so previews need no
plotting library. Slices are shown in neurological convention, as most research viewers do: the
patient's right on the image's right, superior at the top (anterior at the top in the axial view).
A volume's label map, when it has one, is drawn over its slices: each label tinted and outlined in
its own colour.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from medsynth.atomic import atomic_write_bytes


def encode_png(image: np.ndarray) -> bytes:
    """Encode an (H, W) uint8 greyscale or (H, W, 3) uint8 RGB image as PNG bytes."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 2:
        colour_type, channels = 0, 1
    elif image.ndim == 3 and image.shape[2] == 3:
        colour_type, channels = 2, 3
    else:
        raise ValueError(f"expected (H, W) or (H, W, 3), got {image.shape}")
    height, width = image.shape[:2]
    rows = image.reshape(height, width * channels)
    raw = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rows], axis=1).tobytes()  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _zoom_nearest(plane: np.ndarray, scale_rows: float, scale_cols: float) -> np.ndarray:
    rows = np.clip((np.arange(int(round(plane.shape[0] * scale_rows))) / scale_rows).astype(int), 0, plane.shape[0] - 1)
    cols = np.clip((np.arange(int(round(plane.shape[1] * scale_cols))) / scale_cols).astype(int), 0, plane.shape[1] - 1)
    return plane[np.ix_(rows, cols)]


def orthogonal_slices(
    volume: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), pixel_mm: float | None = None
) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices of a RAS-ordered (X, Y, Z) volume, as display images.

    Each is (rows, cols) with superior (or anterior, for axial) at the top, resampled by nearest
    neighbour so that anisotropic voxels show at their true aspect ratio.
    """
    x, y, z = (n // 2 for n in volume.shape)
    pixel_mm = pixel_mm or min(spacing)
    sx, sy, sz = (s / pixel_mm for s in spacing)
    axial = volume[:, :, z].T[::-1]  # rows: anterior at top; cols: x (R) ... displayed left-to-right
    coronal = volume[:, y, :].T[::-1]  # rows: superior at top; cols: x
    sagittal = volume[x, :, :].T[::-1]  # rows: superior at top; cols: y (posterior -> anterior)
    return [
        _zoom_nearest(axial, sy, sx),
        _zoom_nearest(coronal, sz, sx),
        _zoom_nearest(sagittal, sz, sy),
    ]


def to_uint8(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (np.asarray(plane, dtype=np.float64) - low) / max(high - low, 1e-12)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# Colours of label values 1, 2, 3, ... (cycled; 0 is background and is not drawn): distinct
# on grey and to most colour-blind eyes (Wong 2011).
LABEL_COLOURS = np.array(
    [[230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66], [0, 114, 178], [213, 94, 0], [204, 121, 167]],
    dtype=np.uint8,
)
LABEL_FILL = 0.3  # how much of a label's colour tints the voxels inside it; its outline is drawn solid


def overlay_labels(grey: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, W) uint8 image and (H, W) integer label plane (0: background) -> (H, W, 3) uint8: each
    label tinted in its colour, with a solid outline where it meets another label or the edge."""
    labels = np.asarray(labels)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float64)
    colours = LABEL_COLOURS[(labels.astype(np.int64) - 1) % len(LABEL_COLOURS)].astype(np.float64)  # (H, W, 3)
    edged = np.pad(labels, 1, mode="constant", constant_values=-1)  # the edge counts as another label
    centre = edged[1:-1, 1:-1]
    boundary = (
        (centre != edged[:-2, 1:-1])
        | (centre != edged[2:, 1:-1])
        | (centre != edged[1:-1, :-2])
        | (centre != edged[1:-1, 2:])
    )
    inside = labels != 0
    rgb[inside] = (1.0 - LABEL_FILL) * rgb[inside] + LABEL_FILL * colours[inside]
    outline = inside & boundary
    rgb[outline] = colours[outline]
    return (rgb + 0.5).astype(np.uint8)


def montage(
    volumes: list[np.ndarray],
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    value_range: tuple[float, float] = (-1.0, 1.0),
    gap: int = 2,
    min_height: int = 96,
    labels: list[np.ndarray] | None = None,
) -> np.ndarray:
    """One row per volume: [axial | coronal | sagittal], on a black background; uint8 (H, W). With
    `labels` (a label map of values per volume, on its grid, 0 the background), each label is
    drawn over its slices in colour (`overlay_labels`): uint8 (H, W, 3)."""
    rows = []
    for i, volume in enumerate(volumes):
        planes = [to_uint8(p, *value_range) for p in orthogonal_slices(np.asarray(volume), spacing)]
        label_planes = orthogonal_slices(np.asarray(labels[i]), spacing) if labels is not None else None
        height = max(p.shape[0] for p in planes)
        if height < min_height:  # small volumes (32³) get enlarged so they can be seen
            factor = int(np.ceil(min_height / height))
            planes = [np.kron(p, np.ones((factor, factor), dtype=np.uint8)) for p in planes]
            if label_planes is not None:
                label_planes = [np.kron(p, np.ones((factor, factor), dtype=p.dtype)) for p in label_planes]
            height *= factor
        if label_planes is not None:  # outlines drawn at display size, one pixel wide
            planes = [overlay_labels(p, q) for p, q in zip(planes, label_planes)]
        padded = []
        for plane in planes:
            canvas = np.zeros((height, *plane.shape[1:]), dtype=np.uint8)
            canvas[(height - plane.shape[0]) // 2 : (height - plane.shape[0]) // 2 + plane.shape[0]] = plane
            padded.append(canvas)
            padded.append(np.zeros((height, gap, *plane.shape[2:]), dtype=np.uint8))
        rows.append(np.concatenate(padded[:-1], axis=1))
    width = max(r.shape[1] for r in rows)
    out = []
    for row in rows:
        out.append(np.pad(row, ((0, gap), (0, width - row.shape[1])) + ((0, 0),) * (row.ndim - 2)))
    return np.concatenate(out, axis=0)[:-gap] if gap else np.concatenate(out, axis=0)


def save_montage(path: str | Path, volumes: list[np.ndarray], **kwargs) -> Path:
    """Write `montage(volumes)` as a PNG, atomically."""
    return atomic_write_bytes(path, encode_png(montage(volumes, **kwargs)))
