"""Find every usable source under a folder, recursively, and say why everything else was not used."""

from __future__ import annotations

import errno
import os
from collections import Counter
from pathlib import Path

from medsynth.config import IoConfig
from medsynth.io import dicom, itk, nifti
from medsynth.io.checks import FinalSourceError, IndexFileError, frame_count, frames_to_use
from medsynth.io.sources import Discovery, Skipped, Source
from medsynth.io.volume import SourceError

# Files that belong to another file (the pixel half of a header/data pair) and are not sources.
_COMPANION_SUFFIXES = (".img", ".raw", ".zraw", ".img.gz", ".raw.gz")
# Names that are never images, skipped without being listed one by one.
_IGNORED_NAMES = {"DICOMDIR", "LOCKFILE", "VERSION", "Thumbs.db", "desktop.ini"}


def _suffix(name: str) -> str:
    lower = name.lower()
    for compound in (".nii.gz", ".img.gz", ".raw.gz"):
        if lower.endswith(compound):
            return compound
    return os.path.splitext(lower)[1]


def walk_files(root: Path, io: IoConfig, skipped: list[Skipped]) -> list[str]:
    """Every regular file under root, sorted; folders are visited once even through symlink loops."""
    files: list[str] = []
    seen_folders: set[tuple[int, int]] = set()
    seen_files: dict[tuple[int, int], str] = {}
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
        except OSError as exc:
            skipped.append(Skipped(os.path.relpath(folder, root), f"cannot open folder ({exc.strerror})"))
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen_folders:
            continue  # reached again through a symlink: already scanned
        seen_folders.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except PermissionError:
            skipped.append(Skipped(os.path.relpath(folder, root) + "/", "cannot open folder: permission denied"))
            continue
        except OSError as exc:
            skipped.append(Skipped(os.path.relpath(folder, root) + "/", f"cannot open folder ({exc.strerror})"))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files and folders (.git, .DS_Store) are never scans
            rel = os.path.relpath(entry.path, root)
            try:
                if entry.is_symlink():
                    if not io.follow_symlinks:
                        skipped.append(Skipped(rel, "symbolic link not followed (io.follow_symlinks = false)"))
                        continue
                    os.stat(entry.path)  # raises for broken links and loops
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = entry.is_file(follow_symlinks=True)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    skipped.append(Skipped(rel, "symbolic link loop"))
                elif exc.errno == errno.ENOENT:
                    skipped.append(Skipped(rel, "broken symbolic link (its target does not exist)"))
                else:
                    skipped.append(Skipped(rel, f"cannot access ({exc.strerror})"))
                continue
            if is_dir:
                subfolders.append(entry.path)
            elif is_file:
                stat = os.stat(entry.path)
                identity = (stat.st_dev, stat.st_ino)
                if identity in seen_files:
                    skipped.append(
                        Skipped(rel, f"same file as {seen_files[identity]} (a link), used once", ignored=True)
                    )
                    continue
                seen_files[identity] = rel
                files.append(entry.path)
            else:
                skipped.append(Skipped(rel, "not a regular file", ignored=True))
        stack.extend(reversed(subfolders))
    return sorted(files)


def _probe_file(path: str, name: str, kind: str) -> tuple[str, tuple[int, ...], list[str]]:
    """Read a header with the format's primary reader, falling back to the other one.

    nibabel reads NIfTI files SimpleITK refuses (NIfTI-2, non-orthonormal affines); SimpleITK reads
    some files nibabel refuses. A `FinalSourceError` ends the search with its own reason. Returns
    the kind that worked ("nifti" = nibabel, "itk" = SimpleITK).
    """
    readers = [("nifti", nifti.probe), ("itk", itk.probe)] if kind == "nifti" else [("itk", itk.probe)]
    first_error: SourceError | None = None
    for reader_kind, probe in readers:
        try:
            shape, warnings = probe(Path(path), name)
        except FinalSourceError as exc:
            raise type(exc)(name, exc.reason) from None
        except SourceError as exc:
            first_error = first_error or exc
            continue
        if first_error is not None:
            warnings = [f"read with SimpleITK because nibabel cannot ({first_error.reason})"] + warnings
        return reader_kind, shape, warnings
    assert first_error is not None
    raise SourceError(name, first_error.reason)


def _image_sources(path: str, name: str, kind: str, io: IoConfig) -> list[Source]:
    reader_kind, shape, warnings = _probe_file(path, name, kind)
    n_frames = frame_count(name, shape, io.min_slices)
    what = f"4D image with {n_frames} frames ({'×'.join(str(n) for n in shape)})"
    return [
        Source(kind=reader_kind, paths=(path,), name=label, frame=frame, warnings=tuple(warnings + extra))
        for frame, label, extra in frames_to_use(name, n_frames, what, io)
    ]


def discover_sources(root: str | Path, io: IoConfig | None = None) -> Discovery:
    """Every usable source under `root` and every skipped item with its reason.

    Raises SourceError when `root` itself is missing or not a folder. A single image file is
    accepted as a root too.
    """
    io = io or IoConfig()
    root = Path(root)
    if not root.exists():
        raise SourceError(str(root), "no such file or folder")
    found = Discovery(root=str(root))
    if root.is_file():
        files, base = [str(root.resolve())], str(root.resolve().parent)
    else:
        files, base = walk_files(root, io, found.skipped), str(root)

    dicom_headers: list[dicom.DicomHeader] = []
    other: Counter[str] = Counter()
    for path in files:
        name = os.path.relpath(path, base)
        suffix = _suffix(os.path.basename(path))
        try:
            if suffix in nifti.NIFTI_SUFFIXES:
                found.sources += _image_sources(path, name, "nifti", io)
            elif suffix in itk.ITK_SUFFIXES:
                found.sources += _image_sources(path, name, "itk", io)
            elif suffix in _COMPANION_SUFFIXES or os.path.basename(path) in _IGNORED_NAMES:
                continue
            elif suffix in dicom.DICOM_SUFFIXES or dicom.has_dicom_magic(path):
                dicom_headers.append(dicom.read_header(path))
            else:
                other[suffix or "(no extension)"] += 1
        except IndexFileError:
            continue
        except SourceError as exc:
            found.skipped.append(Skipped(name if exc.name == path else exc.name, exc.reason))
    series_sources, series_skipped = dicom.sources_from_headers(base, dicom_headers, io)
    found.sources += series_sources
    found.skipped += series_skipped
    for suffix, count in sorted(other.items()):
        found.skipped.append(
            Skipped(f"{count} {suffix} file{'s' if count > 1 else ''}", "not a recognised image format", ignored=True)
        )
    found.sources.sort(key=lambda s: s.name)
    return found
