"""Label maps: which image each belongs to, and reading one onto its image's grid.

Pairing rule (`train SCAN_DIR --labels LABEL_DIR`): an image pairs with the label map in LABEL_DIR
at the same relative path with the same name, or the same name plus one of the suffixes `_seg`,
`_label`, `_labels`, `_mask` before the extension; extensions may differ. So `case01.nii.gz` pairs
with `case01.nii.gz`, `case01_seg.nii.gz` or `case01_mask.nrrd`, and `sub/a.mha` with
`sub/a_label.nii.gz`. Two label maps that both fit one image (or one that fits two images) are an
error naming both files: medsynth never guesses. LABEL_DIR may be SCAN_DIR itself (`case01.nii.gz`
beside `case01_seg.nii.gz`) or a folder inside it: files taken as label maps are then not images.
DICOM series have no file name to pair by and stay unlabeled.

Without `--labels`, a SCAN_DIR that is itself a dataset folder brings its own labels:
- nnU-Net v2 raw layout: `dataset.json` with `channel_names`, `labels` ({name: value}) and
  `file_ending`; images `imagesTr/CASE_0000<ending>`, labels `labelsTr/CASE<ending>`. Only channel
  _0000 is used (medsynth trains on one channel); the others are listed as not used.
- Medical Segmentation Decathlon: `dataset.json` with `labels` ({"0": "background", ...}) and
  `training` ([{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]).
Class names come from dataset.json where it gives them, else `label_<value>` (0 is "background").

A label map must lie on its image's voxel grid (the same shape and affine, up to an axis
permutation or flip, within `GRID_TOLERANCE_MM`) and hold non-negative whole numbers, at most
`MAX_LABEL_VALUES` distinct ones, each at most 255 (it is cached as uint8). Anything else is refused
with one line naming the file: a label map is never resampled silently.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.config import IoConfig
from medsynth.errors import MedsynthError
from medsynth.io.discover import discover_sources, name_without_extension
from medsynth.io.reader import read_volume
from medsynth.io.sources import Discovery, Skipped, Source
from medsynth.io.volume import SourceError, Volume

LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask")
PAIRING_RULE = (
    "each image pairs with the label map of the same name in the label folder, or the same name plus "
    "_seg, _label, _labels or _mask before the extension"
)
# More distinct values than this is not a segmentation: most likely an image passed as a label map.
MAX_LABEL_VALUES = 100
MAX_LABEL_VALUE = 255  # cached as uint8
# How far a label map's voxel corners may lie from its image's: float32 headers and qform/sform
# round-off stay far below it; anything above is a different grid.
GRID_TOLERANCE_MM = 1e-3
GRID_TOLERANCE_RELATIVE = 1e-5  # of the field of view, for large fields of view stored as float32

NNUNET = "nnU-Net v2"
DECATHLON = "Medical Segmentation Decathlon"
LABEL_FOLDER = "label folder"


class PairingError(MedsynthError):
    """Images and label maps cannot be paired as given (ambiguous names, an unusable dataset.json,
    images without labels when they are required). The message is one line for the user."""


@dataclass
class LabelledDiscovery:
    """The images to use, and each one's label map."""

    layout: str  # LABEL_FOLDER, NNUNET or DECATHLON
    label_root: str  # the folder the label maps were found in
    images: Discovery  # the images, and everything skipped on the image side
    labels: dict[str, Source] = field(default_factory=dict)  # image source name -> its label map
    unlabeled: dict[str, str] = field(default_factory=dict)  # image source name -> why it has none
    skipped: list[Skipped] = field(default_factory=list)  # label side: label maps without an image, unreadable
    class_names: dict[int, str] = field(default_factory=dict)  # as dataset.json names them; {} if it does not
    notes: list[str] = field(default_factory=list)  # one line each, for people

    def label_of(self, source: Source) -> Source | None:
        return self.labels.get(source.name)


# ---------------------------------------------------------------------------------------------
# Finding the label maps


def find_label_maps(
    root: str | Path, labels_dir: str | Path | None, io: IoConfig | None = None
) -> LabelledDiscovery | None:
    """Images under `root` paired with label maps: from `labels_dir` by name, or from the dataset
    layout `root` is in (nnU-Net v2, Decathlon). None when no labels were asked for and `root` is
    no dataset folder: the caller then discovers images as usual."""
    io = io or IoConfig()
    root = Path(root)
    layout = dataset_layout(root)
    if layout is not None:
        kind, data = layout
        if labels_dir is not None and Path(labels_dir).resolve() != (root / "labelsTr").resolve():
            raise PairingError(
                f"{root} is an {kind} dataset with its own labelsTr: leave out --labels {labels_dir} "
                "(or point it at that labelsTr)"
            )
        return _nnunet_pairs(root, data, io) if kind == NNUNET else _decathlon_pairs(root, data, io)
    if labels_dir is None:
        return None
    return _pairs_by_name(root, Path(labels_dir), io)


def dataset_layout(root: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(NNUNET or DECATHLON, the parsed dataset.json) when `root` is such a dataset folder, else None."""
    root = Path(root)
    path = root / "dataset.json"
    if not (root.is_dir() and path.is_file() and (root / "imagesTr").is_dir()):
        return None
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise PairingError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise PairingError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PairingError(f"{path}: expected a JSON object")
    if "file_ending" in data or "channel_names" in data:
        return NNUNET, data
    if isinstance(data.get("training"), list):
        return DECATHLON, data
    raise PairingError(
        f"{path}: neither an nnU-Net v2 dataset.json (channel_names, labels, file_ending) nor a Decathlon one "
        "(labels, training)"
    )


def _relative_file(source: Source, base: Path) -> str | None:
    """The file a source was read from, relative to `base`; None for a DICOM series (many files)."""
    if source.kind == "dicom":
        return None
    return os.path.relpath(source.paths[0], base)


def _label_sources(folder: Path, io: IoConfig, skipped: list[Skipped]) -> list[Source]:
    """Readable label maps under `folder`, named "<folder name>/<path>"; the rest goes to `skipped`."""
    if not folder.is_dir():
        raise PairingError(f"{folder}: the label folder does not exist")
    found = discover_sources(folder, io)
    prefix = folder.resolve().name
    usable = []
    for source in found.sources:
        named = replace(source, name=f"{prefix}/{source.name}")
        if source.kind == "dicom":
            skipped.append(
                Skipped(named.name, "a DICOM series: label maps are read from image files (NIfTI, NRRD, MHA)")
            )
        elif source.frame is not None:
            skipped.append(Skipped(named.name, "a frame of a 4D file: a label map is one 3D volume"))
        else:
            usable.append(named)
    skipped += [Skipped(f"{prefix}/{s.name}", s.reason, s.ignored) for s in found.skipped]
    return usable


def _pairs_by_name(root: Path, labels_dir: Path, io: IoConfig) -> LabelledDiscovery:
    label_skipped: list[Skipped] = []
    labels = _label_sources(labels_dir, io, label_skipped)
    if not labels:
        raise PairingError(
            f"{labels_dir}: no label maps found" + (f" ({len(label_skipped)} skipped)" if label_skipped else "")
        )
    images = discover_sources(root, io)
    # Label maps by the image name they fit: their own name, and their name less a label suffix.
    by_key: dict[str, list[Source]] = {}
    for label in labels:
        stem = name_without_extension(os.path.relpath(label.paths[0], labels_dir))
        keys = {stem} | {stem[: -len(s)] for s in LABEL_SUFFIXES if stem.lower().endswith(s)}
        for key in keys:
            by_key.setdefault(key, []).append(label)

    matched: dict[str, Source] = {}  # image source name -> label map
    for image in images.sources:
        relative = _relative_file(image, root)
        if relative is None:
            continue
        candidates = [c for c in by_key.get(name_without_extension(relative), []) if c.paths[0] != image.paths[0]]
        if len(candidates) > 1:
            raise PairingError(
                f"{image.name}: two label maps fit it, {candidates[0].name} and {candidates[1].name}: "
                "keep one (the rule: " + PAIRING_RULE + ")"
            )
        if candidates:
            matched[image.name] = candidates[0]

    # With the label folder in (or equal to) the scan folder, label maps are found as images too.
    label_files = {label.paths[0] for label in labels}
    claimed = {label.paths[0] for label in matched.values()}
    inside = _is_within(labels_dir, root)
    same_folder = labels_dir.resolve() == root.resolve()
    kept = [
        s
        for s in images.sources
        if s.paths[0] not in claimed and not (inside and not same_folder and s.paths[0] in label_files)
    ]
    result = LabelledDiscovery(
        layout=LABEL_FOLDER, label_root=str(labels_dir), images=replace(images, sources=kept), skipped=label_skipped
    )
    owners: dict[str, str] = {}
    for image in kept:
        label = matched.get(image.name)
        if label is None:
            why = (
                "a DICOM series: label maps pair with image files by name"
                if image.kind == "dicom"
                else f"no label map of its name in {labels_dir}"
            )
            result.unlabeled[image.name] = why
            continue
        if label.paths[0] in owners:
            raise PairingError(
                f"{label.name} fits two images, {owners[label.paths[0]]} and {image.name}: rename one "
                "(the rule: " + PAIRING_RULE + ")"
            )
        owners[label.paths[0]] = image.name
        result.labels[image.name] = label
    if not same_folder:
        for label in labels:
            if label.paths[0] not in owners:
                result.skipped.append(Skipped(label.name, f"a label map with no image of its name in {root}"))
    return result


def _is_within(folder: Path, root: Path) -> bool:
    folder, root = folder.resolve(), root.resolve()
    return folder == root or root in folder.parents


def _dataset_images(root: Path, io: IoConfig) -> Discovery:
    """imagesTr's images, named "imagesTr/<file>"."""
    found = discover_sources(root / "imagesTr", io)
    return Discovery(
        root=str(root),
        sources=[replace(s, name=f"imagesTr/{s.name}") for s in found.sources],
        skipped=[Skipped(f"imagesTr/{s.name}", s.reason, s.ignored) for s in found.skipped],
    )


def _attach(
    result: LabelledDiscovery, images: list[Source], expected: dict[str, Path], root: Path, io: IoConfig
) -> LabelledDiscovery:
    """Pair each image with the label file its layout names (`expected`: image name -> path)."""
    labels = _label_sources(root / "labelsTr", io, result.skipped) if (root / "labelsTr").is_dir() else []
    by_path = {os.path.realpath(label.paths[0]): label for label in labels}
    used = set()
    for image in images:
        want = expected[image.name]
        label = by_path.get(os.path.realpath(want))
        if label is None:
            result.unlabeled[image.name] = f"no label map {os.path.relpath(want, root)}"
            continue
        used.add(os.path.realpath(want))
        result.labels[image.name] = label
    for path, label in by_path.items():
        if path not in used:
            result.skipped.append(Skipped(label.name, "a label map with no image in imagesTr"))
    result.images.sources = images
    return result


def _label_names(declared: dict[Any, Any], path: Path, names_are_keys: bool) -> dict[int, str]:
    """dataset.json's `labels` as {value: name}. nnU-Net writes {name: value} (a list of values for
    a region, which names no single value); the Decathlon {"value": name}."""
    names: dict[int, str] = {}
    if not isinstance(declared, dict):
        raise PairingError(f"{path}: 'labels' must be an object")
    for key, value in declared.items():
        name, number = (key, value) if names_are_keys else (value, key)
        if names_are_keys and isinstance(number, (list, tuple)):
            continue
        try:
            names[int(number)] = str(name)
        except (TypeError, ValueError):
            raise PairingError(f"{path}: label {key!r}: {number!r} is not a whole number") from None
    return names


def _nnunet_pairs(root: Path, data: dict[str, Any], io: IoConfig) -> LabelledDiscovery:
    path = root / "dataset.json"
    ending = data.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise PairingError(f'{path}: file_ending must be an extension such as ".nii.gz", got {ending!r}')
    channels = {str(k): str(v) for k, v in (data.get("channel_names") or {}).items()}
    images = _dataset_images(root, io)
    result = LabelledDiscovery(
        layout=NNUNET,
        label_root=str(root / "labelsTr"),
        images=images,
        class_names=_label_names(data.get("labels", {}), path, names_are_keys=True),
    )
    first, other_channels, expected = [], [], {}
    for source in images.sources:
        base = os.path.basename(source.paths[0])
        case = re.fullmatch(r"(.+)_(\d{4})", base[: -len(ending)]) if base.endswith(ending) else None
        if case is None or source.frame is not None:
            images.skipped.append(
                Skipped(source.name, f"not named CASE_NNNN{ending}, as nnU-Net names a case's channels")
            )
        elif case.group(2) != "0000":
            other_channels.append(source.name)
        else:
            first.append(source)
            expected[source.name] = root / "labelsTr" / f"{case.group(1)}{ending}"
    channel = f"_0000 ({channels['0']})" if "0" in channels else "_0000"
    if other_channels or len(channels) > 1:
        names = ", ".join(
            f"_{int(k):04d} {v}" for k, v in sorted(channels.items(), key=lambda kv: int(kv[0])) if k != "0"
        )
        result.notes.append(
            f"{NNUNET} dataset with {max(len(channels), 2)} channels: medsynth uses channel {channel} only"
            + (f"; {names} not used" if names else "")
        )
        if other_channels:
            images.skipped.append(
                Skipped(
                    f"{len(other_channels)} files of other channels (e.g. {other_channels[0]})",
                    f"only channel {channel} is used",
                    ignored=True,
                )
            )
    else:
        result.notes.append(f"{NNUNET} dataset: images from imagesTr (channel {channel}), label maps from labelsTr")
    return _attach(result, first, expected, root, io)


def _decathlon_pairs(root: Path, data: dict[str, Any], io: IoConfig) -> LabelledDiscovery:
    path = root / "dataset.json"
    images = _dataset_images(root, io)
    result = LabelledDiscovery(
        layout=DECATHLON,
        label_root=str(root / "labelsTr"),
        images=images,
        class_names=_label_names(data.get("labels", {}), path, names_are_keys=False),
        notes=[f"{DECATHLON} dataset: the training cases that dataset.json lists, with their label maps"],
    )
    listed: dict[str, Path] = {}  # real path of a listed image -> its label path
    for i, case in enumerate(data["training"]):
        if (
            not isinstance(case, dict)
            or not isinstance(case.get("image"), str)
            or not isinstance(case.get("label"), str)
        ):
            raise PairingError(f'{path}: training[{i}] needs "image" and "label" paths')
        listed[os.path.realpath(root / case["image"])] = root / case["label"]
    used, expected = [], {}
    for source in images.sources:
        label = listed.pop(os.path.realpath(source.paths[0]), None)
        if label is None:
            images.skipped.append(Skipped(source.name, "not a training case in dataset.json", ignored=True))
            continue
        used.append(source)
        expected[source.name] = label
    for missing in listed:
        images.skipped.append(
            Skipped(os.path.relpath(missing, root), "listed in dataset.json's training cases but not found")
        )
    return _attach(result, used, expected, root, io)


# ---------------------------------------------------------------------------------------------
# Reading one label map


def class_names(values: tuple[int, ...] | list[int], declared: dict[int, str] | None = None) -> tuple[str, ...]:
    """A name per label value: dataset.json's, else `label_<value>`, with 0 "background"."""
    declared = declared or {}
    return tuple(declared.get(v, "background" if v == 0 else f"label_{v}") for v in values)


def _on_image_grid(labels: Volume, image: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The label map's voxels in its image's voxel order: a label map stored with axes permuted or
    flipped relative to its image (both RAS, one LPS) is the same grid, and reordering is lossless."""
    import nibabel.orientations as nio

    array, affine = labels.array, labels.affine
    to_image = nio.ornt_transform(nio.io_orientation(affine), nio.io_orientation(image.affine))
    if not np.array_equal(to_image, [[0, 1], [1, 1], [2, 1]]):
        affine = affine @ nio.inv_ornt_aff(to_image, array.shape)
        array = nio.apply_orientation(array, to_image)
    return array, affine


def _grid_offset_mm(affine: np.ndarray, other: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance between where two affines place the corner voxels of a grid."""
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    )
    return float(np.linalg.norm((corners @ affine.T - corners @ other.T)[:, :3], axis=1).max())


def check_label_values(name: str, array: np.ndarray) -> np.ndarray:
    """The label map as uint8, or SourceError(name, reason) for values a label map cannot hold."""
    rounded = np.round(array)
    if not np.array_equal(array, rounded):
        example = float(array[array != rounded].flat[0])
        raise SourceError(
            name, f"non-integer values (e.g. {example:g}): a label map holds class numbers; is this an image?"
        )
    low = float(array.min())
    if low < 0:
        raise SourceError(name, f"negative values (down to {low:g}): label values are 0 (background) or more")
    values = np.unique(array)
    if len(values) > MAX_LABEL_VALUES:
        raise SourceError(
            name,
            f"{len(values)} distinct values, more than the {MAX_LABEL_VALUES} a label map may have: "
            "probably an image passed as a label map",
        )
    if values[-1] > MAX_LABEL_VALUE:
        raise SourceError(name, f"label value {values[-1]:g} is above {MAX_LABEL_VALUE}, the most medsynth stores")
    return array.astype(np.uint8)


def read_label_map(source: Source, image: Volume) -> np.ndarray:
    """The label map of `image`, (X, Y, Z) uint8 on the image's own voxel grid.

    Raises SourceError (the label map's name, one line) when it cannot be read, lies on another
    grid than its image, or holds values a label map cannot.
    """
    labels = read_volume(source)
    array, affine = _on_image_grid(labels, image)
    if array.shape != image.shape:
        raise SourceError(
            source.name,
            f"its shape {'×'.join(map(str, labels.shape))} differs from its image's "
            f"{'×'.join(map(str, image.shape))} ({image.meta.source or 'the image'}): a label map must lie on its "
            "image's voxel grid; medsynth never resamples one silently",
        )
    extent = float(np.linalg.norm(image.affine[:3, :3] @ np.asarray(image.shape, dtype=np.float64)))
    offset = _grid_offset_mm(affine, image.affine, image.shape)
    if offset > max(GRID_TOLERANCE_MM, GRID_TOLERANCE_RELATIVE * extent):
        raise SourceError(
            source.name,
            f"its affine places it up to {offset:.3g} mm away from its image ({image.meta.source or 'the image'}): "
            "a label map must share its image's grid; medsynth never resamples one silently",
        )
    return check_label_values(source.name, np.ascontiguousarray(array))


def label_values(labels: np.ndarray) -> tuple[int, ...]:
    """The sorted values present in a uint8 label map."""
    counts = np.bincount(labels.ravel(), minlength=1)
    return tuple(int(v) for v in np.flatnonzero(counts))
