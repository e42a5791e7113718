"""The downstream segmentation check (train on synthetic, test on real) on 16³ phantoms.

Each phantom is a dim body filling the same box in every volume (so preprocessing, which centres
each crop on the body, moves nothing) with a bright blob at a random place inside; the label map
is the blob. A U-Net that learns from real pairs finds the blob anywhere; one trained on pairs
whose label maps were shuffled between images can only learn where blobs tend to be.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_nifti

from medsynth.config import load_config
from medsynth.evaluate import utility
from medsynth.evaluate.utility import SegmenterRecipe, UtilityRequest

SIDE = 16
# The grid as written: the plan keeps it (1 mm, 16³), so labels and Dice are those of the files.
GRID = ["plan.target_shape=[16,16,16]", "plan.spacing=[1,1,1]", "plan.modality=mr", "cache.workers=1"]
# Enough steps that the real-trained U-Net finds the blobs with a wide margin (checked over seeds);
# about 5 s for the three trainings on 2 CPU cores.
LEARNING_STEPS = 40


def phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, label map), each (16, 16, 16): a textured body with a bright blob of radius 2.5 voxels."""
    rng = np.random.default_rng(seed)
    image = np.zeros((SIDE,) * 3, dtype=np.float32)
    image[1:-1, 1:-1, 1:-1] = 300 + 60 * rng.random((SIDE - 2,) * 3)
    centre = rng.uniform(4, SIDE - 5, size=3)
    grid = np.stack(np.meshgrid(*[np.arange(SIDE)] * 3, indexing="ij"), axis=-1)
    blob = np.linalg.norm(grid - centre, axis=-1) < 2.5
    image[blob] = 900 + 60 * rng.random(int(blob.sum()))
    return image, blob.astype(np.uint8)


def write_pairs(images_dir: Path, labels_dir: Path, seeds, label_suffix="", label_of=None) -> None:
    """One phantom per seed: images_dir/p<seed>.nii.gz and labels_dir/p<seed><label_suffix>.nii.gz,
    the label map being `label_of(seed)` when given (e.g. another phantom's)."""
    for seed in seeds:
        image, labels = phantom(seed)
        if label_of is not None:
            labels = label_of(seed)
        write_nifti(images_dir / f"p{seed:03d}.nii.gz", image)
        write_nifti(labels_dir / f"p{seed:03d}{label_suffix}.nii.gz", labels, dtype=np.uint8)


TRAIN_SEEDS, HELD_OUT_SEEDS, SYNTHETIC_SEEDS = range(0, 8), range(100, 106), range(200, 208)


def _shuffled_label(seed: int) -> np.ndarray:
    """The label map of another synthetic phantom: right-looking labels, unrelated to the image."""
    others = list(SYNTHETIC_SEEDS)
    return phantom(others[(others.index(seed) + 3) % len(others)])[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Real training pairs, held-out real pairs, and 'synthetic' pairs as `sample` writes them
    (x.nii.gz beside x_label.nii.gz) whose label maps are shuffled between images."""
    root = tmp_path_factory.mktemp("utility")
    write_pairs(root / "train", root / "train-labels", TRAIN_SEEDS, "_seg")
    write_pairs(root / "test", root / "test-labels", HELD_OUT_SEEDS)
    # Under 4 held-out volumes, evaluate skips its two-sample metrics: the CLI test stays fast.
    write_pairs(root / "test-few", root / "test-few-labels", HELD_OUT_SEEDS[:3])
    write_pairs(root / "synthetic", root / "synthetic", SYNTHETIC_SEEDS, "_label", label_of=_shuffled_label)
    return {
        "train": root / "train",
        "train_labels": root / "train-labels",
        "real": root / "test",
        "real_labels": root / "test-labels",
        "real_few": root / "test-few",
        "real_few_labels": root / "test-few-labels",
        "synthetic": root / "synthetic",
        "root": root,
    }


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return load_config(None, [*GRID, f"cache.dir={tmp_path_factory.mktemp('utility-cache')}"])


def _request(folders, **changes) -> UtilityRequest:
    return UtilityRequest(
        train_labels=folders["train_labels"],
        real_labels=folders["real_labels"],
        **changes,
    )


@pytest.fixture(scope="module")
def section(folders, config) -> dict:
    """The utility section of one run: trained on real, on shuffled 'synthetic' pairs, and on both."""
    request = _request(folders, recipe=SegmenterRecipe(steps=LEARNING_STEPS))
    sets = utility.load_sets(folders["train"], folders["real"], folders["synthetic"], request, config)
    return utility.segmentation_utility(sets, request, seed=0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_real_pairs_teach_the_segmenter_and_shuffled_pairs_do_not(section):
    # Chance: the Dice of a guess that ignores the image, another held-out phantom's blob.
    held_out = [phantom(seed)[1].astype(bool) for seed in HELD_OUT_SEEDS]
    chance = np.mean([_dice(held_out[i], held_out[(i + 1) % len(held_out)]) for i in range(len(held_out))])
    real = section["trainings"]["real"]["dice"]["label_1"]["value"]
    shuffled = section["trainings"]["synthetic"]["dice"]["label_1"]["value"]
    # Over seeds 0-2 of the whole check: chance 0.12, real-trained 0.64-0.78, shuffled 0.06-0.10.
    assert chance < 0.2
    assert real > 0.5 and real > chance + 0.35, (real, chance)
    assert shuffled < chance + 0.1 and shuffled < real - 0.4, (shuffled, real, chance)
    assert section["synthetic_to_real_dice_ratio"]["value"] < 0.35


def test_report_structure_sizes_and_intervals(section):
    assert section["task"] == "segmentation"
    assert section["classes"] == [{"value": 1, "name": "label_1"}]
    assert section["n"] == {"train_real": 8, "synthetic": 8, "held_out_real": 6}
    assert section["plan"]["source"] == "computed from the real training pairs"
    assert section["plan"]["target_shape"] == [16, 16, 16]
    assert section["recipe"]["steps"] == LEARNING_STEPS and section["recipe"]["channels"] == (16, 32, 64, 128)
    sizes = {"real": (8, 0), "synthetic": (0, 8), "real_plus_synthetic": (8, 8)}
    for name, (real, synthetic) in sizes.items():
        training = section["trainings"][name]
        for metric in (training["dice"]["label_1"], training["mean_foreground_dice"]):
            low, high = metric["ci95"]
            assert low <= metric["value"] <= high
            assert metric["n"] == {"train_real": real, "train_synthetic": synthetic, "held_out_cases": 6}
        assert len(training["per_case"]) == 6 and training["train_seconds"] > 0
    ratio = section["synthetic_to_real_dice_ratio"]
    assert ratio["ci95"][0] <= ratio["value"] <= ratio["ci95"][1]
    assert section["held_out_names"] == sorted(section["held_out_names"])
    json.dumps(section)  # plain types only (NaN aside, which report.json turns into null)


def test_the_sentence_states_the_ratio(section):
    ratio = section["synthetic_to_real_dice_ratio"]["value"]
    line = section["sentence"]
    assert line.startswith(f"Utility: trained only on synthetic pairs, a segmenter reaches {ratio:.0%} of the real")
    assert "6 held-out real scans" in line
    rows = utility.summary_rows(section)
    assert rows[0][0] == "Dice label_1, trained on real" and rows[0][2] == "8 real + 0 synth / 6 held-out"
    assert any(row[0] == "synthetic / real-trained Dice" for row in rows)


def test_training_is_deterministic_and_values_map_to_classes():
    images = np.stack([phantom(s)[0] / 500 - 1 for s in range(4)]).astype(np.float32)
    labels = np.stack([phantom(s)[1] * 3 for s in range(4)])  # values 0 and 3: classes 0 and 1
    assert set(np.unique(utility._class_indices(labels, (0, 3)))) == {0, 1}
    recipe = SegmenterRecipe(steps=2)
    first, second = (utility.train_segmenter([(images, labels)], (0, 3), recipe, seed=5) for _ in range(2))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), name


def test_subsets_are_evenly_spaced_by_sorted_name():
    names = [f"case{i:02d}" for i in (9, 3, 0, 6, 1, 8, 2, 7, 5, 4)]
    chosen = utility.subset_indices(names, 4)
    assert [names[i] for i in chosen] == ["case00", "case03", "case06", "case09"]
    assert [names[i] for i in utility.subset_indices(names, 1)] == ["case00"]
    assert sorted(names[i] for i in utility.subset_indices(names, 10)) == sorted(names)


def _cli_args(
    folders, output: Path, *extra: str, synthetic: Path | None = None, real: Path | None = None, real_labels=None
) -> list:
    args = [
        "evaluate",
        "--utility",
        "segmentation",
        "--real",
        real or folders["real"],
        "--real-labels",
        real_labels or folders["real_labels"],
        "--train",
        folders["train"],
        "--train-labels",
        folders["train_labels"],
        "--synthetic",
        synthetic or folders["synthetic"],
        "-o",
        output,
        *extra,
    ]
    for setting in GRID:
        args += ["--set", setting]
    return args


def test_cli_reports_utility_with_subsets(run_cli, folders, tmp_path):
    code, out, err = run_cli(
        *_cli_args(
            folders,
            tmp_path / "report",
            "--utility-steps",
            "2",
            "--real-subsets",
            "2,5",
            real=folders["real_few"],
            real_labels=folders["real_few_labels"],
        )
    )
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    section = report["utility"]
    assert section["recipe"]["steps"] == 2
    assert [s["real_pairs"] for s in section["subsets"]] == [2, 5]
    assert section["subsets"][0]["names"] == ["p000.nii.gz", "p007.nii.gz"]
    for subset in section["subsets"]:
        assert subset["real"]["mean_foreground_dice"]["n"]["train_real"] == subset["real_pairs"]
        assert subset["real_plus_synthetic"]["mean_foreground_dice"]["n"]["train_synthetic"] == 8
        assert "dice_gain_from_synthetic" in subset
    # The realism metrics still run, on images only: the x_label maps are not read as synthetic volumes.
    assert report["n"] == {"real": 3, "synthetic": 8, "train": 8}
    assert report["verdict"][-1] == section["sentence"]
    assert "trained only on synthetic pairs" in " ".join(out.split())
    assert "Dice gain from synthetic, 2 real pairs" in out


def _one_line_error(code: int, err: str, expected_code: int = 1) -> str:
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return " ".join(" ".join(lines).split())


def test_a_real_image_without_its_label_map_is_refused(run_cli, folders, tmp_path):
    labels = tmp_path / "partial-labels"
    labels.mkdir()
    for path in sorted(folders["real_labels"].iterdir())[1:]:
        (labels / path.name).symlink_to(path)
    code, _, err = run_cli(*_cli_args(folders, tmp_path / "report", real_labels=labels))
    message = _one_line_error(code, err)
    assert "held-out real pairs (--real)" in message and "p100.nii.gz" in message


def test_label_sets_that_disagree_are_refused(run_cli, folders, tmp_path):
    two_classes = tmp_path / "two-classes"
    write_pairs(two_classes, two_classes, SYNTHETIC_SEEDS[:3], "_label", label_of=lambda s: phantom(s)[1] * 2)
    code, _, err = run_cli(*_cli_args(folders, tmp_path / "report", synthetic=two_classes))
    message = _one_line_error(code, err)
    assert "label sets disagree" in message and "values 0, 1" in message and "0, 2" in message


def test_an_unlabeled_synthetic_folder_is_refused(run_cli, folders, tmp_path):
    unlabeled = tmp_path / "unlabeled"
    for seed in SYNTHETIC_SEEDS[:3]:
        write_nifti(unlabeled / f"s{seed}.nii.gz", phantom(seed)[0])
    code, _, err = run_cli(*_cli_args(folders, tmp_path / "report", synthetic=unlabeled))
    message = _one_line_error(code, err)
    assert "synthetic pairs (--synthetic)" in message and "label map" in message


def test_missing_monai_says_how_to_install_it(run_cli, folders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "monai", None)  # `import monai` now raises ImportError
    code, _, err = run_cli(*_cli_args(folders, tmp_path / "report"))
    message = _one_line_error(code, err)
    assert 'pip install "medsynth[utility]"' in message
    assert not (tmp_path / "report").exists()  # refused before any work


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--real-subsets", "5,x"], "whole numbers"),
        (["--real-subsets", "9"], "between 1 and the 8 real training pairs"),
    ],
)
def test_bad_subsets_are_usage_errors(run_cli, folders, tmp_path, extra, expected):
    code, _, err = run_cli(*_cli_args(folders, tmp_path / "report", *extra))
    assert expected in _one_line_error(code, err, expected_code=2)


def test_utility_options_need_utility_and_train(run_cli, folders, tmp_path):
    code, _, err = run_cli(
        "evaluate", "--real", folders["real"], "--synthetic", folders["synthetic"], "-o", tmp_path / "r",
        "--real-labels", folders["real_labels"],
    )  # fmt: skip
    assert "add --utility segmentation" in _one_line_error(code, err, expected_code=2)
    code, _, err = run_cli(
        "evaluate", "--utility", "segmentation", "--real", folders["real"], "--synthetic", folders["synthetic"],
        "-o", tmp_path / "r",
    )  # fmt: skip
    assert "needs --train" in _one_line_error(code, err, expected_code=2)


def test_the_cli_mirrors_the_library_defaults():
    from medsynth.cli import UTILITY_STEPS, UtilityTask

    assert UTILITY_STEPS == utility.DEFAULT_STEPS == SegmenterRecipe().steps
    assert tuple(task.value for task in UtilityTask) == utility.TASKS
