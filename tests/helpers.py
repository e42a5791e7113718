"""Builders for tiny test inputs: NIfTI files and DICOM series with chosen geometry and defects."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def cpu_runtime():
    """The single-process CPU runtime most tests train in."""
    import torch

    from medsynth.distributed import Runtime

    return Runtime(device=torch.device("cpu"))


def tiny_config(*overrides: str):
    """configs/tiny.yaml (16³, a few channels, 6 steps) with `--set`-style overrides."""
    from medsynth.config import load_config

    return load_config(CONFIGS / "tiny.yaml", list(overrides))


def blob_volume(shape=(20, 24, 16), seed=0, low=0.0, high=1000.0) -> np.ndarray:
    """A bright ellipsoid with texture on a dark background: has a foreground, like a head."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt(((grid / 0.7) ** 2).sum(axis=0))
    body = (radius < 1.0).astype(np.float32)
    texture = 0.6 + 0.4 * rng.random(shape)
    return (low + (high - low) * body * texture).astype(np.float32)


def write_nifti(path: Path, array: np.ndarray, affine=None, dtype=None, slope=None, inter=None, nifti2=False) -> Path:
    import nibabel as nib

    affine = np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    data = np.asarray(array) if dtype is None else np.asarray(array).astype(dtype)
    image = cls(data, affine)
    if slope is not None:
        image.header.set_slope_inter(slope, inter or 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def rotation(degrees_x=0.0, degrees_y=0.0, degrees_z=0.0) -> np.ndarray:
    ax, ay, az = np.radians([degrees_x, degrees_y, degrees_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def new_uid() -> str:
    import pydicom.uid

    return pydicom.uid.generate_uid()


def dicom_dataset(rows: int, cols: int, modality: str, series_uid: str, study_uid: str):
    """A minimal MR-storage dataset with file meta, 16-bit signed pixels, and a made-up patient."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = new_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "Test^Phantom"
    ds.PatientID = "TEST-001"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 3
    ds.StudyDate = datetime.date(2020, 1, 1).strftime("%Y%m%d")
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    return ds


def write_dicom_series(
    folder: Path,
    array: np.ndarray,
    iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    origin=(0.0, 0.0, 0.0),
    pixel_spacing=(1.0, 1.0),
    slice_step=None,
    positions=None,
    slopes=None,
    intercepts=None,
    modality="MR",
    series_uid=None,
    names=None,
    orientations=None,
    sizes=None,
    instance_numbers=None,
) -> list[Path]:
    """Write an (x, y, z) int16 array as single-frame DICOM slices, z = slice index.

    By default slices are stacked along the normal of `iop`, 2 mm apart; `slice_step` (a vector,
    LPS mm) or `positions` (one IPP per slice) override that to build tilt, gaps and other defects.
    """
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or new_uid()
    study_uid = new_uid()
    iop = np.asarray(iop, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    step = np.asarray(slice_step if slice_step is not None else normal * 2.0)
    paths = []
    for k in range(array.shape[2]):
        plane = np.asarray(array[:, :, k])  # (cols, rows)
        slice_iop = np.asarray(orientations[k]) if orientations is not None else iop
        if sizes is not None:
            plane = np.zeros(sizes[k], dtype=plane.dtype)
        rows, cols = plane.shape[1], plane.shape[0]
        ds = dicom_dataset(rows, cols, modality, series_uid, study_uid)
        ipp = np.asarray(positions[k]) if positions is not None else np.asarray(origin) + k * step
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in slice_iop]
        ds.PixelSpacing = [f"{pixel_spacing[0]:g}", f"{pixel_spacing[1]:g}"]
        ds.SliceThickness = "2"
        ds.InstanceNumber = instance_numbers[k] if instance_numbers is not None else k + 1
        slope = slopes[k] if slopes is not None else None
        intercept = intercepts[k] if intercepts is not None else None
        stored = plane.astype(np.float64)
        if slope is not None or intercept is not None:
            ds.RescaleSlope = f"{slope if slope is not None else 1:g}"
            ds.RescaleIntercept = f"{intercept if intercept is not None else 0:g}"
            stored = (stored - (intercept or 0.0)) / (slope or 1.0)
        ds.PixelData = np.round(stored).astype("<i2").T.tobytes()  # rows of the image are y
        name = names[k] if names is not None else f"slice{k:03d}.dcm"
        path = folder / name
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced_multiframe(
    path: Path,
    array: np.ndarray,
    iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    origin=(0.0, 0.0, 0.0),
    pixel_spacing=(1.0, 1.0),
    step=2.0,
    frame_order=None,
    slopes=None,
) -> Path:
    """An Enhanced MR file with per-frame PlanePosition and shared orientation/measures."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedMRImageStorage

    n = array.shape[2]
    order = list(frame_order) if frame_order is not None else list(range(n))  # stored frame f = slice order[f]
    ds = dicom_dataset(array.shape[1], array.shape[0], "MR", new_uid(), new_uid())
    ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.NumberOfFrames = n
    iop = np.asarray(iop, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    shared.PlaneOrientationSequence = Sequence([orientation])
    measures = Dataset()
    measures.PixelSpacing = [f"{pixel_spacing[0]:g}", f"{pixel_spacing[1]:g}"]
    measures.SliceThickness = f"{step:g}"
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    planes = []
    for _f, k in enumerate(order):
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin) + k * step * normal]
        item.PlanePositionSequence = Sequence([position])
        slope = slopes[k] if slopes is not None else 1.0
        transform = Dataset()
        transform.RescaleSlope = f"{slope:g}"
        transform.RescaleIntercept = "0"
        item.PixelValueTransformationSequence = Sequence([transform])
        frames.append(item)
        planes.append(np.round(array[:, :, k] / slope).astype("<i2").T)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack(planes).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def voxel_corners_world(affine: np.ndarray, shape) -> np.ndarray:
    """World positions of all voxel corners (i±0.5, j±0.5, k±0.5): (N, 3)."""
    axes = [np.arange(n + 1) - 0.5 for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid @ affine[:3, :3].T + affine[:3, 3]


def blob_labels(image: np.ndarray) -> np.ndarray:
    """A label map drawn on `image` (from `blob_volume`): 1 on its bright ellipsoid, 2 on the ellipsoid's
    +x half, 0 elsewhere. uint8, on the image's grid."""
    labels = (image > 0).astype(np.uint8)
    labels[image.shape[0] // 2 :][labels[image.shape[0] // 2 :] > 0] = 2
    return labels


def write_labelled_folders(root: Path, n=3, shape=(20, 24, 16), affine=None, suffix="_seg") -> tuple[Path, Path]:
    """SCAN_DIR root/scans with n blob images scan<i>.nii.gz and LABEL_DIR root/labels with each one's
    `blob_labels` as scan<i><suffix>.nii.gz (uint8), on the same grid."""
    affine = np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine
    for seed in range(n):
        image = blob_volume(shape, seed=seed, high=800 + 100 * seed)
        write_nifti(root / "scans" / f"scan{seed}.nii.gz", image, affine)
        write_nifti(root / "labels" / f"scan{seed}{suffix}.nii.gz", blob_labels(image), affine, dtype=np.uint8)
    return root / "scans", root / "labels"
