"""The orchestrator of `medsynth evaluate`: load both sets through one plan, run every metric within
a compute budget, write report.json and the figures, and put the result in plain words. With a
`UtilityRequest`, it also runs the downstream segmentation check (`medsynth.evaluate.utility`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsynth import __version__
from medsynth.atomic import atomic_write_json
from medsynth.config import ConditionsConfig, Config, with_labels_dir
from medsynth.errors import UsageError
from medsynth.pipeline import prepare_dataset
from medsynth.plan import Plan, make_plan

if TYPE_CHECKING:
    from medsynth.evaluate.utility import UtilityRequest

# Below these set sizes a metric has too little power to mean much; it is computed, with a warning.
SMALL_SET = 20
# Below this a metric is not computed at all.
TOO_SMALL = 4


@dataclass(frozen=True)
class EvaluationBudget:
    """How much compute an evaluation spends. The defaults are what `medsynth evaluate` uses.

    No knob changes what a metric measures; each trades statistical power or the precision of a
    number against time, which grows about linearly with it:

    * `c2st_folds`, `c2st_epochs`: one classifier is trained per fold, for this many epochs. More
      folds train each classifier on more of the data, and more epochs let it learn subtler
      differences: both raise the test's power, i.e. its accuracy when the sets do differ. Too few
      err towards 0.5 ("indistinguishable") rather than towards a false alarm, since the accuracy
      is measured on held-out volumes. The C2ST dominates the run time.
    * `mmd_permutations`: the MMD p-value is never below 1 / (permutations + 1), and its Monte Carlo
      error shrinks as 1 / sqrt(permutations).
    * `mmd_interval_resamples`, `feature_interval_resamples`: half-set subsamples behind the
      intervals of MMD, and of precision, recall, density, coverage and the Fréchet distance; each
      feature metric draws its own.
    * `intensity_interval_resamples`, `grid_interval_resamples`, `diversity_interval_resamples`,
      `copying_interval_resamples`: bootstrap draws behind the intervals of the intensity W1, the
      grid artefacts' excess (and its permutation test's permutations), the mean MS-SSIM and the
      data-copying z. Fewer draws leave the interval's ends noisier, not narrower.
    * `diversity_max_pairs`: pairs of volumes per set whose MS-SSIM is computed (all of them when
      there are fewer): fewer pairs, a noisier mean and a wider interval.
    * `conditional_epochs`: epochs of each of the conditional check's two predictor trainings;
      fewer read the conditions back less well from real and synthetic volumes alike.
    """

    c2st_folds: int = 5
    c2st_epochs: int = 30
    mmd_permutations: int = 1000
    mmd_interval_resamples: int = 300
    intensity_interval_resamples: int = 300
    grid_interval_resamples: int = 300
    feature_interval_resamples: int = 200
    diversity_max_pairs: int = 300
    diversity_interval_resamples: int = 1000
    copying_interval_resamples: int = 500
    conditional_epochs: int = 60

    def __post_init__(self) -> None:
        # The C2ST would quietly use two folds instead: refuse, rather than record a budget that was not spent.
        if self.c2st_folds < 2:
            raise ValueError(f"c2st_folds must be at least 2, not {self.c2st_folds}")
        for field in fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"{field.name} must be at least 1, not {getattr(self, field.name)}")


def holds_label_maps_beside_images(folder: str | Path) -> bool:
    """Whether `folder` holds medsynth's paired samples: `x_label.nii.gz` beside `x.nii.gz`."""
    return any(
        label.with_name(label.name.replace("_label.nii.gz", ".nii.gz")).exists()
        for label in Path(folder).glob("*_label.nii.gz")
    )


def _load(folder: Path, config: Config, plan: Plan, progress) -> tuple[np.ndarray, list[str]]:
    prepared = prepare_dataset(folder, config, plan=plan, progress=progress)
    volumes = np.stack([np.load(e.path) for e in prepared.entries])  # (N, X, Y, Z) in [-1, 1]
    return volumes, [e.name for e in prepared.entries]


def run_evaluation(
    real_dir: str | Path,
    synthetic_dir: str | Path,
    out_dir: str | Path,
    config: Config,
    train_dir: str | Path | None = None,
    plan: Plan | None = None,
    seed: int = 0,
    progress: Callable | None = None,
    on_message: Callable[[str], None] | None = None,
    budget: EvaluationBudget | None = None,
    utility: UtilityRequest | None = None,
    conditions: ConditionsConfig | None = None,
) -> dict[str, Any]:
    """Compute every metric within `budget` (the default one when None), write report.json and the
    figures to `out_dir`, return the report. With `utility`, also the segmentation utility check,
    which needs `train_dir` and label maps for every set; its inputs are checked before anything
    is computed. With a conditional plan, `conditions` (its table) and `train_dir`, also the
    conditional check (evaluate/conditional.py)."""
    import torch

    from medsynth.evaluate import conditional, figures, memorisation, realism
    from medsynth.evaluate.similarity import central_patch, downsample
    from medsynth.pipeline import fingerprint_folder

    say = on_message or (lambda message: None)
    budget = budget or EvaluationBudget()
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    real_config = synthetic_config = train_config = config
    utility_sets = None
    if utility is not None:
        from medsynth.evaluate import utility as utility_check

        utility_check.require_monai()
        if train_dir is None:
            raise UsageError(
                "--utility segmentation needs --train: the real training images it trains the reference on"
            )
        say("utility: preparing the labelled sets")
        utility_sets = utility_check.load_sets(
            train_dir, real_dir, synthetic_dir, utility, config, plan=plan, progress=progress
        )
        # Paired, so that label maps lying beside their images (name_label.nii.gz) are not read as volumes.
        real_config = with_labels_dir(config, utility.real_labels)
        synthetic_config = with_labels_dir(config, utility.synthetic_labels or synthetic_dir)
        train_config = with_labels_dir(config, utility.train_labels)
    elif holds_label_maps_beside_images(synthetic_dir):
        # Paired samples judged as images: their label maps pair with them, so they are not read as
        # more synthetic volumes (which would put label maps into every realism figure).
        synthetic_config = with_labels_dir(config, synthetic_dir)
    plan_source = "checkpoint"
    if plan is None:
        plan = make_plan(fingerprint_folder(real_dir, real_config, progress=progress).fingerprint, config.plan)
        plan_source = "computed from the real set"
    real, real_names = _load(Path(real_dir), real_config, plan, progress)
    synthetic, synthetic_names = _load(Path(synthetic_dir), synthetic_config, plan, progress)
    train = train_names = None
    if train_dir is not None:
        train, train_names = _load(Path(train_dir), train_config, plan, progress)
    warnings: list[str] = []
    conditional_inputs = _conditional_inputs(
        plan, conditions, Path(synthetic_dir), synthetic_names, real_names, train_names, warnings
    )
    sizes = {"real": len(real), "synthetic": len(synthetic), **({"train": len(train)} if train is not None else {})}
    for name, count in sizes.items():
        if count < SMALL_SET:
            warnings.append(f"only {count} {name} volumes: two-sample tests and intervals are weak below {SMALL_SET}")
    if train_names is not None and set(real_names) & set(train_names):
        warnings.append(
            "some --real volumes share names with --train volumes: held-out data should be disjoint from training data"
        )

    # Working resolutions: the CNNs and NCC at 32 voxels on the longest side, MMD at 16.
    real_32, synthetic_32 = downsample(real, 32), downsample(synthetic, 32)
    real_16 = downsample(real, 16).flatten(1).numpy()
    synthetic_16 = downsample(synthetic, 16).flatten(1).numpy()
    threshold = -0.9  # foreground in [-1, 1] units: the background maps to -1 for CT and MRI alike
    half_width = (plan.window[1] - plan.window[0]) / 2.0

    report: dict[str, Any] = {
        "medsynth_version": __version__,
        "seed": seed,
        "sets": {
            "real": str(real_dir),
            "synthetic": str(synthetic_dir),
            "train": str(train_dir) if train_dir else None,
        },
        "n": sizes,
        "plan": {"source": plan_source, **plan.to_dict()},
        "warnings": warnings,
        "budget": asdict(budget),
    }
    enough = min(len(real), len(synthetic)) >= TOO_SMALL
    if enough:
        say("realism: classifier two-sample test")
        report["c2st"] = realism.classifier_two_sample_test(
            real_32, synthetic_32, seed, folds=budget.c2st_folds, epochs=budget.c2st_epochs
        )
        if max(real.shape[1:]) > 32:  # the thumbnails average away what lives at full resolution
            say("realism: classifier two-sample test at full resolution (central patches)")
            report["c2st_full_resolution"] = realism.classifier_two_sample_test(
                central_patch(real, 32),
                central_patch(synthetic, 32),
                seed,
                folds=budget.c2st_folds,
                epochs=budget.c2st_epochs,
            )
        say("realism: kernel MMD")
        report["mmd"] = realism.kernel_mmd(
            real_16,
            synthetic_16,
            seed,
            permutations=budget.mmd_permutations,
            resamples=budget.mmd_interval_resamples,
        )
        say("realism: features")
        report.update(realism.feature_metrics(real_32, synthetic_32, seed, resamples=budget.feature_interval_resamples))
    else:
        warnings.append(f"fewer than {TOO_SMALL} volumes in a set: two-sample metrics skipped")
    report["intensity_wasserstein"] = realism.intensity_wasserstein(
        list(real), list(synthetic), threshold, seed, scale=half_width, resamples=budget.intensity_interval_resamples
    )
    report["intensity_wasserstein"]["units"] = "HU" if plan.modality == "ct" else "typical training intensity units"
    say("realism: grid artefacts")
    report["grid_artefacts"] = realism.grid_artefacts(real, synthetic, seed, resamples=budget.grid_interval_resamples)
    say("diversity: MS-SSIM")
    report["diversity_ms_ssim"] = memorisation.diversity(
        downsample(real, 64),
        downsample(synthetic, 64),
        seed,
        max_pairs=budget.diversity_max_pairs,
        resamples=budget.diversity_interval_resamples,
    )
    if report["diversity_ms_ssim"]["mode_collapse_warning"]:
        warnings.append(report["diversity_ms_ssim"]["mode_collapse_warning"])
    if train is not None and len(train) >= 1:
        say("memorisation: nearest training volumes")
        train_32 = downsample(train, 32)
        report["memorisation"] = memorisation.memorisation(
            synthetic_32, real_32, train_32, seed, resamples=budget.copying_interval_resamples
        )
        for entry in report["memorisation"]["closest"]:
            entry["synthetic_name"] = synthetic_names[entry["synthetic"]]
            entry["train_name"] = train_names[entry["train"]]

    say("figures")
    spacing = plan.spacing
    paths = {
        "intensity_histograms": figures.intensity_histograms(
            list(real),
            list(synthetic),
            threshold,
            plan.to_real_units,
            report["intensity_wasserstein"]["units"],
            out_dir / "intensity_histograms.png",
        ),
        "slices": figures.slice_grid(list(real), list(synthetic), spacing, out_dir / "real_vs_synthetic.png"),
    }
    if "memorisation" in report:

        def side_by_side(entries: list[dict], name: str, title: str) -> Path:
            pairs = [
                (
                    synthetic[c["synthetic"]],
                    train[c["train"]],
                    f"{c['synthetic_name']} ~ {c['train_name']}: NCC {c['ncc']:.3f}",
                )
                for c in entries
            ]
            return figures.pairs(pairs, spacing, out_dir / name, title)

        closest = report["memorisation"]["closest"]
        flagged = [c for c in closest if c["flagged"]]
        paths["nearest_neighbours"] = side_by_side(
            closest[:4], "nearest_neighbours.png", "The synthetic volumes closest to a training volume"
        )
        paths["flagged_pairs"] = side_by_side(
            flagged, "flagged_pairs.png", f"Flagged as likely copies ({len(flagged)} shown)"
        )
    report["figures"] = {k: str(v) for k, v in paths.items()}
    if utility_sets is not None:
        report["utility"] = utility_check.segmentation_utility(utility_sets, utility, seed, on_message=say)
        warnings.extend(report["utility"]["warnings"])
    if conditional_inputs is not None:
        from medsynth.conditions import plan_columns

        columns = plan_columns(plan.conditions)  # type: ignore[arg-type]
        train_values, real_values, synthetic_values = conditional_inputs
        report["conditional"] = conditional.conditional_check(
            columns,
            conditional.ConditionedSet(downsample(train, 32), train_values),  # type: ignore[arg-type]
            conditional.ConditionedSet(real_32, real_values),
            conditional.ConditionedSet(synthetic_32, synthetic_values),
            seed,
            recipe=conditional.PredictorRecipe(epochs=budget.conditional_epochs),
            on_message=say,
        )
    report["verdict"] = verdict(report)
    atomic_write_json(out_dir / "report.json", _plain(report))
    return report


def _conditional_inputs(plan, settings, synthetic_dir, synthetic_names, real_names, train_names, warnings):
    """The conditions of the training, held-out and synthetic volumes when the conditional check
    can run (a conditional plan, its table, --train, samples with conditions), else None, with a
    warning saying what is missing. A table given explicitly (`settings.table`) must be usable."""
    from medsynth.evaluate import conditional

    if not plan.conditions:
        if settings is not None and settings.table:
            raise UsageError(
                "--conditions: the plan (--checkpoint) has no conditions; give a conditional run's checkpoint"
            )
        return None
    synthetic_values = conditional.synthetic_conditions(synthetic_dir, synthetic_names)
    missing = [
        what
        for what, absent in (
            ("--train (the predictor's real training scans)", train_names is None),
            ("the real scans' table (--conditions, or the run's conditions.table)", not (settings and settings.table)),
            ("synthetic volumes with conditions in their manifest.json", synthetic_values is None),
        )
        if absent
    ]
    if missing:
        warnings.append("conditional check skipped: it needs " + "; ".join(missing))
        return None
    return (
        conditional.real_conditions(settings, plan.conditions, train_names),
        conditional.real_conditions(settings, plan.conditions, real_names),
        synthetic_values,
    )


def _plain(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN to None."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def verdict(report: dict[str, Any]) -> list[str]:
    """The report in three plain sentences, one each for realism, diversity and privacy, each
    naming the figure it rests on, so the reader does not have to know every metric; a fourth,
    on downstream utility, when the segmentation check ran."""
    lines = []
    c2st = report.get("c2st")
    if c2st:
        low, high = c2st["ci95"]
        n = c2st["n"]["real"] + c2st["n"]["synthetic"]
        if c2st["p_value_better_than_chance"] >= 0.05:
            lines.append(
                f"Realism: a 3D classifier could not reliably tell the sets apart "
                f"(held-out accuracy {c2st['value']:.2f}, 95% CI {low:.2f}-{high:.2f}, {n} volumes; "
                f"p = {c2st['p_value_better_than_chance']:.2f} against chance)."
            )
        else:
            lines.append(
                f"Realism: a 3D classifier tells synthetic from real {c2st['value']:.0%} of the time "
                f"(95% CI {low:.2f}-{high:.2f}, {n} volumes, p = {c2st['p_value_better_than_chance']:.2g}; "
                "50% would be indistinguishable). "
                "See real_vs_synthetic.png and intensity_histograms.png for how they differ."
            )
    full = report.get("c2st_full_resolution")
    if full and lines:
        lines[0] += (
            f" At full resolution (central 32³ patches) its accuracy is {full['value']:.2f} "
            f"(95% CI {full['ci95'][0]:.2f}-{full['ci95'][1]:.2f})."
        )
    grid = report.get("grid_artefacts")
    if grid and lines and grid["permutation_p_value"] < 0.05:
        excess = np.array(grid["synthetic_contrast"]) - np.array(grid["real_contrast"])  # (periods, axes)
        period, axis = np.unravel_index(int(excess.argmax()), excess.shape)
        lines[0] += (
            f" The synthetic volumes repeat every {grid['periods'][period]} voxels along axis {axis} more than "
            f"real scans do (grid contrast excess {grid['value']:.3f}): the generator's upsampling shows."
        )
    diversity = report["diversity_ms_ssim"]
    if diversity.get("real") and diversity.get("synthetic"):
        real, synthetic = diversity["real"]["value"], diversity["synthetic"]["value"]
        if diversity["mode_collapse_warning"]:
            lines.append(
                f"Diversity: too low; synthetic volumes are more alike (MS-SSIM {synthetic:.3f}) than real ones "
                f"({real:.3f}), the signature of mode collapse."
            )
        else:
            gap = synthetic - real
            if abs(gap) <= 0.05:
                how = "about as alike as real ones"
            elif gap < 0:
                how = "less alike than real ones (noise and implausible variety both lower MS-SSIM: read the realism line)"
            else:
                how = "somewhat more alike than real ones, within the intervals' reach"
            lines.append(
                f"Diversity: no sign of mode collapse; synthetic volumes are {how} "
                f"(mean pairwise MS-SSIM {synthetic:.3f} vs {real:.3f}; higher means more alike)."
            )
    memo = report.get("memorisation")
    if memo:
        share, z = memo["flagged_share"]["value"], memo["data_copying_z"]["value"]
        if share > 0.05 or z < -3:
            lines.append(
                f"Privacy: {share:.0%} of synthetic volumes are closer to a training volume than 99% of held-out "
                f"scans are (data-copying z {z:.1f}); inspect flagged_pairs.png before sharing this set."
            )
        else:
            lines.append(
                f"Privacy: no sign of copying ({share:.0%} flagged, data-copying z {z:.1f}; below -3 would suggest it)."
            )
    else:
        lines.append("Privacy: not audited; pass --train with the training volumes to check for copies.")
    if "utility" in report:
        lines.append(report["utility"]["sentence"])
    if "conditional" in report:
        lines.append(report["conditional"]["sentence"])
    return lines


def _fmt(metric: dict[str, Any] | None, digits: int = 3) -> str:
    if not metric:
        return "-"
    low, high = metric["ci95"]
    interval = f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None and high is not None else ""
    return f"{metric['value']:.{digits}f}{interval}"


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """The headline numbers as (metric, value [95% CI], n, reading) rows for a table."""
    n = report["n"]
    sets = f"{n['real']} real / {n['synthetic']} synthetic"
    rows = []
    if "c2st" in report:
        c2st = report["c2st"]
        rows.append(
            [
                "C2ST held-out accuracy",
                _fmt(c2st),
                f"{c2st['n']['real']} + {c2st['n']['synthetic']}",
                "0.5 = indistinguishable, 1.0 = always told apart",
            ]
        )
        rows.append(
            [
                "kernel MMD²",
                _fmt(report["mmd"], 4) + f", p={report['mmd']['permutation_p_value']:.3f}",
                sets,
                "0 = same distribution; p from permutations",
            ]
        )
        if "c2st_full_resolution" in report:
            full = report["c2st_full_resolution"]
            rows.append(
                [
                    "C2ST at full resolution (central 32³ patches)",
                    _fmt(full),
                    f"{full['n']['real']} + {full['n']['synthetic']}",
                    "as above, on texture the 32-voxel thumbnails average away",
                ]
            )
        for name in ("precision", "recall", "density", "coverage"):
            rows.append([name, _fmt(report[name]), sets, "random-CNN features; 1 is ideal (density: ~1)"])
        rows.append(
            [
                "Fréchet distance (random 3D CNN, not FID)",
                _fmt(report["frechet_distance"], 2),
                sets,
                "0 = same mean and covariance",
            ]
        )
    w1 = report["intensity_wasserstein"]
    rows.append(["foreground intensity W1", _fmt(w1, 2), sets, f"in {w1['units']}; 0 = same histogram"])
    if "grid_artefacts" in report:
        rows.append(
            [
                "grid artefacts (periodic contrast at 2, 4, 8 voxels)",
                _fmt(report["grid_artefacts"]) + f", p={report['grid_artefacts']['permutation_p_value']:.3f}",
                sets,
                "excess over real; 0 = no more grid than real scans",
            ]
        )
    diversity = report["diversity_ms_ssim"]
    rows.append(["MS-SSIM within real", _fmt(diversity.get("real")), str(n["real"]), "higher = less diverse"])
    rows.append(
        [
            "MS-SSIM within synthetic",
            _fmt(diversity.get("synthetic")),
            str(n["synthetic"]),
            "much higher than real = mode collapse",
        ]
    )
    if "memorisation" in report:
        memo = report["memorisation"]
        rows.append(
            [
                "flagged as likely copies",
                _fmt(memo["flagged_share"]),
                f"{n['synthetic']} vs {n.get('train', 0)} train",
                "share closer than 99% of held-out reals",
            ]
        )
        rows.append(
            [
                "data-copying z (Meehan 2020)",
                _fmt(memo["data_copying_z"], 2),
                f"{n['synthetic']} vs {n['real']} held-out",
                "below -3 suggests copying",
            ]
        )
    if "utility" in report:
        from medsynth.evaluate.utility import summary_rows as utility_rows

        rows.extend(utility_rows(report["utility"]))
    if "conditional" in report:
        from medsynth.evaluate.conditional import summary_rows as conditional_rows

        rows.extend(conditional_rows(report["conditional"]))
    return rows
