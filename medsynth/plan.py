"""The dataset fingerprint (what the scans are) and the `Plan` derived from it (what the model sees).

As in nnU-Net, nothing about the target grid is hard-coded: the fingerprint records each source's
geometry, modality and intensities, and the plan picks a spacing, a power-of-two shape and an
intensity window from them. The plan is saved as JSON and travels inside every checkpoint, so that
sampling can map synthetic volumes back to real units and real space.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from medsynth import __version__
from medsynth.atomic import atomic_write_json
from medsynth.config import PlanConfig
from medsynth.errors import MedsynthError
from medsynth.io import Volume
from medsynth.io.volume import obliquity_degrees
from medsynth.preprocess import (
    PREPROCESS_VERSION,
    IntensityWindow,
    denormalise,
    foreground_box,
    foreground_mask,
    percentile_window,
    reorient_to_ras,
)

DEFAULT_MR_PERCENTILES = PlanConfig().mr_percentiles
FINGERPRINT_VERSION = 9  # 9: each source's window at the configured MR percentiles
PLAN_VERSION = 1

_PERCENTILES = (0.5, 1.0, 50.0, 99.0, 99.5)
# A source whose spacing or foreground extent differs from the median by more than this factor,
# or whose intensity scale differs by more than `_SCALE_OUTLIER`, is listed as an outlier.
_GEOMETRY_OUTLIER = 1.5
_SCALE_OUTLIER = 10.0


class PlanError(MedsynthError, ValueError):
    """No plan can be made (no usable sources, contradictory settings). The message is for users."""


@dataclass(frozen=True)
class SourceFingerprint:
    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str  # voxel axis codes as stored, e.g. "PSR"
    obliquity_degrees: float
    modality: str  # "ct" or "mr" (anything not in Hounsfield units is windowed like MRI)
    header_modality: str | None  # DICOM Modality; None for formats without one
    percentiles: dict[str, float]  # of all voxels, keyed "p0.5", "p50", ...; plus "min", "max"
    foreground_high: float  # 99.5th percentile of foreground voxels (the scale outliers are judged by)
    # The intensity window at `window_percentiles` (the plan's MR percentiles), by the same function
    # preprocessing windows each volume with: the plan's typical window is the median of these.
    window: tuple[float, float]
    window_percentiles: tuple[float, float]
    foreground_fraction: float
    foreground_extent_mm: tuple[float, float, float]  # bounding box along R, A, S
    value_dtype: str  # the smallest dtype holding the values exactly
    voxel_hash: str  # of the RAS-ordered voxels: finds the same scan stored twice, in any format
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceFingerprint:
        data = dict(data)
        for key in ("shape", "spacing", "foreground_extent_mm", "warnings", "window", "window_percentiles"):
            data[key] = tuple(data[key])
        return cls(**data)


def _looks_like_hounsfield(array: np.ndarray) -> bool:
    """CT in Hounsfield units has air at about -1000 HU; MRI magnitude images are never negative."""
    return float(array.min()) >= -4000.0 and float(np.mean(array <= -900.0)) >= 0.005


def _value_dtype(array: np.ndarray, stored: str | None) -> str:
    """The dtype that holds the values exactly: the file's own when it does (a uint16 scan stays
    uint16), else the smallest integer type that does, else float32 (scaled or float data)."""
    low, high = float(array.min()), float(array.max())
    if not np.array_equal(array, np.round(array)):
        return "float32"
    candidates = ["uint8", "int16", "uint16"]
    if stored in candidates:
        candidates.insert(0, stored)
    for name in candidates:
        info = np.iinfo(name)
        if info.min <= low and high <= info.max:
            return name
    return "float32"


def fingerprint_volume(
    volume: Volume, name: str | None = None, window_percentiles: tuple[float, float] = DEFAULT_MR_PERCENTILES
) -> SourceFingerprint:
    """Everything the plan needs to know about one volume, from one pass over its voxels.
    `window_percentiles` must be the plan's `mr_percentiles`: the window measured here is the one
    synthetic MRI is mapped back to."""
    array = volume.array
    name = name or volume.meta.source or "?"
    warnings = list(volume.meta.warnings)
    header = volume.meta.modality
    hounsfield = _looks_like_hounsfield(array)
    if header == "CT" and not hounsfield:
        warnings.append(
            "DICOM Modality is CT but the values are not Hounsfield units (no air near -1000): windowed as MRI"
        )
    modality = "ct" if hounsfield and header in (None, "CT") else "mr"

    values = np.percentile(array, _PERCENTILES)
    percentiles = {f"p{p:g}": float(v) for p, v in zip(_PERCENTILES, values)}
    percentiles["min"], percentiles["max"] = float(array.min()), float(array.max())

    ras, ras_affine = reorient_to_ras(array, volume.affine)
    mask = foreground_mask(ras, modality)
    box = foreground_box(mask)
    if box is None:
        warnings.append("no foreground found: the volume is flat")
        extent = (0.0, 0.0, 0.0)
        high = percentiles["max"]
    else:
        low_corner, high_corner = box
        corners = np.array(
            [[i, j, k] for i in (low_corner[0] - 0.5, high_corner[0] + 0.5)
             for j in (low_corner[1] - 0.5, high_corner[1] + 0.5)
             for k in (low_corner[2] - 0.5, high_corner[2] + 0.5)]
        )  # fmt: skip
        world = corners @ ras_affine[:3, :3].T + ras_affine[:3, 3]
        extent = tuple(float(v) for v in world.max(axis=0) - world.min(axis=0))
        high = float(np.percentile(ras[mask], 99.5))
    window = percentile_window(ras, mask, window_percentiles)
    return SourceFingerprint(
        name=name,
        shape=volume.shape,
        spacing=tuple(round(s, 6) for s in volume.spacing),  # type: ignore[arg-type]
        orientation=volume.orientation,
        obliquity_degrees=round(obliquity_degrees(volume.affine), 3),
        modality=modality,
        header_modality=header,
        percentiles=percentiles,
        foreground_high=high,
        window=(window.low, window.high),
        window_percentiles=tuple(float(p) for p in window_percentiles),  # type: ignore[arg-type]
        foreground_fraction=float(mask.mean()),
        foreground_extent_mm=extent,  # type: ignore[arg-type]
        value_dtype=_value_dtype(array, volume.meta.stored_dtype),
        voxel_hash=hashlib.sha256(np.ascontiguousarray(ras, dtype=np.float32).tobytes()).hexdigest()[:16],
        warnings=tuple(warnings),
    )


@dataclass(frozen=True)
class DatasetFingerprint:
    sources: tuple[SourceFingerprint, ...]
    modality_counts: dict[str, int]
    orientation_counts: dict[str, int]
    median_shape: tuple[float, float, float]
    median_spacing: tuple[float, float, float]
    median_extent_mm: tuple[float, float, float]
    median_foreground_fraction: float
    median_window: tuple[float, float]  # median low and high of the sources' windows
    window_percentiles: tuple[float, float]  # the percentiles those windows were taken at
    outliers: tuple[tuple[str, str], ...]  # (source name, reason)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median(rows: list) -> tuple[float, ...]:
    return tuple(float(v) for v in np.median(np.asarray(rows, dtype=np.float64), axis=0))


def summarise(fingerprints: list[SourceFingerprint]) -> DatasetFingerprint:
    """Medians across the set, and the sources that stand out from them."""
    if not fingerprints:
        raise PlanError("no usable volumes to fingerprint")
    if len({f.window_percentiles for f in fingerprints}) > 1:
        raise PlanError("the sources were fingerprinted at different window percentiles")
    modality_counts = Counter(f.modality for f in fingerprints)
    majority = modality_counts.most_common(1)[0][0]
    spacing = _median([f.spacing for f in fingerprints])
    extent = _median([f.foreground_extent_mm for f in fingerprints])
    scale = float(np.median([f.foreground_high for f in fingerprints]))
    outliers = []
    first_with_hash: dict[str, str] = {}
    for f in fingerprints:
        reasons = []
        if f.voxel_hash in first_with_hash:
            reasons.append(f"the same voxels as {first_with_hash[f.voxel_hash]} (a duplicate counts twice in training)")
        first_with_hash.setdefault(f.voxel_hash, f.name)
        if f.modality != majority:
            reasons.append(f"modality {f.modality.upper()} in a mostly {majority.upper()} set")
        ratio = np.asarray(f.spacing) / np.maximum(spacing, 1e-9)
        if (ratio > _GEOMETRY_OUTLIER).any() or (ratio < 1 / _GEOMETRY_OUTLIER).any():
            reasons.append(f"spacing {format_triple(f.spacing)} mm vs median {format_triple(spacing)}")
        ratio = np.asarray(f.foreground_extent_mm) / np.maximum(extent, 1e-9)
        if (ratio > _GEOMETRY_OUTLIER).any() or (ratio < 1 / _GEOMETRY_OUTLIER).any():
            reasons.append(
                f"foreground extent {format_triple(f.foreground_extent_mm, 0)} mm vs median {format_triple(extent, 0)}"
            )
        if majority == "mr" and f.modality == "mr" and scale > 0 and f.foreground_high > 0:
            factor = f.foreground_high / scale
            if factor > _SCALE_OUTLIER or factor < 1 / _SCALE_OUTLIER:
                reasons.append(f"intensity scale {factor:.3g}× the median (per-volume windowing absorbs this)")
        if f.foreground_fraction == 0.0:
            reasons.append("no foreground")
        if reasons:
            outliers.append((f.name, "; ".join(reasons)))
    return DatasetFingerprint(
        sources=tuple(fingerprints),
        modality_counts=dict(modality_counts),
        orientation_counts=dict(Counter(f.orientation for f in fingerprints)),
        median_shape=_median([f.shape for f in fingerprints]),  # type: ignore[arg-type]
        median_spacing=spacing,  # type: ignore[arg-type]
        median_extent_mm=extent,  # type: ignore[arg-type]
        median_foreground_fraction=float(np.median([f.foreground_fraction for f in fingerprints])),
        median_window=(
            float(np.median([f.window[0] for f in fingerprints])),
            float(np.median([f.window[1] for f in fingerprints])),
        ),
        window_percentiles=fingerprints[0].window_percentiles,
        outliers=tuple(outliers),
    )


def format_triple(values, digits: int = 2) -> str:
    """Shapes, spacings and extents for people, the one formatter of every "a×b×c" that `inspect`
    prints: "240×240×4", "0.94×0.94×1.2", "180×216×180". Rounded to `digits` decimals with
    trailing decimal zeros dropped; a whole number keeps its own zeros (240, not 24); a value too
    small for `digits` keeps two significant digits instead of printing as 0."""

    def one(value: float) -> str:
        text = f"{value:.{digits}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        if value != 0 and float(text) == 0:
            text = f"{value:.2g}"
        return "0" if text == "-0" else text

    return "×".join(one(float(v)) for v in values)


def centred_affine(
    shape: tuple[int, ...], spacing: tuple[float, ...], centre: tuple[float, ...] | np.ndarray = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """RAS+ affine of a grid of `shape` voxels of `spacing` mm on the world axes, whose centre lies
    at `centre` (mm)."""
    half_extent = (np.asarray(shape, dtype=np.float64) - 1) / 2 * np.asarray(spacing, dtype=np.float64)
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = np.asarray(centre, dtype=np.float64) - half_extent
    return affine


@dataclass(frozen=True)
class Plan:
    """What every volume is turned into before training, and how to turn model output back.

    The plan is the one carrier of "how to get back": `to_real_units` inverts the intensity
    window and `affine` places a synthetic volume in the world. It is made before preprocessing
    (`make_plan`), placed after it (`placed_at`, from where the training crops lie), and then
    travels unchanged through the run folder (plan.json), every checkpoint, `sample` and `evaluate`.
    """

    modality: str  # "ct" or "mr"
    target_shape: tuple[int, int, int]  # (x, y, z), RAS
    spacing: tuple[float, float, float]  # mm
    deoblique: bool
    # "fixed": `window` is a Hounsfield window applied to every volume (CT).
    # "percentile": each volume is windowed at its own `percentiles` (MRI); `window` is then the
    # dataset's typical window at those percentiles, used to map synthetic volumes back to
    # realistic values.
    intensity_mode: str
    window: tuple[float, float]
    percentiles: tuple[float, float] | None
    output_dtype: str  # dtype that synthetic volumes are written in
    n_sources: int
    spacing_reason: str = ""
    shape_reason: str = ""
    version: int = PLAN_VERSION
    medsynth_version: str = __version__
    notes: tuple[str, ...] = field(default=())
    # RAS+ affine of every synthetic volume: set by `placed_at` once the training crops are known.
    output_affine: tuple[tuple[float, ...], ...] | None = None
    # Paired label maps (`with_labels`): the sorted label values found and a class name for each.
    # None for a dataset without labels, whose plan then reads and writes exactly as before.
    label_values: tuple[int, ...] | None = None
    label_names: tuple[str, ...] | None = None
    # Conditions (`with_conditions`): per column its kind, and the training scans' scaling
    # (continuous) or classes (categorical), as medsynth.conditions.ConditionColumn.to_dict. None
    # without conditions, and then the plan reads and writes exactly as before.
    conditions: tuple[dict[str, Any], ...] | None = None

    def preprocessing_key(self) -> str:
        """Hash of everything that changes a preprocessed volume; part of every cache key."""
        relevant = {
            "modality": self.modality,
            "target_shape": list(self.target_shape),
            "spacing": list(self.spacing),
            "deoblique": self.deoblique,
            "intensity_mode": self.intensity_mode,
            "window": list(self.window) if self.intensity_mode == "fixed" else None,
            "percentiles": list(self.percentiles) if self.percentiles else None,
            "preprocess_version": PREPROCESS_VERSION,
            "plan_version": self.version,
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()

    # ---------------------------------------------------------------- the way back

    @property
    def intensity_window(self) -> IntensityWindow:
        """The window that [-1, 1] maps back to: fixed HU for CT, the typical one for MRI."""
        return IntensityWindow(*self.window)

    def to_real_units(self, volume: np.ndarray) -> np.ndarray:
        """Model output in [-1, 1] -> the plan's units (HU for CT, the typical training range for MRI)."""
        return denormalise(np.clip(volume, -1.0, 1.0), self.intensity_window)

    @property
    def affine(self) -> np.ndarray:
        """RAS+ affine of every synthetic volume: where the training crops lay on average, or,
        for a plan never placed, centred on the world origin."""
        if self.output_affine is not None:
            return np.asarray(self.output_affine, dtype=np.float64)
        return centred_affine(self.target_shape, self.spacing)

    def placed_at(self, crop_affines: list) -> Plan:
        """This plan, with synthetic volumes centred where the training crops were centred on
        average, so that a sample overlays the training scans in a viewer."""
        shape = np.asarray(self.target_shape, dtype=np.float64)
        centre_voxel = np.array([*((shape - 1) / 2), 1.0])
        centres = [np.asarray(a, dtype=np.float64) @ centre_voxel for a in crop_affines]  # (4,) each, mm
        affine = centred_affine(self.target_shape, self.spacing, np.mean(centres, axis=0)[:3])
        return replace(self, output_affine=tuple(tuple(float(v) for v in row) for row in affine))

    def with_labels(self, values: list[int] | tuple[int, ...], names: list[str] | tuple[str, ...]) -> Plan:
        """This plan, recording the label set of its paired label maps. Labels never change how an
        image is preprocessed, so `preprocessing_key` (and every image cache key) stays the same."""
        if len(values) != len(names):
            raise PlanError(f"{len(values)} label values but {len(names)} class names")
        return replace(
            self, label_values=tuple(sorted(int(v) for v in values)), label_names=tuple(str(n) for n in names)
        )

    def with_conditions(self, columns: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> Plan:
        """This plan, recording the conditions a model is trained on and how they were scaled, so
        that `sample` takes values in the table's own units. Preprocessing does not change."""
        return replace(self, conditions=tuple(dict(c) for c in columns))

    # ---------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # A plan without labels is written exactly as before labels existed.
        for key in ("label_values", "label_names", "conditions"):
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {data.get('version')} is not supported (this medsynth reads {PLAN_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"unknown plan field(s) {', '.join(unknown)}: written by a newer medsynth?")
        for key in ("target_shape", "spacing", "window", "notes"):
            data[key] = tuple(data[key])
        if data.get("percentiles") is not None:
            data["percentiles"] = tuple(data["percentiles"])
        for key in ("label_values", "label_names", "conditions"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        if data.get("output_affine") is not None:
            data["output_affine"] = tuple(tuple(float(v) for v in row) for row in data["output_affine"])
        try:
            return cls(**data)
        except TypeError as exc:  # a required field missing
            raise PlanError(f"not a complete plan ({exc})") from None

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise PlanError(f"{path}: cannot read the plan ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise PlanError(f"{path}: not a plan (invalid JSON: {exc})") from None
        if not isinstance(data, dict):
            raise PlanError(f"{path}: not a plan (expected a JSON object)")
        try:
            return cls.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None


def _round_up(value: float, step: float = 0.05) -> float:
    return float(np.ceil(value / step - 1e-9) * step).__round__(4)


def choose_shape(
    covered_mm: Sequence[float], native_mm: Sequence[float], max_voxels: int, smallest: int = 16, largest: int = 256
) -> tuple[tuple[int, int, int], str]:
    """The power-of-two grid for a foreground of `covered_mm` at the native spacing `native_mm`
    (per axis), and why. Each axis: the power of two nearest (in log scale) to the foreground's
    extent in native voxels, so no axis is resampled by more than about 1.4x either way to fit;
    then, while the grid holds more than `max_voxels`, the axis with the most voxels per mm of
    foreground is halved (its spacing doubles). Each axis stays within [smallest, largest]."""
    voxels = np.asarray(covered_mm, dtype=np.float64) / np.asarray(native_mm, dtype=np.float64)
    shape = [int(np.clip(2 ** round(float(np.log2(max(v, 1.0)))), smallest, largest)) for v in voxels]
    natural = tuple(shape)
    while math.prod(shape) > max_voxels:
        # Halve where the grid is finest relative to the foreground, keeping the voxels near cubic.
        candidates = [i for i in range(3) if shape[i] > smallest]
        if not candidates:
            break
        axis = max(candidates, key=lambda i: (shape[i] / covered_mm[i], shape[i]))
        shape[axis] //= 2
    reason = (
        f"from the data: the foreground ({format_triple(covered_mm, 0)} mm) at the native "
        f"{format_triple(native_mm, 2)} mm is {format_triple(voxels, 0)} voxels; to powers of two: "
        f"{format_triple(natural, 0)}"
    )
    if tuple(shape) != natural:
        reason += f", halved to fit plan.max_voxels ({max_voxels:,})"
    return tuple(shape), reason  # type: ignore[return-value]


def make_plan(fingerprint: DatasetFingerprint, config: PlanConfig) -> Plan:
    """Derive the plan: modality, shape, spacing and intensity window."""
    sources = fingerprint.sources
    notes = []
    if config.modality != "auto":
        modality = config.modality
    else:
        modality = max(fingerprint.modality_counts, key=lambda m: fingerprint.modality_counts[m])
        if len(fingerprint.modality_counts) > 1:
            counts = ", ".join(f"{n} {m.upper()}" for m, n in fingerprint.modality_counts.items())
            notes.append(f"mixed modalities ({counts}); planned as {modality.upper()}")

    extents = np.asarray([f.foreground_extent_mm for f in sources], dtype=np.float64)
    covered = np.quantile(extents, config.fit_quantile, axis=0)
    if config.target_shape == "auto":
        native_axes = (
            np.asarray(config.spacing, dtype=np.float64)
            if config.spacing is not None
            else np.full(3, float(np.min(fingerprint.median_spacing)))
            if config.isotropic
            else np.asarray(fingerprint.median_spacing, dtype=np.float64)
        )
        target_shape, shape_reason = choose_shape(covered, native_axes, config.max_voxels)
    else:
        target_shape, shape_reason = tuple(int(n) for n in config.target_shape), "set in the config (plan.target_shape)"
    target = np.asarray(target_shape, dtype=np.float64)
    if config.spacing is not None:
        spacing = tuple(float(s) for s in config.spacing)
        reason = "set in the config (plan.spacing)"
    else:
        native = np.min(fingerprint.median_spacing)
        fit = covered / target
        if config.isotropic:
            finest = max(float(fit.max()), float(native))
            spacing = (_round_up(finest),) * 3
        else:
            spacing = tuple(_round_up(max(float(f), float(native))) for f in fit)
        reason = (
            f"the {format_triple(target_shape, 0)} grid covers the foreground of {config.fit_quantile:.0%} of sources "
            f"({format_triple(covered, 0)} mm), never finer than the median native spacing ({native:.2g} mm)"
        )

    if modality == "ct":
        intensity_mode, window, percentiles = "fixed", tuple(config.ct_window), None
        output_dtype = "int16"
    else:
        intensity_mode, percentiles = "percentile", tuple(config.mr_percentiles)
        if tuple(fingerprint.window_percentiles) != tuple(config.mr_percentiles):
            raise PlanError(
                f"the fingerprint's windows are at percentiles {list(fingerprint.window_percentiles)}, "
                f"not plan.mr_percentiles {list(config.mr_percentiles)}: fingerprint with the same settings"
            )
        window = fingerprint.median_window
        if window[1] <= window[0]:
            window = (window[0], window[0] + 1.0)
        dtypes = Counter(f.value_dtype for f in sources if f.modality == modality) or Counter(["float32"])
        output_dtype = dtypes.most_common(1)[0][0]
    return Plan(
        modality=modality,
        target_shape=target_shape,  # type: ignore[arg-type]
        spacing=spacing,  # type: ignore[arg-type]
        deoblique=config.deoblique,
        intensity_mode=intensity_mode,
        window=(float(window[0]), float(window[1])),
        percentiles=percentiles,  # type: ignore[arg-type]
        output_dtype=output_dtype,
        n_sources=len(sources),
        spacing_reason=reason,
        shape_reason=shape_reason,
        notes=tuple(notes),
    )
