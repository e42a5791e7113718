"""Label maps paired with images: the pairing rule and dataset layouts, nearest-neighbour
preprocessing that never invents a value, the cache, the plan's label set, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import CONFIGS, blob_labels, blob_volume, rotation, write_labelled_folders, write_nifti
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medsynth.config import load_config
from medsynth.data import CachedVolumeDataset
from medsynth.io import Volume
from medsynth.io.labels import DECATHLON, NNUNET, PairingError, find_label_maps
from medsynth.pipeline import fingerprint_folder, prepare_dataset, prepare_pair
from medsynth.plan import Plan
from medsynth.preprocess import resample_label, resample_label_to_grid


def small_config(*overrides: str):
    return load_config(None, ["plan.target_shape=[16,16,16]", "cache.workers=1", *overrides])


def labelled_config(labels, *overrides: str):
    return small_config(f"labels.dir={labels}", *overrides)


def a_plan(shape=(32, 32, 32), spacing=(1.0, 1.0, 1.0), deoblique=True) -> Plan:
    return Plan(
        modality="mr",
        target_shape=shape,
        spacing=spacing,
        deoblique=deoblique,
        intensity_mode="percentile",
        window=(0.0, 1000.0),
        percentiles=(0.5, 99.5),
        output_dtype="float32",
        n_sources=1,
    )


# ---------------------------------------------------------------------------------------------
# Pairing


@pytest.mark.parametrize("label_name", ["a.nii.gz", "a_seg.nii.gz", "a_label.nii.gz", "a_labels.nii", "a_mask.nrrd"])
def test_an_image_pairs_with_its_name_or_its_name_and_a_label_suffix(tmp_path, label_name):
    image = blob_volume((8, 8, 8))
    write_nifti(tmp_path / "scans" / "a.nii.gz", image)
    write_nifti(tmp_path / "scans" / "b.nii.gz", image)
    if label_name.endswith(".nrrd"):
        import SimpleITK as sitk

        (tmp_path / "labels").mkdir()
        sitk.WriteImage(sitk.GetImageFromArray(blob_labels(image).T.copy()), str(tmp_path / "labels" / label_name))
    else:
        write_nifti(tmp_path / "labels" / label_name, blob_labels(image), dtype=np.uint8)
    found = find_label_maps(tmp_path / "scans", tmp_path / "labels")
    assert found.labels["a.nii.gz"].name == f"labels/{label_name}"
    assert "b.nii.gz" in found.unlabeled and "no label map" in found.unlabeled["b.nii.gz"]


def test_two_label_maps_for_one_image_is_an_error_naming_both(tmp_path):
    scans, labels = write_labelled_folders(tmp_path, n=1)
    write_nifti(labels / "scan0_mask.nii.gz", np.zeros((20, 24, 16)), np.diag([1.5, 1.5, 2.0, 1.0]), dtype=np.uint8)
    with pytest.raises(PairingError, match="scan0_mask.nii.gz") as caught:
        find_label_maps(scans, labels)
    assert "scan0_seg.nii.gz" in str(caught.value) and "\n" not in str(caught.value)


def test_labels_without_images_are_listed_and_labels_beside_images_are_not_images(tmp_path):
    scans, labels = write_labelled_folders(tmp_path, n=2)
    write_nifti(labels / "orphan_seg.nii.gz", np.zeros((20, 24, 16)), dtype=np.uint8)
    found = find_label_maps(scans, labels)
    assert [s.name for s in found.skipped] == ["labels/orphan_seg.nii.gz"]
    assert "no image of its name" in found.skipped[0].reason

    # Images and label maps side by side in one folder: the label maps are not taken as images.
    for path in labels.iterdir():
        path.rename(scans / path.name)
    found = find_label_maps(scans, scans)
    assert sorted(found.labels) == ["scan0.nii.gz", "scan1.nii.gz"]
    assert sorted(s.name for s in found.images.sources) == ["orphan_seg.nii.gz", "scan0.nii.gz", "scan1.nii.gz"]


def test_nnunet_v2_layout_pairs_channel_0000_and_names_the_classes(tmp_path):
    root = tmp_path / "Dataset004_Hippocampus"
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for case in ("hippo_001", "hippo_002"):
        image = blob_volume((20, 24, 16))
        write_nifti(root / "imagesTr" / f"{case}_0000.nii.gz", image, affine)
        write_nifti(root / "imagesTr" / f"{case}_0001.nii.gz", image * 2, affine)
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", blob_labels(image), affine, dtype=np.uint8)
    write_nifti(root / "imagesTs" / "hippo_009_0000.nii.gz", blob_volume((20, 24, 16)), affine)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T1", "1": "FLAIR"},
                "labels": {"background": 0, "anterior": 1, "posterior": 2},
                "numTraining": 2,
                "file_ending": ".nii.gz",
            }
        )
    )
    found = find_label_maps(root, None)
    assert found.layout == NNUNET
    assert sorted(found.labels) == ["imagesTr/hippo_001_0000.nii.gz", "imagesTr/hippo_002_0000.nii.gz"]
    assert found.labels["imagesTr/hippo_001_0000.nii.gz"].name == "labelsTr/hippo_001.nii.gz"
    assert found.class_names == {0: "background", 1: "anterior", 2: "posterior"}
    assert any("channel _0000 (T1) only" in note and "FLAIR" in note for note in found.notes)

    fingerprinted = fingerprint_folder(root, small_config())
    assert fingerprinted.label_set() == ((0, 1, 2), ("background", "anterior", "posterior"))
    assert len(fingerprinted.sources) == 2  # imagesTs and the _0001 channel are not training images


def test_labels_names_setting_names_the_classes_over_dataset_json(tmp_path):
    image = blob_volume((8, 8, 8))
    for case in ("a", "b"):
        write_nifti(tmp_path / "scans" / f"{case}.nii.gz", image)
        write_nifti(tmp_path / "labels" / f"{case}.nii.gz", blob_labels(image), dtype=np.uint8)
    unnamed = fingerprint_folder(tmp_path / "scans", labelled_config(tmp_path / "labels"))
    assert unnamed.label_set() == ((0, 1, 2), ("background", "label_1", "label_2"))
    named = fingerprint_folder(
        tmp_path / "scans", labelled_config(tmp_path / "labels", 'labels.names=["2=posterior", "1 = anterior"]')
    )
    assert named.label_set() == ((0, 1, 2), ("background", "anterior", "posterior"))


@pytest.mark.parametrize("names", ['["anterior"]', '["-1=x"]', '["1="]', '["1=a", "1=b"]'])
def test_labels_names_that_are_not_value_equals_name_are_a_config_error(names):
    from medsynth.config import ConfigError

    with pytest.raises(ConfigError, match="labels.names"):
        small_config(f"labels.names={names}")


def test_decathlon_layout_pairs_its_training_list(tmp_path):
    root = tmp_path / "Task04_Hippocampus"
    for case in ("hippocampus_001", "hippocampus_003"):
        image = blob_volume((20, 24, 16))
        write_nifti(root / "imagesTr" / f"{case}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", blob_labels(image), dtype=np.uint8)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
                "training": [
                    {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                    for c in ("hippocampus_001", "hippocampus_003")
                ],
            }
        )
    )
    found = find_label_maps(root, None)
    assert found.layout == DECATHLON and found.class_names[2] == "Posterior"
    assert found.labels["imagesTr/hippocampus_003.nii.gz"].name == "labelsTr/hippocampus_003.nii.gz"
    prepared = prepare_dataset(root, small_config())
    assert prepared.plan.label_values == (0, 1, 2)
    assert prepared.plan.label_names == ("background", "Anterior", "Posterior")


# ---------------------------------------------------------------------------------------------
# Preprocessing


def _label_volume(draw_shape, seed):
    rng = np.random.default_rng(seed)
    values = rng.choice([0, 1, 3, 7, 200], size=3, replace=False)
    return rng.choice(values, size=draw_shape).astype(np.uint8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(*[st.integers(4, 12)] * 3),
    spacing=st.tuples(*[st.sampled_from([0.7, 1.0, 2.5])] * 3),
    angles=st.tuples(*[st.sampled_from([0.0, 13.0, 45.0, 180.0])] * 3),
    target=st.sampled_from([0.4, 1.0, 1.7, 4.0]),
    deoblique=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_label_values_never_grow_through_resampling(shape, spacing, angles, target, deoblique, seed):
    labels = _label_volume(shape, seed)
    affine = np.eye(4)
    affine[:3, :3] = rotation(*angles) @ np.diag(spacing)
    resampled, _ = resample_label(labels, affine, (target, target * 1.3, target), deoblique=deoblique)
    assert set(np.unique(resampled)) <= set(np.unique(labels)) | {0}
    assert resampled.dtype == np.uint8


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(*[st.integers(5, 14)] * 3),
    flips=st.tuples(*[st.sampled_from([1.0, -1.0])] * 3),
    permutation=st.permutations([0, 1, 2]),
    native=st.sampled_from([1.0, 2.0]),
    upsample=st.sampled_from([1, 2]),
    seed=st.integers(0, 1000),
)
def test_a_label_map_survives_the_round_trip_to_the_model_grid_and_back(
    shape, flips, permutation, native, upsample, seed
):
    """Stored in any axis order, at the plan's spacing or an integer multiple of it, and inside the
    model's field of view: back on its own grid, every voxel has its own value again."""
    labels = _label_volume(shape, seed)
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3)[:, list(permutation)] * np.asarray(flips) * native
    image = Volume(blob_volume(shape, seed=seed), affine)
    plan = a_plan(shape=(32, 32, 32), spacing=(native / upsample,) * 3)
    _, on_model_grid, model_affine, _ = prepare_pair(image, labels, plan)
    assert on_model_grid.shape == (32, 32, 32)
    back = resample_label_to_grid(on_model_grid, model_affine, affine, shape)
    np.testing.assert_array_equal(back, labels)


def test_downsampling_a_label_map_never_smooths_it():
    """A fine checkerboard of 1 and 3 becomes 1s and 3s, never the 2 that averaging would give."""
    labels = (np.indices((16, 16, 16)).sum(axis=0) % 2 * 2 + 1).astype(np.uint8)
    small, _ = resample_label(labels, np.eye(4), (3.3, 3.3, 3.3))
    assert set(np.unique(small)) <= {1, 3}


@pytest.mark.parametrize("angles", [(0, 0, 0), (0, 0, 30), (20, 10, 0)])
def test_a_label_drawn_on_the_bright_blob_stays_on_it(angles):
    image = blob_volume((30, 36, 24), high=1000.0)
    affine = np.eye(4)
    affine[:3, :3] = rotation(*angles) @ np.diag([1.2, 1.0, 2.0])
    affine[:3, 3] = [-20.0, 13.0, 7.0]
    labels = (image > 0).astype(np.uint8)
    array, on_grid, _, _ = prepare_pair(Volume(image, affine), labels, a_plan(shape=(32, 32, 32), spacing=(1.5,) * 3))
    bright = array > -0.5  # the blob's texture is at 60-100% of its brightness; background is -1
    overlap = 2 * (bright & (on_grid == 1)).sum() / (bright.sum() + (on_grid == 1).sum())
    assert overlap > 0.9, overlap


# ---------------------------------------------------------------------------------------------
# Cache, plan, dataset


def test_label_maps_are_cached_beside_their_images_and_reused(tmp_path):
    scans, labels = write_labelled_folders(tmp_path)
    first = prepare_dataset(scans, labelled_config(labels), tmp_path / "cache")
    assert first.built == 3 and first.plan.label_values == (0, 1, 2)
    assert first.plan.label_names == ("background", "label_1", "label_2")
    for entry in first.entries:
        on_grid = np.load(entry.label_path)
        assert on_grid.dtype == np.uint8 and on_grid.shape == (16, 16, 16)
        assert entry.label_values == tuple(np.unique(on_grid)) and entry.label_name.startswith("labels/scan")
    again = prepare_dataset(scans, labelled_config(labels), tmp_path / "cache")
    assert again.built == 0 and [e.label_key for e in again.entries] == [e.label_key for e in first.entries]
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "manifests").iterdir()]
    assert all(entry["label_path"] for entry in manifests[0]["entries"])

    # Labels change nothing about the images: the same image keys, and a plan without labels is
    # written as before labels existed.
    plain = prepare_dataset(scans, small_config(), tmp_path / "cache")
    assert plain.built == 0 and [e.key for e in plain.entries] == [e.key for e in first.entries]
    assert "label_values" not in plain.plan.to_dict() and "label_path" not in plain.manifest()["entries"][0]
    assert plain.plan.preprocessing_key() == first.plan.preprocessing_key()

    # A changed label map is rebuilt; its image is not.
    write_nifti(labels / "scan1_seg.nii.gz", np.zeros((20, 24, 16)), np.diag([1.5, 1.5, 2.0, 1.0]), dtype=np.uint8)
    changed = prepare_dataset(scans, labelled_config(labels), tmp_path / "cache")
    assert [e.key for e in changed.entries] == [e.key for e in first.entries]
    assert [e.label_key == f.label_key for e, f in zip(changed.entries, first.entries)] == [True, False, True]


def test_plan_round_trips_its_label_set_and_old_plans_still_load():
    plan = a_plan().with_labels([0, 1, 2], ["background", "a", "b"])
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    old = a_plan().to_dict()
    assert "label_values" not in old and Plan.from_dict(old).label_values is None


def test_runs_saved_before_labels_existed_still_resume():
    """A checkpoint's config from before the labels section has none: nothing may differ from today's defaults."""
    from medsynth.config import Config, config_to_dict
    from medsynth.runs import config_differences

    saved = config_to_dict(Config())
    del saved["labels"]
    assert config_differences(saved, Config()) == []


def test_the_dataset_serves_label_maps_flipped_with_their_volumes(tmp_path):
    from medsynth.config import AugmentConfig

    scans, labels = write_labelled_folders(tmp_path, n=2)
    entries = prepare_dataset(scans, labelled_config(labels), tmp_path / "cache").entries
    paths, label_paths = [e.path for e in entries], [e.label_path for e in entries]
    plain = CachedVolumeDataset(paths, label_paths=label_paths)
    flipped = CachedVolumeDataset(paths, AugmentConfig(flip_axes=(0,), flip_probability=1.0), label_paths=label_paths)
    volume, label_map = plain[0]
    assert volume.shape == label_map.shape == (1, 16, 16, 16) and label_map.dtype == np.uint8
    flipped_volume, flipped_labels = flipped[0]
    np.testing.assert_array_equal(flipped_volume, volume[:, ::-1])
    np.testing.assert_array_equal(flipped_labels, label_map[:, ::-1])
    assert isinstance(CachedVolumeDataset(paths)[0], np.ndarray)  # without labels, as before


# ---------------------------------------------------------------------------------------------
# Bad input, through the command line: one line naming the file, no traceback, nothing written


def _write_bad_label(labels, kind):
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    good = blob_labels(blob_volume((20, 24, 16), seed=1, high=900))
    if kind == "shape":
        write_nifti(labels / "scan1_seg.nii.gz", good[:, :, :15], affine, dtype=np.uint8)
    elif kind == "affine":
        moved = affine.copy()
        moved[:3, 3] = [0.0, 0.0, 2.0]
        write_nifti(labels / "scan1_seg.nii.gz", good, moved, dtype=np.uint8)
    elif kind == "fraction":
        write_nifti(labels / "scan1_seg.nii.gz", good * 0.5, affine, dtype=np.float32)
    elif kind == "negative":
        write_nifti(labels / "scan1_seg.nii.gz", good.astype(np.int16) - 1, affine, dtype=np.int16)
    elif kind == "image":
        write_nifti(
            labels / "scan1_seg.nii.gz", np.arange(20 * 24 * 16).reshape(20, 24, 16) % 500, affine, dtype=np.int16
        )
    elif kind == "missing":
        (labels / "scan1_seg.nii.gz").unlink()


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("shape", "its shape 20×24×15 differs from its image's 20×24×16"),
        ("affine", "2 mm away from its image"),
        ("fraction", "non-integer values (e.g. 0.5)"),
        ("negative", "negative values (down to -1)"),
        ("image", "500 distinct values"),
        ("missing", "no label map of its name"),
    ],
)
def test_bad_label_maps_stop_training_with_one_line(run_cli, tmp_path, kind, reason):
    scans, labels = write_labelled_folders(tmp_path)
    _write_bad_label(labels, kind)
    run = tmp_path / "run"
    code, out, err = run_cli("train", scans, "--labels", labels, "-o", run, "-c", CONFIGS / "tiny.yaml")
    assert code == 1 and "Traceback" not in out + err
    [line] = [line for line in err.splitlines() if line.startswith("error")]
    assert "scan1" in line and reason in line and "labels.unlabeled=skip" in line, line
    assert not run.exists() or not any(run.iterdir())  # nothing half-written

    # inspect lists the problem, and says what train would do.
    code, out, err = run_cli("inspect", scans, "--labels", labels, "--set", "plan.target_shape=[16,16,16]")
    assert code == 0 and "2 of 3 images paired" in out and reason.split(" (")[0] in " ".join(out.split())
    assert "train would refuse" in out


def test_ambiguous_labels_are_one_line(run_cli, tmp_path):
    scans, labels = write_labelled_folders(tmp_path, n=2)
    write_nifti(labels / "scan0.nii.gz", np.zeros((20, 24, 16)), dtype=np.uint8)
    code, out, err = run_cli("inspect", scans, "--labels", labels)
    assert code == 1 and "Traceback" not in out + err
    [line] = [line for line in err.splitlines() if line.startswith("error")]
    assert "scan0.nii.gz" in line and "scan0_seg.nii.gz" in line


def test_unlabeled_images_are_skipped_on_request_and_the_rest_train_as_pairs(run_cli, tmp_path):
    scans, labels = write_labelled_folders(tmp_path, n=3)
    write_nifti(scans / "extra.nii.gz", blob_volume((20, 24, 16), seed=5), np.diag([1.5, 1.5, 2.0, 1.0]))
    run = tmp_path / "run"
    code, out, err = run_cli(
        "train", scans, "--labels", labels, "-o", run, "-c", CONFIGS / "tiny.yaml",
        "--set", "labels.unlabeled=skip", "--max-steps", "1",
    )  # fmt: skip
    assert code == 0, err
    assert "with label maps of 3 classes (values 0, 1, 2)" in out + err
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(manifest["entries"]) == 3 and all(e["label_path"] for e in manifest["entries"])
    assert [s["name"] for s in manifest["skipped"]] == ["extra.nii.gz"]
    assert Plan.load(run / "plan.json").label_values == (0, 1, 2)


def test_inspect_shows_the_pairing_as_text_and_json(run_cli, tmp_path):
    scans, labels = write_labelled_folders(tmp_path, n=2)
    write_nifti(labels / "orphan_seg.nii.gz", np.zeros((20, 24, 16)), dtype=np.uint8)
    code, out, _ = run_cli("inspect", scans, "--labels", labels, "--json")
    report = json.loads(out)
    assert code == 0 and [p["values"] for p in report["labels"]["pairs"]] == [[0, 1, 2], [0, 1, 2]]
    assert report["plan"]["label_values"] == [0, 1, 2]
    assert any(s["name"] == "labels/orphan_seg.nii.gz" for s in report["skipped"])
    code, out, _ = run_cli("inspect", scans, "--labels", labels)
    assert code == 0 and "Labels: 2 of 2 images paired" in out and "0 background, 1 label_1, 2 label_2" in out


@pytest.mark.realdata
def test_real_hippocampus_label_set_survives_preprocessing(shared_data, tmp_path):
    names = sorted(p.name for p in (shared_data / "train" / "hippocampus").iterdir())[:4]
    for name in names:
        for folder, target in (("hippocampus", "scans"), ("hippocampus-labels", "labels")):
            (tmp_path / target).mkdir(exist_ok=True)
            (tmp_path / target / name).symlink_to(shared_data / "train" / folder / name)
    config = load_config(CONFIGS / "hippocampus-32.yaml", [f"labels.dir={tmp_path / 'labels'}", "cache.workers=1"])
    prepared = prepare_dataset(tmp_path / "scans", config, tmp_path / "cache")
    assert len(prepared.entries) == 4 and prepared.plan.label_values == (0, 1, 2)
    for entry in prepared.entries:
        assert set(np.unique(np.load(entry.label_path))) == {0, 1, 2}, entry.name


def test_runs_saved_before_a_setting_existed_resume_at_its_default_but_not_at_another_value():
    from medsynth.config import Config, config_to_dict, load_config
    from medsynth.runs import config_differences

    saved = config_to_dict(Config())
    del saved["model"]["condition_generator"], saved["train"]["check_memory"], saved["plan"]["max_voxels"]
    assert config_differences(saved, Config()) == []
    changed = load_config(None, ["model.condition_generator=batchnorm"])
    assert config_differences(saved, changed) == ["model.condition_generator: None -> 'batchnorm'"]
