"""The cache: built once in parallel, reused, rebuilt only for what changed; the Dataset over it."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import blob_volume, rotation, write_nifti

from medsynth.config import AugmentConfig, Config, load_config
from medsynth.data import CachedVolumeDataset
from medsynth.io import Volume
from medsynth.pipeline import prepare_dataset, prepare_volume


def small_config(*overrides: str) -> Config:
    return load_config(None, ["plan.target_shape=[16,16,16]", *overrides])


def make_folder(folder, n=4):
    for seed in range(n):
        write_nifti(
            folder / f"scan{seed}.nii.gz",
            blob_volume((20, 24, 16), seed=seed, high=800 + 100 * seed),
            np.diag([1.5, 1.5, 2.0, 1.0]),
        )
    return folder


def test_prepared_volumes_have_the_plan_shape_and_range(tmp_path):
    prepared = prepare_dataset(make_folder(tmp_path / "scans"), small_config(), tmp_path / "cache")
    assert len(prepared.entries) == 4 and prepared.built == 4
    for entry in prepared.entries:
        array = np.load(entry.path, mmap_mode="r")
        assert array.shape == (16, 16, 16) and array.dtype == np.float32
        assert -1.0 <= array.min() and array.max() <= 1.0 and array.max() > 0.5
        assert entry.window[1] > entry.window[0]


def test_warm_cache_rebuilds_nothing_and_changes_rebuild_only_what_changed(tmp_path):
    folder = make_folder(tmp_path / "scans")
    cache = tmp_path / "cache"
    first = prepare_dataset(folder, small_config(), cache)
    again = prepare_dataset(folder, small_config(), cache)
    assert again.built == 0 and [e.key for e in again.entries] == [e.key for e in first.entries]
    # Change one file's content: only that volume is redone.
    write_nifti(folder / "scan2.nii.gz", blob_volume((20, 24, 16), seed=42, high=1000), np.diag([1.5, 1.5, 2.0, 1.0]))
    changed = prepare_dataset(folder, small_config(), cache)
    assert changed.built == 1
    assert [e.key == f.key for e, f in zip(changed.entries, first.entries)] == [True, True, False, True]
    # A different plan is a different cache.
    replanned = prepare_dataset(folder, small_config("plan.target_shape=[32,16,16]"), cache)
    assert replanned.built == 4


def test_cache_is_content_addressed_not_path_addressed(tmp_path):
    folder = make_folder(tmp_path / "scans", n=2)
    cache = tmp_path / "cache"
    prepare_dataset(folder, small_config("plan.spacing=[2,2,2]"), cache)
    (folder / "scan0.nii.gz").rename(folder / "renamed.nii.gz")
    moved = prepare_dataset(folder, small_config("plan.spacing=[2,2,2]"), cache)
    assert moved.built == 0 and {e.name for e in moved.entries} == {"renamed.nii.gz", "scan1.nii.gz"}


def test_parallel_workers_give_the_same_arrays(tmp_path):
    folder = make_folder(tmp_path / "scans", n=4)
    serial = prepare_dataset(folder, small_config("cache.workers=1"), tmp_path / "c1")
    parallel = prepare_dataset(folder, small_config("cache.workers=2"), tmp_path / "c2")
    for a, b in zip(serial.entries, parallel.entries):
        np.testing.assert_array_equal(np.load(a.path), np.load(b.path))


def test_unreadable_volume_at_preprocess_time_is_skipped_not_fatal(tmp_path):
    folder = make_folder(tmp_path / "scans", n=3)
    array = blob_volume((20, 24, 16))
    array[0, 0, 0] = np.nan
    write_nifti(folder / "nan.nii.gz", array)
    prepared = prepare_dataset(folder, small_config(), tmp_path / "cache")
    assert len(prepared.entries) == 3
    assert any(s.name == "nan.nii.gz" and "NaN" in s.reason for s in prepared.skipped)


def test_prepare_volume_keeps_world_geometry(tmp_path):
    """An oblique scan is resampled onto RAS axes at the plan's spacing, centred on its foreground."""
    from medsynth.plan import fingerprint_volume, make_plan, summarise

    affine = np.eye(4)
    affine[:3, :3] = rotation(0, 0, 30) @ np.diag([-1.0, 1.0, 1.5])
    affine[:3, 3] = [40, -20, 10]
    source = Volume(blob_volume((30, 30, 20)), affine)
    plan = make_plan(summarise([fingerprint_volume(source, "v")]), small_config().plan)
    array, out_affine, window = prepare_volume(source, plan)
    assert array.shape == (16, 16, 16)
    np.testing.assert_allclose(out_affine[:3, :3], np.diag(plan.spacing), atol=1e-9)  # RAS axes
    # The foreground centre in the output is near the world centre of the input's blob.
    centre_in = affine @ np.array([14.5, 14.5, 9.5, 1.0])
    centre_out = out_affine @ np.array([7.5, 7.5, 7.5, 1.0])
    assert np.linalg.norm(centre_in[:3] - centre_out[:3]) < 2 * plan.spacing[0]


def test_dataset_items_and_deterministic_augmentation(tmp_path):
    prepared = prepare_dataset(make_folder(tmp_path / "scans"), small_config(), tmp_path / "cache")
    paths = [e.path for e in prepared.entries]
    augment = AugmentConfig(flip_axes=(0,), flip_probability=0.5, intensity_jitter=0.1)
    dataset = CachedVolumeDataset(paths, augment, seed=7)
    item = dataset[1]
    assert item.shape == (1, 16, 16, 16) and item.dtype == np.float32
    assert -1.0 <= item.min() and item.max() <= 1.0
    again = CachedVolumeDataset(paths, augment, seed=7)[1]
    np.testing.assert_array_equal(item, again)  # same (seed, epoch, index): same augmentation
    flipping = CachedVolumeDataset(paths, AugmentConfig(flip_axes=(0,)), seed=7)
    flips = set()
    for epoch in range(12):
        flipping.set_epoch(epoch)
        flips.add(bool(np.array_equal(flipping[1][0], np.flip(np.load(paths[1]), axis=0))))
    assert flips == {True, False}  # some epochs flipped, some not
    plain = CachedVolumeDataset(paths)[1]
    np.testing.assert_array_equal(plain[0], np.load(paths[1]))


def test_dataset_works_with_torch_dataloader(tmp_path):
    import torch

    prepared = prepare_dataset(make_folder(tmp_path / "scans"), small_config(), tmp_path / "cache")
    loader = torch.utils.data.DataLoader(CachedVolumeDataset([e.path for e in prepared.entries]), batch_size=2)
    batch = next(iter(loader))
    assert batch.shape == (2, 1, 16, 16, 16) and batch.dtype == torch.float32


@pytest.mark.realdata
def test_real_hippocampus_scales_are_normalised(shared_data, tmp_path):
    """Hippocampus files differ in intensity scale by orders of magnitude; all end up in [-1, 1]
    with similar foreground statistics."""
    prepared = prepare_dataset(
        shared_data / "train" / "hippocampus", load_config(None, ["plan.target_shape=[32,32,32]"]), tmp_path / "cache"
    )
    assert len(prepared.entries) == 196
    medians = [float(np.median(np.load(e.path)[np.load(e.path) > -0.9])) for e in prepared.entries[:40]]
    assert np.std(medians) < 0.2
