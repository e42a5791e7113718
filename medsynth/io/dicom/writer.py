"""Writing a volume as a DICOM series: one file per slice, consistent geometry, no patient data.

Every file says what it is: ImageType DERIVED\\SECONDARY\\SYNTHETIC, PatientName and PatientID
set to explicit synthetic values, no dates, and new UIDs derived from the sample's seed (so the
same sample always gets the same UIDs, and different samples never share one). Values are stored
as 16-bit integers with RescaleSlope/RescaleIntercept giving the real units.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from medsynth.io.volume import LPS_TO_RAS

SYNTHETIC_PATIENT_NAME = "SYNTHETIC^MEDSYNTH"
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's registered prefix for generated UIDs


def _ds(value: float) -> str:
    """A Decimal String: at most 16 characters."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.6e}"
    return text


def storage_encoding(values: np.ndarray, dtype: str) -> tuple[np.ndarray, float, float, bool]:
    """(stored integers, slope, intercept, signed) with stored * slope + intercept = values.

    Integer data (CT in HU, integer MRI) is stored as is. Float data is spread over the 16-bit
    range; slope and intercept are first rounded to what a DICOM decimal string holds, so that
    readers reconstruct exactly stored * slope + intercept, within half a step of the original.
    """
    if np.dtype(dtype).kind in "iu":
        rounded = np.round(values)
        low, high = float(rounded.min()), float(rounded.max())
        if low >= -32768 and high <= 32767:
            return rounded.astype(np.int16), 1.0, 0.0, True
        if low >= 0 and high <= 65535:
            return rounded.astype(np.uint16), 1.0, 0.0, False
    low, high = float(values.min()), float(values.max())
    intercept = float(_ds(low))
    slope = float(_ds(max(high - intercept, 1e-6) / 65535.0 * (1 + 1e-6)))
    stored = np.clip(np.round((values - intercept) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, intercept, False


def write_dicom_series(
    folder: str | Path,
    values: np.ndarray,
    affine: np.ndarray,
    modality: str,
    dtype: str,
    series_description: str,
    seed: int,
) -> Path:
    """Write `values` (x, y, z), placed by the RAS+ `affine` (no shear), as a series in `folder`.

    The folder appears complete or not at all: slices are written to a temporary folder beside it,
    which is then renamed.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder = Path(folder)
    values = np.asarray(values)
    stored, slope, intercept, signed = storage_encoding(values, dtype)
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cosine, column_cosine = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]

    def uid(*parts) -> str:
        return generate_uid(prefix=_UID_PREFIX, entropy_srcs=["medsynth", str(seed), *map(str, parts)])

    study, series, frame = uid("study"), uid("series"), uid("frame-of-reference")
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        for k in range(values.shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = uid("instance", k)
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.ImageType = ["DERIVED", "SECONDARY", "SYNTHETIC"]
            ds.Modality = modality
            ds.Manufacturer = "medsynth"
            ds.SeriesDescription = series_description[:64]
            ds.PatientName = SYNTHETIC_PATIENT_NAME
            ds.PatientID = f"SYNTHETIC-{seed % 10**12}"
            ds.PatientBirthDate = ""
            ds.PatientSex = ""
            ds.StudyDate = ""
            ds.StudyTime = ""
            ds.AccessionNumber = ""
            ds.ReferringPhysicianName = ""
            ds.StudyID = ""
            ds.BurnedInAnnotation = "NO"
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.FrameOfReferenceUID = frame
            ds.PositionReferenceIndicator = ""
            ds.SeriesNumber = 1
            ds.InstanceNumber = k + 1
            position = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.ImageOrientationPatient = [_ds(v) for v in (*row_cosine, *column_cosine)]
            ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # between rows, between columns
            ds.SliceThickness = _ds(spacing[2])
            ds.SpacingBetweenSlices = _ds(spacing[2])
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = values.shape[1], values.shape[0]
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.PixelRepresentation = 1 if signed else 0
            ds.RescaleSlope = _ds(slope)
            ds.RescaleIntercept = _ds(intercept)
            ds.RescaleType = "HU" if modality == "CT" else "US"
            plane = stored[:, :, k].T  # (rows, columns): rows run along y
            ds.PixelData = np.ascontiguousarray(plane).astype("<i2" if signed else "<u2").tobytes()
            pydicom.dcmwrite(temporary / f"slice_{k + 1:04d}.dcm", ds, enforce_file_format=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return folder
