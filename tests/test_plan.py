"""Fingerprint and plan: modality, spacing, shape and window derived from the data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import blob_volume

from medsynth.config import PlanConfig
from medsynth.io import Volume, VolumeMeta
from medsynth.plan import Plan, PlanError, fingerprint_volume, make_plan, summarise


def volume(array, spacing=(1.0, 1.0, 1.0), **meta) -> Volume:
    return Volume(array=array, affine=np.diag([*spacing, 1.0]), meta=VolumeMeta(**meta))


def ct_volume(seed=0, shape=(40, 40, 30)) -> np.ndarray:
    """Air at -1000 HU around a water-like body with bone-like specks."""
    body = blob_volume(shape, seed=seed, low=0.0, high=1.0) > 0
    rng = np.random.default_rng(seed)
    return np.where(body, 40.0 + 30 * rng.standard_normal(shape), -1000.0).astype(np.float32)


def test_ct_is_recognised_and_windowed_in_hounsfield_units():
    fingerprints = [fingerprint_volume(volume(ct_volume(s), (0.8, 0.8, 2.0)), f"ct{s}") for s in range(3)]
    assert all(f.modality == "ct" for f in fingerprints)
    plan = make_plan(summarise(fingerprints), PlanConfig(target_shape=(32, 32, 16)))
    assert plan.modality == "ct" and plan.intensity_mode == "fixed"
    assert plan.window == (-1024.0, 2048.0) and plan.output_dtype == "int16"


def test_dicom_ct_label_without_hounsfield_values_is_treated_as_mr():
    fingerprint = fingerprint_volume(volume(blob_volume(), modality="CT"), "mislabelled")
    assert fingerprint.modality == "mr"
    assert any("not Hounsfield units" in w for w in fingerprint.warnings)


def test_mr_plan_uses_per_volume_percentiles_and_the_typical_window():
    fingerprints = [fingerprint_volume(volume(blob_volume(seed=s, high=500.0 * (s + 1))), f"mr{s}") for s in range(3)]
    plan = make_plan(summarise(fingerprints), PlanConfig(target_shape=(16, 16, 16)))
    assert plan.modality == "mr" and plan.intensity_mode == "percentile"
    assert plan.percentiles == (0.5, 99.5)
    assert 0.0 <= plan.window[0] < plan.window[1] <= 1500.0


def test_spacing_covers_the_foreground_and_is_isotropic_by_default():
    # Foreground about 28 x 34 x 22 voxels of 2 mm: 56 x 67 x 45 mm; a 16-voxel grid needs ~4.2 mm.
    fingerprints = [
        fingerprint_volume(volume(blob_volume((40, 48, 32), seed=s), (2.0, 2.0, 2.0)), f"v{s}") for s in range(4)
    ]
    plan = make_plan(summarise(fingerprints), PlanConfig(target_shape=(16, 16, 16), fit_quantile=1.0))
    extent = np.max([f.foreground_extent_mm for f in fingerprints], axis=0)
    assert len(set(plan.spacing)) == 1
    assert plan.spacing[0] * 16 >= extent.max()
    assert plan.spacing[0] * 16 < extent.max() + 16 * 0.05 + 1e-6  # and no coarser than needed
    anisotropic = make_plan(
        summarise(fingerprints), PlanConfig(target_shape=(16, 16, 16), isotropic=False, fit_quantile=1.0)
    )
    assert anisotropic.spacing[1] > anisotropic.spacing[2]


def test_non_cubic_shape_and_fixed_spacing():
    fingerprints = [fingerprint_volume(volume(blob_volume()), "v")]
    plan = make_plan(summarise(fingerprints), PlanConfig(target_shape=(128, 128, 64), spacing=(1.0, 1.0, 2.5)))
    assert plan.target_shape == (128, 128, 64) and plan.spacing == (1.0, 1.0, 2.5)
    assert "set in the config" in plan.spacing_reason


def test_never_finer_than_native_spacing():
    fingerprints = [fingerprint_volume(volume(blob_volume((20, 20, 20)), (3.0, 3.0, 3.0)), "v")]
    plan = make_plan(summarise(fingerprints), PlanConfig(target_shape=(256, 256, 256)))
    assert plan.spacing == (3.0, 3.0, 3.0)


def test_outliers_are_flagged():
    fingerprints = [fingerprint_volume(volume(blob_volume(seed=s)), f"v{s}") for s in range(4)]
    fingerprints.append(fingerprint_volume(volume(blob_volume(seed=9, high=1e6)), "bright"))
    fingerprints.append(fingerprint_volume(volume(blob_volume(seed=1)), "copy-of-v1"))
    fingerprints.append(fingerprint_volume(volume(blob_volume(seed=2), (4.0, 4.0, 4.0)), "coarse"))
    outliers = dict(summarise(fingerprints).outliers)
    assert "intensity scale" in outliers["bright"]
    assert "the same voxels as v1" in outliers["copy-of-v1"]
    assert "spacing" in outliers["coarse"]
    assert "v0" not in outliers


def test_plan_json_round_trip_and_key(tmp_path):
    fingerprints = [fingerprint_volume(volume(blob_volume()), "v")]
    plan = make_plan(summarise(fingerprints), PlanConfig(target_shape=(32, 32, 16)))
    path = plan.save(tmp_path / "plan.json")
    loaded = Plan.load(path)
    assert loaded == plan and loaded.preprocessing_key() == plan.preprocessing_key()
    other = make_plan(summarise(fingerprints), PlanConfig(target_shape=(32, 32, 32)))
    assert other.preprocessing_key() != plan.preprocessing_key()
    data = json.loads(path.read_text())
    data["version"] = 99
    with pytest.raises(PlanError, match="version 99"):
        Plan.from_dict(data)


def test_no_sources_is_a_plan_error():
    with pytest.raises(PlanError):
        summarise([])


@pytest.mark.slow  # test_cli's IXI inspect checks the same plan by default
@pytest.mark.realdata
def test_real_ixi_plan(shared_data):
    from medsynth.config import Config
    from medsynth.pipeline import fingerprint_folder

    found = fingerprint_folder(shared_data / "train" / "ixi-t1", Config())
    assert len(found.sources) == 139 and not found.fingerprint.outliers
    plan = make_plan(found.fingerprint, PlanConfig())
    assert plan.modality == "mr" and plan.target_shape == (64, 64, 64)
    # The 64³ grid must hold a whole head (about 180 x 230 x 215 mm) at a few mm per voxel.
    assert 3.0 <= plan.spacing[0] <= 4.0


def test_the_grid_comes_from_the_data_when_no_shape_is_given():
    from medsynth.plan import choose_shape

    # Small crops get a small grid, each axis the nearest power of two: not a padded 64³.
    assert choose_shape([36, 50, 36], [1.0] * 3, 64**3)[0] == (32, 64, 32)
    assert choose_shape([64, 64, 64], [2.3] * 3, 64**3)[0] == (32, 32, 32)  # 28³ crops at 2.3 mm
    # A whole head at ~1 mm would be 256³: halved, finest axis first, until it fits the budget.
    shape, reason = choose_shape([150, 200, 190], [0.94] * 3, 64**3)
    assert shape == (64, 64, 64) and "halved to fit plan.max_voxels" in reason
    assert choose_shape([150, 200, 190], [0.94] * 3, 128**3)[0] == (128, 128, 128)
    # Never below 16 or above 256 on an axis; the budget is never exceeded otherwise.
    assert choose_shape([5, 5, 5], [1.0] * 3, 64**3)[0] == (16, 16, 16)
    assert choose_shape([2000, 300, 300], [1.0] * 3, 10**9)[0][0] == 256
    for extent in ([300, 300, 120], [90, 400, 60], [30, 30, 900]):
        assert np.prod(choose_shape(extent, [0.7, 0.7, 5.0], 64**3)[0]) <= 64**3


def test_an_auto_plan_says_why_and_an_explicit_shape_still_wins():
    # Crops like the hippocampus set's: a foreground of about 36 x 50 x 36 mm at 1 mm.
    crops = [fingerprint_volume(volume(blob_volume((52, 72, 52), seed=s)), f"crop{s}") for s in range(3)]
    fingerprint = summarise(crops)
    auto = make_plan(fingerprint, PlanConfig())
    assert auto.target_shape == (32, 64, 32) and "from the data" in auto.shape_reason
    # The spacing rule then fits the foreground into that grid (never finer than native).
    extent = np.quantile([f.foreground_extent_mm for f in crops], 0.9, axis=0)
    assert np.all(np.asarray(auto.spacing) * auto.target_shape >= extent)
    explicit = make_plan(fingerprint, PlanConfig(target_shape=(64, 64, 64)))
    assert explicit.target_shape == (64, 64, 64) and "plan.target_shape" in explicit.shape_reason
