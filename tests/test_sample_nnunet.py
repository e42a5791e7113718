"""`medsynth sample --format nnunet`: a paired run's samples as a ready nnU-Net v2 raw dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import cpu_runtime, tiny_config, write_labelled_folders

from medsynth.checkpoint import load_checkpoint
from medsynth.nnunet import channel_name_for_modality, verify_nnunet_dataset
from medsynth.plan import Plan
from medsynth.runs import train_run
from medsynth.sample import default_dataset_name

DATASET = "Dataset900_SyntheticHippoV2"  # the default id, and the name made from the run folder's


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory) -> Path:
    """A paired tiny model (label values 0, 1, 2) trained for 3 steps, in a run folder named hippo-v2."""
    root = tmp_path_factory.mktemp("nnunet-run")
    scans, labels = write_labelled_folders(root, n=3)
    config = tiny_config(f"labels.dir={labels}", "train.max_steps=3", f"cache.dir={root / 'cache'}")
    train_run(scans, root / "hippo-v2", config, cpu_runtime())
    return root / "hippo-v2"


def sample(run_cli, source: Path, out: Path, *args) -> tuple[int, str]:
    code, stdout, stderr = run_cli("sample", source, "-o", out, *map(str, args))
    assert "Traceback" not in stderr
    return code, stdout + stderr


def cases(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """case -> (image voxels, label voxels) as stored."""
    found = {}
    for path in sorted((folder / "imagesTr").glob("*_0000.nii.gz")):
        case = path.name.removesuffix("_0000.nii.gz")
        labels = folder / "labelsTr" / f"{case}.nii.gz"
        found[case] = (np.asarray(nib.load(str(path)).dataobj), np.asarray(nib.load(str(labels)).dataobj))
    return found


def dataset_json(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


def test_a_paired_run_becomes_a_dataset_that_passes_the_verifier(run_cli, paired_run, tmp_path):
    import hashlib

    code, output = sample(
        run_cli, paired_run, tmp_path / "raw", "-n", 3, "--seed", 2, "--format", "nnunet", "--preview"
    )
    assert code == 0, output
    folder = tmp_path / "raw" / DATASET
    assert verify_nnunet_dataset(folder) == []
    # nnU-Net sees only its own files; medsynth's records sit in a folder it never reads.
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"synth_{i:05d}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"synth_{i:05d}.nii.gz" for i in range(3)]
    assert {p.name for p in folder.iterdir() if not p.name.startswith(".")} == {
        "dataset.json",
        "imagesTr",
        "labelsTr",
        "medsynth",
    }
    plan = Plan.from_dict(load_checkpoint(paired_run)["plan"])
    data = dataset_json(folder)
    assert data["channel_names"] == {"0": channel_name_for_modality(plan.modality)}
    assert data["labels"] == {"background": 0, **{name: i for i, name in enumerate(plan.label_names) if i}}
    assert data["numTraining"] == 3 and data["file_ending"] == ".nii.gz"

    checkpoint_hash = hashlib.sha256((paired_run / "checkpoints" / "last.pt").read_bytes()).hexdigest()
    records = folder / "medsynth"
    for i in range(3):
        record = json.loads((records / f"synth_{i:05d}.json").read_text())
        assert record["checkpoint_sha256"] == checkpoint_hash and record["training_step"] == 3
        assert record["base_seed"] == 2 and isinstance(record["seed"], int) and record["format"] == "nnunet"
        assert record["nnunet_case"] == f"synth_{i:05d}" and record["nnunet_dataset"] == DATASET
        assert (records / record["file"]).resolve() == (folder / "imagesTr" / f"synth_{i:05d}_0000.nii.gz")
        assert (records / record["label_file"]).resolve() == (folder / "labelsTr" / f"synth_{i:05d}.nii.gz")
    manifest = json.loads((records / "manifest.json").read_text())
    assert manifest["count"] == 3 and manifest["labels"]["values"] == [0, 1, 2]
    assert (records / "preview.png").is_file()

    raw_root = str((tmp_path / "raw").resolve())
    assert "3 written, 0 already there" in output and str(folder) in output
    assert f"export nnUNet_raw={raw_root}" in output
    assert "nnUNetv2_plan_and_preprocess -d 900 --verify_dataset_integrity" in output


def test_a_case_holds_the_voxels_and_affine_of_the_nifti_format(run_cli, paired_run, tmp_path):
    sample(run_cli, paired_run, tmp_path / "nifti", "-n", 2, "--seed", 5)
    sample(run_cli, paired_run, tmp_path / "raw", "-n", 2, "--seed", 5, "--format", "nnunet")
    folder = tmp_path / "raw" / DATASET
    for i in range(2):
        nifti_image = nib.load(str(tmp_path / "nifti" / f"sample_{i:05d}.nii.gz"))
        nifti_labels = nib.load(str(tmp_path / "nifti" / f"sample_{i:05d}_label.nii.gz"))
        case_image = nib.load(str(folder / "imagesTr" / f"synth_{i:05d}_0000.nii.gz"))
        case_labels = nib.load(str(folder / "labelsTr" / f"synth_{i:05d}.nii.gz"))
        assert case_image.get_data_dtype() == nifti_image.get_data_dtype()  # the plan's dtype, in real units
        np.testing.assert_array_equal(np.asarray(case_image.dataobj), np.asarray(nifti_image.dataobj))
        np.testing.assert_array_equal(np.asarray(case_labels.dataobj), np.asarray(nifti_labels.dataobj))
        for written in (case_image, case_labels):
            np.testing.assert_array_equal(written.affine, nifti_image.affine)
            assert b"SYNTHETIC" in written.header["descrip"].tobytes()


def test_shards_into_one_folder_make_the_dataset_of_one_job(run_cli, paired_run, tmp_path):
    sample(run_cli, paired_run, tmp_path / "whole", "-n", 5, "--seed", 3, "--format", "nnunet")
    code, output = sample(
        run_cli, paired_run, tmp_path / "sharded", "-n", 5, "--seed", 3, "--format", "nnunet", "--shard", "1/2"
    )
    assert code == 0 and "2 of the 5 cases" in output and "the job that completes the set checks" in output
    code, output = sample(
        run_cli, paired_run, tmp_path / "sharded", "-n", 5, "--seed", 3, "--format", "nnunet", "--shard", "0/2"
    )
    assert code == 0 and "nnU-Net dataset ready (5 cases)" in output
    whole, sharded = tmp_path / "whole" / DATASET, tmp_path / "sharded" / DATASET
    assert dataset_json(whole) == dataset_json(sharded) and dataset_json(sharded)["numTraining"] == 5
    whole_cases, sharded_cases = cases(whole), cases(sharded)
    assert whole_cases.keys() == sharded_cases.keys() and len(whole_cases) == 5
    for case, (image, labels) in whole_cases.items():
        np.testing.assert_array_equal(image, sharded_cases[case][0])
        np.testing.assert_array_equal(labels, sharded_cases[case][1])
    manifests = [json.loads((f / "medsynth" / "manifest.json").read_text()) for f in (whole, sharded)]
    assert manifests[0]["samples"] == manifests[1]["samples"]
    assert verify_nnunet_dataset(sharded) == []


def test_a_rerun_skips_finished_cases_and_completes_the_rest(run_cli, paired_run, tmp_path):
    out = tmp_path / "raw"
    sample(run_cli, paired_run, out, "-n", 3, "--format", "nnunet")
    folder = out / DATASET
    kept = folder / "imagesTr" / "synth_00000_0000.nii.gz"
    before = kept.stat().st_mtime_ns - 10**9
    os.utime(kept, ns=(before, before))  # a rewrite would change it
    lost = (folder / "imagesTr" / "synth_00001_0000.nii.gz").read_bytes()
    (folder / "imagesTr" / "synth_00001_0000.nii.gz").unlink()  # a case stopped halfway

    code, output = sample(run_cli, paired_run, out, "-n", 4, "--format", "nnunet")
    assert code == 0 and "2 written, 2 already there" in output
    assert kept.stat().st_mtime_ns == before
    assert (folder / "imagesTr" / "synth_00001_0000.nii.gz").read_bytes() == lost
    assert dataset_json(folder)["numTraining"] == 4 and verify_nnunet_dataset(folder) == []

    code, output = sample(run_cli, paired_run, out, "-n", 4, "--format", "nnunet", "--force")
    assert code == 0 and "4 written, 0 already there" in output
    assert kept.stat().st_mtime_ns != before

    code, output = sample(run_cli, paired_run, out, "-n", 4, "--format", "nnunet", "--seed", 9)
    assert code == 1 and "another checkpoint, seed, format or conditions" in output and "--force" in output


def test_a_dataset_nnunet_would_refuse_is_reported_one_line_a_problem(run_cli, paired_run, tmp_path):
    out = tmp_path / "raw"
    sample(run_cli, paired_run, out, "-n", 1, "--format", "nnunet")
    stray = out / DATASET / "labelsTr" / "stray.nii.gz"
    stray.write_bytes((out / DATASET / "labelsTr" / "synth_00000.nii.gz").read_bytes())
    code, output = sample(run_cli, paired_run, out, "-n", 1, "--format", "nnunet")
    assert code == 1
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert any("labelsTr/stray.nii.gz: a label map with no image" in line for line in lines), output
    assert "numTraining is 1 but" not in output  # numTraining counts complete cases only
    assert "not a valid nnU-Net dataset (1 problem above)" in lines[-1]
    assert "dataset ready" not in output


def test_a_run_without_labels_is_refused(run_cli, paired_run, tmp_path):
    payload = load_checkpoint(paired_run)
    payload["plan"]["label_values"] = payload["plan"]["label_names"] = None
    torch.save(dict(payload), tmp_path / "images-only.pt")
    code, output = sample(run_cli, tmp_path / "images-only.pt", tmp_path / "raw", "-n", 1, "--format", "nnunet")
    assert code == 2 and "trained on images alone" in output and "--labels" in output
    assert len(output.strip().splitlines()) == 1
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--dataset-id", "0"), "dataset id must be a whole number from 1 to 999, got 0"),
        (("--dataset-id", "1000"), "from 1 to 999, got 1000"),
        (("--dataset-name", "my-set"), "letters, digits and _ only, got 'my-set'"),
        (("--dataset-name", ""), "letters, digits and _ only, got ''"),
    ],
)
def test_a_bad_dataset_id_or_name_is_a_usage_error(run_cli, paired_run, tmp_path, args, expected):
    code, output = sample(run_cli, paired_run, tmp_path / "raw", "-n", 1, "--format", "nnunet", *args)
    assert code == 2 and expected in output and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "raw").exists()


def test_dataset_options_need_the_nnunet_format_and_ids_are_not_shared(run_cli, paired_run, tmp_path):
    code, output = sample(run_cli, paired_run, tmp_path / "out", "-n", 1, "--dataset-id", "901")
    assert code == 2 and "go with --format nnunet" in output

    sample(run_cli, paired_run, tmp_path / "raw", "-n", 1, "--format", "nnunet", "--dataset-id", "901")
    assert (tmp_path / "raw" / "Dataset901_SyntheticHippoV2" / "dataset.json").is_file()
    code, output = sample(
        run_cli, paired_run, tmp_path / "raw", "-n", 1, "--format", "nnunet", "--dataset-id", "901",
        "--dataset-name", "Other",
    )  # fmt: skip
    assert code == 2 and "already uses nnU-Net dataset id 901" in output
    assert not (tmp_path / "raw" / "Dataset901_Other").exists()


@pytest.mark.parametrize(
    "checkpoint, name",
    [
        ("runs/hippo/checkpoints/last.pt", "SyntheticHippo"),
        ("runs/brain-mri.v2/checkpoints/step_100.pt", "SyntheticBrainMriV2"),
        ("exports/liver_ct 64.pt", "SyntheticLiverCt64"),
        ("runs/---/checkpoints/last.pt", "Synthetic"),
    ],
)
def test_default_dataset_name_comes_from_the_run_folder(checkpoint, name):
    assert default_dataset_name(Path(checkpoint)) == name
