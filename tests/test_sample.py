"""Sampling: geometry, units, determinism, shards, resume, DICOM, provenance, errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import CONFIGS, cpu_runtime
from reliability_report import record

from medsynth.checkpoint import load_checkpoint
from medsynth.config import load_config
from medsynth.phantoms import write_phantoms
from medsynth.runs import train_run

CPU = cpu_runtime()


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory) -> Path:
    """A tiny model trained for a few steps on CT phantoms (Hounsfield units)."""
    root = tmp_path_factory.mktemp("ct")
    write_phantoms(root / "data", 6, shape=(32, 32, 32), spacing=6.0)
    config = load_config(CONFIGS / "tiny.yaml", ["plan.target_shape=[16,16,32]", "train.max_steps=3"])
    train_run(root / "data", root / "run", config, CPU)
    return root / "run"


def sample(run_cli, source, out, *args):
    code, stdout, stderr = run_cli("sample", source, "-o", out, *map(str, args))
    assert "Traceback" not in stderr
    return code, stderr


def voxels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("sample_*.nii.gz"))}


def test_geometry_units_and_header(run_cli, ct_run, tmp_path):
    code, _ = sample(run_cli, ct_run, tmp_path / "out", "-n", 3)
    assert code == 0
    payload = load_checkpoint(ct_run)
    plan = payload["plan"]
    image = nib.load(str(tmp_path / "out" / "sample_00000.nii.gz"))
    assert image.shape == (16, 16, 32)
    assert image.get_data_dtype() == np.int16  # CT: int16 Hounsfield units
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    np.testing.assert_allclose(image.header.get_zooms(), plan["spacing"], rtol=1e-6)
    assert int(image.header["qform_code"]) > 0 and int(image.header["sform_code"]) > 0
    assert b"SYNTHETIC" in image.header["descrip"].tobytes() and b"medsynth" in image.header["descrip"].tobytes()
    assert not np.allclose(image.affine, np.eye(4))
    values = np.asarray(image.dataobj)
    low, high = plan["window"]
    assert values.min() >= low and values.max() <= high


def test_samples_lie_where_the_training_volumes_lie(run_cli, ct_run, tmp_path):
    """The sample grid is centred on the training crops' mean centre, same spacing, same axes."""
    sample(run_cli, ct_run, tmp_path / "out", "-n", 1)
    image = nib.load(str(tmp_path / "out" / "sample_00000.nii.gz"))
    manifest = json.loads((ct_run / "manifest.json").read_text())
    shape = np.array(image.shape)
    centre = np.array([*((shape - 1) / 2), 1.0])
    training_centres = [np.asarray(e["affine"]) @ centre for e in manifest["entries"]]
    np.testing.assert_allclose(image.affine @ centre, np.mean(training_centres, axis=0), atol=1e-3)
    np.testing.assert_allclose(image.affine[:3, :3], np.asarray(manifest["entries"][0]["affine"])[:3, :3], atol=1e-5)


def test_mr_plan_writes_the_typical_training_range(tmp_path, run_cli):
    from helpers import blob_volume, write_nifti

    for seed in range(4):
        write_nifti(
            tmp_path / "data" / f"mr{seed}.nii.gz",
            blob_volume((24, 24, 24), seed=seed, high=600 + 50 * seed),
            dtype=np.uint16,
        )
    config = load_config(CONFIGS / "tiny.yaml", ["train.max_steps=2"])
    train_run(tmp_path / "data", tmp_path / "run", config, CPU)
    plan = load_checkpoint(tmp_path / "run")["plan"]
    assert plan["modality"] == "mr" and plan["output_dtype"] == "uint16"
    sample(run_cli, tmp_path / "run", tmp_path / "out", "-n", 2)
    image = nib.load(str(tmp_path / "out" / "sample_00000.nii.gz"))
    values = np.asarray(image.dataobj)
    assert image.get_data_dtype() == np.uint16
    assert plan["window"][0] <= values.min() and values.max() <= plan["window"][1] + 0.5


@pytest.mark.parametrize("batch_size", [1, 3, 6])
def test_same_seed_same_voxels_whatever_the_batch_size(run_cli, ct_run, tmp_path, batch_size):
    sample(run_cli, ct_run, tmp_path / "reference", "-n", 6, "--seed", 7, "--batch-size", 4)
    sample(run_cli, ct_run, tmp_path / "other", "-n", 6, "--seed", 7, "--batch-size", batch_size)
    reference, other = voxels(tmp_path / "reference"), voxels(tmp_path / "other")
    assert reference.keys() == other.keys() and len(reference) == 6
    for name in reference:
        np.testing.assert_array_equal(reference[name], other[name])


def test_float_output_is_batch_independent_too(ct_run):
    """The raw generator output, before rounding to int16, is bitwise independent of batching."""
    from medsynth.checkpoint import generator_from_checkpoint
    from medsynth.sample import generate, latent_for

    generator = generator_from_checkpoint(load_checkpoint(ct_run))
    latents = torch.stack([latent_for(3, i, 16, "normal") for i in range(7)])
    together = generate(generator, latents, torch.device("cpu"))
    apart = np.concatenate([generate(generator, latents[i : i + 1], torch.device("cpu")) for i in range(7)])
    np.testing.assert_array_equal(together, apart)


def test_different_seeds_give_different_samples(run_cli, ct_run, tmp_path):
    sample(run_cli, ct_run, tmp_path / "a", "-n", 2, "--seed", 1)
    sample(run_cli, ct_run, tmp_path / "b", "-n", 2, "--seed", 2)
    a, b = voxels(tmp_path / "a"), voxels(tmp_path / "b")
    assert not np.array_equal(a["sample_00000.nii.gz"], b["sample_00000.nii.gz"])
    assert not np.array_equal(a["sample_00000.nii.gz"], a["sample_00001.nii.gz"])


def test_shards_make_exactly_the_unsharded_set(run_cli, ct_run, tmp_path):
    sample(run_cli, ct_run, tmp_path / "whole", "-n", 5, "--seed", 3)
    sample(run_cli, ct_run, tmp_path / "sharded", "-n", 5, "--seed", 3, "--shard", "1/2")
    sample(run_cli, ct_run, tmp_path / "sharded", "-n", 5, "--seed", 3, "--shard", "0/2")
    whole, sharded = voxels(tmp_path / "whole"), voxels(tmp_path / "sharded")
    assert whole.keys() == sharded.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name], sharded[name])
    manifest_whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    manifest_sharded = json.loads((tmp_path / "sharded" / "manifest.json").read_text())
    assert manifest_whole["samples"] == manifest_sharded["samples"] and manifest_whole["count"] == 5


def test_every_file_has_a_sidecar_with_provenance(run_cli, ct_run, tmp_path):
    sample(run_cli, ct_run, tmp_path / "out", "-n", 3, "--seed", 11)
    import hashlib

    checkpoint_hash = hashlib.sha256((ct_run / "checkpoints" / "last.pt").read_bytes()).hexdigest()
    for index in range(3):
        record = json.loads((tmp_path / "out" / f"sample_{index:05d}.json").read_text())
        assert record["index"] == index and record["file"] == f"sample_{index:05d}.nii.gz"
        assert record["checkpoint_sha256"] == checkpoint_hash and record["training_step"] == 3
        assert record["base_seed"] == 11 and isinstance(record["seed"], int)
        assert record["medsynth_version"] and "sample" in record["command"] and record["synthetic"] is True
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["file"] for s in manifest["samples"]] == [f"sample_{i:05d}.nii.gz" for i in range(3)]


def test_rerun_skips_finished_and_completes_interrupted(run_cli, ct_run, tmp_path):
    out = tmp_path / "out"
    sample(run_cli, ct_run, out, "-n", 4)
    reference = voxels(out)
    # Simulate a crash: sample 1 lost its volume, sample 2 never got its sidecar, and a temporary
    # file of a half-written sample 3 is lying around.
    (out / "sample_00001.nii.gz").unlink()
    (out / "sample_00002.json").unlink()
    (out / ".sample_00003.nii.gz.abc.tmp").write_bytes(b"\x1f\x8b half")
    before = (out / "sample_00000.nii.gz").stat().st_mtime_ns
    code, stderr = sample(run_cli, ct_run, out, "-n", 4)
    assert code == 0 and "2 written, 2 already there" in stderr
    assert (out / "sample_00000.nii.gz").stat().st_mtime_ns == before  # untouched
    again = voxels(out)
    for name in reference:
        np.testing.assert_array_equal(reference[name], again[name])


def test_no_half_written_file_under_a_final_name(run_cli, ct_run, tmp_path, monkeypatch):
    """A crash inside the write leaves no sample_*.nii.gz behind."""

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("medsynth.io.nifti.compress", explode)
    with pytest.raises(RuntimeError):
        from medsynth.sample import SampleRequest, run_sampling

        run_sampling(SampleRequest(checkpoint=ct_run, count=2, out_dir=tmp_path / "out"))
    assert list((tmp_path / "out").glob("sample_*.nii.gz")) == []
    assert list((tmp_path / "out").glob("*.tmp")) == []


def test_force_semantics(run_cli, ct_run, tmp_path):
    out = tmp_path / "out"
    sample(run_cli, ct_run, out, "-n", 2, "--seed", 1)
    first = voxels(out)
    code, stderr = sample(run_cli, ct_run, out, "-n", 2, "--seed", 2)
    assert code == 1 and "another checkpoint, seed, format or conditions" in stderr and "--force" in stderr
    np.testing.assert_array_equal(
        voxels(out)["sample_00000.nii.gz"], first["sample_00000.nii.gz"]
    )  # nothing overwritten
    code, _ = sample(run_cli, ct_run, out, "-n", 2, "--seed", 2, "--force")
    assert code == 0
    assert json.loads((out / "sample_00000.json").read_text())["base_seed"] == 2
    assert not np.array_equal(voxels(out)["sample_00000.nii.gz"], first["sample_00000.nii.gz"])


def test_dicom_output_reads_back_like_the_nifti(run_cli, ct_run, tmp_path):
    import pydicom
    import SimpleITK as sitk

    from medsynth.io import discover_sources, read_volume

    sample(run_cli, ct_run, tmp_path / "nifti", "-n", 2, "--seed", 5)
    code, _ = sample(run_cli, ct_run, tmp_path / "dicom", "-n", 2, "--seed", 5, "--format", "dicom")
    assert code == 0
    series = tmp_path / "dicom" / "sample_00001"
    files = sorted(series.glob("*.dcm"))
    assert len(files) == 32
    # SimpleITK's own series reader: same geometry and values as the NIfTI of the same seed.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (x, y, z)
    nifti = nib.load(str(tmp_path / "nifti" / "sample_00001.nii.gz"))
    np.testing.assert_array_equal(array, np.asarray(nifti.dataobj))
    lps = np.asarray(image.GetOrigin())
    np.testing.assert_allclose(lps * [-1, -1, 1], nifti.affine[:3, 3], atol=1e-3)
    np.testing.assert_allclose(image.GetSpacing(), nifti.header.get_zooms(), atol=1e-4)
    # And medsynth's own reader agrees, voxel corner for voxel corner.
    (source,) = discover_sources(series).sources
    volume = read_volume(source)
    np.testing.assert_array_equal(volume.array, np.asarray(nifti.dataobj, dtype=np.float32))
    np.testing.assert_allclose(volume.affine, nifti.affine, atol=1e-3)
    header = pydicom.dcmread(files[0])
    assert list(header.ImageType) == ["DERIVED", "SECONDARY", "SYNTHETIC"]
    assert (
        header.Modality == "CT"
        and str(header.PatientName) == "SYNTHETIC^MEDSYNTH"
        and header.PatientID.startswith("SYNTHETIC")
    )
    uids = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert len(uids) == 32
    other = pydicom.dcmread(sorted((tmp_path / "dicom" / "sample_00000").glob("*.dcm"))[0])
    assert other.SeriesInstanceUID != header.SeriesInstanceUID and other.StudyInstanceUID != header.StudyInstanceUID
    assert float(header.SliceThickness) == pytest.approx(nifti.header.get_zooms()[2], abs=1e-4)


def test_missing_corrupt_and_incompatible_checkpoints(run_cli, ct_run, tmp_path):
    code, stderr = sample(run_cli, tmp_path / "nope.pt", tmp_path / "out", "-n", 1)
    assert code == 1 and "no such checkpoint" in stderr
    (tmp_path / "empty-run").mkdir()
    code, stderr = sample(run_cli, tmp_path / "empty-run", tmp_path / "out", "-n", 1)
    assert code == 1 and "no checkpoint in this run folder" in stderr
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((ct_run / "checkpoints" / "last.pt").read_bytes()[:1000])
    code, stderr = sample(run_cli, corrupt, tmp_path / "out", "-n", 1)
    assert code == 1 and "corrupt" in stderr
    payload = load_checkpoint(ct_run)
    payload["schema_version"] = 99
    old = tmp_path / "future.pt"
    torch.save(payload, old)
    code, stderr = sample(run_cli, old, tmp_path / "out", "-n", 1)
    assert code == 1 and "schema version 99" in stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("sample_*"))


def test_malicious_checkpoint_cannot_run_code(tmp_path, run_cli):
    """weights_only loading: a pickle that would run code is refused, not executed."""
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "medsynth-checkpoint", "payload": Exploit()}, path)
    code, stderr = sample(run_cli, path, tmp_path / "out", "-n", 1)
    assert code == 1 and not marker.exists()
    assert "could run code" in stderr and "system" in stderr and "Traceback" not in stderr
    assert "weights_only=False" not in stderr  # torch's advice to drop the protection is not passed on
    # Pickle protocol 5 fails earlier in the weights-only unpickler, as corrupt: refused all the same.
    torch.save({"format": "medsynth-checkpoint", "payload": Exploit()}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    code, stderr = sample(run_cli, path, tmp_path / "out", "-n", 1)
    assert code == 1 and not marker.exists() and "Traceback" not in stderr
    record(
        "checkpoint-untrusted",
        "untrusted checkpoints",
        "a checkpoint whose pickle would run a shell command; a truncated checkpoint; one of schema version 99",
        3,
        "all refused with one line naming the file and the reason (the code never runs: weights_only=True)",
    )


def test_bad_shard_is_a_usage_error(run_cli, ct_run, tmp_path):
    code, stderr = sample(run_cli, ct_run, tmp_path / "out", "-n", 2, "--shard", "2/2")
    assert code == 2 and "--shard" in stderr


def test_output_that_is_a_file_is_a_usage_error_not_a_traceback(run_cli, ct_run, tmp_path):
    from medsynth.errors import UsageError
    from medsynth.sample import SampleRequest, run_sampling

    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    code, stderr = sample(run_cli, ct_run, existing, "-n", 1)
    assert code == 2 and "notes.txt" in stderr and "is a file" in stderr
    with pytest.raises(UsageError, match="is a file"):  # the library says so too, for demo and scripts
        run_sampling(SampleRequest(checkpoint=ct_run, count=1, out_dir=existing))
    code, stderr = sample(run_cli, ct_run, existing / "below", "-n", 1)
    assert code == 1 and "cannot write" in stderr
    assert existing.read_text() == "keep me"


def test_a_version_1_checkpoint_samples_the_same_files(run_cli, ct_run, tmp_path):
    """Schema 1 kept the samples' affine beside the plan; it is read into the plan on load."""
    payload = load_checkpoint(ct_run)
    payload["schema_version"] = 1
    payload["sample_affine"] = [list(row) for row in payload["plan"].pop("output_affine")]
    torch.save(dict(payload), tmp_path / "v1.pt")
    sample(run_cli, ct_run, tmp_path / "now", "-n", 2)
    sample(run_cli, tmp_path / "v1.pt", tmp_path / "old", "-n", 2)
    now, old = voxels(tmp_path / "now"), voxels(tmp_path / "old")
    for name in now:
        np.testing.assert_array_equal(now[name], old[name])
        a = nib.load(str(tmp_path / "now" / name)).affine
        np.testing.assert_array_equal(a, nib.load(str(tmp_path / "old" / name)).affine)


def test_a_checkpoint_from_before_model_upsample_loads_its_transposed_generator(ct_run, tmp_path):
    """Checkpoints written before model.upsample existed hold transposed-convolution generators;
    they must load as such, whatever the default has become since."""
    from dataclasses import replace

    from medsynth.checkpoint import generator_from_checkpoint
    from medsynth.config import config_from_dict
    from medsynth.models import Generator3d

    payload = load_checkpoint(ct_run)
    model = replace(config_from_dict(payload["config"]).model, upsample="transposed")
    old_generator = Generator3d(model, tuple(payload["plan"]["target_shape"]))
    payload["generator"] = payload["generator_ema"] = old_generator.state_dict()
    del payload["config"]["model"]["upsample"]
    torch.save(dict(payload), tmp_path / "old.pt")
    generator = generator_from_checkpoint(load_checkpoint(tmp_path / "old.pt"))
    assert any(isinstance(m, torch.nn.ConvTranspose3d) for m in generator.modules())


def test_mr_window_follows_the_configured_percentiles(tmp_path, run_cli):
    """The window `sample` maps [-1, 1] back to is the typical window at the percentiles each
    training volume was windowed at, computed by the same function: not fixed 0.5/99.5."""
    from helpers import blob_volume, write_nifti

    from medsynth.pipeline import fingerprint_folder
    from medsynth.plan import make_plan
    from medsynth.preprocess import foreground_mask, percentile_window

    arrays = [blob_volume((24, 24, 24), seed=seed, high=600 + 50 * seed) for seed in range(4)]
    for seed, array in enumerate(arrays):
        write_nifti(tmp_path / "data" / f"mr{seed}.nii.gz", array, dtype=np.uint16)
    config = load_config(CONFIGS / "tiny.yaml", ["plan.mr_percentiles=[2,60]", "train.max_steps=1"])
    stored = [a.astype(np.uint16).astype(np.float32) for a in arrays]  # what the files hold
    windows = [percentile_window(a, foreground_mask(a, "mr"), (2.0, 60.0)) for a in stored]
    expected = (np.median([w.low for w in windows]), np.median([w.high for w in windows]))
    plan = make_plan(fingerprint_folder(tmp_path / "data", config).fingerprint, config.plan)
    np.testing.assert_allclose(plan.window, expected, rtol=1e-6)
    default = load_config(CONFIGS / "tiny.yaml")
    default_plan = make_plan(fingerprint_folder(tmp_path / "data", default).fingerprint, default.plan)
    assert default_plan.window[1] > plan.window[1] * 1.1  # the setting matters, so the test can fail
    train_run(tmp_path / "data", tmp_path / "run", config, CPU)
    sample(run_cli, tmp_path / "run", tmp_path / "out", "-n", 2)
    values = np.asarray(nib.load(str(tmp_path / "out" / "sample_00000.nii.gz")).dataobj)
    assert values.max() <= round(expected[1]) + 1
