"""Every input accounted for; MGH/MGZ and MINC read with their exact RAS affine; `inspect`'s numbers
printed as they are; 4D frames in numeric order."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from helpers import blob_volume, rotation, write_nifti

from medsynth.config import IoConfig
from medsynth.io import discover_sources, read_volume
from medsynth.io.discover import natural_order
from medsynth.plan import format_triple

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def inspect(run_cli, target, *options):
    """`medsynth inspect TARGET` as text and as JSON: (exit code, text, report, stderr)."""
    code, text, err = run_cli("inspect", target, "--set", "cache.workers=1", *options)
    json_code, out, json_err = run_cli("inspect", target, "--json", "--set", "cache.workers=1", *options)
    assert json_code == code
    for stream in (text, err, out, json_err):
        assert "Traceback" not in stream
    return code, text, json.loads(out), err


def reasons(report) -> dict[str, str]:
    """Every item the report accounts for, skipped or ignored, by name."""
    return {item["name"]: item["reason"] for item in report["skipped"] + report["ignored"]}


# ---------------------------------------------------------------------------------------------
# Every input is accounted for


@pytest.mark.parametrize("name", ["scan.xyz", "notes.txt", "export", "volume.zip"])
def test_a_lone_unrecognised_file_is_reported_with_its_reason(run_cli, tmp_path, name):
    (tmp_path / name).write_bytes(b"not an image\n" * 20)
    code, text, report, err = inspect(run_cli, tmp_path / name)
    assert code == 1 and "no usable images found" in err
    assert [item["name"] for item in report["skipped"]] == [name]
    reason = report["skipped"][0]["reason"]
    assert "not a recognised image format" in reason and "medsynth reads NIfTI" in reason
    assert name in text and "not a recognised image format" in text


def test_a_folder_of_only_unrecognised_files_lists_each_reason(run_cli, tmp_path):
    (tmp_path / "a.xyz").write_text("x")
    (tmp_path / "b.xyz").write_text("x")
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "export.zip").write_bytes(b"PK\x03\x04")
    code, text, report, err = inspect(run_cli, tmp_path)
    assert code == 1 and "no usable images found (3 skipped)" in err
    found = {item["name"]: item["reason"] for item in report["skipped"]}  # problems, not merely ignored
    assert set(found) == {"2 .xyz files (e.g. a.xyz)", "readme.txt", "sub/export.zip"}
    assert all("not a recognised image format" in reason for reason in found.values())
    assert "unpack it" in found["sub/export.zip"]
    for name in found:
        assert name in text


def test_unrecognised_files_beside_images_are_listed_as_ignored(run_cli, tmp_path):
    write_nifti(tmp_path / "scan.nii.gz", blob_volume())
    (tmp_path / "notes.txt").write_text("x")
    code, text, report, _ = inspect(run_cli, tmp_path)
    assert code == 0 and report["skipped"] == []
    assert report["ignored"] == [{"name": "notes.txt", "reason": "not a recognised image format (.txt)"}]
    assert "Ignored: notes.txt (not a recognised image format (.txt))" in text


def test_data_files_without_a_header_and_hidden_files_are_accounted_for(run_cli, tmp_path):
    (tmp_path / "orphan.img").write_bytes(b"\0" * 64)
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    code, _, report, _ = inspect(run_cli, tmp_path)
    assert code == 1
    found = reasons(report)
    assert "without a header" in found["orphan.img"]
    assert "never read" in found["1 hidden item (.DS_Store)"]


def test_a_named_data_file_says_to_name_its_header(run_cli, tmp_path):
    write_nifti(tmp_path / "pair.img", blob_volume())  # nibabel writes pair.hdr beside it
    code, _, report, _ = inspect(run_cli, tmp_path / "pair.img")
    assert code == 1 and "name its header" in reasons(report)["pair.img"]
    code, _, report, _ = inspect(run_cli, tmp_path)
    assert code == 0 and [s["name"] for s in report["sources"]] == ["pair.hdr"] and not report["ignored"]


def test_reasons_found_only_when_reading_voxels_are_listed_when_nothing_is_usable(run_cli, tmp_path):
    broken = blob_volume()
    broken[3, 3, 3] = np.nan
    write_nifti(tmp_path / "nan.nii.gz", broken)
    code, text, report, err = inspect(run_cli, tmp_path)
    assert code == 1 and "none of the 1 sources could be read" in err
    assert "1 NaN" in reasons(report)["nan.nii.gz"] and "nan.nii.gz" in text


# ---------------------------------------------------------------------------------------------
# FreeSurfer MGH/MGZ: nibabel's vox2ras, exactly


def mgh_affine() -> np.ndarray:
    # Permuted and flipped axes with values a float32 header holds exactly, so the comparison can be exact.
    return np.array([[0.0, 0.0, 1.5, -30.0], [-2.0, 0.0, 0.0, 40.5], [0.0, 1.25, 0.0, -12.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.mark.parametrize("suffix", [".mgh", ".mgz"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_mgh_reads_back_with_the_same_affine_and_values(tmp_path, suffix, dtype):
    import nibabel as nib

    array = (blob_volume((9, 10, 11), high=200.0)).astype(dtype)
    path = tmp_path / f"brain{suffix}"
    nib.save(nib.MGHImage(array, mgh_affine()), str(path))
    (source,) = discover_sources(tmp_path).sources
    volume = read_volume(source)
    assert source.kind == "nifti" and volume.meta.format == "MGH"
    np.testing.assert_array_equal(volume.affine, nib.load(str(path)).affine)
    np.testing.assert_array_equal(volume.affine, mgh_affine())
    np.testing.assert_array_equal(volume.array, array.astype(np.float32))


def test_mgh_frames_split_in_order(tmp_path):
    import nibabel as nib

    frames = np.stack([blob_volume((6, 7, 8), seed=t) for t in range(3)], axis=-1)
    nib.save(nib.MGHImage(frames, mgh_affine()), str(tmp_path / "series.mgz"))
    found = discover_sources(tmp_path, IoConfig(four_d="split"))
    assert [s.name for s in found.sources] == [f"series.mgz [frame {t}]" for t in range(3)]
    for t, source in enumerate(found.sources):
        np.testing.assert_array_equal(read_volume(source).array, frames[..., t])


# ---------------------------------------------------------------------------------------------
# MINC: MINC1 (NetCDF) through nibabel alone, MINC2 (HDF5) through nibabel and h5py


SPATIAL = ("zspace", "yspace", "xspace")  # MINC's usual stored order: x varies fastest
STEPS = {"xspace": 1.5, "yspace": -2.0, "zspace": 2.5}
STARTS = {"xspace": -40.0, "yspace": 60.0, "zspace": -20.0}
COSINES = dict(zip(("xspace", "yspace", "zspace"), rotation(10, 0, 20).T))  # oblique world axes


def minc_affine(dims=SPATIAL) -> np.ndarray:
    """MINC's own definition: world = sum over spatial dims of cosine * (start + index * step)."""
    spatial = [d for d in dims if d.endswith("space")]
    affine = np.eye(4)
    for column, dim in enumerate(spatial):
        affine[:3, column] = COSINES[dim] * STEPS[dim]
    affine[:3, 3] = sum(COSINES[dim] * STARTS[dim] for dim in spatial)
    return affine


def write_minc1(path, data: np.ndarray, dims=SPATIAL, slope_range=None) -> None:
    """A tiny MINC1 file, with nibabel's NetCDF writer. `slope_range`: store int16 voxels in
    (0, 1000) that MINC's image-min/image-max map onto this real range."""
    from nibabel.externals.netcdf import netcdf_file

    handle = netcdf_file(str(path), "w")
    for dim, n in zip(dims, data.shape):
        handle.createDimension(dim, n)
        variable = handle.createVariable(dim, "d", ())
        if dim.endswith("space"):
            variable.step, variable.start = STEPS[dim], STARTS[dim]
            variable.direction_cosines = np.asarray(COSINES[dim], dtype=np.float64)
        variable.spacing = b"regular__"
    if slope_range is None:
        image = handle.createVariable("image", "f", dims)
        image[:] = data.astype(np.float32)
        low, high = float(data.min()), float(data.max())
    else:
        image = handle.createVariable("image", "h", dims)
        image.signtype, image.valid_range = b"signed__", np.array([0.0, 1000.0])
        image[:] = data.astype(np.int16)
        low, high = slope_range
    handle.createVariable("image-min", "d", ()).data[...] = low
    handle.createVariable("image-max", "d", ()).data[...] = high
    handle.close()


def write_minc2(path, data: np.ndarray, dims=SPATIAL) -> None:
    """A tiny MINC2 file: HDF5 laid out as the MINC 2.0 format reference describes."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(str(path), "w") as handle:
        minc = handle.create_group("minc-2.0")
        dimensions = minc.create_group("dimensions")
        for dim in dims:
            variable = dimensions.create_dataset(dim, data=0)
            if dim.endswith("space"):
                variable.attrs["step"], variable.attrs["start"] = STEPS[dim], STARTS[dim]
                variable.attrs["direction_cosines"] = np.asarray(COSINES[dim], dtype=np.float64)
            variable.attrs["spacing"] = np.bytes_(b"regular__")  # fixed-length strings, as libminc writes
        group = minc.create_group("image").create_group("0")
        image = group.create_dataset("image", data=data.astype(np.float32), compression="gzip")
        image.attrs["dimorder"] = np.bytes_(",".join(dims).encode())
        group.create_dataset("image-min", data=float(data.min()))
        group.create_dataset("image-max", data=float(data.max()))


@pytest.mark.parametrize("version", [1, 2])
def test_minc_reads_with_minc_world_coordinates_as_ras(tmp_path, version):
    array = blob_volume((7, 8, 9), high=500.0)  # stored (z, y, x)
    (write_minc1 if version == 1 else write_minc2)(tmp_path / "brain.mnc", array)
    (source,) = discover_sources(tmp_path).sources
    volume = read_volume(source)
    assert volume.meta.format == f"Minc{version}" and volume.meta.reader == "nibabel"
    np.testing.assert_allclose(volume.affine, minc_affine(), atol=1e-9)
    np.testing.assert_allclose(volume.array, array, rtol=1e-6)


def test_minc1_scaling_from_image_min_and_max_is_applied(tmp_path):
    stored = np.arange(6 * 7 * 8).reshape(6, 7, 8) % 1000
    write_minc1(tmp_path / "scaled.mnc", stored, slope_range=(-50.0, 50.0))
    volume = read_volume(discover_sources(tmp_path).sources[0])
    np.testing.assert_allclose(volume.array, stored * 0.1 - 50.0, atol=1e-4)


@pytest.mark.parametrize("version", [1, 2])
def test_minc_time_first_frames_split_in_order(tmp_path, version):
    """MINC stores time first ("time, zspace, yspace, xspace"); frames are along that axis, not x."""
    dims = ("time", *SPATIAL)
    frames = np.stack([blob_volume((5, 6, 7), seed=t) for t in range(3)])  # (t, z, y, x)
    (write_minc1 if version == 1 else write_minc2)(tmp_path / "dynamic.mnc", frames, dims)
    skipped = discover_sources(tmp_path)
    assert "4D image with 3 frames (5×6×7×3)" in skipped.problems[0].reason
    found = discover_sources(tmp_path, IoConfig(four_d="split"))
    assert [s.name for s in found.sources] == [f"dynamic.mnc [frame {t}]" for t in range(3)]
    for t, source in enumerate(found.sources):
        volume = read_volume(source)
        np.testing.assert_allclose(volume.array, frames[t], rtol=1e-6)
        np.testing.assert_allclose(volume.affine, minc_affine(), atol=1e-9)


def test_minc2_without_h5py_is_refused_with_how_to_read_it(run_cli, tmp_path, monkeypatch):
    """Never SimpleITK as a stand-in: it reads MINC's RAS coordinates as LPS."""
    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` now fails, as where it is not installed
    (tmp_path / "brain.mnc").write_bytes(HDF5_MAGIC + b"\0" * 600)
    code, text, report, _ = inspect(run_cli, tmp_path / "brain.mnc")
    assert code == 1
    reason = reasons(report)["brain.mnc"]
    assert "MINC2" in reason and "pip install h5py" in reason and "mnc2nii" in reason
    assert "brain.mnc" in text and "h5py" in text


def test_a_file_named_mnc_that_is_not_minc(run_cli, tmp_path):
    (tmp_path / "some.mnc").write_text("not minc at all\n")
    code, text, report, _ = inspect(run_cli, tmp_path / "some.mnc")
    assert code == 1 and "not a MINC file" in reasons(report)["some.mnc"] and "some.mnc" in text


# ---------------------------------------------------------------------------------------------
# `inspect` prints numbers as they are


@pytest.mark.parametrize(
    ("values", "digits", "text"),
    [
        ((240, 240, 4), 0, "240×240×4"),
        ((240.0, 200.0, 40.0), 0, "240×200×40"),
        ((180.4, 216.0, 0.0), 0, "180×216×0"),
        ((0.5, 10.0, 100.0), 2, "0.5×10×100"),
        ((0.004, 1.0, 1.0), 2, "0.004×1×1"),  # not "0×1×1"
        ((-0.001, 1.0, 1.0), 0, "-0.001×1×1"),
    ],
)
def test_format_triple_keeps_whole_numbers_and_small_values(values, digits, text):
    assert format_triple(values, digits) == text


def test_inspect_prints_shape_spacing_and_extents_in_full(run_cli, tmp_path):
    array = np.zeros((240, 240, 4), dtype=np.float32)
    array[20:220, 30:210, :] = 999.98 - np.random.default_rng(0).random((200, 180, 4))  # a 200×180×40 mm box
    write_nifti(tmp_path / "wide.nii.gz", array, np.diag([1.0, 1.0, 10.0, 1.0]))
    code, text, report, _ = inspect(run_cli, tmp_path)
    assert code == 0 and report["sources"][0]["shape"] == [240, 240, 4]
    assert "240×240×4" in text and "1×1×10" in text
    extent = report["fingerprint"]["median_extent_mm"]
    assert min(extent) > 0 and f"{format_triple(extent, 0)} mm (R×A×S)" in text
    assert re.search(r"median foreground extent\s*│\s*\d+×\d+×\d+ mm", text)
    field = re.search(r"a (\d+)×(\d+)×(\d+) mm field of view", text)
    assert field and all(int(n) > 0 for n in field.groups())
    assert "×× mm" not in text and "e+0" not in text  # 999.98 is "1000", not "1e+03"


# ---------------------------------------------------------------------------------------------
# Frames in natural order


def test_natural_order_compares_numbers_as_numbers():
    names = ["s10.nii", "s9.nii", "s1.nii", "x [frame 10]", "x [frame 2]", "x [frame 100]", "a"]
    assert sorted(names, key=natural_order) == [
        "a",
        "s1.nii",
        "s9.nii",
        "s10.nii",
        "x [frame 2]",
        "x [frame 10]",
        "x [frame 100]",
    ]


def test_twelve_split_frames_are_listed_in_numeric_order(run_cli, tmp_path):
    frames = np.stack([blob_volume((8, 8, 8), seed=t) for t in range(12)], axis=-1)
    write_nifti(tmp_path / "run.nii.gz", frames)
    expected = [f"run.nii.gz [frame {t}]" for t in range(12)]
    found = discover_sources(tmp_path, IoConfig(four_d="split"))
    assert [s.name for s in found.sources] == expected
    code, text, report, _ = inspect(run_cli, tmp_path, "--set", "io.four_d=split")
    assert code == 0 and [s["name"] for s in report["sources"]] == expected
    positions = [text.index(name + " ") for name in expected]
    assert positions == sorted(positions)
