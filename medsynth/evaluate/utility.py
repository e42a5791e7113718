"""Downstream utility: does a segmenter trained on synthetic pairs work on real scans?

The protocol is *train on synthetic, test on real* (TSTR; Esteban, Hyland & Rätsch 2017, used
for segmentation by e.g. Shin et al. 2018). A synthetic set of image + label-map pairs is useful
for segmentation when a segmenter trained on it does well on real scans it has never seen. One
small, fixed 3D U-Net recipe (`SegmenterRecipe`) is trained three times, from the same initial
weights and for the same number of optimiser steps:

  (a) `real`: on the real training pairs (`--train` with `--train-labels`), the reference;
  (b) `synthetic`: on the synthetic pairs only (`x.nii.gz` with `x_label.nii.gz`, as
      `medsynth sample` writes them);
  (c) `real_plus_synthetic`: on both, every batch half real and half synthetic pairs, so that
      the real pairs keep the same weight however many synthetic pairs there are.

Each is scored with the model after its last step (no model selection on the test set) on held-out
real pairs (`--real` with `--real-labels`): the Dice of every foreground class, case by case, and
its mean over cases with a 95% percentile-bootstrap interval over the held-out cases. The headline
is the ratio of (b)'s mean foreground Dice to (a)'s, with a paired bootstrap interval: "trained
only on synthetic pairs, a segmenter reaches N% of the real-trained Dice".

Small-data experiment (`real_subsets`, `--real-subsets 5,10,20`): (a) and (c) again with only k
real training pairs, taken evenly spaced along the real training pairs sorted by name (positions
round(linspace(0, n - 1, k))), so the choice is fixed and spans the set. The report gives the paired
difference (c) - (a) on the same held-out cases: do synthetic pairs help when real data is scarce?

All three sets lie on one grid: the checkpoint's plan (on which the synthetic pairs were sampled),
else a plan made from the real training pairs. Every set is prepared by
`medsynth.pipeline.prepare_dataset`, as training prepares its data: images windowed to [-1, 1],
label maps carried through the image's geometric steps with nearest-neighbour rules.

Cost: (3 + 2 x subsets) trainings of `steps` optimiser steps at batch 4, on the plan's grid, on CPU.
At 32³ a step took about 0.13 s on 2 shared AMD EPYC cores (AVX2): the default 400 steps take about
50 s a training, 2.5 minutes for (a), (b), (c); 64³ costs about 8x that. On the hippocampus data at
32³ (147 real training pairs), the real-trained mean foreground Dice was 0.25, 0.67, 0.74 and 0.78
after 100, 200, 400 and 800 steps: 400 is past the steep part, where a comparison of training sets
measures their data more than how fast each is learned.

The U-Net, its loss and its metric are MONAI's (`pip install "medsynth[utility]"`), the field's
standard implementations, imported only when this check runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.config import Config, with_labels_dir
from medsynth.errors import MedsynthError, UsageError
from medsynth.evaluate.stats import bootstrap_interval, headline
from medsynth.io.labels import PairingError, dataset_layout
from medsynth.plan import Plan, PlanError

MONAI_INSTALL = 'pip install "medsynth[utility]"'
# Measured (docstring above): about 2.5 minutes for the three trainings at 32³ on 2 CPU cores.
DEFAULT_STEPS = 400
TASKS = ("segmentation",)
BOOTSTRAP_RESAMPLES = 1000


class UtilityUnavailable(MedsynthError):
    """The utility check cannot run in this environment (MONAI is not installed)."""


def require_monai() -> str:
    """MONAI's version, or UtilityUnavailable with the install command, in one line."""
    try:
        import monai
    except ImportError:
        raise UtilityUnavailable(
            f"evaluate --utility segmentation needs MONAI, which is not installed: {MONAI_INSTALL}"
        ) from None
    return str(monai.__version__)


@dataclass(frozen=True)
class SegmenterRecipe:
    """The one segmenter every training set gets, so Dice differences come from the data alone.

    A 4-level residual U-Net (MONAI `UNet`, instance norm, 16-128 channels, about 0.6 M parameters):
    the common small 3D baseline, big enough for the organ-sized structures of 32³-64³ grids and
    cheap on a CPU. DiceCE (Dice + cross-entropy) copes with small foreground classes where plain
    cross-entropy predicts background. Adam at 1e-3, batch 4, random flips along each axis as the
    only augmentation. The budget is in optimiser steps, not epochs, so (a), (b) and (c) get the
    same compute whatever the sizes of their training sets.
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    residual_units: int = 1
    learning_rate: float = 1e-3
    batch_size: int = 4
    steps: int = DEFAULT_STEPS

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UsageError(f"--utility-steps must be at least 1, not {self.steps}")
        if self.batch_size < 2:
            raise UsageError(
                f"the segmenter's batch size must be at least 2 (half real, half synthetic), not {self.batch_size}"
            )

    @property
    def downsampling(self) -> int:
        return math.prod(self.strides)


@dataclass(frozen=True)
class UtilityRequest:
    """What `evaluate --utility segmentation` was asked for, beside the folders `run_evaluation` takes."""

    train_labels: Path | None = None  # None: --train is a dataset folder with its own labelsTr
    real_labels: Path | None = None
    synthetic_labels: Path | None = None  # None: beside the synthetic images (name_label.nii.gz)
    real_subsets: tuple[int, ...] = ()
    recipe: SegmenterRecipe = field(default_factory=SegmenterRecipe)


@dataclass
class LabelledSet:
    """Image + label-map pairs on the plan's grid, sorted by name."""

    role: str  # how the user named it, for messages: "real training pairs (--train)"
    images: np.ndarray  # (N, X, Y, Z) float32 in [-1, 1]
    labels: np.ndarray  # (N, X, Y, Z) uint8 label values
    names: list[str]
    label_values: tuple[int, ...]  # the values the label maps hold, as checked before preprocessing

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class UtilitySets:
    train: LabelledSet
    synthetic: LabelledSet
    held_out: LabelledSet
    plan: Plan
    plan_source: str
    class_values: tuple[int, ...]  # every class the segmenter predicts, background (0) first
    class_names: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Loading the pairs


def _load_pairs(
    role: str,
    folder: Path,
    labels_dir: Path | None,
    labels_option: str,
    config: Config,
    plan: Plan | None,
    progress,
    hint: str = "",
) -> tuple[LabelledSet, Plan]:
    """The pairs under `folder`, through `prepare_dataset` on `plan` (None: the folder's own plan).
    `hint` ends the message of a pairing failure."""
    from medsynth.pipeline import prepare_dataset

    if labels_dir is None and dataset_layout(folder) is None:
        raise PairingError(
            f"{role}: {folder} has no label maps: pass {labels_option} DIR (or an nnU-Net or Decathlon dataset folder)"
        )
    try:
        prepared = prepare_dataset(folder, with_labels_dir(config, labels_dir), plan=plan, progress=progress)
    except PairingError as exc:
        raise PairingError(f"{role}: {exc}{hint}") from None
    except PlanError as exc:
        raise PlanError(f"{role}: {exc}") from None
    entries = sorted(prepared.entries, key=lambda entry: entry.name)
    if not all(entry.label_path for entry in entries):
        raise PairingError(f"{role}: {folder} has images without label maps in {labels_dir or folder}")
    labelled = LabelledSet(
        role=role,
        images=np.stack([np.load(entry.path) for entry in entries]).astype(np.float32),  # (N, X, Y, Z)
        labels=np.stack([np.load(entry.label_path) for entry in entries]).astype(np.uint8),  # (N, X, Y, Z)
        names=[entry.name for entry in entries],
        label_values=tuple(prepared.plan.label_values or ()),
    )
    return labelled, prepared.plan


def _values(values: tuple[int, ...]) -> str:
    return ", ".join(map(str, values)) if values else "none"


def load_sets(
    train_dir: str | Path,
    real_dir: str | Path,
    synthetic_dir: str | Path,
    request: UtilityRequest,
    config: Config,
    plan: Plan | None = None,
    progress=None,
) -> UtilitySets:
    """Load and check the three labelled sets on one grid; refuse, in one line, what cannot be compared."""
    synthetic_labels = request.synthetic_labels or Path(synthetic_dir)
    # Each set is prepared without a label set in the plan, so each reports its own values and
    # the comparison below can say which set disagrees.
    grid = replace(plan, label_values=None, label_names=None) if plan is not None else None
    train, train_plan = _load_pairs(
        "real training pairs (--train)", Path(train_dir), request.train_labels, "--train-labels", config, grid, progress
    )
    plan_source = "checkpoint"
    if plan is None:
        plan, plan_source = train_plan, "computed from the real training pairs"
        grid = replace(plan, label_values=None, label_names=None)
    held_out, _ = _load_pairs(
        "held-out real pairs (--real)", Path(real_dir), request.real_labels, "--real-labels", config, grid, progress
    )
    synthetic, _ = _load_pairs(
        "synthetic pairs (--synthetic)",
        Path(synthetic_dir),
        synthetic_labels,
        "--synthetic-labels",
        config,
        grid,
        progress,
        hint=" (medsynth sample writes x_label.nii.gz beside x.nii.gz for a run trained with --labels)",
    )
    if set(synthetic.label_values) != set(train.label_values):
        raise PairingError(
            f"the label sets disagree: the real training label maps hold values {_values(train.label_values)}, "
            f"the synthetic ones {_values(synthetic.label_values)}; a segmenter can only be compared on the same classes"
        )
    extra = sorted(set(held_out.label_values) - set(train.label_values))
    if extra:
        raise PairingError(
            f"the label sets disagree: the held-out real label maps hold value(s) {_values(tuple(extra))}, "
            f"which no training label map holds (they hold {_values(train.label_values)})"
        )
    for subset in request.real_subsets:
        if not 1 <= subset <= len(train):
            raise UsageError(
                f"--real-subsets {subset}: choose between 1 and the {len(train)} real training pairs there are"
            )
    shape = tuple(int(n) for n in train.images.shape[1:])
    if any(n % request.recipe.downsampling for n in shape):
        raise UsageError(
            f"the segmenter needs a grid divisible by {request.recipe.downsampling} on every side, not "
            f"{'×'.join(map(str, shape))}: set plan.target_shape"
        )
    values = tuple(sorted(set(train.label_values) | {0}))
    names = _class_names(values, plan, train_plan)
    return UtilitySets(train, synthetic, held_out, plan, plan_source, values, names)


def _class_names(values: tuple[int, ...], *plans: Plan) -> tuple[str, ...]:
    """Each class's name from the first plan that names it (the checkpoint's, then the training pairs')."""
    from medsynth.io.labels import class_names

    declared: dict[int, str] = {}
    for plan in reversed(plans):
        if plan.label_values and plan.label_names:
            declared.update(zip(plan.label_values, plan.label_names))
    return class_names(values, declared)


def subset_indices(names: list[str], size: int) -> list[int]:
    """`size` of the pairs, evenly spaced along their names' sorted order: a fixed choice that spans the set."""
    order = sorted(range(len(names)), key=lambda i: names[i])
    positions = np.round(np.linspace(0, len(names) - 1, size)).astype(int)
    return [order[p] for p in positions]


# ---------------------------------------------------------------------------------------------
# The segmenter


def build_segmenter(recipe: SegmenterRecipe, classes: int):
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=classes,
        channels=recipe.channels,
        strides=recipe.strides,
        num_res_units=recipe.residual_units,
    )


def _class_indices(labels: np.ndarray, class_values: tuple[int, ...]) -> np.ndarray:
    """Label values -> class indices 0..C-1 (values need not be consecutive: 0, 3, 7 -> 0, 1, 2)."""
    lookup = np.zeros(256, dtype=np.int64)
    lookup[list(class_values)] = np.arange(len(class_values))
    return lookup[labels]


def train_segmenter(
    pools: list[tuple[np.ndarray, np.ndarray]], class_values: tuple[int, ...], recipe: SegmenterRecipe, seed: int
):
    """Train the recipe's U-Net for `recipe.steps` steps; return it in eval mode.

    `pools`: one or two (images (N, X, Y, Z), label values (N, X, Y, Z)) sets; every batch takes an
    equal share from each. Within a pool, pairs are drawn in seeded random order, each pair once
    before any pair twice. The same seed gives the same initial weights to every training, so
    trainings differ only by their data.
    """
    import torch
    from monai.losses import DiceCELoss

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = build_segmenter(recipe, len(class_values))
    optimiser = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    tensors = [
        (torch.from_numpy(images)[:, None], torch.from_numpy(_class_indices(labels, class_values))[:, None])
        for images, labels in pools
    ]  # (N, 1, X, Y, Z) float32 and int64 each
    share = recipe.batch_size // len(pools)
    shares = [share + (1 if i < recipe.batch_size - share * len(pools) else 0) for i in range(len(pools))]
    queues: list[list[int]] = [[] for _ in pools]
    model.train()
    for _ in range(recipe.steps):
        batch_images, batch_labels = [], []
        for pool, (images, labels) in enumerate(tensors):
            for _ in range(shares[pool]):
                if not queues[pool]:
                    queues[pool] = list(rng.permutation(len(images)))
                index = queues[pool].pop()
                flip = [axis for axis in (1, 2, 3) if rng.random() < 0.5]  # of (1, X, Y, Z)
                batch_images.append(torch.flip(images[index], flip) if flip else images[index])
                batch_labels.append(torch.flip(labels[index], flip) if flip else labels[index])
        optimiser.zero_grad()
        logits = model(torch.stack(batch_images))  # (B, C, X, Y, Z)
        loss_function(logits, torch.stack(batch_labels)).backward()
        optimiser.step()
    return model.eval()


def dice_per_case(model, held_out: LabelledSet, class_values: tuple[int, ...], batch_size: int = 4) -> np.ndarray:
    """(N cases, C - 1 foreground classes) Dice of the model's argmax; NaN where a case lacks the class."""
    import torch
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    classes = len(class_values)
    rows = []
    with torch.no_grad():
        for start in range(0, len(held_out), batch_size):
            images = torch.from_numpy(held_out.images[start : start + batch_size])[:, None]  # (B, 1, X, Y, Z)
            truth = torch.from_numpy(_class_indices(held_out.labels[start : start + batch_size], class_values))
            predicted = model(images).argmax(dim=1)  # (B, X, Y, Z)
            one_hot = [torch.nn.functional.one_hot(t, classes).movedim(-1, 1) for t in (predicted, truth)]
            rows.append(metric(*one_hot).numpy())  # (B, C - 1)
    return np.concatenate(rows).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Statistics of the scores


def _mean_present(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def _case_means(dice: np.ndarray) -> np.ndarray:
    """Each case's mean Dice over the foreground classes it holds (NaN if it holds none)."""
    present = np.isfinite(dice)
    totals = np.where(present, dice, 0.0).sum(axis=1)
    counts = present.sum(axis=1)
    return np.divide(totals, counts, out=np.full(len(dice), np.nan), where=counts > 0)


def _scores(dice: np.ndarray, class_names: tuple[str, ...], sizes: dict[str, int], seed: int) -> dict[str, Any]:
    """Per-class and mean foreground Dice, each with a bootstrap interval over the held-out cases."""
    cases = len(dice)
    per_class = {}
    for k, name in enumerate(class_names[1:]):
        column = dice[:, k]
        interval = bootstrap_interval(
            lambda index, column=column: _mean_present(column[index]),
            cases,
            np.random.default_rng(seed),
            resamples=BOOTSTRAP_RESAMPLES,
        )
        per_class[name] = headline(
            _mean_present(column), interval, {**sizes, "held_out_cases": int(np.isfinite(column).sum())}
        )
    means = _case_means(dice)
    interval = bootstrap_interval(
        lambda index: _mean_present(means[index]), cases, np.random.default_rng(seed), resamples=BOOTSTRAP_RESAMPLES
    )
    mean = headline(
        _mean_present(means),
        interval,
        {**sizes, "held_out_cases": int(np.isfinite(means).sum())},
        note="per case, the mean Dice over the foreground classes it holds; then the mean over cases",
    )
    return {"dice": per_class, "mean_foreground_dice": mean, "per_case": means.tolist()}


def _paired(first: np.ndarray, second: np.ndarray, combine: Callable[[float, float], float], seed: int):
    """combine(mean of first, mean of second) over the same held-out cases, with a paired bootstrap interval."""
    both = np.isfinite(first) & np.isfinite(second)
    first, second = first[both], second[both]

    def statistic(index: np.ndarray) -> float:
        return combine(_mean_present(first[index]), _mean_present(second[index]))

    value = statistic(np.arange(len(first))) if len(first) else float("nan")
    interval = (
        bootstrap_interval(statistic, len(first), np.random.default_rng(seed), resamples=BOOTSTRAP_RESAMPLES)
        if len(first)
        else (float("nan"), float("nan"))
    )
    return value, interval, len(first)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# The check


def segmentation_utility(
    sets: UtilitySets,
    request: UtilityRequest,
    seed: int = 0,
    on_message: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the recipe on (a) real, (b) synthetic, (c) both, and on real subsets; score each on the
    held-out real pairs. Returns the report's "utility" section."""
    say = on_message or (lambda message: None)
    recipe = request.recipe
    monai_version = require_monai()
    values, names = sets.class_values, sets.class_names
    held_out_n = len(sets.held_out)
    train, synthetic = sets.train, sets.synthetic

    def run(name: str, pools: list[LabelledSet], what: str) -> tuple[dict[str, Any], np.ndarray]:
        say(f"utility: training the segmenter on {what} ({recipe.steps} steps)")
        started = time.perf_counter()
        model = train_segmenter([(p.images, p.labels) for p in pools], values, recipe, seed)
        seconds = time.perf_counter() - started
        dice = dice_per_case(model, sets.held_out, values, recipe.batch_size)
        sizes = {
            "train_real": sum(len(p) for p in pools if p is not synthetic),
            "train_synthetic": len(synthetic) if any(p is synthetic for p in pools) else 0,
        }
        return {"trained_on": name, **_scores(dice, names, sizes, seed), "train_seconds": seconds}, _case_means(dice)

    trainings, case_means = {}, {}
    for name, pools, what in (
        ("real", [train], f"{len(train)} real pairs"),
        ("synthetic", [synthetic], f"{len(synthetic)} synthetic pairs"),
        ("real_plus_synthetic", [train, synthetic], f"{len(train)} real + {len(synthetic)} synthetic pairs"),
    ):
        trainings[name], case_means[name] = run(name, pools, what)

    ratio, interval, paired_cases = _paired(case_means["synthetic"], case_means["real"], _ratio, seed)
    section: dict[str, Any] = {
        "task": "segmentation",
        "protocol": "train on synthetic, test on real (TSTR): one fixed U-Net recipe trained on (a) the real "
        "training pairs, (b) the synthetic pairs, (c) both (half of every batch each); Dice on held-out real pairs "
        "with the model after its last step",
        "recipe": {
            **asdict(recipe),
            "model": "MONAI UNet (3D, instance norm)",
            "loss": "DiceCELoss (softmax)",
            "optimiser": "Adam",
            "augmentation": "random flip along each axis, p = 0.5",
            "monai_version": monai_version,
            "device": "cpu",
        },
        "plan": {
            "source": sets.plan_source,
            "target_shape": list(sets.plan.target_shape),
            "spacing": list(sets.plan.spacing),
        },
        "classes": [{"value": v, "name": n} for v, n in zip(values[1:], names[1:])],
        "n": {"train_real": len(train), "synthetic": len(synthetic), "held_out_real": held_out_n},
        "held_out_names": sets.held_out.names,
        "trainings": trainings,
        "synthetic_to_real_dice_ratio": headline(
            ratio,
            interval,
            {"held_out_cases": paired_cases, "train_real": len(train), "train_synthetic": len(synthetic)},
            note="mean foreground Dice trained on synthetic / trained on real, on the same held-out cases; paired bootstrap",
        ),
        "subsets": [],
        "warnings": [],
    }
    for k, name in enumerate(names[1:]):
        if trainings["real"]["dice"][name]["n"]["held_out_cases"] == 0:
            section["warnings"].append(
                f"no held-out real label map holds class {name} (value {values[k + 1]}): its Dice is not measured"
            )
    for size in request.real_subsets:
        chosen = subset_indices(train.names, size)
        subset = LabelledSet(
            role=f"{size} of the real training pairs",
            images=train.images[chosen],
            labels=train.labels[chosen],
            names=[train.names[i] for i in chosen],
            label_values=train.label_values,
        )
        real_only, real_means = run("real", [subset], f"{size} real pairs")
        mixed, mixed_means = run(
            "real_plus_synthetic", [subset, synthetic], f"{size} real + {len(synthetic)} synthetic pairs"
        )
        gain, gain_interval, gain_cases = _paired(mixed_means, real_means, lambda a, b: a - b, seed)
        section["subsets"].append(
            {
                "real_pairs": size,
                "names": subset.names,
                "real": real_only,
                "real_plus_synthetic": mixed,
                "dice_gain_from_synthetic": headline(
                    gain,
                    gain_interval,
                    {"held_out_cases": gain_cases, "train_real": size, "train_synthetic": len(synthetic)},
                    note="mean foreground Dice of (real + synthetic) minus (real only); paired bootstrap",
                ),
            }
        )
    section["sentence"] = sentence(section)
    return section


def sentence(section: dict[str, Any]) -> str:
    """The utility finding in one plain sentence."""
    real = section["trainings"]["real"]["mean_foreground_dice"]
    synthetic = section["trainings"]["synthetic"]["mean_foreground_dice"]
    ratio = section["synthetic_to_real_dice_ratio"]
    cases = ratio["n"]["held_out_cases"]
    if ratio["value"] is None or not math.isfinite(ratio["value"]):
        return (
            f"Utility: not measurable; the segmenter trained on real pairs reached a mean foreground Dice of "
            f"{_number(real['value'])} on {cases} held-out real scans, so there is no real-trained Dice to compare with."
        )
    low, high = ratio["ci95"]
    interval = f", 95% CI {low:.0%}-{high:.0%}" if _finite(low) and _finite(high) else ""
    return (
        f"Utility: trained only on synthetic pairs, a segmenter reaches {ratio['value']:.0%} of the real-trained Dice "
        f"(mean foreground Dice {_number(synthetic['value'])} vs {_number(real['value'])} on {cases} held-out real "
        f"scans{interval})."
    )


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def _number(value: Any) -> str:
    return f"{value:.2f}" if _finite(value) else "-"


def summary_rows(section: dict[str, Any]) -> list[list[str]]:
    """(metric, value [95% CI], n, reading) rows for the printed table."""

    def cell(metric: dict[str, Any], percent: bool = False) -> str:
        value, (low, high) = metric["value"], metric["ci95"]
        if not _finite(value):
            return "-"
        text = f"{value:.0%}" if percent else f"{value:.3f}"
        if _finite(low) and _finite(high):
            text += f" [{low:.0%}, {high:.0%}]" if percent else f" [{low:.3f}, {high:.3f}]"
        return text

    def sizes(n: dict[str, int]) -> str:
        trained = f"{n['train_real']} real + {n['train_synthetic']} synth"
        return f"{trained} / {n['held_out_cases']} held-out"

    labels = {"real": "real", "synthetic": "synthetic", "real_plus_synthetic": "real + synthetic"}
    rows = []
    for key, training in section["trainings"].items():
        for name, metric in training["dice"].items():
            rows.append(
                [f"Dice {name}, trained on {labels[key]}", cell(metric), sizes(metric["n"]), "held-out real pairs"]
            )
        if len(training["dice"]) > 1:
            metric = training["mean_foreground_dice"]
            rows.append(
                [f"mean Dice, trained on {labels[key]}", cell(metric), sizes(metric["n"]), "over foreground classes"]
            )
    ratio = section["synthetic_to_real_dice_ratio"]
    rows.append(
        [
            "synthetic / real-trained Dice",
            cell(ratio, percent=True),
            f"{ratio['n']['held_out_cases']} held-out",
            "100% = as useful as real pairs",
        ]
    )
    for subset in section["subsets"]:
        for key in ("real", "real_plus_synthetic"):
            metric = subset[key]["mean_foreground_dice"]
            rows.append(
                [
                    f"mean Dice, {subset['real_pairs']} real pairs, trained on {labels[key]}",
                    cell(metric),
                    sizes(metric["n"]),
                    "small-data experiment",
                ]
            )
        gain = subset["dice_gain_from_synthetic"]
        rows.append(
            [
                f"Dice gain from synthetic, {subset['real_pairs']} real pairs",
                cell(gain),
                f"{gain['n']['held_out_cases']} held-out",
                "above 0 = synthetic pairs help",
            ]
        )
    return rows
