"""Evaluation: the metrics tell same-distribution sets, different sets and copies apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsynth.config import load_config
from medsynth.evaluate import run_evaluation, summary_rows
from medsynth.evaluate.stats import mann_whitney_z, wilson_interval
from medsynth.io import Volume, write_nifti
from medsynth.phantoms import head_phantom

CONFIG = load_config(None, ["plan.target_shape=[32,32,32]", "plan.modality=ct", "cache.workers=1"])


def write_set(folder: Path, seeds, transform=None) -> Path:
    for seed in seeds:
        array, affine = head_phantom(seed, shape=(40, 40, 40), spacing=5.0)
        array = array.astype(np.float32)
        if transform is not None:
            array = transform(array, seed)
        write_nifti(Volume(array, affine), folder / f"v{seed:04d}.nii.gz", dtype="int16")
    return folder


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return {
        "train": write_set(root / "train", range(0, 24)),
        "held_out": write_set(root / "held_out", range(100, 124)),
        "same": write_set(root / "same", range(200, 224)),
        # Smooth blobs of the right size and range, but no skull, brain or ventricles.
        "different": write_set(root / "different", range(300, 324), lambda a, s: np.where(a > -500, 400.0, -1000.0)),
        "copies": write_set(root / "copies", range(0, 24), lambda a, s: np.roll(a, 1, axis=0)),
    }


def evaluate(sets, synthetic, out, train=True):
    return run_evaluation(
        sets["held_out"], sets[synthetic], out, CONFIG, train_dir=sets["train"] if train else None, seed=0
    )


def test_same_distribution_is_not_told_apart(sets, tmp_path):
    report = evaluate(sets, "same", tmp_path)
    low, high = report["c2st"]["ci95"]
    assert low <= 0.5 + 0.05 and report["c2st"]["value"] < 0.75
    assert report["mmd"]["permutation_p_value"] > 0.01
    assert report["memorisation"]["flagged_share"]["value"] <= 0.1
    assert report["memorisation"]["data_copying_z"]["value"] > -3
    assert report["diversity_ms_ssim"]["mode_collapse_warning"] is None


def test_different_distribution_is_told_apart(sets, tmp_path):
    report = evaluate(sets, "different", tmp_path, train=False)
    assert report["c2st"]["value"] > 0.9 and report["c2st"]["ci95"][0] > 0.5
    assert report["mmd"]["permutation_p_value"] < 0.01
    same = evaluate(sets, "same", tmp_path / "same", train=False)
    assert report["intensity_wasserstein"]["value"] > 3 * same["intensity_wasserstein"]["value"]
    assert report["frechet_distance"]["value"] > same["frechet_distance"]["value"]


def test_copies_of_training_volumes_are_flagged(sets, tmp_path):
    report = evaluate(sets, "copies", tmp_path)
    memo = report["memorisation"]
    assert memo["flagged_share"]["value"] > 0.9  # shifted by a voxel, still caught
    assert memo["data_copying_z"]["value"] < -3
    assert all(c["synthetic_name"] == c["train_name"] for c in memo["closest"])
    assert Path(report["figures"]["flagged_pairs"]).exists()


def test_mode_collapse_warning(tmp_path, sets):
    collapsed = write_set(
        tmp_path / "collapsed",
        range(500, 516),
        lambda a, s: (
            head_phantom(7, shape=(40, 40, 40), spacing=5.0)[0].astype(np.float32)
            + np.random.default_rng(s).normal(0, 3, a.shape)
        ),
    )
    report = run_evaluation(sets["held_out"], collapsed, tmp_path / "out", CONFIG, seed=0)
    assert report["diversity_ms_ssim"]["mode_collapse_warning"]
    assert any("mode collapse" in w for w in report["warnings"])
    assert any("only 16 synthetic volumes" in w for w in report["warnings"])  # and the set is small


def test_report_json_figures_and_sample_sizes(sets, tmp_path):
    report = evaluate(sets, "same", tmp_path)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["n"] == {"real": 24, "synthetic": 24, "train": 24}
    for key in (
        "c2st",
        "mmd",
        "precision",
        "recall",
        "density",
        "coverage",
        "frechet_distance",
        "intensity_wasserstein",
    ):
        assert len(on_disk[key]["ci95"]) == 2 and on_disk[key]["n"], key
    assert not any("weak below" in w for w in on_disk["warnings"])  # 24 volumes per set is enough
    for path in on_disk["figures"].values():
        assert Path(path).read_bytes()[:4] == b"\x89PNG"
    assert len(summary_rows(report)) >= 10


def test_cli_prints_a_table_and_json(run_cli, sets, tmp_path):
    code, out, err = run_cli(
        "evaluate",
        "--real",
        sets["held_out"],
        "--synthetic",
        sets["same"],
        "-o",
        tmp_path,
        "--set",
        "plan.target_shape=[32,32,32]",
        "--set",
        "plan.modality=ct",
    )
    assert code == 0, err
    assert "C2ST held-out accuracy" in out and "Traceback" not in err


def test_statistics_helpers():
    low, high = wilson_interval(50, 100)
    assert low < 0.5 < high and 0.39 < low < 0.41
    assert mann_whitney_z(np.arange(10), np.arange(10) + 100) < -3
    assert abs(mann_whitney_z(np.arange(10), np.arange(10))) < 1e-9
