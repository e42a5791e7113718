"""Bad input: one clear reason naming the file, no traceback, the right exit status, nothing lost."""

from __future__ import annotations

import builtins
import gzip
import json
import os

import numpy as np
import pytest
from helpers import blob_volume, write_nifti


def inspect_json(run_cli, folder):
    code, out, err = run_cli("inspect", folder, "--json")
    assert "Traceback" not in err and "Traceback" not in out
    return code, json.loads(out), err


def good_volume(folder):
    write_nifti(folder / "good.nii.gz", blob_volume())


def reason_for(report, name):
    matches = [s["reason"] for s in report["skipped"] if s["name"] == name]
    assert matches, f"{name} not reported as skipped: {report['skipped']}"
    return matches[0]


def test_empty_folder_fails_with_one_line(run_cli, tmp_path):
    code, out, err = run_cli("inspect", tmp_path)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error:")
    assert "no usable images found" in err and str(tmp_path) in err
    assert "Traceback" not in err


def test_folder_without_images(run_cli, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "table.csv").write_text("a,b\n")
    code, report, err = inspect_json(run_cli, tmp_path)
    assert code == 1 and "no usable images found" in err


def test_missing_folder_is_a_usage_error(run_cli, tmp_path):
    code, _, err = run_cli("inspect", tmp_path / "nope")
    assert code == 2 and "does not exist" in err and "nope" in err and len(err.strip().splitlines()) == 1


def test_text_file_named_nii(run_cli, tmp_path):
    good_volume(tmp_path)
    (tmp_path / "fake.nii").write_text("this is not an image\n" * 40)
    code, report, _ = inspect_json(run_cli, tmp_path)
    assert code == 0 and len(report["sources"]) == 1
    assert "not a readable NIfTI" in reason_for(report, "fake.nii")


def test_truncated_nii_gz(run_cli, tmp_path):
    good_volume(tmp_path)
    path = write_nifti(tmp_path / "cut.nii.gz", blob_volume((40, 40, 40), seed=3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, report, _ = inspect_json(run_cli, tmp_path)
    assert code == 0 and [s["name"] for s in report["sources"]] == ["good.nii.gz"]
    assert "truncated" in reason_for(report, "cut.nii.gz")


def test_truncated_uncompressed_nii(run_cli, tmp_path):
    good_volume(tmp_path)
    path = write_nifti(tmp_path / "cut.nii", blob_volume((30, 30, 30)))
    path.write_bytes(path.read_bytes()[:5000])
    code, report, _ = inspect_json(run_cli, tmp_path)
    assert code == 0
    assert "truncated" in reason_for(report, "cut.nii") or "shorter" in reason_for(report, "cut.nii")


def test_2d_image(run_cli, tmp_path):
    good_volume(tmp_path)
    write_nifti(tmp_path / "flat.nii.gz", np.ones((32, 32), dtype=np.float32))
    write_nifti(tmp_path / "slab.nii.gz", np.ones((32, 32, 1), dtype=np.float32))
    _, report, _ = inspect_json(run_cli, tmp_path)
    assert "2D image (32×32)" in reason_for(report, "flat.nii.gz")
    assert "2D image stored as 3D" in reason_for(report, "slab.nii.gz")


def test_zero_sized_axis(run_cli, tmp_path):
    import nibabel as nib

    good_volume(tmp_path)
    header = nib.Nifti1Header()
    header.set_data_shape((16, 0, 16))
    header.set_data_dtype(np.float32)
    with open(tmp_path / "empty.nii", "wb") as handle:
        header.write_to(handle)
        handle.write(b"\0" * 4)
    _, report, _ = inspect_json(run_cli, tmp_path)
    assert "zero-sized axis" in reason_for(report, "empty.nii")


@pytest.mark.parametrize("bad_value, word", [(np.nan, "NaN"), (np.inf, "infinite")])
def test_nan_or_inf_voxels(run_cli, tmp_path, bad_value, word):
    good_volume(tmp_path)
    array = blob_volume(seed=5)
    array[3, 4, 5] = bad_value
    array[6, 7, 8] = bad_value
    write_nifti(tmp_path / "bad.nii.gz", array)
    code, report, _ = inspect_json(run_cli, tmp_path)
    assert code == 0 and len(report["sources"]) == 1
    assert f"2 {word} voxel values" in reason_for(report, "bad.nii.gz")


def test_unreadable_file(run_cli, tmp_path, monkeypatch):
    """Permission denied. Simulated, because tests may run as root, who can read anything."""
    good_volume(tmp_path)
    locked = write_nifti(tmp_path / "locked.nii.gz", blob_volume(seed=2))
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if os.fspath(file) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(gzip, "open", lambda f, *a, **k: gzip.GzipFile(fileobj=guarded_open(f, "rb")))
    code, report, _ = inspect_json(run_cli, tmp_path)
    assert code == 0 and len(report["sources"]) == 1
    assert "permission denied" in reason_for(report, "locked.nii.gz").lower()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_real_permissions(run_cli, tmp_path):
    good_volume(tmp_path)
    locked = write_nifti(tmp_path / "locked.nii.gz", blob_volume(seed=2))
    locked.chmod(0)
    try:
        code, report, _ = inspect_json(run_cli, tmp_path)
    finally:
        locked.chmod(0o644)
    assert code == 0 and "permission denied" in reason_for(report, "locked.nii.gz").lower()


def test_symlink_loops(run_cli, tmp_path):
    good_volume(tmp_path)
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path, tmp_path / "sub" / "back-to-top")  # a folder loop
    os.symlink(tmp_path / "self.nii", tmp_path / "self.nii")  # a link to itself
    os.symlink(tmp_path / "missing.nii.gz", tmp_path / "dangling.nii.gz")
    code, report, _ = inspect_json(run_cli, tmp_path)
    assert code == 0 and [s["name"] for s in report["sources"]] == ["good.nii.gz"]
    assert reason_for(report, "self.nii") == "symbolic link loop"
    assert "broken symbolic link" in reason_for(report, "dangling.nii.gz")


def test_unsupported_5d(run_cli, tmp_path):
    good_volume(tmp_path)
    write_nifti(tmp_path / "vectors.nii.gz", np.zeros((8, 8, 8, 2, 3), dtype=np.float32))
    _, report, _ = inspect_json(run_cli, tmp_path)
    assert "only 3D and 4D" in reason_for(report, "vectors.nii.gz")


def test_bad_input_never_loses_the_good_volumes(run_cli, tmp_path):
    """All defects at once: the good volumes are still all found."""
    for seed in range(3):
        write_nifti(tmp_path / f"good{seed}.nii.gz", blob_volume(seed=seed))
    (tmp_path / "fake.nii").write_text("nope")
    write_nifti(tmp_path / "flat.nii.gz", np.ones((8, 8), dtype=np.float32))
    code, report, _ = inspect_json(run_cli, tmp_path)
    assert code == 0 and len(report["sources"]) == 3 and len(report["skipped"]) == 2


@pytest.mark.realdata
@pytest.mark.parametrize(
    "folder, expected",
    [
        ("dicom/bad/slicecount", {"001/": "only 2 slices"}),
        ("dicom/bad/sliceorientation", {"001/": "disagree on orientation"}),
        (
            "dicom/single-files",
            {"CT_small.dcm": "a single slice is not a volume", "MR_small.dcm": "a single slice is not a volume"},
        ),
    ],
)
def test_real_bad_dicom(run_cli, shared_data, folder, expected):
    code, report, _ = inspect_json(run_cli, shared_data / folder)
    for name, reason in expected.items():
        assert reason in reason_for(report, name)
    if folder == "dicom/single-files":
        assert code == 0 and [s["name"] for s in report["sources"]] == ["emri_small_multiframe.dcm"]


@pytest.mark.realdata
def test_real_bad_dicom_folder_alone_exits_1_with_reasons(run_cli, shared_data):
    code, out, err = run_cli("inspect", shared_data / "dicom" / "bad" / "sliceorientation")
    assert code == 1
    assert "disagree on orientation" in out  # the skipped table says why nothing was usable
    assert err.strip().splitlines()[-1].startswith("error:") and "Traceback" not in err
