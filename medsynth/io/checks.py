"""Shape and value checks shared by every reader, so all formats reject the same things the same way,
and the kinds of `SourceError` on which discovery decides what to do next."""

from __future__ import annotations

import numpy as np

from medsynth.config import IoConfig
from medsynth.io.volume import SourceError

# The most voxels one 3D frame may declare: 2^30 (4 GiB as float32), far above any scanner's
# volume (a 512×512×2000 CT is 2^29). Checked from the header, before anything is allocated, so
# a header claiming 10^12 voxels is refused instead of exhausting memory.
MAX_FRAME_VOXELS = 2**30
# Deflate cannot expand data more than 1032:1, so a .gz file of n bytes holds at most ~1032 n.
# A header declaring more than that is lying (or the file is truncated): refuse before reading.
MAX_DEFLATE_RATIO = 1032


class FinalSourceError(SourceError):
    """A refusal that no other reader could overturn, so discovery does not try its fallback
    reader: the reason stands as given."""


class UnsupportedContentError(FinalSourceError):
    """The file was understood, and holds what medsynth does not use: colour, complex or vector voxels."""


class AccessDeniedError(FinalSourceError):
    """The file cannot be opened: permission denied. Another reader would be refused the same way."""


class DeclaredSizeError(FinalSourceError):
    """The header's declared size is impossible. Final: no other reader may try the file, since
    SimpleITK, for one, zero-fills what is missing from a truncated file."""


class IndexFileError(SourceError):
    """A DICOMDIR: an index of other files that holds no image itself. Discovery passes over it
    without listing it as a problem, as it does files named DICOMDIR."""


def format_shape(shape: tuple[int, ...]) -> str:
    """A stored shape in messages, every axis as the whole number it is: "240×240×4×12". (Sizes
    and spacings for reports, which may be fractional, go through `plan.format_triple`.)"""
    return "×".join(str(int(n)) for n in shape)


def frame_count(name: str, shape: tuple[int, ...], min_slices: int) -> int:
    """Check a stored image shape; return how many 3D frames it holds (1 for a plain volume).

    Raises SourceError for what is not a volume: 2D images, zero-sized axes, axes shorter than
    `min_slices`, and images with more than one non-spatial dimension.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) < 3:
        raise SourceError(name, f"2D image ({format_shape(shape)}), not a volume")
    if 0 in shape:
        raise SourceError(name, f"zero-sized axis (shape {format_shape(shape)})")
    spatial = shape[:3]
    extra = [n for n in shape[3:] if n != 1]
    if len(extra) > 1:
        raise SourceError(name, f"{len(shape)}D image ({format_shape(shape)}); only 3D and 4D images are supported")
    flat_axes = [axis for axis, n in enumerate(spatial) if n == 1]
    if len(flat_axes) == 1:
        raise SourceError(name, f"2D image stored as 3D ({format_shape(spatial)}), not a volume")
    short = [(axis, n) for axis, n in enumerate(spatial) if n < min_slices]
    if short:
        axis, n = short[0]
        raise SourceError(
            name,
            f"only {n} voxel{'s' if n != 1 else ''} along axis {'xyz'[axis]} ({format_shape(spatial)}): "
            f"too few to form a volume (io.min_slices = {min_slices})",
        )
    return extra[0] if extra else 1


def check_finite(name: str, array: np.ndarray) -> None:
    """NaN or Inf voxels would poison every statistic and the GAN's loss; refuse them with a count."""
    finite = np.isfinite(array)
    if finite.all():
        return
    n_nan = int(np.isnan(array).sum())
    n_inf = int(array.size - finite.sum() - n_nan)
    parts = []
    if n_nan:
        parts.append(f"{n_nan} NaN")
    if n_inf:
        parts.append(f"{n_inf} infinite")
    raise SourceError(name, f"{' and '.join(parts)} voxel values (of {array.size})")


def check_affine(name: str, affine: np.ndarray) -> None:
    if not np.isfinite(affine).all():
        raise SourceError(name, "the voxel-to-world affine contains NaN or Inf")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise SourceError(name, "the voxel-to-world affine is singular (a zero voxel size or collapsed axes)")


def check_declared_size(
    name: str,
    shape: tuple[int, ...],
    itemsize: int,
    file_bytes: int | None = None,
    data_offset: int = 0,
    compressed: bool = False,
) -> None:
    """Refuse, from the header alone, images whose declared size is absurd or cannot be in the file.
    `file_bytes` None: the voxels are elsewhere (.hdr/.img, .mhd/.raw), so only the count is checked."""
    frame_voxels = int(np.prod([int(n) for n in shape[:3]], dtype=object))
    if frame_voxels > MAX_FRAME_VOXELS:
        raise DeclaredSizeError(
            name,
            f"the header declares {format_shape(shape)} = {frame_voxels:.3g} voxels per volume, "
            f"more than medsynth reads ({MAX_FRAME_VOXELS:.3g}); the header is probably corrupt",
        )
    data_bytes = int(np.prod([int(n) for n in shape], dtype=object)) * itemsize
    if file_bytes is None:
        return
    if compressed:
        most = (file_bytes + 1) * MAX_DEFLATE_RATIO
        if data_offset + data_bytes > most:
            raise DeclaredSizeError(
                name,
                f"the header declares {data_bytes:.3g} bytes of voxels, more than a {file_bytes}-byte compressed "
                "file can hold: truncated, or a corrupt header",
            )
    elif data_offset + data_bytes > file_bytes:
        raise DeclaredSizeError(
            name,
            f"truncated: the header declares {data_offset + data_bytes} bytes but the file has {file_bytes}",
        )


def frames_to_use(name: str, n_frames: int, what: str, io: IoConfig) -> list[tuple[int | None, str, list[str]]]:
    """(frame, display name, warnings) for each volume a 4D image or series yields under
    `io.four_d`; a plain volume (`n_frames` 1) yields itself. `what` describes the 4D content for
    the messages, e.g. "4D image with 5 frames (64×64×30×5)"."""
    if n_frames == 1:
        return [(None, name, [])]
    if io.four_d == "skip":
        raise SourceError(name, f"{what}; set io.four_d=split to use each frame as a volume, or io.four_d=first")
    if io.four_d == "first":
        return [(0, name, [f"{what}: using the first frame (io.four_d=first)"])]
    return [(frame, f"{name} [frame {frame}]", []) for frame in range(n_frames)]
