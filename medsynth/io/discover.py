"""Find every usable source under a folder, recursively, and say why everything else was not used."""

from __future__ import annotations

import errno
import os
import re
from collections import defaultdict
from pathlib import Path

from medsynth.config import IoConfig
from medsynth.io import dicom, itk, nifti
from medsynth.io.checks import FinalSourceError, IndexFileError, format_shape, frame_count, frames_to_use
from medsynth.io.sources import Discovery, Skipped, Source
from medsynth.io.volume import SourceError

# Files that belong to another file (the pixel half of a header/data pair) and are not sources.
_COMPANION_SUFFIXES = (".img", ".raw", ".zraw", ".img.gz", ".raw.gz")
# The headers that name such data files. A data file with none of them in its folder is orphaned.
_HEADER_SUFFIXES = (".hdr", ".mhd", ".nhdr")
# Names that are never images, skipped without being listed one by one.
_IGNORED_NAMES = {"DICOMDIR", "LOCKFILE", "VERSION", "Thumbs.db", "desktop.ini"}
_COMPOUND_SUFFIXES = (".nii.gz", ".img.gz", ".raw.gz", ".mnc.gz", ".tar.gz", ".brik.gz")
_UNRECOGNISED = "not a recognised image format"
_READABLE = (
    "medsynth reads NIfTI (.nii, .nii.gz, .hdr/.img), MGH (.mgh, .mgz), MINC (.mnc), NRRD (.nrrd, .nhdr), "
    "MetaImage (.mha, .mhd) and DICOM"
)
# What people point medsynth at that it does not read, and what to do instead. Any other
# unrecognised file is still reported, without advice.
_ADVICE = {
    **dict.fromkeys((".zip", ".tar", ".tar.gz", ".tgz", ".7z", ".rar", ".gz", ".bz2", ".xz"), "an archive: unpack it"),
    **dict.fromkeys((".par", ".rec"), "Philips PAR/REC: convert it to NIfTI, e.g. with dcm2niix"),
    **dict.fromkeys((".brik", ".brik.gz", ".head"), "AFNI: convert it to NIfTI with 3dAFNItoNIFTI"),
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"), "a 2D picture: medsynth reads volumes"),
    **dict.fromkeys((".npy", ".npz"), "a NumPy array has no geometry: save it as NIfTI with its affine"),
}


def _suffix(name: str) -> str:
    lower = name.lower()
    for compound in _COMPOUND_SUFFIXES:
        if lower.endswith(compound):
            return compound
    return os.path.splitext(lower)[1]


def name_without_extension(name: str) -> str:
    """A file name (or relative path) without its format's extension: "sub/case01.nii.gz" -> "sub/case01"."""
    suffix = _suffix(os.path.basename(name))
    return name[: len(name) - len(suffix)] if suffix else name


def unrecognised_reason(suffix: str, list_readable: bool = False) -> str:
    """Why a file of this suffix is not read, with advice where there is some; `list_readable`
    adds what medsynth does read (for a file the user named, or when nothing was usable)."""
    advice = _ADVICE.get(suffix)
    reason = f"{_UNRECOGNISED} ({suffix or 'no extension'}{'; ' + advice if advice else ''})"
    return f"{reason}; {_READABLE}" if list_readable else reason


def natural_order(name: str) -> tuple[list[str | int], str]:
    """Sort key that compares runs of digits as numbers: "frame 2" before "frame 10", "s9" before "s10"."""
    parts = re.split(r"(\d+)", name)  # text, number, text, ...: the same type at the same place
    return [int(part) if i % 2 else part for i, part in enumerate(parts)], name


def walk_files(root: Path, io: IoConfig, skipped: list[Skipped]) -> list[str]:
    """Every regular file under root, sorted; folders are visited once even through symlink loops."""
    files: list[str] = []
    hidden: list[str] = []
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
            rel = os.path.relpath(entry.path, root)
            if entry.name.startswith("."):
                hidden.append(rel)  # hidden files and folders (.git, .DS_Store) are never scans
                continue
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
    if hidden:
        examples = ", ".join(hidden[:3]) + (", ..." if len(hidden) > 3 else "")
        skipped.append(
            Skipped(
                f"{len(hidden)} hidden item{'s' if len(hidden) > 1 else ''} ({examples})",
                "names starting with '.' are never read",
                ignored=True,
            )
        )
    return sorted(files)


_READER_MODULES = {"nifti": nifti, "itk": itk}  # by kind: "nifti" = nibabel, "itk" = SimpleITK


def _probe_file(path: str, name: str, kinds: tuple[str, ...]) -> tuple[str, tuple[int, ...], list[str]]:
    """Read a header with the format's readers in turn, until one understands it.

    nibabel reads NIfTI files SimpleITK refuses (NIfTI-2, non-orthonormal affines); SimpleITK reads
    some files nibabel refuses. A `FinalSourceError` ends the search with its own reason. Returns
    the kind that worked ("nifti" = nibabel, "itk" = SimpleITK).
    """
    first_error: SourceError | None = None
    for reader_kind in kinds:
        probe = _READER_MODULES[reader_kind].probe
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


def _readers_for(suffix: str) -> tuple[str, ...] | None:
    """The readers that may read a file of this suffix, in order; None for formats not read."""
    if suffix in nifti.NIFTI_SUFFIXES:
        return ("nifti", "itk")  # SimpleITK stands in where nibabel cannot parse the header
    if suffix in nifti.NIBABEL_ONLY_SUFFIXES:
        return ("nifti",)
    if suffix in itk.ITK_SUFFIXES:
        return ("itk",)
    return None


def _image_sources(path: str, name: str, kinds: tuple[str, ...], io: IoConfig) -> list[Source]:
    reader_kind, shape, warnings = _probe_file(path, name, kinds)
    n_frames = frame_count(name, shape, io.min_slices)
    what = f"4D image with {n_frames} frames ({format_shape(shape)})"
    return [
        Source(kind=reader_kind, paths=(path,), name=label, frame=frame, warnings=tuple(warnings + extra))
        for frame, label, extra in frames_to_use(name, n_frames, what, io)
    ]


def discover_sources(root: str | Path, io: IoConfig | None = None) -> Discovery:
    """Every usable source under `root` and every skipped item with its reason.

    Raises SourceError when `root` itself is missing or not a folder. A single image file is
    accepted as a root too. Nothing found is left unaccounted for: a file that is not read is
    listed as a problem, or as ignored when it is plainly not an image (counted by suffix); when
    nothing at all is usable, the ignored files become problems, since they are why.
    """
    io = io or IoConfig()
    root = Path(root)
    if not root.exists():
        raise SourceError(str(root), "no such file or folder")
    found = Discovery(root=str(root))
    named = root.is_file()  # the user named this one file, so whatever it is, it gets a reason
    if named:
        files, base = [str(root.resolve())], str(root.resolve().parent)
    else:
        files, base = walk_files(root, io, found.skipped), str(root)

    dicom_headers: list[dicom.DicomHeader] = []
    unrecognised: dict[str, list[str]] = defaultdict(list)  # suffix -> names
    companions: list[tuple[str, str]] = []  # (path, name) of data files that belong to a header
    for path in files:
        name = os.path.relpath(path, base)
        basename = os.path.basename(path)
        suffix = _suffix(basename)
        readers = _readers_for(suffix)
        try:
            if readers:
                found.sources += _image_sources(path, name, readers, io)
            elif suffix in _COMPANION_SUFFIXES:
                companions.append((path, name))
            elif basename in _IGNORED_NAMES:
                if named:
                    found.skipped.append(Skipped(name, _named_non_image_reason(basename)))
            elif suffix in dicom.DICOM_SUFFIXES or dicom.has_dicom_magic(path):
                dicom_headers.append(dicom.read_header(path))
            elif suffix == "" and (header := _headerless_dicom(path)) is not None:
                dicom_headers.append(header)
            else:
                unrecognised[suffix].append(name)
        except IndexFileError as exc:
            if named:
                found.skipped.append(Skipped(name, f"{exc.reason}: name the folder it indexes instead"))
        except SourceError as exc:
            found.skipped.append(Skipped(name if exc.name == path else exc.name, exc.reason))
    series_sources, series_skipped = dicom.sources_from_headers(base, dicom_headers, io)
    found.sources += series_sources
    found.skipped += series_skipped
    # When nothing is usable, what would otherwise be ignored is the answer to "why not?".
    must_explain = named or not found.sources
    found.skipped += _orphaned_data_files(companions, files, named)
    for suffix, names in sorted(unrecognised.items()):
        found.skipped.append(
            Skipped(_files_named(names, suffix), unrecognised_reason(suffix, must_explain), ignored=not must_explain)
        )
    if must_explain:
        found.skipped = [Skipped(s.name, s.reason) for s in found.skipped]
    found.sources.sort(key=lambda s: natural_order(s.name))
    return found


def _headerless_dicom(path: str) -> dicom.DicomHeader | None:
    """A file without an extension or the DICM preamble may still be DICOM: older exports (and
    ACR-NEMA-style files) write bare datasets. It is one when pydicom finds image attributes in it;
    anything else (README, LICENSE, ...) is simply not an image."""
    try:
        return dicom.read_header(path)
    except IndexFileError:
        raise
    except SourceError:
        return None


def _files_named(names: list[str], suffix: str) -> str:
    """One file by its name; several of one suffix by their count and the first of them."""
    if len(names) == 1:
        return names[0]
    return f"{len(names)} {suffix or '(no extension)'} files (e.g. {names[0]})"


def _named_non_image_reason(basename: str) -> str:
    if basename == "DICOMDIR":
        return "a DICOMDIR only indexes the files of a DICOM export: name the folder it indexes instead"
    return "not an image"


def _orphaned_data_files(companions: list[tuple[str, str]], files: list[str], named: bool) -> list[Skipped]:
    """Data files (.img, .raw) that nothing will read: named on their own, or with no header in
    their folder. A data file beside a header is read through that header and needs no mention."""
    if named and companions:
        reason = "the data half of a header/data pair: name its header (.hdr, .mhd or .nhdr) instead"
        return [Skipped(companions[0][1], reason)]
    folders_with_headers = {os.path.dirname(f) for f in files if _suffix(os.path.basename(f)) in _HEADER_SUFFIXES}
    orphans: dict[str, list[str]] = defaultdict(list)
    for path, name in companions:
        if os.path.dirname(path) not in folders_with_headers:
            orphans[_suffix(os.path.basename(path))].append(name)
    reason = "image data without a header (.hdr, .mhd or .nhdr) in its folder to describe it"
    return [Skipped(_files_named(names, suffix), reason, ignored=True) for suffix, names in sorted(orphans.items())]
