"""Hostile input files: mutated real NIfTI and DICOM files give a clean error or a valid volume.

Never a crash (any exception other than SourceError), a hang, or a memory blow-up. hypothesis
mutates real files from ../shared/data: truncation, flipped bytes, absurd header fields
(10^9-voxel dimensions, zero/negative/NaN spacings, NaN affines, wrong dtype codes), corrupt and
"bomb" compressed streams, and absurd DICOM tags. Peak Python/numpy allocation is measured per case
with tracemalloc (nibabel and pydicom allocate voxels through numpy), and the process's peak RSS
over the whole test is checked too.

The default suite runs a few hundred cases; `make test-slow` runs thousands and records the
outcome counts in docs/reliability.md.
"""

from __future__ import annotations

import gzip
import resource
import shutil
import struct
import tempfile
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_report import record

from medsynth.io import SourceError, discover_sources, read_volume

NIFTI = SHARED_DATA / "nifti" / "anatomical.nii"  # uncompressed NIfTI-1
NIFTI_GZ = SHARED_DATA / "nifti" / "aniso_vox.nii.gz"
DICOM_SERIES = SHARED_DATA / "dicom" / "clean-series-17"
pytestmark = [
    pytest.mark.skipif(not NIFTI.exists(), reason=f"real test data not found at {SHARED_DATA}"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # pydicom warns, rightly, about every invalid value
]

# (name, byte offset, struct code, count) of NIfTI-1 header fields worth lying in.
NIFTI_FIELDS = [
    ("dim", 40, "h", 8),
    ("datatype", 70, "h", 1),
    ("bitpix", 72, "h", 1),
    ("pixdim", 76, "f", 8),
    ("vox_offset", 108, "f", 1),
    ("scl_slope", 112, "f", 1),
    ("scl_inter", 116, "f", 1),
    ("qform_code", 252, "h", 1),
    ("sform_code", 254, "h", 1),
    ("quatern_and_offset", 256, "f", 6),
    ("srow", 280, "f", 12),
]
ABSURD_INTS = st.sampled_from([0, 1, -1, 2, 3, 7, 4, 5, 16, 32, 64, 128, 256, 511, 1024, 2304, 32767, -32768, 1000])
ABSURD_FLOATS = st.sampled_from([0.0, -1.0, -0.0, 1e-30, 1e30, float("nan"), float("inf"), float("-inf"), 3.5, 1e9])
PEAK_LIMIT_BYTES = 1 << 30  # no single case may allocate 1 GiB

outcomes: Counter = Counter()
peaks: list[int] = []
peaks_by_builder: dict[str, int] = {}


def _endian(header: bytes) -> str:
    return "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"


def mutate_nifti_field(data: bytearray, field: int, element: int, int_value: int, float_value: float) -> bytearray:
    name, offset, code, count = NIFTI_FIELDS[field]
    position = offset + (element % count) * struct.calcsize(code)
    value = int_value if code == "h" else float_value
    struct.pack_into(_endian(bytes(data)) + code, data, position, value)
    return data


def flip_bytes(data: bytearray, positions: list[int], values: list[int], header_only: bool) -> bytearray:
    span = min(len(data), 352) if header_only else len(data)
    for position, value in zip(positions, values, strict=False):
        data[position % span] ^= value or 1
    return data


def gzip_bomb(header: bytes, declared: tuple[int, int, int], stream_megabytes: int) -> bytes:
    """A .nii.gz whose header declares `declared` int16 voxels over a small stream of zeros."""
    data = bytearray(header[:352])
    endian = _endian(header)
    struct.pack_into(endian + "8h", data, 40, 3, *declared, 1, 1, 1, 1)
    struct.pack_into(endian + "hh", data, 70, 4, 16)  # int16
    struct.pack_into(endian + "f", data, 108, 352.0)
    return gzip.compress(bytes(data) + bytes(stream_megabytes << 20), compresslevel=1)


nifti_case = st.one_of(
    st.tuples(
        st.just("field"),
        st.integers(0, len(NIFTI_FIELDS) - 1),
        st.integers(0, 11),
        ABSURD_INTS,
        ABSURD_FLOATS,
        st.booleans(),  # gzip the result
    ),
    st.tuples(
        st.just("flip"),
        st.lists(st.integers(0, 1 << 20), min_size=1, max_size=16),
        st.lists(st.integers(0, 255), min_size=1, max_size=16),
        st.booleans(),  # header only
        st.booleans(),  # gzip the result
    ),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999), st.booleans()),
    st.tuples(st.just("gz_stream"), st.lists(st.integers(0, 1 << 20), min_size=1, max_size=8), st.floats(0.05, 1.0)),
    st.tuples(
        st.just("bomb"),
        st.sampled_from([(1024, 1024, 1024), (2048, 2048, 2048), (32767, 32767, 32767), (512, 512, 64)]),
        st.integers(0, 8),
    ),
)

dicom_case = st.one_of(
    st.tuples(
        st.just("tag"),
        st.sampled_from(
            [
                ("Rows", 65535),
                ("Columns", 65535),
                ("Rows", 0),
                ("NumberOfFrames", "1000000"),
                ("BitsAllocated", 0),
                ("BitsAllocated", 7),
                ("BitsAllocated", 64),
                ("PixelRepresentation", 5),
                ("SamplesPerPixel", 3),
                ("PixelSpacing", ["0", "0"]),
                ("PixelSpacing", ["-1", "nan"]),
                ("SliceThickness", "nan"),
                ("ImageOrientationPatient", ["nan", "0", "0", "0", "1", "0"]),
                ("ImageOrientationPatient", ["0", "0", "0", "0", "0", "0"]),
                ("ImagePositionPatient", ["inf", "0", "0"]),
                ("RescaleSlope", "nan"),
                ("RescaleSlope", "0"),
                ("RescaleIntercept", "1e308"),
            ]
        ),
        st.integers(0, 16),  # which file of the series
    ),
    st.tuples(
        st.just("flip"),
        st.integers(0, 16),
        st.lists(st.integers(0, 1 << 16), min_size=1, max_size=16),
        st.lists(st.integers(0, 255), min_size=1, max_size=16),
    ),
    st.tuples(st.just("truncate"), st.integers(0, 16), st.floats(0.0, 0.999)),
)


def build_nifti(case, folder: Path) -> Path:
    kind = case[0]
    raw = bytearray(NIFTI.read_bytes())
    compress = False
    if kind == "field":
        _, field, element, int_value, float_value, compress = case
        data = mutate_nifti_field(raw, field, element, int_value, float_value)
    elif kind == "flip":
        _, positions, values, header_only, compress = case
        data = flip_bytes(raw, positions, values, header_only)
    elif kind == "truncate":
        _, fraction, compress = case
        data = raw[: int(len(raw) * fraction)]
    elif kind == "gz_stream":  # damage the compressed bytes of a real .nii.gz, then maybe cut it
        _, positions, keep = case
        stream = flip_bytes(bytearray(NIFTI_GZ.read_bytes()), positions, [0x5A] * len(positions), False)
        path = folder / "case.nii.gz"
        path.write_bytes(bytes(stream[: max(1, int(len(stream) * keep))]))
        return path
    else:  # bomb
        _, declared, megabytes = case
        path = folder / "case.nii.gz"
        path.write_bytes(gzip_bomb(bytes(raw), declared, megabytes))
        return path
    path = folder / ("case.nii.gz" if compress else "case.nii")
    path.write_bytes(gzip.compress(bytes(data), compresslevel=1) if compress else bytes(data))
    return path


def build_dicom(case, folder: Path) -> Path:
    import pydicom

    series = folder / "series"
    shutil.copytree(DICOM_SERIES, series)
    files = sorted(series.iterdir())
    for file in files:
        file.chmod(0o644)
    kind = case[0]
    if kind == "tag":
        _, (keyword, value), index = case
        target = files[index % len(files)]
        dataset = pydicom.dcmread(target, force=True)
        setattr(dataset, keyword, value)
        dataset.save_as(target)
    elif kind == "flip":
        _, index, positions, values = case
        target = files[index % len(files)]
        target.write_bytes(bytes(flip_bytes(bytearray(target.read_bytes()), positions, values, False)))
    else:
        _, index, fraction = case
        target = files[index % len(files)]
        data = target.read_bytes()
        target.write_bytes(data[: int(len(data) * fraction)])
    return series


def read_everything(folder: Path) -> str:
    """Discover and read every source; return the outcome class. Anything but SourceError fails."""
    discovery = discover_sources(folder)
    if not discovery.sources:
        assert discovery.skipped, "nothing found and nothing reported as skipped"
        assert all(item.reason for item in discovery.skipped)
        return "refused with a reason"
    valid = 0
    for source in discovery.sources:
        try:
            volume = read_volume(source)
        except SourceError as exc:
            assert str(exc).strip() and "\n" not in str(exc)
            continue
        assert volume.array.ndim == 3 and volume.array.dtype == np.float32
        assert np.isfinite(volume.array).all() and np.isfinite(volume.affine).all()
        valid += 1
    return "read as a valid volume" if valid else "refused with a reason"


def run_case(builder, case) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        built = builder(case, folder)
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]  # what earlier cases left alive is not this case's
        outcome = read_everything(built if built.is_dir() else folder)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    peaks.append(peak)
    peaks_by_builder[builder.__name__] = max(peak, peaks_by_builder.get(builder.__name__, 0))
    assert peak < PEAK_LIMIT_BYTES, f"{case[0]} case allocated {peak / 2**20:.0f} MiB"
    outcomes[(builder.__name__, case[0], outcome)] += 1


@pytest.fixture(scope="module", autouse=True)
def _traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def _fuzz(strategy, builder, examples: int):
    @settings(
        max_examples=examples,
        deadline=20_000,  # ms: a case that takes 20 s is a hang
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(case=strategy)
    def fuzz(case):
        run_case(builder, case)

    fuzz()


def _summarise(kind: str) -> tuple[int, str]:
    counts = Counter()
    for (builder, _, outcome), n in outcomes.items():
        if builder == kind:
            counts[outcome] += n
    total = sum(counts.values())
    return total, ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))


@pytest.mark.parametrize(
    "examples", [pytest.param(150, id="short"), pytest.param(2500, id="full", marks=pytest.mark.slow)]
)
def test_mutated_nifti_gives_a_clean_error_or_a_valid_volume(examples):
    _fuzz(nifti_case, build_nifti, examples)
    total, summary = _summarise("build_nifti")
    peak = peaks_by_builder["build_nifti"] / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    assert rss < 6 * 1024, f"peak RSS {rss:.0f} MiB"
    record(
        "hostile-nifti",
        "hostile NIfTI files",
        "hypothesis mutates a real NIfTI-1 (.nii and .nii.gz): absurd header fields, flipped bytes, "
        "truncation, corrupt gzip streams, gzip bombs declaring up to 32767³ voxels",
        total,
        f"{summary}; no crash or hang; peak allocation per case {peak:.0f} MiB (limit 1024), "
        f"process peak RSS {rss:.0f} MiB",
    )


@pytest.mark.skipif(not DICOM_SERIES.exists(), reason="DICOM test series not found")
@pytest.mark.parametrize(
    "examples", [pytest.param(40, id="short"), pytest.param(600, id="full", marks=pytest.mark.slow)]
)
def test_mutated_dicom_series_gives_a_clean_error_or_a_valid_volume(examples):
    _fuzz(dicom_case, build_dicom, examples)
    total, summary = _summarise("build_dicom")
    peak = peaks_by_builder["build_dicom"] / 2**20
    record(
        "hostile-dicom",
        "hostile DICOM series",
        "hypothesis mutates one file of a real 17-slice series: absurd Rows/Columns/frames/bits, "
        "zero/NaN spacing and orientation, NaN rescale, flipped bytes, truncation",
        total,
        f"{summary}; no crash or hang; peak allocation per case {peak:.0f} MiB",
    )


@pytest.mark.skipif(not DICOM_SERIES.exists(), reason="DICOM test series not found")
def test_corrupt_dicom_length_field_does_not_allocate_what_it_claims():
    """Regression: byte 155 of IMG0001.dcm is in a file-meta length field; flipped, it claimed
    1 040 187 394 bytes, and a buffered read allocated them all for a 24 kB file."""
    run_case(build_dicom, ("flip", 0, [155], [62]))
    assert peaks[-1] < 64 * 2**20


@pytest.mark.skipif(not DICOM_SERIES.exists(), reason="DICOM test series not found")
@pytest.mark.parametrize(
    "case",
    [("flip", 0, [272], [0]), ("flip", 0, [136], [8])],
    ids=["transfer-syntax-uid-not-a-transfer-syntax", "unknown-value-representation"],
)
def test_fuzzer_findings_are_clean_errors(case):
    """Regressions from the full fuzz run: pydicom raised ValueError and NotImplementedError."""
    run_case(build_dicom, case)


@pytest.mark.parametrize("declared", [(2048, 2048, 2048), (32767, 32767, 32767)])
def test_gzip_bomb_is_refused_from_the_header(tmp_path, declared):
    (tmp_path / "bomb.nii.gz").write_bytes(gzip_bomb(NIFTI.read_bytes(), declared, 1))
    discovery = discover_sources(tmp_path)
    assert not discovery.sources
    assert "the header declares" in discovery.skipped[0].reason
