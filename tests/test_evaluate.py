"""Evaluation: the metrics tell same-distribution sets, different sets and copies apart.

The default tests evaluate with `QUICK`, a small fraction of the default budget; one slow test runs
`medsynth evaluate` with the full budget, as users do.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.config import load_config
from medsynth.evaluate import (
    EvaluationBudget,
    figures,
    memorisation,
    realism,
    run_evaluation,
    summary_rows,
    verdict,
)
from medsynth.evaluate.similarity import _blur, max_shifted_ncc, ms_ssim
from medsynth.evaluate.stats import mann_whitney_z, wilson_interval
from medsynth.io import Volume, write_nifti
from medsynth.phantoms import head_phantom

# 32³ heads at 6.25 mm: the phantom's usual 200 mm field of view, at a cost the tests can afford.
PHANTOM = {"shape": (32, 32, 32), "spacing": 6.25}
# Enough classifier training and draws that every assertion below holds with a margin, checked over
# several seeds: two folds of 40 epochs separate the "different" set every time, where 20 epochs
# sometimes leave the classifier at chance; 200 permutations put the smallest p-value at 0.005.
QUICK = EvaluationBudget(
    c2st_folds=2,
    c2st_epochs=40,
    mmd_permutations=200,
    mmd_interval_resamples=20,
    intensity_interval_resamples=20,
    grid_interval_resamples=20,
    feature_interval_resamples=20,
    diversity_max_pairs=40,
    diversity_interval_resamples=100,
    copying_interval_resamples=50,
)
# For the tests that read neither the C2ST nor the MMD: one epoch of classifier training is next to free.
QUICK_UNTRAINED = replace(QUICK, c2st_epochs=1)


@functools.cache
def phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A test-sized head phantom; cached, as the copies and the collapsed set reuse heads."""
    return head_phantom(seed, **PHANTOM)


def write_set(folder: Path, seeds, make=None) -> Path:
    """One volume per seed: its head phantom, or `make(seed)` on the same grid."""
    affine = phantom(0)[1]  # every phantom of one shape and spacing has the same grid
    for seed in seeds:
        array = phantom(seed)[0] if make is None else make(seed)
        write_nifti(Volume(np.asarray(array, dtype=np.float32), affine), folder / f"v{seed:04d}.nii.gz", dtype="int16")
    return folder


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    # One cache for the module, unlike elsewhere in the suite: the held-out and training sets are
    # then preprocessed once, not in every test.
    cache = tmp_path_factory.mktemp("evaluate-cache")
    return load_config(
        None, ["plan.target_shape=[32,32,32]", "plan.modality=ct", "cache.workers=1", f"cache.dir={cache}"]
    )


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    # 20 volumes a set: the fewest that raise no small-set warning, and enough held-out volumes that
    # the copy threshold (their 99th percentile) does not flag fresh samples by chance.
    root = tmp_path_factory.mktemp("sets")
    return {
        "train": write_set(root / "train", range(0, 20)),
        "held_out": write_set(root / "held_out", range(100, 120)),
        "same": write_set(root / "same", range(200, 220)),
        # The same set's heads as smooth blobs of the right size and range: no skull, brain or ventricles.
        "different": write_set(
            root / "different", range(200, 220), lambda seed: np.where(phantom(seed)[0] > -500, 400.0, -1000.0)
        ),
        # Training volumes shifted by a voxel.
        "copies": write_set(root / "copies", range(0, 8), lambda seed: np.roll(phantom(seed)[0], 1, axis=0)),
    }


def evaluate(sets, synthetic, out, config, train=True, budget=QUICK):
    return run_evaluation(
        sets["held_out"],
        sets[synthetic],
        out,
        config,
        train_dir=sets["train"] if train else None,
        seed=0,
        budget=budget,
    )


@pytest.fixture
def without_figures(monkeypatch):
    """For tests that read only numbers: drawing takes about a third of a quick evaluation."""

    def skip_drawing(*args, **kwargs) -> Path:
        return next(arg for arg in args if isinstance(arg, Path))  # the figure's path, left unwritten

    for name in ("intensity_histograms", "slice_grid", "pairs"):
        monkeypatch.setattr(figures, name, skip_drawing)


def _recording(helper, draws: list[tuple[str, int]]):
    """`helper`, noting which function called it and with how many resamples."""

    def recorded(*args, resamples: int, **kwargs):
        draws.append((inspect.currentframe().f_back.f_code.co_name, resamples))
        return helper(*args, resamples=resamples, **kwargs)

    return recorded


@pytest.fixture(scope="module")
def same_report(sets, config, tmp_path_factory):
    """Evaluated once: several tests read the same-distribution report. The interval helpers are
    watched meanwhile, so that a test can see which metric drew how many resamples."""
    out = tmp_path_factory.mktemp("same_report")
    draws: list[tuple[str, int]] = []
    with pytest.MonkeyPatch.context() as patch:
        for module, name in (
            (realism, "two_set_subsample_interval"),
            (realism, "two_set_bootstrap"),
            (memorisation, "bootstrap_interval"),
        ):
            patch.setattr(module, name, _recording(getattr(module, name), draws))
        report = evaluate(sets, "same", out, config)
    return report, out, draws


def test_same_distribution_is_not_told_apart(same_report):
    report, _, _ = same_report
    low, high = report["c2st"]["ci95"]
    assert low <= 0.5 + 0.05 and report["c2st"]["value"] < 0.75
    assert report["mmd"]["permutation_p_value"] > 0.01
    assert report["memorisation"]["flagged_share"]["value"] <= 0.1
    assert report["memorisation"]["data_copying_z"]["value"] > -3
    assert report["diversity_ms_ssim"]["mode_collapse_warning"] is None


def test_different_distribution_is_told_apart(sets, config, same_report, tmp_path, without_figures):
    report = evaluate(sets, "different", tmp_path, config, train=False)
    assert report["c2st"]["value"] > 0.9 and report["c2st"]["ci95"][0] > 0.5
    assert report["mmd"]["permutation_p_value"] < 0.01
    same, _, _ = same_report
    assert report["intensity_wasserstein"]["value"] > 3 * same["intensity_wasserstein"]["value"]
    assert report["frechet_distance"]["value"] > same["frechet_distance"]["value"]


def test_copies_of_training_volumes_are_flagged(sets, config, tmp_path):
    report = evaluate(sets, "copies", tmp_path, config, budget=QUICK_UNTRAINED)
    memo = report["memorisation"]
    assert memo["flagged_share"]["value"] > 0.9  # shifted by a voxel, still caught
    assert memo["data_copying_z"]["value"] < -3
    assert all(c["synthetic_name"] == c["train_name"] for c in memo["closest"])
    assert any(line.startswith("Privacy:") and "flagged_pairs.png" in line for line in report["verdict"])
    assert Path(report["figures"]["flagged_pairs"]).exists()


def test_mode_collapse_warning(tmp_path, sets, config, without_figures):
    # One head, with a little noise: all alike.
    collapsed = write_set(
        tmp_path / "collapsed",
        range(500, 512),
        lambda seed: phantom(7)[0] + np.random.default_rng(seed).normal(0, 3, PHANTOM["shape"]),
    )
    report = run_evaluation(sets["held_out"], collapsed, tmp_path / "out", config, seed=0, budget=QUICK_UNTRAINED)
    assert report["diversity_ms_ssim"]["mode_collapse_warning"]
    assert any("mode collapse" in w for w in report["warnings"])
    assert any("only 12 synthetic volumes" in w for w in report["warnings"])  # and the set is small


def test_report_json_figures_and_sample_sizes(same_report):
    report, out, _ = same_report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["n"] == {"real": 20, "synthetic": 20, "train": 20}
    for key in (
        "c2st",
        "mmd",
        "precision",
        "recall",
        "density",
        "coverage",
        "frechet_distance",
        "intensity_wasserstein",
        "grid_artefacts",
    ):
        assert len(on_disk[key]["ci95"]) == 2 and on_disk[key]["n"], key
    assert "c2st_full_resolution" not in on_disk  # 32³: the thumbnails are the full resolution
    assert not any("weak below" in w for w in on_disk["warnings"])  # 20 volumes per set is enough
    for path in on_disk["figures"].values():
        assert Path(path).read_bytes()[:4] == b"\x89PNG"
    assert len(summary_rows(report)) >= 10


def test_the_budget_reaches_every_metric(same_report):
    report, out, draws = same_report
    assert report["budget"] == asdict(QUICK) == json.loads((out / "report.json").read_text())["budget"]
    assert (report["c2st"]["folds"], report["c2st"]["epochs"]) == (QUICK.c2st_folds, QUICK.c2st_epochs)
    assert report["mmd"]["permutations"] == QUICK.mmd_permutations
    assert report["mmd"]["permutation_p_value"] >= 1 / (QUICK.mmd_permutations + 1)
    for name in ("real", "synthetic"):  # 20 volumes make 190 pairs, more than the budget allows
        assert report["diversity_ms_ssim"][name]["n"]["pairs"] == QUICK.diversity_max_pairs
    assert set(draws) == {
        ("kernel_mmd", QUICK.mmd_interval_resamples),
        ("intensity_wasserstein", QUICK.intensity_interval_resamples),
        ("grid_artefacts", QUICK.grid_interval_resamples),
        ("feature_metrics", QUICK.feature_interval_resamples),
        ("diversity", QUICK.diversity_interval_resamples),
        ("memorisation", QUICK.copying_interval_resamples),
    }


def test_default_budget_is_the_documented_one_and_nonsense_is_refused():
    budget = EvaluationBudget()
    assert (budget.c2st_folds, budget.c2st_epochs, budget.mmd_permutations) == (5, 30, 1000)
    with pytest.raises(ValueError, match="c2st_folds"):
        EvaluationBudget(c2st_folds=1)
    with pytest.raises(ValueError, match="mmd_permutations"):
        EvaluationBudget(mmd_permutations=0)


def test_summary_rows_and_verdict_read_the_report(same_report):
    report, _, _ = same_report
    rows = summary_rows(report)
    assert all(len(row) == 4 for row in rows)
    assert [row[0] for row in rows][:2] == ["C2ST held-out accuracy", "kernel MMD²"]
    assert rows[0][2] == "20 + 20" and f"p={report['mmd']['permutation_p_value']:.3f}" in rows[1][1]
    assert {"flagged as likely copies", "data-copying z (Meehan 2020)"} <= {row[0] for row in rows}
    lines = verdict(report)
    assert [line.split(":")[0] for line in lines] == ["Realism", "Diversity", "Privacy"]
    assert "could not reliably tell the sets apart" in lines[0] and "no sign of copying" in lines[2]
    assert "about as alike as real ones" in lines[1]  # two draws of one distribution
    # Without --train there is no memorisation audit: the verdict says so and the table drops its rows.
    unaudited = {key: value for key, value in report.items() if key != "memorisation"}
    assert verdict(unaudited)[2].startswith("Privacy: not audited")
    assert len(summary_rows(unaudited)) == len(rows) - 2


@pytest.mark.slow
def test_cli_evaluates_with_the_full_budget(run_cli, sets, tmp_path):
    """`medsynth evaluate` end to end, with the budget users get: the only test that pays for it."""
    code, out, err = run_cli(
        "evaluate",
        "--real",
        sets["held_out"],
        "--synthetic",
        sets["same"],
        "--train",
        sets["train"],
        "-o",
        tmp_path,
        "--set",
        "plan.target_shape=[32,32,32]",
        "--set",
        "plan.modality=ct",
    )
    assert code == 0, err
    assert "C2ST held-out accuracy" in out and "Traceback" not in err
    assert "Realism:" in out and "Diversity:" in out and "Privacy:" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["budget"] == asdict(EvaluationBudget())
    assert (report["c2st"]["folds"], report["c2st"]["epochs"], report["mmd"]["permutations"]) == (5, 30, 1000)
    assert report["c2st"]["ci95"][0] <= 0.5 + 0.05 and report["c2st"]["value"] < 0.75
    assert report["mmd"]["permutation_p_value"] > 0.01
    assert report["memorisation"]["flagged_share"]["value"] <= 0.1
    assert report["memorisation"]["data_copying_z"]["value"] > -3


def test_grid_artefacts_find_a_pattern_on_the_generators_grid_and_not_in_alike_sets():
    """Smooth random volumes, and the same kind with every other x-plane 2% brighter (what a 2x
    upsampling layer leaves): the metric names the period and the axis, and sees nothing between
    two sets of the first kind."""
    rng = np.random.default_rng(0)

    def smooth_set(count: int) -> np.ndarray:
        noise = torch.from_numpy(rng.normal(size=(count, 1, 32, 32, 32)).astype(np.float32))
        return 1.0 + torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2)[:, 0].numpy()  # around 1

    real, alike, gridded = smooth_set(20), smooth_set(20), smooth_set(20)
    gridded[:, ::2] *= 1.02
    found = realism.grid_artefacts(real, gridded, seed=0, resamples=50)
    excess = np.array(found["synthetic_contrast"]) - np.array(found["real_contrast"])
    assert np.unravel_index(excess.argmax(), excess.shape) == (0, 0)  # period 2, axis 0
    assert found["permutation_p_value"] < 0.05 and found["ci95"][0] > 0
    same = realism.grid_artefacts(real, alike, seed=0, resamples=50)
    assert same["permutation_p_value"] > 0.05 and same["value"] < 0.5 * found["value"]


def test_central_patches_keep_full_resolution():
    from medsynth.evaluate.similarity import central_patch

    volumes = np.arange(2 * 64 * 64 * 16, dtype=np.float32).reshape(2, 64, 64, 16)
    patch = central_patch(volumes, 32)
    assert patch.shape == (2, 1, 32, 32, 16)
    assert torch.equal(patch[:, 0], torch.from_numpy(volumes[:, 16:48, 16:48, :]))


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


def test_ms_ssim_reads_signed_volumes_as_intensities_from_their_lower_bound():
    """On [-1, 1] volumes, mid-grey regions just either side of zero are nearly alike; SSIM's
    luminance term, written for non-negative intensities, once scored them as opposites."""
    brighter = torch.full((1, 1, 32, 32, 32), 0.05)
    darker = torch.full((1, 1, 32, 32, 32), -0.05)
    assert ms_ssim(brighter, darker).item() > 0.99
    # The same as the classical figure on the volumes shifted into [0, 2].
    torch.manual_seed(0)
    a, b = torch.rand(2, 1, 1, 32, 32, 32) * 2 - 1
    assert torch.allclose(ms_ssim(a, b), ms_ssim(a + 1, b + 1, low=0.0), atol=1e-6)
    # Where the shift matters, it is only through the luminance term: plainly different means still score low.
    assert ms_ssim(torch.full_like(a, -1.0), torch.full_like(a, 1.0)).item() < 0.2


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
