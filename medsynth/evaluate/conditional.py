"""Is the condition obeyed? An independent predictor, trained on real scans, reads the condition
back from synthetic ones.

One fixed recipe (`PredictorRecipe`): the small 3D CNN of the classifier two-sample test
(`realism.small_3d_cnn`), wider, with one output per continuous condition (its standardised value,
mean squared error) and one block of class scores per categorical condition (cross-entropy),
trained with Adam on volumes at 32 voxels on the longest side, left-right flips its only
augmentation, a fixed number of epochs and a fixed seed. A value missing in the table is left out
of that condition's loss, not guessed.

Three uses of the recipe, each scored per condition with 95% bootstrap intervals over the scored
volumes (mean absolute error in the table's units and Pearson's r for continuous conditions,
accuracy for categorical ones):

* **ceiling**: trained on the real training scans, scored on the held-out real scans. How well the
  condition can be read from a scan at this resolution at all.
* **agreement**: the same predictor, scored on the synthetic volumes against the conditions they
  were asked for (their sidecars). Near the ceiling: the generator obeys the condition as well as
  real anatomy shows it. Near the "predict the mean" baseline: it ignores it.
* **reverse** (train on synthetic, test on real): trained on the synthetic volumes at their asked
  conditions, scored on the held-out real scans. Whether what the generator draws for a condition
  is what real scans show for it.

Each row also gives the error of predicting the training mean (continuous) or the commonest
training class (categorical): a predictor is only informative where it beats that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsynth.conditions import (
    CATEGORICAL,
    CONTINUOUS,
    ConditionColumn,
    ConditionsError,
    check_against_plan,
    encode,
    scan_conditions,
)
from medsynth.config import ConditionsConfig
from medsynth.evaluate.realism import small_3d_cnn
from medsynth.evaluate.stats import bootstrap_interval, headline

BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class PredictorRecipe:
    channels: int = 16
    epochs: int = 60
    batch_size: int = 16
    learning_rate: float = 1e-3


@dataclass
class ConditionedSet:
    """Volumes (N, 1, x, y, z) in [-1, 1] and each one's conditions in the table's units (None: missing)."""

    volumes: torch.Tensor
    values: list[dict[str, Any]]


def _targets(columns: tuple[ConditionColumn, ...], values: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, c) standardised continuous targets (NaN where missing) and (N, k) class indices (-1 where
    missing): the model's own encoding (`conditions.encode`), with missing values marked for the losses."""
    numbers, present, classes = encode(columns, values)
    return torch.from_numpy(np.where(present, numbers, np.nan)), torch.from_numpy(classes - 1)


def train_predictor(
    columns: tuple[ConditionColumn, ...], data: ConditionedSet, recipe: PredictorRecipe, seed: int
) -> nn.Module:
    """The recipe's CNN trained on `data`; in eval mode."""
    continuous = sum(c.kind == CONTINUOUS for c in columns)
    class_counts = [len(c.categories or ()) for c in columns if c.kind == CATEGORICAL]
    torch.manual_seed(seed)
    model = small_3d_cnn(continuous + sum(class_counts), recipe.channels)
    optimiser = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    numbers, classes = _targets(columns, data.values)
    rng = np.random.default_rng(seed)
    n = len(data.volumes)
    for _ in range(recipe.epochs):
        for batch in np.array_split(rng.permutation(n), max(1, math.ceil(n / recipe.batch_size))):
            volumes = data.volumes[batch]  # (b, 1, x, y, z)
            flip = torch.from_numpy(rng.random(len(batch)) < 0.5)
            volumes = torch.where(flip.view(-1, 1, 1, 1, 1), volumes.flip(2), volumes)  # left-right (RAS x)
            out = model(volumes)  # (b, outputs)
            loss = out.new_zeros(())
            if continuous:
                target = numbers[batch]
                known = ~torch.isnan(target)
                if known.any():
                    loss = loss + ((out[:, :continuous] - torch.nan_to_num(target)) ** 2)[known].mean()
            start = continuous
            for j, count in enumerate(class_counts):
                target = classes[batch, j]
                if (target >= 0).any():
                    loss = loss + nn.functional.cross_entropy(out[:, start : start + count], target, ignore_index=-1)
                start += count
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, columns: tuple[ConditionColumn, ...], volumes: torch.Tensor) -> list[dict[str, Any]]:
    """Each volume's predicted conditions, in the table's units."""
    out = torch.cat([model(volumes[i : i + 32]) for i in range(0, len(volumes), 32)])  # (N, outputs)
    continuous = [c for c in columns if c.kind == CONTINUOUS]
    predictions: list[dict[str, Any]] = [{} for _ in range(len(volumes))]
    for j, column in enumerate(continuous):
        for i in range(len(volumes)):
            predictions[i][column.name] = column.in_units(float(out[i, j]))
    start = len(continuous)
    for column in (c for c in columns if c.kind == CATEGORICAL):
        count = len(column.categories or ())
        chosen = out[:, start : start + count].argmax(dim=1)
        for i in range(len(volumes)):
            predictions[i][column.name] = (column.categories or ())[int(chosen[i])]
        start += count
    return predictions


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def score(
    columns: tuple[ConditionColumn, ...],
    truth: list[dict[str, Any]],
    predicted: list[dict[str, Any]],
    baseline: dict[str, Any],
    seed: int,
    sizes: dict[str, int],
) -> dict[str, Any]:
    """Per condition: MAE (units) and Pearson's r, or accuracy; each with a bootstrap interval over
    the volumes that have a true value, beside the baseline's error."""
    rng = np.random.default_rng(seed)
    scores: dict[str, Any] = {}
    for column in columns:
        pairs = [(t[column.name], p[column.name]) for t, p in zip(truth, predicted) if t.get(column.name) is not None]
        if not pairs:
            continue
        n = {**sizes, "scored": len(pairs)}
        if column.kind == CONTINUOUS:
            true = np.array([float(t) for t, _ in pairs])
            guess = np.array([float(p) for _, p in pairs])
            errors = np.abs(true - guess)
            scores[column.name] = {
                "mae": headline(
                    float(errors.mean()),
                    bootstrap_interval(lambda i, e=errors: float(e[i].mean()), len(errors), rng, BOOTSTRAP_RESAMPLES),
                    n,
                ),
                "pearson_r": headline(
                    _pearson(true, guess),
                    bootstrap_interval(
                        lambda i, t=true, g=guess: _pearson(t[i], g[i]), len(true), rng, BOOTSTRAP_RESAMPLES
                    ),
                    n,
                ),
                "baseline_mae": float(np.abs(true - baseline[column.name]).mean()),
            }
        else:
            hits = np.array([t == p for t, p in pairs], dtype=float)
            scores[column.name] = {
                "accuracy": headline(
                    float(hits.mean()),
                    bootstrap_interval(lambda i, h=hits: float(h[i].mean()), len(hits), rng, BOOTSTRAP_RESAMPLES),
                    n,
                ),
                "baseline_accuracy": float(np.mean([t == baseline[column.name] for t, _ in pairs])),
            }
    return scores


def _baseline(columns: tuple[ConditionColumn, ...], values: list[dict[str, Any]]) -> dict[str, Any]:
    """The training set's mean (continuous) or commonest class (categorical)."""
    baseline: dict[str, Any] = {}
    for column in columns:
        present = [v[column.name] for v in values if v.get(column.name) is not None]
        if column.kind == CONTINUOUS:
            baseline[column.name] = float(np.mean([float(v) for v in present])) if present else float("nan")
        else:
            baseline[column.name] = max(sorted(set(present)), key=present.count) if present else None
    return baseline


def conditional_check(
    columns: tuple[ConditionColumn, ...],
    train: ConditionedSet,
    held_out: ConditionedSet,
    synthetic: ConditionedSet,
    seed: int,
    recipe: PredictorRecipe | None = None,
    on_message=None,
) -> dict[str, Any]:
    """The ceiling, agreement and reverse scores (module docstring), as report.json's "conditional"."""
    say = on_message or (lambda message: None)
    recipe = recipe or PredictorRecipe()
    sizes = {
        "train_real": len(train.volumes),
        "held_out_real": len(held_out.volumes),
        "synthetic": len(synthetic.volumes),
    }
    say(f"conditional: training the predictor on {len(train.volumes)} real scans")
    on_real = train_predictor(columns, train, recipe, seed)
    say(f"conditional: training the predictor on {len(synthetic.volumes)} synthetic volumes")
    on_synthetic = train_predictor(columns, synthetic, recipe, seed)
    real_baseline, synthetic_baseline = _baseline(columns, train.values), _baseline(columns, synthetic.values)
    report = {
        "protocol": (
            "a fixed 3D CNN predicts each condition from a volume; ceiling: trained on real training scans, scored on "
            "held-out real scans; agreement: the same predictor scored on synthetic volumes against the conditions "
            "they were made at; reverse: trained on the synthetic volumes, scored on held-out real scans"
        ),
        "recipe": {**asdict(recipe), "network": "small 3D CNN (the C2ST classifier's), inputs at 32 voxels"},
        "n": sizes,
        "ceiling": score(
            columns, held_out.values, predict(on_real, columns, held_out.volumes), real_baseline, seed, sizes
        ),
        "agreement": score(
            columns, synthetic.values, predict(on_real, columns, synthetic.volumes), real_baseline, seed, sizes
        ),
        "reverse": score(
            columns, held_out.values, predict(on_synthetic, columns, held_out.volumes), synthetic_baseline, seed, sizes
        ),
    }
    report["sentence"] = sentence(report, columns)
    return report


def _figure(entry: dict[str, Any], kind: str) -> str:
    if kind == CONTINUOUS:
        return f"MAE {entry['mae']['value']:.3g} (r {entry['pearson_r']['value']:.2f})"
    return f"accuracy {entry['accuracy']['value']:.0%}"


def sentence(report: dict[str, Any], columns: tuple[ConditionColumn, ...]) -> str:
    parts = []
    for column in columns:
        if column.name not in report["agreement"] or column.name not in report["ceiling"]:
            continue
        agreement, ceiling = report["agreement"][column.name], report["ceiling"][column.name]
        baseline = (
            f"predicting the mean: MAE {agreement['baseline_mae']:.3g}"
            if column.kind == CONTINUOUS
            else f"the commonest class: {agreement['baseline_accuracy']:.0%}"
        )
        parts.append(
            f"{column.name}: read back from synthetic volumes with {_figure(agreement, column.kind)}, against "
            f"{_figure(ceiling, column.kind)} on held-out real scans ({baseline})"
        )
    return "Conditions: " + "; ".join(parts) + "." if parts else "Conditions: nothing to score."


def synthetic_conditions(folder: Path, names: list[str]) -> list[dict[str, Any]] | None:
    """Each synthetic volume's asked-for conditions, from the folder's manifest.json as `sample`
    writes it; None when the folder has none (not a conditional model's samples)."""
    import json

    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    by_file = {s["file"]: s.get("conditions") for s in manifest.get("samples", [])}
    found = [by_file.get(name) for name in names]
    if not any(found):
        return None
    missing = [n for n, f in zip(names, found) if f is None]
    if missing:
        raise ConditionsError(
            f"{folder}: {len(missing)} volume(s) have no conditions in manifest.json (e.g. {missing[0]})"
        )
    return found  # type: ignore[return-value]


def real_conditions(
    settings: ConditionsConfig, plan_conditions: tuple[dict[str, Any], ...], names: list[str]
) -> list[dict[str, Any]]:
    """Each real scan's conditions from the table (`settings.table`), matched as for training, in
    the plan's columns."""
    if not settings.table:
        raise ConditionsError("the conditional check needs the real scans' conditions: give --conditions TABLE")
    found = scan_conditions(settings, names)
    assert found is not None
    check_against_plan(found, plan_conditions)
    return found.values


def summary_rows(section: dict[str, Any]) -> list[list[str]]:
    """Rows for evaluate's table: each condition under each use of the predictor."""
    readings = {
        "ceiling": "trained on real, scored on held-out real",
        "agreement": "trained on real, scored on synthetic at their conditions",
        "reverse": "trained on synthetic, scored on held-out real",
    }
    rows = []
    for use, reading in readings.items():
        for name, entry in section[use].items():
            if "mae" in entry:
                metric, value, base = "MAE", entry["mae"], f"mean: {entry['baseline_mae']:.3g}"
                r = entry["pearson_r"]["value"]
                shown = f"{value['value']:.3g} [{value['ci95'][0]:.3g}, {value['ci95'][1]:.3g}], r {r:.2f}"
            else:
                metric, value, base = "accuracy", entry["accuracy"], f"commonest: {entry['baseline_accuracy']:.0%}"
                shown = f"{value['value']:.0%} [{value['ci95'][0]:.0%}, {value['ci95'][1]:.0%}]"
            rows.append([f"{name} {metric}, {use}", shown, f"{value['n']['scored']} scored", f"{reading}; {base}"])
    return rows
