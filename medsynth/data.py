"""The preprocessed cache and the Dataset that serves it.

`medsynth.pipeline` fills the cache; this module owns its layout and keys, and serves it to
training. The cache is content-addressed: keys cover the file contents and the plan, so a second
run finds everything ready and only changed files are redone. Layout of the cache folder:

    file-hashes.json                    path -> (size, mtime, sha256), so unchanged files are not re-hashed
    fingerprints/<key>-p<lo>-<hi>.json  per-source fingerprint, keyed by content and window percentiles
    volumes/<key>.npy / .json           preprocessed volume (float32 in [-1, 1]) and its window and affine;
                                        or a preprocessed label map (uint8) and its label values
    labels/<key>.json                   a label map's check against its image (its values), by content
    manifests/<key>.json                the list of volumes for one (folder, plan)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.atomic import atomic_write_json
from medsynth.config import AugmentConfig, Config
from medsynth.io import Source, file_sha256
from medsynth.plan import FINGERPRINT_VERSION, Plan
from medsynth.preprocess import LABEL_PREPROCESS_VERSION


def default_cache_dir() -> Path:
    if os.environ.get("MEDSYNTH_CACHE"):
        return Path(os.environ["MEDSYNTH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medsynth"


def cache_dir_for(config: Config) -> Path:
    return Path(config.cache.dir) if config.cache.dir else default_cache_dir()


# ---------------------------------------------------------------------------------------------
# Content keys


class FileHashes:
    """sha256 of files, remembered by (size, mtime, inode) like git's index, so a warm run only stats."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.table: dict[str, list] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.table = {}
        self.changed = False

    def digest(self, path: str) -> str:
        stat = os.stat(path)
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        known = self.table.get(path)
        if known and known[:3] == signature:
            return known[3]
        digest = file_sha256(path)
        self.table[path] = signature + [digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if self.changed:
            atomic_write_json(self.path, self.table)
            self.changed = False


def source_key(source: Source, hashes: FileHashes) -> str:
    """Content address of a source: its files' bytes, their order, and which frame."""
    parts = {
        "kind": source.kind,
        "files": [hashes.digest(p) for p in source.paths],
        "frame": source.frame,
        "fingerprint_version": FINGERPRINT_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def fingerprint_path(cache: Path, key: str, window_percentiles: tuple[float, float]) -> Path:
    """Where a source's fingerprint is cached: by content, and by the percentiles its window was
    measured at (changing plan.mr_percentiles re-measures it; nothing else does)."""
    low, high = window_percentiles
    return cache / "fingerprints" / f"{key}-p{low:g}-{high:g}.json"


def volume_key(key: str, plan: Plan) -> str:
    return hashlib.sha256(f"{key}:{plan.preprocessing_key()}".encode()).hexdigest()


def label_key(label_source_key: str, image_source_key: str) -> str:
    """Content address of a label map as its image's label map: both files' contents."""
    return hashlib.sha256(f"label:{label_source_key}:{image_source_key}".encode()).hexdigest()


def label_check_path(cache: Path, key: str) -> Path:
    """Where a label map's check against its image (its values) is cached."""
    return cache / "labels" / f"{key}.json"


def label_volume_key(key: str, image_volume_key: str) -> str:
    """Cache key of a preprocessed label map: its content and its image's volume key, which covers
    the image's content and the plan, and so the crop the label map shares with its image."""
    return hashlib.sha256(f"{key}:{image_volume_key}:{LABEL_PREPROCESS_VERSION}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# What the cache holds


@dataclass(frozen=True)
class CacheEntry:
    name: str  # the source's name, for people
    key: str  # volume cache key
    path: str  # the .npy file
    window: tuple[float, float]  # intensity window that maps to [-1, 1], in the scan's units
    affine: tuple[tuple[float, ...], ...]  # RAS+ affine of the preprocessed array
    # The paired label map, preprocessed on the same grid (same affine): None without labels.
    label_name: str | None = None  # the label map's name, for people
    label_key: str | None = None
    label_path: str | None = None  # the uint8 .npy file
    label_values: tuple[int, ...] | None = None  # the values in the preprocessed label map

    def to_dict(self) -> dict[str, Any]:
        """For manifests: an entry without a label map is written exactly as before labels existed."""
        return {k: v for k, v in self.__dict__.items() if v is not None or not k.startswith("label_")}


def cache_entry(name: str, key: str, path: Path, record: dict[str, Any]) -> CacheEntry:
    return CacheEntry(
        name=name,
        key=key,
        path=str(path),
        window=(float(record["window"][0]), float(record["window"][1])),
        affine=tuple(tuple(float(v) for v in row) for row in record["affine"]),
    )


def with_label(entry: CacheEntry, name: str, key: str, path: Path, record: dict[str, Any]) -> CacheEntry:
    """`entry` with its preprocessed label map (the .npy at `path`, `record` its .json)."""
    return replace(
        entry,
        label_name=name,
        label_key=key,
        label_path=str(path),
        label_values=tuple(int(v) for v in record["values"]),
    )


# ---------------------------------------------------------------------------------------------
# Serving volumes to training


@dataclass(frozen=True)
class VolumeDraw:
    """A cached volume and the augmentation drawn for it, not yet read: what the dataset serves
    with `draws_only`, so that the reader reads the volume a few planes at a time (`read_planes`)."""

    index: int
    flipped_axes: tuple[int, ...]
    intensity_factor: float | None  # intensity jitter's scale about the background, when on


class CachedVolumeDataset:
    """Map-style dataset over cached volumes: item i is a (1, X, Y, Z) float32 array in [-1, 1];
    with `label_paths` (one per volume), the pair (volume, its label map as (1, X, Y, Z) uint8),
    flipped together; with `condition_codes`, each item ends with the volume's code row. With
    `draws_only`, item i is its `VolumeDraw` instead, and `read_planes` reads a few x-planes of
    the augmented volume at a time: the hierarchical model cuts its views so, and a 256³ batch is
    never whole in memory.

    Arrays are memory-mapped, so worker processes share the page cache instead of copies.
    Augmentation draws from a generator seeded by (seed, epoch, index): the same epoch gives the
    same augmented batch whichever worker serves it, which keeps resumed training bit-identical.
    A plain class works with torch's DataLoader, and keeps torch out of this module's imports.
    """

    def __init__(
        self,
        paths: list[str],
        augment: AugmentConfig | None = None,
        seed: int = 0,
        label_paths: list[str] | None = None,
        condition_codes: np.ndarray | None = None,
        draws_only: bool = False,
    ):
        self.paths = list(paths)
        self.draws_only = draws_only
        if draws_only and (label_paths is not None or condition_codes is not None):
            raise ValueError("draws_only serves images alone, without label maps or conditions")
        self.label_paths = list(label_paths) if label_paths is not None else None
        if self.label_paths is not None and len(self.label_paths) != len(self.paths):
            raise ValueError(f"{len(self.label_paths)} label maps for {len(self.paths)} volumes")
        # (n, width) float32, one row per volume (medsynth.conditions.ConditionSpec), or None.
        self.condition_codes = condition_codes
        if condition_codes is not None and len(condition_codes) != len(self.paths):
            raise ValueError(f"{len(condition_codes)} condition rows for {len(self.paths)} volumes")
        self.augment = augment or AugmentConfig(flip_axes=(), intensity_jitter=0.0)
        self.seed = seed
        self.epoch = 0
        self._arrays: dict[int, np.ndarray] = {}
        self._label_maps: dict[int, np.ndarray] = {}
        self._layouts: dict[int, tuple[int, tuple[int, ...], np.dtype]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def _array(self, index: int) -> np.ndarray:
        if index not in self._arrays:
            self._arrays[index] = np.load(self.paths[index], mmap_mode="r")
        return self._arrays[index]

    def _label_map(self, index: int) -> np.ndarray:
        if index not in self._label_maps:
            self._label_maps[index] = np.load(self.label_paths[index], mmap_mode="r")  # type: ignore[index]
        return self._label_maps[index]

    def __getitem__(self, index: int) -> np.ndarray | tuple[np.ndarray, ...] | VolumeDraw:
        """The volume; with label maps, (volume, label map); with conditions, the volume's
        condition codes (width,) after those; with `draws_only`, its `VolumeDraw`."""
        if self.draws_only:
            return self.draw(index)
        item = self._volume_item(index)
        if self.condition_codes is None:
            return item
        codes = np.array(self.condition_codes[index], dtype=np.float32)  # (width,)
        return (*item, codes) if isinstance(item, tuple) else (item, codes)

    def draw(self, index: int) -> VolumeDraw:
        """The augmentation of volume `index` this epoch, drawn from (seed, epoch, index) alone."""
        augment = self.augment
        flipped: list[int] = []
        factor = None
        if augment.flip_axes or augment.intensity_jitter:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            flipped = [axis for axis in augment.flip_axes if rng.random() < augment.flip_probability]
            if augment.intensity_jitter:
                factor = 1.0 + rng.uniform(-augment.intensity_jitter, augment.intensity_jitter)
        return VolumeDraw(index, tuple(flipped), factor)

    @staticmethod
    def _jitter(volume: np.ndarray, factor: float | None) -> np.ndarray:
        if factor is None:  # intensities only: a label map has none
            return volume
        return np.clip((volume + 1.0) * factor - 1.0, -1.0, 1.0)  # scale about the background

    def read_planes(self, draw: VolumeDraw, start: int, stop: int) -> np.ndarray:
        """x-planes [start, stop) of the augmented volume `draw`, (stop - start, Y, Z) float32,
        read from the file by one positioned read: a flipped x reads the mirrored planes, then
        every flip is applied. Not through the memory map, whose pages, once touched, count in
        the process's resident memory for as long as it is open (a 256³ volume is 64 MiB)."""
        offset, shape, dtype = self._layout(draw.index)
        n, plane = shape[0], shape[1] * shape[2]
        first, last = (n - stop, n - start) if 0 in draw.flipped_axes else (start, stop)
        count = (last - first) * plane
        data = np.fromfile(
            self.paths[draw.index], dtype=dtype, count=count, offset=offset + first * plane * dtype.itemsize
        )
        if data.size != count:
            raise OSError(f"{self.paths[draw.index]}: cached volume is shorter than its header says")
        region = data.reshape(last - first, *shape[1:]).astype(np.float32, copy=False)
        region = np.flip(region, axis=draw.flipped_axes) if draw.flipped_axes else region
        return np.ascontiguousarray(self._jitter(region, draw.intensity_factor), dtype=np.float32)

    def _layout(self, index: int) -> tuple[int, tuple[int, ...], np.dtype]:
        """(where the data starts, shape, dtype) of cached volume `index`, from its .npy header."""
        if index not in self._layouts:
            with open(self.paths[index], "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in read_header:
                    raise ValueError(f"{self.paths[index]}: .npy format {version} is not one the cache writes")
                shape, fortran_order, dtype = read_header[version](handle)
                if fortran_order or len(shape) != 3:
                    raise ValueError(f"{self.paths[index]}: expected a C-ordered 3D volume")
                self._layouts[index] = (handle.tell(), tuple(shape), np.dtype(dtype))
        return self._layouts[index]

    def _volume_item(self, index: int) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        volume = np.array(self._array(index), dtype=np.float32)  # (X, Y, Z), a private copy
        labels = self._label_map(index) if self.label_paths is not None else None
        draw = self.draw(index)
        if draw.flipped_axes:
            volume = np.flip(volume, axis=draw.flipped_axes)
            labels = np.flip(labels, axis=draw.flipped_axes) if labels is not None else None
        volume = self._jitter(volume, draw.intensity_factor)
        volume = np.ascontiguousarray(volume[None], dtype=np.float32)  # (1, X, Y, Z)
        if labels is None:
            return volume
        # A private copy, as the volume is: torch warns of (and must not write to) the read-only memory map.
        return volume, np.array(labels[None], dtype=np.uint8, order="C")  # (1, X, Y, Z) each
