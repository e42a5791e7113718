"""NIfTI-1/2 and SimpleITK formats: values, affines, 4D policy and reader fallback."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import blob_volume, rotation, write_nifti

from medsynth.config import IoConfig
from medsynth.io import discover_sources, read_volume


def oblique_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation(10, 5, -30) @ np.diag([-1.2, 0.9, 2.5])  # LAS-ish, oblique, anisotropic
    affine[:3, 3] = [12.0, -40.0, 7.5]
    return affine


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("nifti2", [False, True])
def test_nifti_values_and_affine_round_trip(tmp_path, suffix, nifti2):
    array = blob_volume()
    write_nifti(tmp_path / f"scan{suffix}", array, oblique_affine(), nifti2=nifti2)
    (source,) = discover_sources(tmp_path).sources
    volume = read_volume(source)
    np.testing.assert_allclose(volume.array, array)
    np.testing.assert_allclose(volume.affine, oblique_affine(), atol=1e-5)


def test_scl_slope_and_inter_are_applied(tmp_path):
    stored = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    write_nifti(tmp_path / "scaled.nii.gz", stored, dtype=np.int16, slope=0.5, inter=-100.0)
    volume = read_volume(discover_sources(tmp_path).sources[0])
    np.testing.assert_allclose(volume.array, stored * 0.5 - 100.0)
    assert volume.meta.stored_dtype == "int16"


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_simpleitk_formats_convert_lps_to_ras(tmp_path, suffix):
    """A voxel's world position from SimpleITK (LPS) must come out as the same point in RAS."""
    import SimpleITK as sitk

    array = blob_volume((7, 8, 9))
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))  # ITK arrays are (z, y, x)
    image.SetSpacing((0.8, 1.1, 2.0))
    image.SetOrigin((10.0, -5.0, 3.0))
    image.SetDirection(tuple(rotation(0, 0, 25).ravel()))
    sitk.WriteImage(image, str(tmp_path / f"scan{suffix}"))
    volume = read_volume(discover_sources(tmp_path).sources[0])
    np.testing.assert_allclose(volume.array, array)
    index = (3, 5, 7)
    lps = np.asarray(image.TransformIndexToPhysicalPoint(index))
    ras = volume.affine @ np.array([*index, 1.0])
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-4)


def test_four_d_policy(tmp_path):
    frames = np.stack([blob_volume(seed=s) for s in range(3)], axis=-1)  # (x, y, z, t)
    write_nifti(tmp_path / "fmri.nii.gz", frames)
    skipped = discover_sources(tmp_path)
    assert skipped.sources == [] and "4D image with 3 frames" in skipped.problems[0].reason
    assert "io.four_d=split" in skipped.problems[0].reason
    split = discover_sources(tmp_path, IoConfig(four_d="split"))
    assert [s.name for s in split.sources] == [f"fmri.nii.gz [frame {t}]" for t in range(3)]
    for t, source in enumerate(split.sources):
        np.testing.assert_allclose(read_volume(source).array, frames[..., t])
    (first,) = discover_sources(tmp_path, IoConfig(four_d="first")).sources
    np.testing.assert_allclose(read_volume(first).array, frames[..., 0])


def test_trailing_singleton_axis_is_a_plain_volume(tmp_path):
    write_nifti(tmp_path / "vol.nii.gz", blob_volume()[..., None])
    (source,) = discover_sources(tmp_path).sources
    assert read_volume(source).shape == (20, 24, 16)


def test_nibabel_fallback_to_simpleitk(tmp_path, monkeypatch):
    """When nibabel refuses a file that SimpleITK reads, the file still loads, with a note."""
    from medsynth.io import nifti
    from medsynth.io.volume import SourceError

    write_nifti(tmp_path / "scan.nii.gz", blob_volume(), oblique_affine())

    def refuse(path, name, *args):
        raise SourceError(name, "nibabel says no")

    monkeypatch.setattr(nifti, "probe", refuse)
    monkeypatch.setattr(nifti, "read", refuse)
    (source,) = discover_sources(tmp_path).sources
    volume = read_volume(source)
    assert source.kind == "itk"
    np.testing.assert_allclose(volume.affine, oblique_affine(), atol=1e-4)
    assert any("nibabel cannot" in w for w in volume.meta.warnings)


@pytest.mark.realdata
def test_real_files_simpleitk_refuses_load_through_nibabel(shared_data):
    nifti_dir = shared_data / "nifti"
    found = discover_sources(nifti_dir, IoConfig(four_d="split"))
    names = {s.name for s in found.sources}
    assert "S0_10slices.nii.gz" in names  # non-orthonormal affine: SimpleITK refuses it
    assert {"example_nifti2.nii.gz [frame 0]", "example_nifti2.nii.gz [frame 1]"} <= names  # NIfTI-2
    for source in found.sources:
        volume = read_volume(source)
        assert np.isfinite(volume.array).all()
    sheared = read_volume(next(s for s in found.sources if s.name == "S0_10slices.nii.gz"))
    assert any("not orthogonal" in w for w in sheared.meta.warnings)


@pytest.mark.realdata
def test_real_nifti_orientations_and_scaling(shared_data):
    import nibabel as nib

    found = discover_sources(shared_data / "nifti")
    by_name = {s.name: s for s in found.sources}
    anatomical = read_volume(by_name["anatomical.nii"])
    assert anatomical.orientation == "LAS"  # big-endian int16, LAS
    aniso = read_volume(by_name["aniso_vox.nii.gz"])
    assert aniso.orientation == "LPS" and np.allclose(aniso.spacing, (4, 4, 5))
    gd = read_volume(by_name["MR_Gd.nii.gz"])
    np.testing.assert_allclose(
        gd.array, nib.load(str(shared_data / "nifti" / "MR_Gd.nii.gz")).get_fdata(dtype=np.float32)
    )
    assert gd.array.max() > 255  # uint8 with a scale factor: the factor was applied
