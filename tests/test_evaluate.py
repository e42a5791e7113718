"""Evaluation: the metrics tell same-distribution sets, different sets and copies apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.config import load_config
from medsynth.evaluate import run_evaluation, summary_rows
from medsynth.evaluate.similarity import _blur, max_shifted_ncc, ms_ssim
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


@pytest.fixture(scope="module")
def same_report(sets, tmp_path_factory):
    """Evaluated once: several tests read the same-distribution report."""
    out = tmp_path_factory.mktemp("same_report")
    return evaluate(sets, "same", out), out


def test_same_distribution_is_not_told_apart(same_report):
    report, _ = same_report
    low, high = report["c2st"]["ci95"]
    assert low <= 0.5 + 0.05 and report["c2st"]["value"] < 0.75
    assert report["mmd"]["permutation_p_value"] > 0.01
    assert report["memorisation"]["flagged_share"]["value"] <= 0.1
    assert report["memorisation"]["data_copying_z"]["value"] > -3
    assert report["diversity_ms_ssim"]["mode_collapse_warning"] is None


def test_different_distribution_is_told_apart(sets, same_report, tmp_path):
    report = evaluate(sets, "different", tmp_path, train=False)
    assert report["c2st"]["value"] > 0.9 and report["c2st"]["ci95"][0] > 0.5
    assert report["mmd"]["permutation_p_value"] < 0.01
    same, _ = same_report
    assert report["intensity_wasserstein"]["value"] > 3 * same["intensity_wasserstein"]["value"]
    assert report["frechet_distance"]["value"] > same["frechet_distance"]["value"]


def test_copies_of_training_volumes_are_flagged(sets, tmp_path):
    report = evaluate(sets, "copies", tmp_path)
    memo = report["memorisation"]
    assert memo["flagged_share"]["value"] > 0.9  # shifted by a voxel, still caught
    assert memo["data_copying_z"]["value"] < -3
    assert all(c["synthetic_name"] == c["train_name"] for c in memo["closest"])
    assert any(line.startswith("Privacy:") and "flagged_pairs.png" in line for line in report["verdict"])
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


def test_report_json_figures_and_sample_sizes(same_report):
    report, out = same_report
    on_disk = json.loads((out / "report.json").read_text())
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
    assert "Realism:" in out and "Diversity:" in out and "Privacy: not audited" in out


def test_statistics_helpers():
    low, high = wilson_interval(50, 100)
    assert low < 0.5 < high and 0.39 < low < 0.41
    assert mann_whitney_z(np.arange(10), np.arange(10) + 100) < -3
    assert abs(mann_whitney_z(np.arange(10), np.arange(10))) < 1e-9


def test_ms_ssim_is_one_for_identical_volumes_and_falls_with_noise():
    torch.manual_seed(0)
    volume = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 36, 36, 36), 5, 1)  # smooth, 32³
    scores = [ms_ssim(volume, volume + torch.randn_like(volume) * level).item() for level in (0.0, 0.05, 0.2, 1.0)]
    assert abs(scores[0] - 1.0) < 1e-5
    assert scores == sorted(scores, reverse=True) and scores[-1] < 0.5


def test_separable_blur_matches_a_direct_convolution():
    torch.manual_seed(0)
    volume = torch.randn(2, 3, 12, 10, 9)
    window = torch.tensor([0.1, 0.2, 0.4, 0.2, 0.1])
    kernel = window[:, None, None] * window[None, :, None] * window[None, None, :]  # the 3D Gaussian it stands for
    direct = torch.nn.functional.conv3d(volume, kernel.expand(3, 1, 5, 5, 5), groups=3)
    assert torch.allclose(_blur(volume, window), direct, atol=1e-5)


def test_shifted_ncc_finds_a_moved_copy():
    torch.manual_seed(0)
    references = torch.randn(3, 1, 16, 16, 16)
    moved = torch.roll(references[1:2], shifts=(2, -1, 1), dims=(2, 3, 4)) * 3.0 + 5.0  # shifted, rescaled
    scores = max_shifted_ncc(moved, references)
    assert scores.shape == (1, 3) and abs(scores[0, 1].item() - 1.0) < 1e-5 and scores[0, 0] < 0.3


def test_subsample_interval_has_the_right_width_and_holds_the_estimate():
    from medsynth.evaluate.stats import two_set_subsample_interval

    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 200), rng.normal(0.5, 1, 100)
    point = b.mean() - a.mean()
    low, high = two_set_subsample_interval(lambda i, j: b[j].mean() - a[i].mean(), point, 200, 100, rng, resamples=800)
    expected_half_width = 1.96 * np.sqrt(1 / 200 + 1 / 100)  # the textbook interval for a difference of means
    assert low < point < high
    assert abs((high - low) / 2 - expected_half_width) < 0.1 * expected_half_width
