"""The nnU-Net v2 raw dataset export: what it writes, what the verifier catches, re-runs and refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import write_nifti

from medsynth.errors import MedsynthError, UsageError
from medsynth.nnunet import (
    NnUNetRawWriter,
    channel_name_for_modality,
    dataset_folder_name,
    scan_cases,
    verify_nnunet_dataset,
)

SHAPE = (6, 7, 5)  # (X, Y, Z): tiny, so a case writes in milliseconds
AFFINE = np.array(
    [[0.0, 0.0, 2.5, -10.0], [-1.5, 0.0, 0.0, 20.0], [0.0, 1.5, 0.0, -5.0], [0.0, 0.0, 0.0, 1.0]]
)  # a permuted, flipped, anisotropic grid: a lost or transposed affine would show


def pair(seed: int, values=(0, 1, 2)) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) float32 image in HU-like units and an (X, Y, Z) label map using every value of `values`."""
    rng = np.random.default_rng(seed)
    image = rng.normal(40.0, 300.0, SHAPE).astype(np.float32)
    labels = np.asarray(values)[np.arange(np.prod(SHAPE)) % len(values)].reshape(SHAPE)
    return image, labels


def make_writer(root: Path, **overrides) -> NnUNetRawWriter:
    settings = {
        "dataset_id": 501,
        "dataset_name": "SynthHippo",
        "channel_name": "CT",
        "label_values": (0, 1, 2),
        "label_names": ("background", "anterior", "posterior"),
    } | overrides
    return NnUNetRawWriter(root, **settings)


def export(root: Path, n: int = 2, **overrides):
    writer = make_writer(root, **overrides)
    values = tuple(overrides.get("label_values", (0, 1, 2)))
    for i in range(n):
        writer.add_case(f"synth_{i:03d}", *pair(i, values), AFFINE)
    return writer.finish()


def dataset_json(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


def test_written_dataset_has_nnunet_layout_and_passes_the_verifier(tmp_path):
    import nibabel as nib

    result = export(tmp_path, n=2)
    folder = tmp_path / "Dataset501_SynthHippo"
    assert result.folder == folder and result.num_training == 2
    assert result.written == ("synth_000", "synth_001") and result.skipped == () and result.incomplete == ()
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["synth_000_0000.nii.gz", "synth_001_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == ["synth_000.nii.gz", "synth_001.nii.gz"]
    data = dataset_json(folder)
    assert data["channel_names"] == {"0": "CT"}
    assert data["labels"] == {"background": 0, "anterior": 1, "posterior": 2}
    assert data["numTraining"] == 2 and data["file_ending"] == ".nii.gz"
    assert data["medsynth"]["synthetic"] is True
    assert verify_nnunet_dataset(folder) == []

    image, labels = pair(0)
    written_image = nib.load(folder / "imagesTr" / "synth_000_0000.nii.gz")
    written_labels = nib.load(folder / "labelsTr" / "synth_000.nii.gz")
    assert written_image.get_data_dtype() == np.float32 and written_labels.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written_image.get_fdata(), image, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(written_labels.dataobj), labels)
    for written in (written_image, written_labels):
        np.testing.assert_allclose(written.affine, AFFINE, atol=1e-5)
        assert int(written.header["sform_code"]) == 1 and int(written.header["qform_code"]) == 1
        assert b"SYNTHETIC" in bytes(written.header["descrip"])


def test_simpleitk_sees_one_grid_for_image_and_labels(tmp_path):
    """nnU-Net reads .nii.gz with SimpleITK (its SimpleITKIO): spacing must match (an error there),
    origin and direction too (a warning), and the voxels must be the ones written."""
    import SimpleITK as sitk

    folder = export(tmp_path, n=1).folder
    image = sitk.ReadImage(str(folder / "imagesTr" / "synth_000_0000.nii.gz"))
    labels = sitk.ReadImage(str(folder / "labelsTr" / "synth_000.nii.gz"))
    for read in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(image, read)(), getattr(labels, read)(), atol=1e-6)
    np.testing.assert_allclose(image.GetSpacing(), (1.5, 1.5, 2.5), atol=1e-6)
    # SimpleITK's arrays are (Z, Y, X); ours (X, Y, Z).
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels).transpose(2, 1, 0), pair(0)[1])


def test_integer_images_keep_their_dtype(tmp_path):
    import nibabel as nib

    writer = make_writer(tmp_path)
    image, labels = pair(0)
    writer.add_case("ct_hu", np.round(image).astype(np.int16), labels, AFFINE)
    writer.add_case("as_asked", image, labels, AFFINE, image_dtype="int16")
    writer.finish()
    for case in ("ct_hu", "as_asked"):
        assert nib.load(writer.image_path(case)).get_data_dtype() == np.int16
    assert verify_nnunet_dataset(writer.folder) == []


def _rewrite_json(folder: Path, **changes) -> None:
    data = dataset_json(folder)
    data.update(changes)
    (folder / "dataset.json").write_text(json.dumps(data))


def _break_missing_label(folder: Path) -> None:
    (folder / "labelsTr" / "synth_001.nii.gz").unlink()


def _break_orphan_label(folder: Path) -> None:
    (folder / "imagesTr" / "synth_001_0000.nii.gz").unlink()
    _rewrite_json(folder, numTraining=1)


def _break_affine(folder: Path) -> None:
    shifted = AFFINE.copy()
    shifted[:3, 3] += 0.5
    write_nifti(folder / "labelsTr" / "synth_000.nii.gz", pair(0)[1], shifted, dtype=np.uint8)


def _break_spacing(folder: Path) -> None:
    write_nifti(folder / "labelsTr" / "synth_000.nii.gz", pair(0)[1], AFFINE @ np.diag([2, 1, 1, 1]), dtype=np.uint8)


def _break_shape(folder: Path) -> None:
    write_nifti(folder / "labelsTr" / "synth_000.nii.gz", np.zeros((6, 7, 4)), AFFINE, dtype=np.uint8)


def _break_nan_image(folder: Path) -> None:
    image = pair(1)[0]
    image[2, 3, 1] = np.nan
    write_nifti(folder / "imagesTr" / "synth_001_0000.nii.gz", image, AFFINE)


def _break_undeclared_label(folder: Path) -> None:
    labels = pair(0)[1].astype(np.uint8)
    labels[0, 0, 0] = 7
    write_nifti(folder / "labelsTr" / "synth_000.nii.gz", labels, AFFINE, dtype=np.uint8)


def _break_file_name(folder: Path) -> None:
    write_nifti(folder / "imagesTr" / "stray.nii.gz", pair(0)[0], AFFINE)


def _break_folder_name(folder: Path) -> None:
    folder.rename(folder.parent / "Dataset51_SynthHippo")


BROKEN = {
    "missing label": (_break_missing_label, "no label map labelsTr/synth_001.nii.gz"),
    "label without image": (_break_orphan_label, "a label map with no image"),
    "wrong numTraining": (lambda f: _rewrite_json(f, numTraining=3), "numTraining is 3 but imagesTr holds 2"),
    "numTraining not a number": (lambda f: _rewrite_json(f, numTraining="2"), "numTraining must be a whole number"),
    "non-consecutive labels": (
        lambda f: _rewrite_json(f, labels={"background": 0, "anterior": 1, "posterior": 5}),
        "consecutive integers",
    ),
    "no background": (lambda f: _rewrite_json(f, labels={"bg": 0, "anterior": 1, "posterior": 2}), '"background": 0'),
    "missing key": (lambda f: _drop_key(f, "channel_names"), "dataset.json: missing channel_names"),
    "channels not in a row": (lambda f: _rewrite_json(f, channel_names={"1": "CT"}), "0, 1, ... in a row"),
    "mismatched affine": (_break_affine, "affine differs"),
    "mismatched spacing": (_break_spacing, "voxel size"),
    "mismatched shape": (_break_shape, "shape"),
    "NaN image": (_break_nan_image, "NaN"),
    "undeclared label value": (_break_undeclared_label, "label values [7] are not declared"),
    "file not named CASE_NNNN": (_break_file_name, "not named CASE_NNNN"),
    "bad folder name": (_break_folder_name, "DatasetNNN_Name"),
}


def _drop_key(folder: Path, key: str) -> None:
    data = dataset_json(folder)
    del data[key]
    (folder / "dataset.json").write_text(json.dumps(data))


@pytest.mark.parametrize("defect", BROKEN)
def test_verifier_catches_each_defect(tmp_path, defect):
    folder = export(tmp_path, n=2).folder
    assert verify_nnunet_dataset(folder) == []
    breaks, expected = BROKEN[defect]
    breaks(folder)
    if not folder.exists():  # renamed
        (folder,) = tmp_path.iterdir()
    problems = verify_nnunet_dataset(folder)
    assert any(expected in problem for problem in problems), problems
    assert all("\n" not in problem for problem in problems)


def test_non_consecutive_label_values_are_renumbered_and_the_mapping_recorded(tmp_path):
    import nibabel as nib

    result = export(tmp_path, n=1, label_values=(0, 1, 5), label_names=("background", "liver", "tumour"))
    assert result.label_mapping == {0: 0, 1: 1, 5: 2}
    data = dataset_json(result.folder)
    assert data["labels"] == {"background": 0, "liver": 1, "tumour": 2}
    assert data["medsynth"]["original_to_written_label_values"] == {"0": 0, "1": 1, "5": 2}
    original = pair(0, (0, 1, 5))[1]
    written = np.asarray(nib.load(result.folder / "labelsTr" / "synth_000.nii.gz").dataobj)
    np.testing.assert_array_equal(written, np.select([original == 5, original == 1], [2, 1], 0))
    assert verify_nnunet_dataset(result.folder) == []


def test_background_is_declared_and_class_names_stay_unique(tmp_path):
    writer = make_writer(tmp_path, label_values=(1, 2, 3), label_names=("ignore", "organ", "organ"))
    assert writer.label_mapping == {0: 0, 1: 1, 2: 2, 3: 3}
    assert writer.dataset_json(0)["labels"] == {"background": 0, "ignore_1": 1, "organ": 2, "organ_3": 3}
    renamed = make_writer(tmp_path / "other", label_values=(0, 4), label_names=("clear", "background"))
    assert renamed.dataset_json(0)["labels"] == {"background": 0, "background_4": 1}


def test_rerun_skips_complete_cases_and_counts_every_case(tmp_path):
    first = export(tmp_path, n=2)
    image_file = first.folder / "imagesTr" / "synth_000_0000.nii.gz"
    before = image_file.stat().st_mtime_ns
    os.utime(image_file, ns=(before - 10**9, before - 10**9))  # a rewrite would change this

    second = export(tmp_path, n=3)
    assert second.skipped == ("synth_000", "synth_001") and second.written == ("synth_002",)
    assert second.num_training == 3 and dataset_json(second.folder)["numTraining"] == 3
    assert image_file.stat().st_mtime_ns == before - 10**9
    assert verify_nnunet_dataset(second.folder) == []

    # A re-run asking for fewer cases still counts what is on disk.
    assert export(tmp_path, n=1).num_training == 3
    assert dataset_json(second.folder)["numTraining"] == 3


def test_overwrite_rewrites_complete_cases(tmp_path):
    export(tmp_path, n=1)
    result = export(tmp_path, n=1, overwrite=True)
    assert result.written == ("synth_000",) and result.skipped == ()


def test_interrupted_case_leaves_no_partial_file_and_a_rerun_completes_it(tmp_path, monkeypatch):
    import medsynth.io

    writer = make_writer(tmp_path)
    writer.add_case("synth_000", *pair(0), AFFINE)
    real_write = medsynth.io.write_nifti

    def stopped_at_the_image(volume, path, **kwargs):
        if "imagesTr" in str(path):
            raise KeyboardInterrupt  # Ctrl-C between the label map and the image
        return real_write(volume, path, **kwargs)

    monkeypatch.setattr(medsynth.io, "write_nifti", stopped_at_the_image)
    with pytest.raises(KeyboardInterrupt):
        writer.add_case("synth_001", *pair(1), AFFINE)
    monkeypatch.undo()
    folder = writer.folder
    # The stopped case is a label map without an image (which nnU-Net ignores), never an image
    # without labels; no temp file is left behind.
    assert scan_cases(folder) == (["synth_000"], ["synth_001"])
    assert [p.name for p in folder.rglob(".*.tmp")] == []

    # What a killed run (SIGKILL) can leave: a temp file, and from older runs an image without labels.
    stray = folder / "imagesTr" / ".synth_001_0000.nii.gz.abc123.tmp"
    stray.write_bytes(b"half a file")
    write_nifti(folder / "imagesTr" / "synth_002_0000.nii.gz", pair(2)[0], AFFINE)
    problems = verify_nnunet_dataset(folder)
    assert any("no label map labelsTr/synth_002" in p for p in problems)
    assert not any(".tmp" in p for p in problems)  # nnU-Net ignores files without its ending

    rerun = export(tmp_path, n=3)
    assert rerun.skipped == ("synth_000",) and rerun.written == ("synth_001", "synth_002")
    assert rerun.num_training == 3 and rerun.incomplete == ()
    assert not stray.exists()
    assert verify_nnunet_dataset(folder) == []


def test_finish_reports_incomplete_cases_it_did_not_complete(tmp_path):
    folder = export(tmp_path, n=2).folder
    (folder / "imagesTr" / "synth_001_0000.nii.gz").unlink()
    result = export(tmp_path, n=1)
    assert result.num_training == 1 and result.incomplete == ("synth_001",)


def test_dataset_json_is_on_disk_from_the_start(tmp_path):
    writer = make_writer(tmp_path)
    assert dataset_json(writer.folder)["numTraining"] == 0
    assert verify_nnunet_dataset(writer.folder) == []  # an empty dataset is consistent


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"dataset_name": "OtherName"}, "already uses nnU-Net dataset id 501"),
        ({"label_names": ("background", "anterior", "middle")}, "has labels"),
        ({"label_values": (0, 1, 2, 3), "label_names": None}, "has labels"),
        ({"channel_name": "MRI"}, "has channel_names"),
        ({"label_values": (0, 1, 3), "label_names": ("background", "anterior", "posterior")}, "renumbers the labels"),
    ],
)
def test_a_conflicting_existing_dataset_is_refused(tmp_path, change, expected):
    export(tmp_path, n=1)
    with pytest.raises(UsageError) as caught:
        make_writer(tmp_path, **change)
    message = str(caught.value)
    assert expected in message and "\n" not in message
    assert dataset_json(tmp_path / "Dataset501_SynthHippo")["numTraining"] == 1  # untouched


def test_a_folder_of_someone_elses_images_is_refused_without_overwrite(tmp_path):
    folder = tmp_path / "Dataset501_SynthHippo"
    write_nifti(folder / "imagesTr" / "theirs_0000.nii.gz", pair(0)[0], AFFINE)
    with pytest.raises(UsageError, match="no dataset.json"):
        make_writer(tmp_path)
    make_writer(tmp_path, overwrite=True)


@pytest.mark.parametrize("dataset_id, name", [(0, "A"), (1000, "A"), (True, "A"), (5, "bad-name"), (5, "")])
def test_bad_dataset_id_or_name_is_a_usage_error(dataset_id, name):
    with pytest.raises(UsageError):
        dataset_folder_name(dataset_id, name)


def test_bad_cases_are_refused_before_anything_is_written(tmp_path):
    writer = make_writer(tmp_path)
    image, labels = pair(0)
    nan_image = image.copy()
    nan_image[0, 0, 0] = np.nan
    with pytest.raises(MedsynthError, match="NaN"):
        writer.add_case("nan", nan_image, labels, AFFINE)
    with pytest.raises(MedsynthError, match=r"label values \[9\]"):
        writer.add_case("undeclared", image, np.where(labels == 2, 9, labels), AFFINE)
    with pytest.raises(ValueError, match="case name"):
        writer.add_case("../escape", image, labels, AFFINE)
    with pytest.raises(ValueError, match="shape"):
        writer.add_case("shapes", image, labels[:-1], AFFINE)
    with pytest.raises(ValueError, match="affine"):
        writer.add_case("flat", image, labels, np.diag([1.0, 1.0, 0.0, 1.0]))
    assert scan_cases(writer.folder) == ([], [])
    assert writer.finish().num_training == 0


@pytest.mark.parametrize("modality, channel", [("ct", "CT"), ("CT", "CT"), ("mr", "MRI")])
def test_ct_and_mri_channel_names(tmp_path, modality, channel):
    assert channel_name_for_modality(modality) == channel
    folder = export(tmp_path, n=1, channel_name=channel_name_for_modality(modality)).folder
    assert dataset_json(folder)["channel_names"] == {"0": channel}
    assert verify_nnunet_dataset(folder) == []


def test_nnunet_own_integrity_check_accepts_the_export(tmp_path):
    integrity = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    folder = export(tmp_path, n=2, label_values=(0, 1, 5), label_names=("background", "a", "b")).folder
    integrity.verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem
