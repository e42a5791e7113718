"""The spine of data preparation: discover -> fingerprint -> plan -> preprocess -> cache.

`fingerprint_folder(folder, config)` discovers the sources and fingerprints each (cached by
content); `prepare_dataset(folder, config)` then derives the plan (as nnU-Net derives its plan from
the dataset fingerprint), preprocesses every volume once, in parallel worker processes, into the
content-addressed cache (`medsynth.data`), and places the plan where the preprocessed crops lie.
Training, `inspect` and `evaluate` all prepare data through here, so they see volumes alike.

With label maps (`labels.dir`, or a dataset folder's own labelsTr; `medsynth.io.labels` pairs them),
each label map is checked against its image while the image is fingerprinted, the plan records the
label set (`Plan.with_labels`), and each is preprocessed in the same job as its image, through the
image's own geometric decisions (`prepare_pair`), into the cache beside it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.atomic import atomic_write, atomic_write_json
from medsynth.conditions import ScanConditions, check_against_plan, condition_codes, plan_columns, scan_conditions
from medsynth.config import Config
from medsynth.data import (
    CacheEntry,
    FileHashes,
    cache_dir_for,
    cache_entry,
    fingerprint_path,
    label_check_path,
    label_key,
    label_volume_key,
    source_key,
    volume_key,
    with_label,
)
from medsynth.io import Discovery, Skipped, Source, SourceError, Volume, discover_sources, read_volume
from medsynth.io.labels import (
    LabelledDiscovery,
    PairingError,
    class_names,
    find_label_maps,
    label_values,
    read_label_map,
)
from medsynth.plan import (
    DatasetFingerprint,
    Plan,
    PlanError,
    SourceFingerprint,
    fingerprint_volume,
    make_plan,
    summarise,
)
from medsynth.preprocess import (
    IntensityWindow,
    crop_or_pad,
    foreground_box,
    foreground_mask,
    normalise,
    percentile_window,
    reorient_to_ras,
    resample,
    resample_label,
)

# (phase, done, total): lets the CLI draw progress without this module knowing about terminals.
Progress = Callable[[str, int, int], None]


class NoUsableSources(PlanError):
    """Nothing under the folder could be used. `skipped` says why, item by item, so that the
    caller can list every reason, including those found only when reading voxels."""

    def __init__(self, message: str, skipped: list[Skipped]):
        super().__init__(message)
        self.skipped = skipped


# ---------------------------------------------------------------------------------------------
# Preprocessing one volume


def prepare_volume(volume: Volume, plan: Plan) -> tuple[np.ndarray, np.ndarray, IntensityWindow]:
    """Volume -> (array in [-1, 1] of the plan's shape, its RAS affine, the window used)."""
    array, affine, window, _ = _prepare_image(volume, plan)
    return array, affine, window


def prepare_label(labels: np.ndarray, image_affine: np.ndarray, plan: Plan, centre: np.ndarray) -> np.ndarray:
    """A label map on its image's grid (`image_affine`) -> (X, Y, Z) uint8 on the plan's grid.

    The image's steps with nearest-neighbour rules: reorient, resample to the plan's spacing onto the
    same grid the image was resampled onto, and crop or pad (background 0) around the image's own
    `centre`, so the label map lands voxel for voxel on its preprocessed image.
    """
    labels, affine = reorient_to_ras(labels, image_affine)
    labels, affine = resample_label(labels, affine, plan.spacing, deoblique=plan.deoblique)
    labels, _ = crop_or_pad(labels, affine, plan.target_shape, centre, fill=0)
    return labels


def prepare_pair(
    volume: Volume, labels: np.ndarray, plan: Plan
) -> tuple[np.ndarray, np.ndarray, np.ndarray, IntensityWindow]:
    """An image and its label map (on the image's grid) -> (array, label map, their common RAS affine, window)."""
    array, affine, window, centre = _prepare_image(volume, plan)
    return array, prepare_label(labels, volume.affine, plan, centre), affine, window


def _prepare_image(volume: Volume, plan: Plan) -> tuple[np.ndarray, np.ndarray, IntensityWindow, np.ndarray]:
    """`prepare_volume`, also returning the crop centre (voxel index on the resampled grid) that its
    label map must be cut around."""
    array, affine = reorient_to_ras(volume.array, volume.affine)
    background = float(np.percentile(array, 0.5))
    array, affine = resample(array, affine, plan.spacing, deoblique=plan.deoblique, fill=background)
    mask = foreground_mask(array, plan.modality)
    if plan.intensity_mode == "fixed":
        window = IntensityWindow(*plan.window)
    else:
        window = percentile_window(array, mask, plan.percentiles or (0.5, 99.5))
    box = foreground_box(mask)
    centre = (box[0] + box[1]) / 2.0 if box is not None else (np.asarray(array.shape) - 1) / 2.0
    fill = window.low if plan.intensity_mode == "fixed" else min(background, window.low)
    array, affine = crop_or_pad(array, affine, plan.target_shape, centre, fill)
    return normalise(array, window), affine, window, centre


# ---------------------------------------------------------------------------------------------
# Worker jobs (top-level functions so worker processes can import them)


def _fingerprint_job(
    source: Source,
    window_percentiles: tuple[float, float],
    label: Source | None = None,
    fingerprint: bool = True,
) -> dict[str, Any]:
    """The source's fingerprint (unless `fingerprint` is False: it is cached) and, with `label`,
    its label map's check against it: {"label": {"values": [...]}} or {"label_error": reason}."""
    try:
        volume = read_volume(source)
        result: dict[str, Any] = {}
        if fingerprint:
            result["fingerprint"] = fingerprint_volume(volume, source.name, window_percentiles).__dict__
    except SourceError as exc:
        return {"error": exc.reason}
    except MemoryError:
        return {"error": "too large to load into memory"}
    if label is not None:
        try:
            result["label"] = {"values": list(label_values(read_label_map(label, volume)))}
        except SourceError as exc:
            result["label_error"] = str(exc)
        except MemoryError:
            result["label_error"] = f"{label.name}: too large to load into memory"
    return result


def _preprocess_job(
    source: Source, plan: Plan, target: str, label: Source | None = None, label_target: str | None = None
) -> dict[str, Any]:
    try:
        volume = read_volume(source)
    except SourceError as exc:
        return {"error": exc.reason}
    try:
        labels = read_label_map(label, volume) if label is not None else None
    except SourceError as exc:  # changed since it was checked
        return {"label_error": str(exc)}
    try:
        if labels is None:
            array, affine, window = prepare_volume(volume, plan)
        else:
            array, labels, affine, window = prepare_pair(volume, labels, plan)
    except SourceError as exc:
        return {"error": exc.reason}
    if labels is not None:
        # The label map first: an image entry found in the cache without its label map is rebuilt.
        label_record = {"values": list(label_values(labels)), "affine": affine.tolist(), "shape": list(labels.shape)}
        atomic_write(label_target, lambda handle: np.save(handle, labels.astype(np.uint8, copy=False)))
        atomic_write_json(Path(label_target).with_suffix(".json"), label_record)
    atomic_write(target, lambda handle: np.save(handle, array.astype(np.float32, copy=False)))
    record = {"window": [window.low, window.high], "affine": affine.tolist(), "shape": list(array.shape)}
    atomic_write_json(Path(target).with_suffix(".json"), record)
    if labels is not None:
        record["label"] = label_record
    return record


def _worker_init() -> None:
    # Each worker handles one volume at a time; letting every worker spawn a thread per core would
    # oversubscribe the CPU several times over. Set through the environment, so that torch (which
    # only the preprocessing pass needs) is not imported just to be told.
    import sys

    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _run_jobs(
    function: Callable, jobs: list[tuple], workers: int, phase: str, progress: Progress | None
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = [{} for _ in jobs]
    if progress:
        progress(phase, 0, len(jobs))
    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            results[i] = function(*job)
            if progress:
                progress(phase, i + 1, len(jobs))
        return results
    # forkserver: workers are forked from a clean, single-threaded server process, which is safe
    # even when the parent has started torch's thread pools (plain fork is not).
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context, initializer=_worker_init) as pool:
        futures = [pool.submit(function, *job) for job in jobs]
        for done, (i, future) in enumerate(zip(range(len(jobs)), futures), start=1):
            results[i] = future.result()
            if progress:
                progress(phase, done, len(jobs))
    return results


def _workers(config: Config) -> int:
    return config.cache.workers or os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# The whole folder


@dataclass
class Fingerprinted:
    discovery: Discovery
    sources: list[Source]  # readable sources, in discovery order
    keys: list[str]  # content key of each
    fingerprint: DatasetFingerprint
    skipped: list[Skipped] = field(default_factory=list)  # discovery's plus unreadable at read time
    # With label maps (None without): the pairing, and for each of `sources` its checked label map
    # (None: unlabeled), that label map's content key ("" if none) and its values.
    labelled: LabelledDiscovery | None = None
    labels: list[Source | None] = field(default_factory=list)
    label_keys: list[str] = field(default_factory=list)
    label_values: list[tuple[int, ...] | None] = field(default_factory=list)
    unlabeled: dict[str, str] = field(default_factory=dict)  # image name -> why it has no usable label map

    def label_set(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The label values found across the label maps, sorted, and a class name for each."""
        values = sorted({v for found in self.label_values if found for v in found})
        declared = self.labelled.class_names if self.labelled else {}
        return tuple(values), class_names(values, declared)


def _cached(target: Path) -> dict[str, Any] | None:
    """The record of a complete cache item (its .json, and its .npy for a .npy target), else None."""
    try:
        record = json.loads(target.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    complete = isinstance(record, dict) and (target.suffix != ".npy" or target.exists())
    return record if complete else None


def _labels_dir(config: Config) -> Path | None:
    return Path(config.labels.dir) if config.labels.dir else None


def fingerprint_folder(
    root: str | Path, config: Config, cache_dir: Path | None = None, progress: Progress | None = None
) -> Fingerprinted:
    """Discover, read and fingerprint every source (cached by content), and check each one's label
    map against it when there are label maps. Raises PlanError if no source is usable."""
    labelled = find_label_maps(root, _labels_dir(config), config.io)
    if labelled is not None and config.labels.names:
        labelled = replace(labelled, class_names={**labelled.class_names, **config.labels.class_names})
    discovery = labelled.images if labelled else discover_sources(root, config.io)
    skipped = list(discovery.skipped) + (labelled.skipped if labelled else [])
    if not discovery.sources:
        raise NoUsableSources(
            f"{root}: no usable images found" + (f" ({len(discovery.problems)} skipped)" if discovery.problems else ""),
            skipped,
        )
    cache = Path(cache_dir) if cache_dir else cache_dir_for(config)
    percentiles = config.plan.mr_percentiles
    hashes = FileHashes(cache / "file-hashes.json")
    keys, label_sources, label_keys = [], [], []
    unlabeled = dict(labelled.unlabeled) if labelled else {}
    for source in discovery.sources:
        label = labelled.label_of(source) if labelled else None
        try:
            keys.append(source_key(source, hashes))
        except OSError as exc:
            keys.append("")
            skipped.append(Skipped(source.name, f"cannot read ({exc.strerror})"))
        try:
            label_keys.append(label_key(source_key(label, hashes), keys[-1]) if label and keys[-1] else "")
        except OSError as exc:
            label_keys.append("")
            unlabeled[source.name] = f"{label.name}: cannot read ({exc.strerror})"  # type: ignore[union-attr]
        label_sources.append(label if label_keys[-1] else None)
    hashes.save()

    fingerprints: dict[int, SourceFingerprint] = {}
    values: dict[int, tuple[int, ...]] = {}
    todo = []
    for i, (source, key) in enumerate(zip(discovery.sources, keys)):
        if not key:
            continue
        cached = fingerprint_path(cache, key, percentiles)
        try:
            data = json.loads(cached.read_text())
            data["name"] = source.name  # the same content may sit under another name
            fingerprints[i] = SourceFingerprint.from_dict(data)
        except (OSError, ValueError, TypeError, KeyError):
            pass
        checked = _cached(label_check_path(cache, label_keys[i])) if label_sources[i] is not None else None
        if checked is not None:
            values[i] = tuple(int(v) for v in checked["values"])
        if i not in fingerprints or (label_sources[i] is not None and i not in values):
            todo.append(i)
    jobs = [
        (discovery.sources[i], percentiles, label_sources[i] if i not in values else None, i not in fingerprints)
        for i in todo
    ]
    results = _run_jobs(_fingerprint_job, jobs, _workers(config), "fingerprint", progress)
    for i, result in zip(todo, results):
        if "error" in result:
            skipped.append(Skipped(discovery.sources[i].name, result["error"]))
            fingerprints.pop(i, None)
            continue
        if "fingerprint" in result:
            fingerprints[i] = SourceFingerprint.from_dict(result["fingerprint"])
            atomic_write_json(fingerprint_path(cache, keys[i], percentiles), result["fingerprint"])
        if "label" in result:
            values[i] = tuple(result["label"]["values"])
            atomic_write_json(label_check_path(cache, label_keys[i]), result["label"])
        elif "label_error" in result:
            unlabeled[discovery.sources[i].name] = result["label_error"]
    order = sorted(fingerprints)
    if not order:
        raise NoUsableSources(f"{root}: none of the {len(discovery.sources)} sources could be read", skipped)
    return Fingerprinted(
        discovery=discovery,
        sources=[discovery.sources[i] for i in order],
        keys=[keys[i] for i in order],
        fingerprint=summarise([fingerprints[i] for i in order]),
        skipped=skipped,
        labelled=labelled,
        labels=[label_sources[i] if i in values else None for i in order],
        label_keys=[label_keys[i] if i in values else "" for i in order],
        label_values=[values.get(i) for i in order],
        unlabeled={s.name: unlabeled[s.name] for s in (discovery.sources[i] for i in order) if s.name in unlabeled},
    )


def unlabeled_images(found: Fingerprinted, config: Config) -> Fingerprinted:
    """Apply `labels.unlabeled` to the images without a usable label map: "refuse" raises
    PairingError naming them; "skip" returns `found` without them, each listed in `skipped`."""
    if found.labelled is None or not found.unlabeled:
        return found
    names = list(found.unlabeled)
    if not any(found.label_values):
        raise PairingError(
            f"{found.discovery.root}: none of the {len(found.sources)} images has a usable label map in "
            f"{found.labelled.label_root} (e.g. {names[0]}: {found.unlabeled[names[0]]})"
        )
    if not config.labels.skip_unlabeled:
        listed = "; ".join(f"{name} ({found.unlabeled[name]})" for name in names[:5])
        more = f"; and {len(names) - 5} more" if len(names) > 5 else ""
        raise PairingError(
            f"{len(names)} of {len(found.sources)} images have no usable label map: {listed}{more}. "
            "Fix or add their label maps, or --set labels.unlabeled=skip to train without them"
        )
    keep = [i for i, source in enumerate(found.sources) if source.name not in found.unlabeled]
    skipped = list(found.skipped) + [
        Skipped(name, f"no usable label map ({reason}); skipped: labels.unlabeled=skip")
        for name, reason in found.unlabeled.items()
    ]
    return replace(
        found,
        sources=[found.sources[i] for i in keep],
        keys=[found.keys[i] for i in keep],
        fingerprint=summarise([found.fingerprint.sources[i] for i in keep]),
        skipped=skipped,
        labels=[found.labels[i] for i in keep],
        label_keys=[found.label_keys[i] for i in keep],
        label_values=[found.label_values[i] for i in keep],
        unlabeled={},
    )


def plan_with_conditions(plan: Plan, scan_names: list[str], config: Config) -> tuple[Plan, ScanConditions | None]:
    """`plan` with the conditions of these scans (`config.conditions`), and the conditions; the plan
    unchanged and None without any. A plan that already has conditions (from a checkpoint, or
    `--plan`) keeps its scaling and classes, as long as the table fits them."""
    conditions = scan_conditions(config.conditions, scan_names)
    if conditions is None:
        return plan, None
    if plan.conditions is None:
        return plan.with_conditions([column.to_dict() for column in conditions.columns]), conditions
    check_against_plan(conditions, plan.conditions)
    return plan, conditions


def plan_with_labels(plan: Plan, found: Fingerprinted) -> Plan:
    """`plan` with the label set of `found`'s label maps. A plan that already has one (from a
    checkpoint, or `--plan`) keeps it, as long as every value found is in it."""
    if found.labelled is None:
        return plan
    values, names = found.label_set()
    if plan.label_values is None:
        return plan.with_labels(values, names)
    extra = sorted(set(values) - set(plan.label_values))
    if extra:
        raise PlanError(
            f"label value(s) {', '.join(map(str, extra))} in the label maps are not in the plan's label set "
            f"{list(plan.label_values)}: use a plan made from these label maps"
        )
    return plan


@dataclass
class PreparedDataset:
    root: str
    plan: Plan
    fingerprint: DatasetFingerprint
    entries: list[CacheEntry]  # with `label_path` set on each when the images have label maps
    skipped: list[Skipped]
    cache_dir: str
    built: int = 0  # volumes preprocessed in this call (0 on a fully warm cache)
    # With conditions (`conditions.table` / `class_folders`): each entry's conditions, and their
    # code rows (n, width) as the model sees them, scaled as the plan says.
    conditions: ScanConditions | None = None
    condition_codes: np.ndarray | None = None

    @property
    def labelled(self) -> bool:
        return any(entry.label_path for entry in self.entries)

    def manifest(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "plan": self.plan.to_dict(),
            "entries": [entry.to_dict() for entry in self.entries],
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped if not s.ignored],
        }


def prepare_dataset(
    root: str | Path,
    config: Config,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    plan: Plan | None = None,
    before_preprocessing: Callable[[Plan, int], None] | None = None,
) -> PreparedDataset:
    """Fingerprint, plan (unless `plan` is given, e.g. from a checkpoint), fill the cache, and place
    the plan (`Plan.placed_at`) where the preprocessed crops lie, if it is not placed yet. With
    label maps, each entry carries its preprocessed label map, and the plan its label set.
    `before_preprocessing(plan, volume count)` runs once the plan is known and before any volume
    is preprocessed: where `train` checks that a step fits in memory."""
    cache = Path(cache_dir) if cache_dir else cache_dir_for(config)
    found = unlabeled_images(fingerprint_folder(root, config, cache, progress), config)
    plan = plan_with_labels(plan or make_plan(found.fingerprint, config.plan), found)
    if before_preprocessing is not None:
        before_preprocessing(plan, len(found.sources))
    skipped = list(found.skipped)
    entries: list[CacheEntry | None] = [None] * len(found.sources)
    todo = []
    for i, (source, key) in enumerate(zip(found.sources, found.keys)):
        vkey = volume_key(key, plan)
        target = cache / "volumes" / f"{vkey}.npy"
        label = found.labels[i] if found.labels else None
        lkey = label_volume_key(found.label_keys[i], vkey) if label else None
        label_target = cache / "volumes" / f"{lkey}.npy" if lkey else None
        record = _cached(target)
        label_record = _cached(label_target) if label_target else None
        try:
            if record is None or (label and label_record is None):
                raise KeyError
            entry = cache_entry(source.name, vkey, target, record)
            if label:
                entry = with_label(entry, label.name, lkey, label_target, label_record)  # type: ignore[arg-type]
            entries[i] = entry
        except (KeyError, ValueError, TypeError, IndexError):
            todo.append((i, vkey, target, label, lkey, label_target))
    jobs = [(found.sources[i], plan, str(t), label, str(lt) if lt else None) for i, _, t, label, _, lt in todo]
    results = _run_jobs(_preprocess_job, jobs, _workers(config), "preprocess", progress)
    for (i, vkey, target, label, lkey, label_target), result in zip(todo, results):
        name = found.sources[i].name
        if "error" in result:
            skipped.append(Skipped(name, result["error"]))
        elif "label_error" in result:
            if not config.labels.skip_unlabeled:
                raise PairingError(f"{name}: its label map is unusable ({result['label_error']})")
            skipped.append(
                Skipped(name, f"no usable label map ({result['label_error']}); skipped: labels.unlabeled=skip")
            )
        else:
            entry = cache_entry(name, vkey, target, result)
            if label:
                entry = with_label(entry, label.name, lkey, label_target, result["label"])
            entries[i] = entry
    ready = [e for e in entries if e is not None]
    if not ready:
        raise PlanError(f"{root}: no volume could be preprocessed")
    if plan.output_affine is None:
        plan = plan.placed_at([entry.affine for entry in ready])
    plan, conditions = plan_with_conditions(plan, [entry.name for entry in ready], config)
    codes = (
        condition_codes(plan_columns(plan.conditions), conditions.values) if conditions and plan.conditions else None
    )
    prepared = PreparedDataset(
        root=str(root),
        plan=plan,
        fingerprint=found.fingerprint,
        entries=ready,
        skipped=skipped,
        cache_dir=str(cache),
        built=len(todo),
        conditions=conditions,
        condition_codes=codes,
    )
    identity = f"{Path(root).resolve()}:{plan.preprocessing_key()}"
    if found.labelled is not None:  # the same images with and without label maps: two manifests
        identity += f":labels:{Path(found.labelled.label_root).resolve()}"
    manifest_key = hashlib.sha256(identity.encode()).hexdigest()
    atomic_write_json(cache / "manifests" / f"{manifest_key}.json", prepared.manifest())
    return prepared
