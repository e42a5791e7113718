"""Write synthetic image + label pairs as an nnU-Net v2 raw dataset, and check such a dataset.

The format is nnU-Net's (https://github.com/MIC-DKFZ/nnUNet/blob/master/documentation/dataset_format.md);
what `nnUNetv2_plan_and_preprocess -d NNN --verify_dataset_integrity` enforces is in its
`nnunetv2/experiment_planning/verify_dataset_integrity.py`. The layout written here:

    <nnUNet_raw>/DatasetNNN_Name/          NNN: the dataset id, three digits (001-999)
        dataset.json
        imagesTr/<case>_0000.nii.gz        one file per channel; medsynth writes one channel, _0000
        labelsTr/<case>.nii.gz             uint8 class numbers, on the same grid as the image

    dataset.json: {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, ...},
                   "numTraining": N, "file_ending": ".nii.gz", "name": ..., "description": ...,
                   "medsynth": {...}}

The rules nnU-Net holds a raw dataset to, and which of them `verify_nnunet_dataset` checks:
- Folder `DatasetNNN_Name`: nnU-Net finds a dataset by the prefix `DatasetNNN` alone, so two folders
  with one id (in nnUNet_raw, nnUNet_preprocessed or nnUNet_results) are an error.
- dataset.json holds `labels`, `channel_names`, `numTraining` and `file_ending`; other keys are
  ignored (the "medsynth" key here records where the dataset came from and the label remapping).
- `channel_names` maps "0", "1"... to a name. The name picks the normalisation: "CT" gets nnU-Net's
  global foreground-percentile CT normalisation, anything else ("MRI") per-case z-scoring.
- `labels` maps a class name to its value: "background" must be 0, and the values must be
  consecutive integers (0, 1, 2, ...). An "ignore" class, if any, must be the largest value + 1;
  a list of values is a region, which needs `regions_class_order`.
- Every image file in imagesTr is `<case>_NNNN<file_ending>` (NNNN: the 4-digit channel), every
  case has every channel of `channel_names`, and a label map `labelsTr/<case><file_ending>`.
- `numTraining` equals the number of cases in imagesTr.
- A label map holds only declared values, and no NaN.
- Images hold no NaN (checked here: no NaN or infinity).
- A case's channels and its label map share shape and spacing (an error in nnU-Net), and origin,
  direction and affine (a warning in nnU-Net, an error here: a synthetic pair is made on one grid).

How this writer keeps those rules and medsynth's own (atomic writes, no silent loss, resumable runs):
- Label values that are not consecutive from 0 (a plan with 0, 1, 5) are renumbered in the files
  (0, 1, 2); dataset.json's "medsynth" key and `NnUNetExport.label_mapping` record the renumbering.
  Background is always value 0 named "background".
- Every file is written atomically (a temp file beside it, then a rename): a stopped export leaves
  no half-written file under a final name. A case's label map is written before its image, so a
  case stopped halfway leaves a label map without an image, which nnU-Net ignores.
- A re-run skips complete cases (both files present) and completes incomplete ones; it replaces a
  complete case only with `overwrite=True`. dataset.json is written when the writer opens (so the
  class set is on disk from the start, and a conflicting later export is refused) and again by
  `finish()`, with `numTraining` counted from the complete cases on disk, under a lock, so that the
  last of several shards to finish writes the full count.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsynth import __version__
from medsynth.atomic import atomic_write_json
from medsynth.errors import MedsynthError, UsageError, WriteError

FILE_ENDING = ".nii.gz"
CHANNEL = "0000"  # medsynth makes one channel per case
REQUIRED_KEYS = ("labels", "channel_names", "numTraining", "file_ending")
DATASET_FOLDER = re.compile(r"Dataset(\d{3})_(.+)")
DATASET_NAME = re.compile(r"[A-Za-z0-9_]+")
# A case name becomes part of two file names; keep it to characters every filesystem and shell
# takes, and never a leading dot (atomic writes use hidden temp files beside their target).
CASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
MAX_LABEL_VALUE = 255  # label maps are written as uint8
# How far an image's and its label map's affines (mm) and voxel sizes may differ: float32 header
# round-off stays far below it.
AFFINE_TOLERANCE_MM = 1e-4
SYNTHETIC_DESCRIPTION = f"SYNTHETIC medsynth {__version__}"  # the NIfTI descrip, as `sample` writes it
_LOCK_NAME = ".dataset.json.lock"


def channel_name_for_modality(modality: str) -> str:
    """nnU-Net's channel name for a medsynth plan's modality ("ct" or "mr"). "CT" turns on nnU-Net's
    CT normalisation (global Hounsfield percentiles); "MRI" gets its default per-case z-scoring."""
    return "CT" if modality.lower() == "ct" else "MRI"


def dataset_folder_name(dataset_id: int, dataset_name: str) -> str:
    """`DatasetNNN_Name`, as nnU-Net names a raw dataset folder."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise UsageError(f"nnU-Net dataset id must be a whole number from 1 to 999, got {dataset_id!r}")
    if not DATASET_NAME.fullmatch(dataset_name):
        raise UsageError(f"nnU-Net dataset name must be letters, digits and _ only, got {dataset_name!r}")
    return f"Dataset{dataset_id:03d}_{dataset_name}"


@dataclass(frozen=True)
class NnUNetExport:
    """What an export left on disk."""

    folder: Path  # <nnUNet_raw>/DatasetNNN_Name
    num_training: int  # complete cases on disk, as written to dataset.json
    written: tuple[str, ...]  # cases this writer wrote
    skipped: tuple[str, ...]  # cases already complete on disk, left as they were
    incomplete: tuple[str, ...]  # cases on disk with an image or a label map but not both
    label_mapping: dict[int, int]  # the plan's label value -> the value in labelsTr
    channel_name: str


@dataclass(frozen=True)
class _LabelScheme:
    """The plan's classes as nnU-Net needs them: consecutive values from 0, unique names."""

    mapping: dict[int, int]  # original value -> written value
    names: dict[str, int]  # dataset.json's "labels": class name -> written value
    original_names: dict[int, str]  # original value -> the plan's own name

    @property
    def is_identity(self) -> bool:
        return all(original == written for original, written in self.mapping.items())


def _label_scheme(label_values: Sequence[int], label_names: Sequence[str] | None) -> _LabelScheme:
    values = [int(v) for v in label_values]
    if label_names is not None and len(label_names) != len(values):
        raise ValueError(f"{len(values)} label values but {len(label_names)} label names")
    if len(set(values)) != len(values):
        raise ValueError(f"label values repeat: {tuple(values)}")
    if any(v < 0 or v > MAX_LABEL_VALUE for v in values):
        raise UsageError(
            f"label values must be from 0 to {MAX_LABEL_VALUE} to be written as uint8, got {tuple(values)}"
        )
    given = dict(zip(values, label_names if label_names is not None else [None] * len(values), strict=True))
    # nnU-Net needs a background 0 declared even where the label maps never hold it.
    ordered = sorted(set(values) | {0})
    mapping = {original: written for written, original in enumerate(ordered)}
    original_names: dict[int, str] = {}
    names: dict[str, int] = {}
    for original in ordered:
        name = str(given.get(original) or ("background" if original == 0 else f"label_{original}"))
        original_names[original] = name
        if original == 0:
            name = "background"  # nnU-Net looks the background up by this exact name
        else:
            # "background" and "ignore" mean something to nnU-Net, and names are JSON keys: make a
            # clashing name unique with its original value rather than lose a class.
            while name in names or name in ("background", "ignore"):
                name = f"{name}_{original}"
        names[name] = mapping[original]
    return _LabelScheme(mapping=mapping, names=names, original_names=original_names)


class NnUNetRawWriter:
    """Writes cases into `<raw_root>/DatasetNNN_Name` (see the module docstring for the rules).

        writer = NnUNetRawWriter(out, 501, "SyntheticLiver", channel_name_for_modality(plan.modality),
                                 plan.label_values, plan.label_names)
        for i, (image, labels) in enumerate(pairs):
            writer.add_case(f"synth_{i:05d}", image, labels, plan.affine)
        export = writer.finish()

    Opening checks the folder and writes dataset.json: UsageError (one line) when `raw_root` holds
    another dataset with this id, or a dataset.json for other classes or channels.
    """

    def __init__(
        self,
        raw_root: str | Path,
        dataset_id: int,
        dataset_name: str,
        channel_name: str,
        label_values: Sequence[int],
        label_names: Sequence[str] | None = None,
        *,
        overwrite: bool = False,
        description: str = SYNTHETIC_DESCRIPTION,
    ):
        if not isinstance(channel_name, str) or not channel_name.strip():
            raise ValueError(f"channel_name must be a non-empty string, got {channel_name!r}")
        self.raw_root = Path(raw_root)
        self.folder = self.raw_root / dataset_folder_name(dataset_id, dataset_name)
        self.dataset_name = dataset_name
        self.channel_name = channel_name
        self.overwrite = overwrite
        self.description = description
        self._scheme = _label_scheme(label_values, label_names)
        self._written: list[str] = []
        self._skipped: list[str] = []
        self._refuse_conflicts(dataset_id)
        for sub in ("imagesTr", "labelsTr"):
            try:
                (self.folder / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise WriteError(str(self.folder / sub), exc.strerror or str(exc)) from None
        self._write_dataset_json()

    @property
    def label_mapping(self) -> dict[int, int]:
        """The plan's label value -> the value written in labelsTr."""
        return dict(self._scheme.mapping)

    def dataset_json(self, num_training: int) -> dict[str, Any]:
        return {
            "channel_names": {"0": self.channel_name},
            "labels": dict(self._scheme.names),
            "numTraining": num_training,
            "file_ending": FILE_ENDING,
            "name": self.dataset_name,
            "description": "Synthetic image and label pairs sampled by medsynth; not patient data.",
            # nnU-Net ignores keys it does not know; this one says how to get the plan's values back.
            "medsynth": {
                "synthetic": True,
                "original_to_written_label_values": {str(k): v for k, v in self._scheme.mapping.items()},
                "original_label_names": {str(k): v for k, v in self._scheme.original_names.items()},
            },
        }

    def image_path(self, case: str) -> Path:
        return self.folder / "imagesTr" / f"{case}_{CHANNEL}{FILE_ENDING}"

    def label_path(self, case: str) -> Path:
        return self.folder / "labelsTr" / f"{case}{FILE_ENDING}"

    def is_complete(self, case: str) -> bool:
        return self.image_path(case).is_file() and self.label_path(case).is_file()

    def add_case(
        self,
        case: str,
        image: np.ndarray,
        labels: np.ndarray,
        affine: np.ndarray,
        image_dtype: str | None = None,
    ) -> bool:
        """Write one case; False when it was already complete on disk and left as it was.

        image: (X, Y, Z) in real units (HU, or the MR range), written as `image_dtype` (default:
        float32 for a float array, the array's own dtype for an integer one). labels: (X, Y, Z)
        integers from the plan's label values, renumbered and written as uint8. affine: (4, 4)
        voxel -> RAS+ mm, written into both files.
        """
        if not CASE_NAME.fullmatch(case):
            raise ValueError(f"case name {case!r}: use letters, digits, _ and -, starting with a letter or digit")
        image = np.asarray(image)
        labels = np.asarray(labels)
        affine = np.asarray(affine, dtype=np.float64)
        if image.ndim != 3 or labels.shape != image.shape:
            raise ValueError(f"case {case}: image {image.shape} and labels {labels.shape} must be one (X, Y, Z) shape")
        if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError(f"case {case}: the affine must be a finite, invertible 4x4 matrix")
        if not self.overwrite and self.is_complete(case):
            self._skipped.append(case)
            return False
        if not np.isfinite(image).all():
            raise MedsynthError(
                f"{self.image_path(case)}: the image holds NaN or infinite values, which nnU-Net refuses; "
                "the generator may have diverged"
            )
        written_labels = self._renumber(case, labels)  # (X, Y, Z) uint8
        dtype = image_dtype or (image.dtype.name if image.dtype.kind in "iu" else "float32")

        from medsynth.io import Volume, write_nifti

        self._remove_stale_temp_files(case)
        # The label map first: a case stopped between the two writes is then a label map without
        # an image, which nnU-Net ignores, rather than an image without labels, which it refuses.
        write_nifti(Volume(written_labels, affine), self.label_path(case), dtype="uint8", description=self.description)
        write_nifti(Volume(image, affine), self.image_path(case), dtype=dtype, description=self.description)
        self._written.append(case)
        return True

    def finish(self) -> NnUNetExport:
        """Write dataset.json with `numTraining` counted from the complete cases on disk.

        Under a lock, so that when several shards export into one folder, whichever finishes last
        counts every shard's cases."""
        import fcntl

        with open(self.folder / _LOCK_NAME, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            complete, incomplete = scan_cases(self.folder)
            self._write_dataset_json(len(complete))
        return NnUNetExport(
            folder=self.folder,
            num_training=len(complete),
            written=tuple(self._written),
            skipped=tuple(self._skipped),
            incomplete=tuple(incomplete),
            label_mapping=self.label_mapping,
            channel_name=self.channel_name,
        )

    # -----------------------------------------------------------------------------------------

    def _renumber(self, case: str, labels: np.ndarray) -> np.ndarray:
        """(X, Y, Z) label values -> (X, Y, Z) uint8 written values; refuses undeclared values."""
        if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
            raise MedsynthError(f"{self.label_path(case)}: label map with non-integer values")
        present = np.unique(labels).astype(np.int64)
        unknown = [int(v) for v in present if int(v) not in self._scheme.mapping]
        if unknown:
            declared = tuple(self._scheme.mapping)
            raise MedsynthError(f"{self.label_path(case)}: label values {unknown} are not among the plan's {declared}")
        whole = labels.astype(np.int64)
        if self._scheme.is_identity:
            return whole.astype(np.uint8)
        lookup = np.zeros(int(present.max()) + 1, dtype=np.uint8)  # original value -> written value
        for original, written in self._scheme.mapping.items():
            if original < lookup.size:
                lookup[original] = written
        return lookup[whole]

    def _remove_stale_temp_files(self, case: str) -> None:
        """Temp files a killed run (SIGKILL, power loss) left for this case. Each case belongs to one
        shard, so no other process is writing them."""
        for target in (self.label_path(case), self.image_path(case)):
            for stale in target.parent.glob(f".{target.name}.*.tmp"):
                stale.unlink(missing_ok=True)

    def _write_dataset_json(self, num_training: int | None = None) -> None:
        if num_training is None:
            num_training = len(scan_cases(self.folder)[0])
        content = self.dataset_json(num_training)
        path = self.folder / "dataset.json"
        if path.is_file() and _read_json(path) == content:
            return
        atomic_write_json(path, content)

    def _refuse_conflicts(self, dataset_id: int) -> None:
        if self.raw_root.exists() and not self.raw_root.is_dir():
            raise UsageError(f"{self.raw_root}: not a folder; the nnU-Net raw folder must be one")
        prefix = f"Dataset{dataset_id:03d}"
        if self.raw_root.is_dir():
            for other in sorted(self.raw_root.iterdir()):
                if other.is_dir() and other.name.startswith(prefix) and other.name != self.folder.name:
                    raise UsageError(
                        f"{other} already uses nnU-Net dataset id {dataset_id} (nnU-Net finds a dataset by "
                        f"its id alone): choose another id, or remove that folder"
                    )
        path = self.folder / "dataset.json"
        if not path.is_file():
            images = self.folder / "imagesTr"
            if not self.overwrite and images.is_dir() and any(images.glob(f"*{FILE_ENDING}")):
                raise UsageError(
                    f"{self.folder} holds images but no dataset.json, so it is not a medsynth export: "
                    "choose another dataset id or name, remove the folder, or use --force to add to it"
                )
            return
        existing = _read_json(path)
        if existing is None:
            raise UsageError(f"{path}: not a readable JSON object; remove it or choose another dataset id")
        wanted = self.dataset_json(0)
        for key in ("channel_names", "labels", "file_ending"):
            if existing.get(key) != wanted[key]:
                raise UsageError(
                    f"{path} has {key} {json.dumps(existing.get(key))}, this export {json.dumps(wanted[key])}: "
                    "choose another dataset id, or remove the folder to start it again"
                )
        old_mapping = (existing.get("medsynth") or {}).get("original_to_written_label_values")
        new_mapping = wanted["medsynth"]["original_to_written_label_values"]
        if old_mapping is not None and old_mapping != new_mapping:
            raise UsageError(
                f"{path} renumbers the labels {json.dumps(old_mapping)}, this export {json.dumps(new_mapping)}: "
                "choose another dataset id, or remove the folder to start it again"
            )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def scan_cases(folder: str | Path, file_ending: str = FILE_ENDING) -> tuple[list[str], list[str]]:
    """(complete cases, incomplete cases) of a single-channel dataset folder, each sorted. Complete:
    both `imagesTr/<case>_0000` and `labelsTr/<case>`; incomplete: only one of them."""
    folder = Path(folder)
    with_image = _files_ending(folder / "imagesTr", f"_{CHANNEL}{file_ending}")
    with_labels = _files_ending(folder / "labelsTr", file_ending)
    return sorted(with_image & with_labels), sorted(with_image ^ with_labels)


def _files_ending(folder: Path, ending: str) -> set[str]:
    """Names (less `ending`) of the files in `folder` that end with it; temp files end in .tmp."""
    if not folder.is_dir():
        return set()
    return {p.name[: -len(ending)] for p in folder.iterdir() if p.name.endswith(ending) and p.is_file()}


# ---------------------------------------------------------------------------------------------
# Checking a dataset folder without nnU-Net


def verify_nnunet_dataset(folder: str | Path, check_voxels: bool = True) -> list[str]:
    """The reasons nnU-Net v2 would refuse the raw dataset `folder` (or that its pairs are not on
    one grid), one line each; [] when it is fine. `check_voxels=False` checks names and dataset.json
    only, without reading the images."""
    folder = Path(folder)
    problems: list[str] = []
    if not folder.is_dir():
        return [f"{folder}: not a folder"]
    match = DATASET_FOLDER.fullmatch(folder.name)
    if match is None or int(match.group(1)) == 0:
        problems.append(f"{folder.name}: the folder must be named DatasetNNN_Name, NNN a dataset id from 001 to 999")
    for sub in ("imagesTr", "labelsTr"):
        if not (folder / sub).is_dir():
            problems.append(f"{sub}: missing folder")
    path = folder / "dataset.json"
    if not path.is_file():
        return [*problems, "dataset.json: missing"]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return [*problems, f"dataset.json: not readable JSON ({exc})"]
    if not isinstance(data, dict):
        return [*problems, "dataset.json: not a JSON object"]
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        return [*problems, f"dataset.json: missing {', '.join(missing)}"]

    channels, channel_problems = _check_channels(data["channel_names"])
    allowed_labels, label_problems = _check_labels(data)
    problems += channel_problems + label_problems
    ending = data["file_ending"]
    if not isinstance(ending, str) or ending not in (".nii.gz", ".nii"):
        return [
            *problems,
            f"dataset.json: file_ending {ending!r}: only NIfTI (.nii.gz, .nii) datasets can be checked here",
        ]

    cases, name_problems = _cases_in(folder, ending, channels)
    problems += name_problems
    num_training = data["numTraining"]
    if isinstance(num_training, bool) or not isinstance(num_training, int):
        problems.append(f"dataset.json: numTraining must be a whole number, got {num_training!r}")
    elif num_training != len(cases):
        problems.append(f"dataset.json: numTraining is {num_training} but imagesTr holds {len(cases)} cases")
    labels_on_disk = _files_ending(folder / "labelsTr", ending)
    for case in sorted(set(cases) - labels_on_disk):
        problems.append(f"imagesTr/{case}_*{ending}: no label map labelsTr/{case}{ending}")
    for case in sorted(labels_on_disk - set(cases)):
        problems.append(f"labelsTr/{case}{ending}: a label map with no image in imagesTr")

    if check_voxels:
        for case in sorted(set(cases) & labels_on_disk):
            images = [f"imagesTr/{case}_{channel:04d}{ending}" for channel in cases[case]]
            problems += _check_case(folder, images, f"labelsTr/{case}{ending}", allowed_labels)
    return problems


def _check_channels(channel_names: Any) -> tuple[list[int], list[str]]:
    """The channel numbers dataset.json declares, and what is wrong with them."""
    if not isinstance(channel_names, dict) or not channel_names:
        return [], ['dataset.json: channel_names must be a non-empty object such as {"0": "CT"}']
    problems = []
    try:
        numbers = sorted(int(key) for key in channel_names)
    except ValueError:
        return [], [f'dataset.json: channel_names keys must be channel numbers "0", "1"..., got {list(channel_names)}']
    if numbers != list(range(len(numbers))):
        problems.append(f"dataset.json: channel_names keys must be 0, 1, ... in a row, got {list(channel_names)}")
    if not all(isinstance(name, str) and name for name in channel_names.values()):
        problems.append("dataset.json: every channel name must be a non-empty string")
    return numbers, problems


def _check_labels(data: dict[str, Any]) -> tuple[set[int], list[str]]:
    """The label values a label map may hold, and what is wrong with dataset.json's `labels`."""
    labels = data["labels"]
    if not isinstance(labels, dict):
        return set(), ["dataset.json: labels must be an object {class name: value}"]
    problems = []
    background = labels.get("background")
    if "background" not in labels:
        problems.append('dataset.json: labels must declare "background": 0')
    elif isinstance(background, bool) or not isinstance(background, int) or background != 0:
        problems.append(f'dataset.json: labels "background" must be 0, got {background!r}')

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    values: set[int] = set()
    has_regions = False
    for name, value in labels.items():
        if name == "ignore":
            continue
        if isinstance(value, list) and value and all(whole(v) for v in value):
            has_regions = has_regions or len(value) > 1
            values.update(value)
        elif whole(value):
            values.add(value)
        else:
            problems.append(
                f"dataset.json: label {name!r} must be a whole number (or a list, for a region), got {value!r}"
            )
    ordered = sorted(values)
    if ordered != list(range(len(ordered))):
        problems.append(f"dataset.json: label values must be consecutive integers 0, 1, 2, ..., got {ordered}")
    if has_regions and "regions_class_order" not in data:
        problems.append("dataset.json: labels declare regions (lists of values) but no regions_class_order")
    allowed = set(values)
    if "ignore" in labels:
        ignore = labels["ignore"]
        if whole(ignore) and ignore == (max(values) + 1 if values else 0):
            allowed.add(ignore)
        else:
            problems.append(f'dataset.json: the "ignore" label must be the largest value + 1, got {ignore!r}')
    return allowed, problems


def _cases_in(folder: Path, ending: str, channels: list[int]) -> tuple[dict[str, list[int]], list[str]]:
    """imagesTr's cases (case -> its channel numbers) and what is wrong with their names."""
    images = folder / "imagesTr"
    if not images.is_dir():
        return {}, []
    cases: dict[str, list[int]] = {}
    problems = []
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(ending))
    for path in sorted(images.iterdir()):
        if not path.name.endswith(ending) or not path.is_file():
            continue  # nnU-Net looks only at files with the dataset's ending (not at temp files)
        named = pattern.fullmatch(path.name)
        if named is None:
            problems.append(f"imagesTr/{path.name}: not named CASE_NNNN{ending} (NNNN: the 4-digit channel number)")
            continue
        cases.setdefault(named.group(1), []).append(int(named.group(2)))
    for case, found in cases.items():
        if channels and sorted(found) != channels:
            want = ", ".join(f"_{c:04d}" for c in channels)
            have = ", ".join(f"_{c:04d}" for c in sorted(found))
            problems.append(f"imagesTr/{case}_*{ending}: channels {have}, dataset.json declares {want}")
    return cases, problems


def _check_case(folder: Path, images: list[str], label: str, allowed_labels: set[int]) -> list[str]:
    """Each channel's and the label map's voxels and geometry: finite images, declared labels,
    one shape, voxel size and affine for the whole case."""
    import nibabel as nib

    from medsynth.io.nifti import describe_error

    loaded = {}
    problems = []
    for name in [*images, label]:
        try:
            image = nib.load(str(folder / name))
            loaded[name] = (image, np.asanyarray(image.dataobj))
        except Exception as exc:  # nibabel raises many types for a corrupt file
            problems.append(f"{name}: cannot be read ({describe_error(exc)})")
    if problems:
        return problems
    for name in images:
        voxels = loaded[name][1]
        if voxels.dtype.kind in "fc" and not np.isfinite(voxels).all():
            problems.append(f"{name}: the image holds NaN or infinite values")
    label_image, label_voxels = loaded[label]
    if label_voxels.dtype.kind in "fc":
        if not np.isfinite(label_voxels).all():
            problems.append(f"{label}: the label map holds NaN or infinite values")
            label_voxels = np.nan_to_num(label_voxels)
        if not np.array_equal(label_voxels, np.round(label_voxels)):
            problems.append(f"{label}: the label map holds non-integer values")
    found = {int(v) for v in np.unique(np.round(label_voxels))}
    if found - allowed_labels:
        problems.append(f"{label}: label values {sorted(found - allowed_labels)} are not declared in dataset.json")
    for name in images:
        image = loaded[name][0]
        if len(image.shape) not in (2, 3):
            problems.append(f"{name}: {len(image.shape)}D; a channel file holds one 2D or 3D image")
        if image.shape != label_image.shape:
            problems.append(f"{name}: shape {image.shape} differs from its label map's {label_image.shape}")
            continue
        zooms, label_zooms = image.header.get_zooms()[:3], label_image.header.get_zooms()[:3]
        if not np.allclose(zooms, label_zooms, rtol=1e-5, atol=AFFINE_TOLERANCE_MM):
            problems.append(
                f"{name}: voxel size {tuple(map(float, zooms))} differs from its label map's "
                f"{tuple(map(float, label_zooms))}"
            )
        elif not np.allclose(image.affine, label_image.affine, rtol=1e-5, atol=AFFINE_TOLERANCE_MM):
            offset = float(np.abs(image.affine - label_image.affine).max())
            problems.append(f"{name}: its affine differs from its label map's (by up to {offset:.3g})")
    return problems
