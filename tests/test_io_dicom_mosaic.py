"""Siemens mosaics (tiles of one 2D image) and Float Pixel Data: tiny files made here, and the real
mosaic in ../shared/data against dicom2nifti's reference."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from helpers import dicom_dataset, new_uid, voxel_corners_world

from medsynth.config import IoConfig
from medsynth.io import discover_sources, read_volume
from medsynth.preprocess import reorient_to_ras


def csa2(tags: dict[str, tuple[str, list[str]]]) -> bytes:
    """A Siemens CSA2 header ("SV10") holding `tags` as {name: (VR, [item strings])}."""
    out = bytearray(b"SV10\x04\x03\x02\x01" + struct.pack("<2I", len(tags), 77))
    for name, (vr, items) in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(items), vr.encode(), 0, len(items), 77)
        for item in items:
            data = item.encode() + b"\x00"
            out += struct.pack("<4i", len(data), len(data), 77, len(data)) + data + b"\x00" * (-len(data) % 4)
    return bytes(out)


def write_mosaic(
    path,
    volume: np.ndarray,
    slice0_corner,
    iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    spacing=(2.0, 3.0, 4.0),
    image_header: bool = True,
    protocol: str | None = None,
    series_uid: str | None = None,
    instance: int = 1,
) -> None:
    """Write an (x, y, n) volume as one Siemens mosaic file: tile k holds slice k (or slice n-1-k
    when `protocol` sets ucImageNumb), the grid ceil(sqrt(n)) tiles square, and ImagePositionPatient
    that of the whole mosaic image centred on the slice at `slice0_corner` (LPS mm)."""
    import pydicom

    cols, rows, n = volume.shape
    across = int(np.ceil(np.sqrt(n)))
    mosaic = np.zeros((rows * across, cols * across), dtype=np.int16)
    for k in range(n):
        r, c = divmod(k, across)
        mosaic[r * rows : (r + 1) * rows, c * cols : (c + 1) * cols] = volume[:, :, k].T
    column_spacing, row_spacing, slice_spacing = spacing
    row_cosine, column_cosine = np.asarray(iop[:3]), np.asarray(iop[3:])
    ipp = (
        np.asarray(slice0_corner)
        - row_cosine * column_spacing * (cols * across - cols) / 2
        - column_cosine * row_spacing * (rows * across - rows) / 2
    )
    ds = dicom_dataset(*mosaic.shape, "MR", series_uid or new_uid(), new_uid())
    ds.Manufacturer = "SIEMENS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.InstanceNumber = ds.AcquisitionNumber = instance
    ds.PixelSpacing = [f"{row_spacing:g}", f"{column_spacing:g}"]
    ds.SpacingBetweenSlices = f"{slice_spacing:g}"
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    if image_header:
        normal = np.cross(row_cosine, column_cosine)
        ds.add_new(0x00291010, "OB", csa2({"NumberOfImagesInMosaic": ("US", [str(n)]), "SliceNormalVector": (
            "FD", [f"{v:.8f}" for v in normal])}))  # fmt: skip
    if protocol is not None:
        text = f"### ASCCONV BEGIN ###\n{protocol}\n### ASCCONV END ###"
        ds.add_new(0x00291020, "OB", csa2({"MrPhoenixProtocol": ("UN", [text])}))
    ds.PixelData = mosaic.astype("<i2").tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def test_mosaic_is_untiled_with_the_first_slice_at_its_corrected_position(tmp_path):
    volume = np.arange(4 * 3 * 5, dtype=np.int16).reshape(4, 3, 5)  # (x, y, slices): 5 tiles on a 3×3 grid
    iop = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # sagittal: rows along A->P, columns down
    corner = np.array([10.0, -20.0, 30.0])
    write_mosaic(tmp_path / "m.dcm", volume, corner, iop=iop)
    found = discover_sources(tmp_path)
    assert not found.problems and len(found.sources) == 1
    read = read_volume(found.sources[0])
    assert read.shape == (4, 3, 5)
    np.testing.assert_array_equal(read.array, volume.astype(np.float32))
    # Voxel (0, 0, k) of slice k sits at corner + k * 4 mm along the row × column normal, in RAS.
    normal = np.cross(iop[:3], iop[3:])
    for k in (0, 4):
        lps = corner + k * 4.0 * normal
        ras = read.affine @ np.array([0, 0, k, 1.0])
        np.testing.assert_allclose(ras[:3], lps * np.array([-1, -1, 1]), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(read.affine[:3, :3], axis=0), [2.0, 3.0, 4.0], atol=1e-5)


def test_mosaic_stored_last_slice_first_is_put_back_in_order(tmp_path):
    """ucImageNumbTra set for a transverse stack: tile k is slice n-1-k, as dcm2niix reads it."""
    volume = np.arange(2 * 2 * 4, dtype=np.int16).reshape(2, 2, 4)
    protocol = "sSliceArray.lSize = 4\nsSliceArray.ucImageNumbTra = 0x1"
    write_mosaic(tmp_path / "m.dcm", volume, (0.0, 0.0, 0.0), image_header=False, protocol=protocol)
    read = read_volume(discover_sources(tmp_path).sources[0])
    ras, _ = reorient_to_ras(read.array, read.affine)
    np.testing.assert_array_equal(ras[::-1, ::-1, :], volume[:, :, ::-1].astype(np.float32))  # LPS rows -> RAS


def test_series_of_mosaics_is_four_d(tmp_path):
    series = new_uid()
    volumes = [np.full((2, 2, 3), t, dtype=np.int16) for t in (5, 7)]
    for t, volume in enumerate(volumes):
        write_mosaic(tmp_path / f"t{t}.dcm", volume, (0.0, 0.0, 0.0), series_uid=series, instance=t + 1)
    skipped = discover_sources(tmp_path).problems
    assert len(skipped) == 1 and "4D series: 2 images at each of 3 slice positions" in skipped[0].reason
    split = discover_sources(tmp_path, IoConfig(four_d="split")).sources
    assert [s.name for s in split] == ["./ [frame 0]", "./ [frame 1]"]
    assert [float(read_volume(s).array.mean()) for s in split] == [5.0, 7.0]


def test_mosaic_without_its_slice_count_says_it_is_a_mosaic(tmp_path):
    write_mosaic(tmp_path / "m.dcm", np.zeros((2, 2, 4), dtype=np.int16), (0, 0, 0), image_header=False)
    (problem,) = discover_sources(tmp_path).problems
    assert problem.name == "m.dcm"
    assert "Siemens mosaic" in problem.reason and "CSA header" in problem.reason and "dcm2niix" in problem.reason
    assert "single slice" not in problem.reason


def test_float_pixel_data_is_read_exactly(tmp_path):
    """Float Pixel Data (e.g. parametric maps), which GDCM cannot decode, is read with pydicom."""
    import pydicom

    volume = (np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4) - 7.25) * 0.5
    series = new_uid()
    for k in range(volume.shape[2]):
        ds = dicom_dataset(2, 3, "MR", series, new_uid())
        ds.InstanceNumber, ds.BitsAllocated = k + 1, 32
        for integer_only in ("BitsStored", "HighBit", "PixelRepresentation"):  # absent with float pixels
            delattr(ds, integer_only)
        ds.PixelSpacing, ds.ImageOrientationPatient = ["1", "1"], ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = ["0", "0", str(2 * k)]
        ds.FloatPixelData = volume[:, :, k].T.astype("<f4").tobytes()
        pydicom.dcmwrite(tmp_path / f"s{k}.dcm", ds, enforce_file_format=True)
    found = discover_sources(tmp_path)
    assert not found.problems
    read = read_volume(found.sources[0])
    np.testing.assert_array_equal(read.array, volume)
    assert read.meta.stored_dtype == "float32"


@pytest.mark.realdata
def test_real_siemens_mosaic_matches_the_dicom2nifti_reference(shared_data):
    import nibabel as nib

    folder = shared_data / "dicom" / "siemens-mosaic-fmri"
    truth = nib.load(str(folder / "001_ground_truth.nii.gz"))
    sources = discover_sources(folder / "001", IoConfig(four_d="split")).sources
    assert len(sources) == truth.shape[3] == 2
    for t, source in enumerate(sources):
        volume = read_volume(source)
        ours, our_affine = reorient_to_ras(volume.array, volume.affine)
        theirs, their_affine = reorient_to_ras(np.asarray(truth.dataobj, dtype=np.float32)[..., t], truth.affine)
        np.testing.assert_array_equal(ours, theirs)
        corners = voxel_corners_world(our_affine, ours.shape) - voxel_corners_world(their_affine, theirs.shape)
        assert np.abs(corners).max() < 0.001  # mm


@pytest.mark.realdata
def test_real_mosaic_stripped_of_its_csa_header_is_refused_as_a_mosaic(shared_data, tmp_path):
    import pydicom

    source = shared_data / "dicom" / "siemens-mosaic-fmri" / "001" / "IM-0001-0001.dcm"
    ds = pydicom.dcmread(source)
    for element in list(ds.group_dataset(0x0029)):
        del ds[element.tag]
    ds.save_as(tmp_path / "anonymised.dcm")
    (problem,) = discover_sources(tmp_path / "anonymised.dcm").problems
    assert "Siemens mosaic" in problem.reason


def test_dicom_without_preamble_or_extension_is_read_and_other_bare_files_are_not(tmp_path):
    """Older exports write bare datasets (no 128-byte preamble, no 'DICM') in files named like
    IM0001. They are DICOM; a README beside them is not."""
    import pydicom
    from helpers import write_dicom_series

    written = write_dicom_series(tmp_path / "in", np.arange(4 * 3 * 3, dtype=np.int16).reshape(4, 3, 3))
    out = tmp_path / "export"
    out.mkdir()
    for k, path in enumerate(written):
        ds = pydicom.dcmread(path)
        del ds.file_meta  # a bare dataset: no preamble, no 'DICM', no file meta group
        ds.preamble = None
        pydicom.dcmwrite(out / f"IM{k:04d}", ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
        assert (out / f"IM{k:04d}").read_bytes()[128:132] != b"DICM"
    (out / "README").write_text("exported by some console\n")
    found = discover_sources(out)
    assert len(found.sources) == 1 and found.sources[0].kind == "dicom"
    assert read_volume(found.sources[0]).shape == (4, 3, 3)
    assert [s.name for s in found.ignored] == ["README"]
