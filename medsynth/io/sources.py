"""What discovery finds: usable `Source`s and `Skipped` items with the reason each was not used."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DicomLayout:
    """How the files (or frames) of a DICOM source form one volume, worked out from headers alone."""

    affine: tuple[tuple[float, ...], ...]  # (4, 4) RAS+, voxel index -> mm
    # Multi-frame file (or mosaic): the frame (tile) indices in spatial order. None for a series of
    # single-frame files, whose `Source.paths` are already in spatial order.
    frame_order: tuple[int, ...] | None = None
    # Multi-frame file: (slope, intercept) of every frame, in `frame_order`, when they differ.
    frame_rescale: tuple[tuple[float, float], ...] | None = None
    modality: str | None = None
    shape: tuple[int, int, int] = (0, 0, 0)  # (x, y, z)
    # Siemens mosaic: (tile rows, tile columns, tiles per row); `frame_order` then lists tiles.
    mosaic: tuple[int, int, int] | None = None
    float_pixels: bool = False  # Float Pixel Data: decoded by pydicom, which GDCM cannot do
    stored_dtype: str = "float32"


@dataclass(frozen=True)
class Source:
    """One volume to read: a NIfTI/ITK file (or one frame of a 4D one), or a DICOM series."""

    kind: str  # "nifti", "itk" or "dicom"
    paths: tuple[str, ...]  # absolute paths; for a DICOM series, the slice files in spatial order
    name: str  # for people: the path relative to the scanned folder, plus series/frame details
    frame: int | None = None  # the frame of a 4D image this source stands for
    dicom: DicomLayout | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Skipped:
    """A file or series that is not used, and why. `ignored` marks files that are not images at all."""

    name: str
    reason: str
    ignored: bool = False


@dataclass
class Discovery:
    root: str
    sources: list[Source] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def problems(self) -> list[Skipped]:
        return [s for s in self.skipped if not s.ignored]

    @property
    def ignored(self) -> list[Skipped]:
        return [s for s in self.skipped if s.ignored]
