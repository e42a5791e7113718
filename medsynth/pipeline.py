"""The spine of data preparation: discover -> fingerprint -> plan -> preprocess -> cache.

`fingerprint_folder(folder, config)` discovers the sources and fingerprints each (cached by
content); `prepare_dataset(folder, config)` then derives the plan (as nnU-Net derives its plan from
the dataset fingerprint), preprocesses every volume once, in parallel worker processes, into the
content-addressed cache (`medsynth.data`), and places the plan where the preprocessed crops lie.
Training, `inspect` and `evaluate` all prepare data through here, so they see volumes alike.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.atomic import atomic_write, atomic_write_json
from medsynth.config import Config
from medsynth.data import (
    CacheEntry,
    FileHashes,
    cache_dir_for,
    cache_entry,
    fingerprint_path,
    source_key,
    volume_key,
)
from medsynth.io import Discovery, Skipped, Source, SourceError, Volume, discover_sources, read_volume
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
    return normalise(array, window), affine, window


# ---------------------------------------------------------------------------------------------
# Worker jobs (top-level functions so worker processes can import them)


def _fingerprint_job(source: Source, window_percentiles: tuple[float, float]) -> dict[str, Any]:
    try:
        volume = read_volume(source)
        return {"fingerprint": fingerprint_volume(volume, source.name, window_percentiles).__dict__}
    except SourceError as exc:
        return {"error": exc.reason}
    except MemoryError:
        return {"error": "too large to load into memory"}


def _preprocess_job(source: Source, plan: Plan, target: str) -> dict[str, Any]:
    try:
        volume = read_volume(source)
        array, affine, window = prepare_volume(volume, plan)
    except SourceError as exc:
        return {"error": exc.reason}
    atomic_write(target, lambda handle: np.save(handle, array.astype(np.float32, copy=False)))
    record = {"window": [window.low, window.high], "affine": affine.tolist(), "shape": list(array.shape)}
    atomic_write_json(Path(target).with_suffix(".json"), record)
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


def fingerprint_folder(
    root: str | Path, config: Config, cache_dir: Path | None = None, progress: Progress | None = None
) -> Fingerprinted:
    """Discover, read and fingerprint every source (cached by content). Raises PlanError if none is usable."""
    discovery = discover_sources(root, config.io)
    skipped = list(discovery.skipped)
    if not discovery.sources:
        raise NoUsableSources(
            f"{root}: no usable images found" + (f" ({len(discovery.problems)} skipped)" if discovery.problems else ""),
            skipped,
        )
    cache = Path(cache_dir) if cache_dir else cache_dir_for(config)
    percentiles = config.plan.mr_percentiles
    hashes = FileHashes(cache / "file-hashes.json")
    keys = []
    for source in discovery.sources:
        try:
            keys.append(source_key(source, hashes))
        except OSError as exc:
            keys.append("")
            skipped.append(Skipped(source.name, f"cannot read ({exc.strerror})"))
    hashes.save()

    fingerprints: dict[int, SourceFingerprint] = {}
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
            todo.append(i)
    results = _run_jobs(
        _fingerprint_job,
        [(discovery.sources[i], percentiles) for i in todo],
        _workers(config),
        "fingerprint",
        progress,
    )
    for i, result in zip(todo, results):
        if "error" in result:
            skipped.append(Skipped(discovery.sources[i].name, result["error"]))
            continue
        fingerprints[i] = SourceFingerprint.from_dict(result["fingerprint"])
        atomic_write_json(fingerprint_path(cache, keys[i], percentiles), result["fingerprint"])
    order = sorted(fingerprints)
    if not order:
        raise NoUsableSources(f"{root}: none of the {len(discovery.sources)} sources could be read", skipped)
    return Fingerprinted(
        discovery=discovery,
        sources=[discovery.sources[i] for i in order],
        keys=[keys[i] for i in order],
        fingerprint=summarise([fingerprints[i] for i in order]),
        skipped=skipped,
    )


@dataclass
class PreparedDataset:
    root: str
    plan: Plan
    fingerprint: DatasetFingerprint
    entries: list[CacheEntry]
    skipped: list[Skipped]
    cache_dir: str
    built: int = 0  # volumes preprocessed in this call (0 on a fully warm cache)

    def manifest(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "plan": self.plan.to_dict(),
            "entries": [entry.__dict__ for entry in self.entries],
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped if not s.ignored],
        }


def prepare_dataset(
    root: str | Path,
    config: Config,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    plan: Plan | None = None,
) -> PreparedDataset:
    """Fingerprint, plan (unless `plan` is given, e.g. from a checkpoint), fill the cache, and place
    the plan (`Plan.placed_at`) where the preprocessed crops lie, if it is not placed yet."""
    cache = Path(cache_dir) if cache_dir else cache_dir_for(config)
    found = fingerprint_folder(root, config, cache, progress)
    plan = plan or make_plan(found.fingerprint, config.plan)
    skipped = list(found.skipped)
    entries: list[CacheEntry | None] = [None] * len(found.sources)
    todo = []
    for i, (source, key) in enumerate(zip(found.sources, found.keys)):
        vkey = volume_key(key, plan)
        target = cache / "volumes" / f"{vkey}.npy"
        try:
            record = json.loads(target.with_suffix(".json").read_text())
            if not target.exists():
                raise OSError
            entries[i] = cache_entry(source.name, vkey, target, record)
        except (OSError, ValueError, KeyError):
            todo.append((i, vkey, target))
    jobs = [(found.sources[i], plan, str(target)) for i, _, target in todo]
    results = _run_jobs(_preprocess_job, jobs, _workers(config), "preprocess", progress)
    for (i, vkey, target), result in zip(todo, results):
        if "error" in result:
            skipped.append(Skipped(found.sources[i].name, result["error"]))
        else:
            entries[i] = cache_entry(found.sources[i].name, vkey, target, result)
    ready = [e for e in entries if e is not None]
    if not ready:
        raise PlanError(f"{root}: no volume could be preprocessed")
    if plan.output_affine is None:
        plan = plan.placed_at([entry.affine for entry in ready])
    prepared = PreparedDataset(
        root=str(root),
        plan=plan,
        fingerprint=found.fingerprint,
        entries=ready,
        skipped=skipped,
        cache_dir=str(cache),
        built=len(todo),
    )
    manifest_key = hashlib.sha256(f"{Path(root).resolve()}:{plan.preprocessing_key()}".encode()).hexdigest()
    atomic_write_json(cache / "manifests" / f"{manifest_key}.json", prepared.manifest())
    return prepared
