"""DICOM series: grouping, geometry from every slice, and every defect reported by name."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from helpers import LPS_TO_RAS, new_uid, rotation, voxel_corners_world, write_dicom_series, write_enhanced_multiframe

from medsynth.config import IoConfig
from medsynth.io import discover_sources, read_volume
from medsynth.preprocess import reorient_to_ras


def ramp(shape=(6, 5, 4)) -> np.ndarray:
    """Every voxel a different value, so any axis mix-up or flip changes the array."""
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape) * 3


def expected_affine(iop, pixel_spacing, step, origin) -> np.ndarray:
    iop = np.asarray(iop, dtype=np.float64)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * pixel_spacing[1]
    lps[:3, 1] = iop[3:] * pixel_spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def only_source(folder, **io):
    found = discover_sources(folder, IoConfig(**io))
    assert len(found.sources) == 1, (found.sources, found.skipped)
    return found.sources[0], read_volume(found.sources[0])


def test_axial_series_values_and_affine(tmp_path):
    array = ramp()
    write_dicom_series(tmp_path, array, pixel_spacing=(0.5, 0.8), origin=(10, -20, 30))
    _, volume = only_source(tmp_path)
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, expected_affine((1, 0, 0, 0, 1, 0), (0.5, 0.8), (0, 0, 2), (10, -20, 30)))
    assert volume.orientation == "LPS"  # DICOM's patient axes, as stored


def test_oblique_series_in_shuffled_order_without_extensions(tmp_path):
    """File names carry no order and no extension: positions alone decide the stack."""
    r = rotation(20, -10, 35)
    iop = np.concatenate([r[:, 0], r[:, 1]])
    array = ramp((5, 6, 7))
    names = [f"IM{n}" for n in (4, 0, 6, 2, 5, 1, 3)]
    write_dicom_series(tmp_path, array, iop=iop, pixel_spacing=(1.5, 1.2), origin=(5, 6, 7), names=names)
    source, volume = only_source(tmp_path)
    np.testing.assert_array_equal(volume.array, array)
    step = np.cross(iop[:3], iop[3:]) * 2.0
    np.testing.assert_allclose(volume.affine, expected_affine(iop, (1.5, 1.2), step, (5, 6, 7)), atol=1e-5)


def test_per_slice_rescale_is_applied(tmp_path):
    array = ramp().astype(np.float32)
    slopes = [1.0, 2.0, 0.5, 4.0]
    intercepts = [0.0, -1024.0, 10.0, 3.0]
    real = np.stack(
        [array[:, :, k] * 0 + np.round(array[:, :, k] / slopes[k]) * slopes[k] + intercepts[k] for k in range(4)],
        axis=2,
    )
    write_dicom_series(tmp_path, real, slopes=slopes, intercepts=intercepts)
    _, volume = only_source(tmp_path)
    np.testing.assert_allclose(volume.array, real)


def test_two_series_in_one_folder_become_two_sources(tmp_path):
    write_dicom_series(tmp_path, ramp(), names=[f"a{k}" for k in range(4)])
    write_dicom_series(tmp_path, ramp((4, 4, 5)), names=[f"b{k}" for k in range(5)])
    found = discover_sources(tmp_path)
    assert sorted(v.shape for v in map(read_volume, found.sources)) == [(4, 4, 5), (6, 5, 4)]
    assert all("[series" in s.name for s in found.sources)


def test_series_split_across_folders_is_joined(tmp_path):
    uid = new_uid()
    array = ramp((4, 4, 6))
    write_dicom_series(tmp_path / "part1", array[:, :, :3], series_uid=uid, names=["a", "b", "c"])
    write_dicom_series(tmp_path / "part2", array[:, :, 3:], series_uid=uid, origin=(0, 0, 6), names=["d", "e", "f"])
    _, volume = only_source(tmp_path)
    np.testing.assert_array_equal(volume.array, array)


def test_copies_of_a_series_in_two_folders_stay_separate(tmp_path):
    write_dicom_series(tmp_path / "a", ramp())
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    found = discover_sources(tmp_path)
    assert [s.name for s in found.sources] == ["a/", "b/"]


def test_gantry_tilt_is_kept_as_shear_and_reported(tmp_path):
    tilt = np.radians(15)
    step = np.array([0.0, 2.0 * np.tan(tilt), 2.0])  # the table moves while the gantry is tilted
    write_dicom_series(tmp_path, ramp(), slice_step=step)
    source, volume = only_source(tmp_path)
    assert any("gantry tilt" in w and "15.0°" in w for w in volume.meta.warnings)
    np.testing.assert_allclose(volume.affine, expected_affine((1, 0, 0, 0, 1, 0), (1, 1), step, (0, 0, 0)), atol=1e-5)


@pytest.mark.parametrize(
    "case, reason",
    [
        ("missing", "1 missing slice"),
        ("nonuniform", "non-uniform slice spacing"),
        ("orientation", "disagree on orientation"),
        ("sizes", "mixed image sizes"),
        ("single", "a single slice is not a volume"),
        ("two", "only 2 slices"),
        ("offline", "do not lie on a straight line"),
        ("uneven-duplicates", "duplicate slice positions"),
    ],
)
def test_defective_series_are_skipped_with_the_reason(tmp_path, case, reason):
    array = ramp((6, 5, 5))
    z = [0.0, 2.0, 4.0, 6.0, 8.0]
    kwargs = {}
    if case == "missing":
        kwargs["positions"] = [(0, 0, p) for p in (0, 2, 6, 8, 10)]
    elif case == "nonuniform":
        kwargs["positions"] = [(0, 0, p) for p in (0, 2, 4.7, 6, 8)]
    elif case == "orientation":
        kwargs["orientations"] = [(1, 0, 0, 0, 1, 0)] * 3 + [(1, 0, 0, 0, 0, -1)] * 2
    elif case == "sizes":
        kwargs["sizes"] = [(6, 5)] * 4 + [(8, 8)]
    elif case == "single":
        array = array[:, :, :1]
    elif case == "two":
        array = array[:, :, :2]
    elif case == "offline":
        kwargs["positions"] = [(0, 0, 0), (0, 0, 2), (3, 0, 4), (0, 0, 6), (0, 0, 8)]
    elif case == "uneven-duplicates":
        kwargs["positions"] = [(0, 0, p) for p in (0, 2, 2, 4, 6)]
    del z
    write_dicom_series(tmp_path / "series", array, **kwargs)
    found = discover_sources(tmp_path)
    assert found.sources == []
    assert len(found.problems) == 1
    assert reason in found.problems[0].reason
    assert found.problems[0].name.startswith("series")


def test_four_d_series_policy(tmp_path):
    """Two images at every position (two echoes): skipped by default, split or first on request."""
    array = ramp((4, 4, 6))
    positions = [(0, 0, 2.0 * (k // 2)) for k in range(6)]
    write_dicom_series(tmp_path, array, positions=positions, instance_numbers=list(range(1, 7)))
    found = discover_sources(tmp_path)
    assert not found.sources and "4D" in found.problems[0].reason
    split = discover_sources(tmp_path, IoConfig(four_d="split"))
    assert len(split.sources) == 2
    first, second = (read_volume(s).array for s in split.sources)
    np.testing.assert_array_equal(first, array[:, :, 0::2])
    np.testing.assert_array_equal(second, array[:, :, 1::2])
    assert len(discover_sources(tmp_path, IoConfig(four_d="first")).sources) == 1


def test_enhanced_multiframe_uses_per_frame_positions(tmp_path):
    """Frames stored out of spatial order come back sorted by their PlanePositionSequence."""
    array = ramp((5, 4, 6))
    order = [3, 0, 5, 1, 4, 2]
    write_enhanced_multiframe(
        tmp_path / "enhanced.dcm", array, frame_order=order, origin=(1, 2, 3), pixel_spacing=(0.7, 0.9)
    )
    source, volume = only_source(tmp_path)
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(
        volume.affine, expected_affine((1, 0, 0, 0, 1, 0), (0.7, 0.9), (0, 0, 2), (1, 2, 3)), atol=1e-5
    )


def test_enhanced_multiframe_per_frame_rescale(tmp_path):
    array = (ramp((4, 4, 4)) * 4).astype(np.float32)
    write_enhanced_multiframe(tmp_path / "enhanced.dcm", array, slopes=[2.0, 1.0, 4.0, 2.0])
    _, volume = only_source(tmp_path)
    np.testing.assert_allclose(volume.array, array)


def test_non_image_dicom_and_junk_are_explained(tmp_path):
    (tmp_path / "notes.dcm").write_text("this is not DICOM\n")
    write_dicom_series(tmp_path / "ok", ramp())
    found = discover_sources(tmp_path)
    assert len(found.sources) == 1
    assert any(p.name == "notes.dcm" and "not a" in p.reason for p in found.problems)


def test_no_patient_identifiers_in_volume_metadata(tmp_path):
    write_dicom_series(tmp_path, ramp())
    _, volume = only_source(tmp_path)
    text = repr(volume.meta)
    assert "Phantom" not in text and "TEST-001" not in text


# ---------------------------------------------------------------------------------------------
# Real exports, against reference conversions (dicom2nifti)


REFERENCES = [
    ("hitachi-mr/001", "hitachi-mr/001_ground_truth.nii.gz"),
    ("hitachi-mr/001_implicit", "hitachi-mr/001_implicit_ground_truth.nii.gz"),
    ("compressed/rle/001", "compressed/rle/001_ground_truth.nii.gz"),
    ("compressed/j2k/001", "compressed/j2k/001_ground_truth.nii.gz"),
]


@pytest.mark.realdata
@pytest.mark.parametrize("series, reference", REFERENCES)
def test_real_series_match_reference_values_and_voxel_corners(shared_data, series, reference):
    import nibabel as nib

    _, volume = only_source(shared_data / "dicom" / series)
    truth = nib.load(str(shared_data / "dicom" / reference))
    ours, our_affine = reorient_to_ras(volume.array, volume.affine)
    theirs, their_affine = reorient_to_ras(np.asarray(truth.dataobj, dtype=np.float32), truth.affine)
    np.testing.assert_array_equal(ours, theirs)  # the same voxel values, in the same places
    corners_ours = voxel_corners_world(our_affine, ours.shape)
    corners_theirs = voxel_corners_world(their_affine, theirs.shape)
    assert np.abs(corners_ours - corners_theirs).max() < 0.01  # mm


@pytest.mark.realdata
def test_real_dicom_folder_finds_every_series_and_explains_the_rest(shared_data):
    found = discover_sources(shared_data / "dicom")
    dicom_sources = sorted(s.name for s in found.sources if s.kind == "dicom")
    assert dicom_sources == [
        "clean-series-17/",
        "compressed/j2k/001/",
        "compressed/rle/001/",
        "hitachi-mr/001/",
        "hitachi-mr/001_implicit/",
        "single-files/emri_small_multiframe.dcm",
        "two-series-one-folder/ [series 10]",
        "two-series-one-folder/ [series 123456]",
    ]
    reasons = {p.name: p.reason for p in found.problems}
    assert "only 2 slices" in reasons["bad/slicecount/001/"]
    assert "disagree on orientation" in reasons["bad/sliceorientation/001/"]
    assert reasons["single-files/CT_small.dcm"] == "a single slice is not a volume"
    assert reasons["single-files/MR_small.dcm"] == "a single slice is not a volume"
    for source in found.sources:
        volume = read_volume(source)
        assert volume.array.dtype == np.float32 and np.isfinite(volume.array).all()


@pytest.mark.realdata
def test_real_multiframe_without_geometry_loads_with_a_warning(shared_data):
    source, volume = only_source(shared_data / "dicom" / "single-files" / "emri_small_multiframe.dcm")
    assert volume.shape == (64, 64, 10)
    assert any("world position is unknown" in w for w in volume.meta.warnings)


@pytest.mark.realdata
def test_real_ct_slice_rescale_gives_hounsfield_units(shared_data, tmp_path):
    """CT_small.dcm stores raw values with intercept -1024: air must come out near -1000 HU."""
    import pydicom

    dataset = pydicom.dcmread(shared_data / "dicom" / "single-files" / "CT_small.dcm")
    raw = dataset.pixel_array.astype(np.float64)
    # Three copies of the slice, 5 mm apart, make a readable series.
    for k in range(3):
        dataset.ImagePositionPatient = [0, 0, 5 * k]
        dataset.SOPInstanceUID = new_uid()
        dataset.save_as(tmp_path / f"{k}.dcm")
    _, volume = only_source(tmp_path)
    expected = raw * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    np.testing.assert_allclose(volume.array[:, :, 0], expected.T)
    assert volume.array.min() < -800


def test_readable_even_when_listed_through_a_symlinked_folder(tmp_path):
    write_dicom_series(tmp_path / "real", ramp())
    os.symlink(tmp_path / "real", tmp_path / "link")
    found = discover_sources(tmp_path)
    assert len(found.sources) == 1  # one folder, reached twice, read once
