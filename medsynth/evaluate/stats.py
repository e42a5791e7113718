"""Small statistics helpers: bootstrap intervals, Wilson intervals, the Mann-Whitney z-score."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    indices_size: int,
    rng: np.random.Generator,
    resamples: int = 1000,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap: `statistic(indices)` over `resamples` resamples of range(indices_size)."""
    values = [statistic(rng.integers(0, indices_size, indices_size)) for _ in range(resamples)]
    return _percentile_interval(values, level)


def _percentile_interval(values: list[float], level: float) -> tuple[float, float]:
    """The central `level` range of the finite values; NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return (float("nan"), float("nan"))
    alpha = (1 - level) / 2
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return float(low), float(high)


def two_set_bootstrap(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    size_a: int,
    size_b: int,
    rng: np.random.Generator,
    resamples: int = 500,
    level: float = 0.95,
) -> tuple[float, float]:
    """Bootstrap interval for a statistic of two sets, resampling each set independently."""
    values = [statistic(rng.integers(0, size_a, size_a), rng.integers(0, size_b, size_b)) for _ in range(resamples)]
    return _percentile_interval(values, level)


def two_set_subsample_interval(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    point: float,
    size_a: int,
    size_b: int,
    rng: np.random.Generator,
    resamples: int = 300,
    level: float = 0.95,
) -> tuple[float, float]:
    """Subsampling interval (Politis & Romano 1994) for a statistic of two sets.

    Resampling *with* replacement duplicates volumes, which biases exactly the statistics that
    compare sets: duplicates look like near neighbours to k-NN metrics, shrink covariances in the
    Fréchet distance and inflate within-set similarity in MMD, so percentile bootstrap intervals
    there did not even contain the estimate. Instead: half of each set, drawn without
    replacement; the spread of the statistic around its subsample median, scaled to the full
    sets' size (root-n rate, with the finite-population correction), is placed around `point`.
    """
    half_a, half_b = max(2, (size_a + 1) // 2), max(2, (size_b + 1) // 2)
    values = []
    for _ in range(resamples):
        a = rng.choice(size_a, half_a, replace=False)
        b = rng.choice(size_b, half_b, replace=False)
        value = statistic(a, b)
        if math.isfinite(value):
            values.append(value)
    if len(values) < 2 or not math.isfinite(point):
        return (float("nan"), float("nan"))
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    centre = float(np.median(values))
    # Without replacement, a half-set statistic varies like 1/m - 1/n (the finite-population
    # correction), which for halves equals the full sets' 1/n: the scale is then about 1.
    scale = math.sqrt((1 / size_a + 1 / size_b) / (1 / half_a - 1 / size_a + 1 / half_b - 1 / size_b))
    return float(point - scale * (centre - low)), float(point + scale * (high - centre))


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (better than the normal one near 0 and 1)."""
    if trials == 0:
        return (float("nan"), float("nan"))
    z = _normal_quantile(0.5 + level / 2)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (max(0.0, centre - half), min(1.0, centre + half))


def binomial_p_value_greater(successes: int, trials: int, p: float = 0.5) -> float:
    """One-sided exact binomial test: P(X >= successes) under Binomial(trials, p)."""
    total = 0.0
    for k in range(successes, trials + 1):
        total += math.comb(trials, k) * p**k * (1 - p) ** (trials - k)
    return min(1.0, total)


def mann_whitney_z(first: np.ndarray, second: np.ndarray) -> float:
    """Mann-Whitney U of `first` against `second`, as a z-score (ties get mid-ranks).

    Negative when values in `first` tend to be smaller. With distances to the training set, it is
    the data-copying statistic of Meehan et al. (2020): strongly negative means the synthetic
    samples sit closer to the training data than genuinely new data does.
    """
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    n1, n2 = len(first), len(second)
    if n1 == 0 or n2 == 0:
        return float("nan")
    combined = np.concatenate([first, second])
    order = combined.argsort(kind="mergesort")
    ranks = np.empty(len(combined))
    sorted_values = combined[order]
    i = 0
    while i < len(combined):  # mid-ranks for ties
        j = i
        while j + 1 < len(combined) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    mean = n1 * n2 / 2
    sd = math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
    return float((u - mean) / sd) if sd > 0 else 0.0


def normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _normal_quantile(p: float) -> float:
    """Inverse normal CDF by bisection (good to 1e-10; only used for a handful of levels)."""
    low, high = -10.0, 10.0
    for _ in range(100):
        middle = (low + high) / 2
        if normal_cdf(middle) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def headline(value: float, interval: tuple[float, float], n: dict[str, int], **extra: Any) -> dict[str, Any]:
    """A metric as it appears in report.json: value, 95% interval, and the sample sizes behind it."""
    return {"value": value, "ci95": list(interval), "n": n, **extra}
