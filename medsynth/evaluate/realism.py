"""How real the synthetic set looks, with nothing pretrained from outside.

* Classifier two-sample test (Lopez-Paz & Oquab 2017): a small 3D CNN learns to tell real from
  synthetic under k-fold cross-validation; its held-out accuracy is 0.5 when it cannot.
  It runs twice: on the whole volumes downsampled to 32 voxels, and at full resolution on their
  central 32³ patches, where the texture the thumbnails average away (grain, a grid) is visible.
* Grid artefacts: the periodic part of the voxel-to-voxel contrast at the generator's upsampling
  periods (2, 4, 8 voxels), against the real scans' (which are not made on that grid).
* Kernel MMD (Gretton et al. 2012) on downsampled volumes, with a permutation p-value.
* Wasserstein-1 distance between the foreground intensity distributions.
* Precision/recall (Kynkäänniemi et al. 2019), density/coverage (Naeem et al. 2020) and a Fréchet
  distance, in the feature space of a randomly initialised, fixed 3D CNN. Naeem et al. show that
  such random embeddings give meaningful fidelity and diversity scores; they need no download and
  are reproducible from the seed. The Fréchet distance here is *not* the ImageNet FID.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from medsynth.evaluate.stats import (
    binomial_p_value_greater,
    headline,
    two_set_bootstrap,
    two_set_subsample_interval,
    wilson_interval,
)


def small_3d_cnn(outputs: int = 1, channels: int = 8) -> nn.Module:
    """Three strided 3³ convolutions, global average pooling and a linear layer: (N, 1, x, y, z) ->
    (N, outputs). The C2ST classifier, and the conditional check's predictor (evaluate/conditional.py)."""
    return nn.Sequential(
        nn.Conv3d(1, channels, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv3d(channels, 2 * channels, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv3d(2 * channels, 4 * channels, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4 * channels, outputs),
    )


def classifier_two_sample_test(
    real: torch.Tensor, synthetic: torch.Tensor, seed: int, folds: int = 5, epochs: int = 30
) -> dict[str, Any]:
    """Held-out accuracy of a 3D CNN telling the sets apart; (N, 1, x, y, z) inputs.

    The larger set is subsampled so both classes are equal, and chance is 0.5. Every volume is
    predicted once, by the model of the fold that did not train on it. One model is trained per
    fold, for `epochs` epochs: the cost is about folds x epochs.
    """
    rng = np.random.default_rng(seed)
    n = min(len(real), len(synthetic))
    real = real[rng.permutation(len(real))[:n]]
    synthetic = synthetic[rng.permutation(len(synthetic))[:n]]
    volumes = torch.cat([real, synthetic])  # (2n, 1, x, y, z)
    labels = torch.cat([torch.ones(n), torch.zeros(n)])
    folds = max(2, min(folds, n))
    assignment = np.concatenate([rng.permutation(np.arange(n) % folds), rng.permutation(np.arange(n) % folds)])
    correct = 0
    for fold in range(folds):
        train_index = np.flatnonzero(assignment != fold)
        test_index = np.flatnonzero(assignment == fold)
        torch.manual_seed(seed + fold)
        model = small_3d_cnn()
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_function = nn.BCEWithLogitsLoss()
        for _ in range(epochs):
            order = rng.permutation(train_index)
            for start in range(0, len(order), 16):
                batch = order[start : start + 16]
                optimiser.zero_grad()
                loss_function(model(volumes[batch]).squeeze(1), labels[batch]).backward()
                optimiser.step()
        with torch.no_grad():
            predictions = (model(volumes[test_index]).squeeze(1) > 0).float()
        correct += int((predictions == labels[test_index]).sum())
    trials = 2 * n
    accuracy = correct / trials
    return headline(
        accuracy,
        wilson_interval(correct, trials),
        {"real": n, "synthetic": n},
        chance=0.5,
        p_value_better_than_chance=binomial_p_value_greater(correct, trials),
        folds=folds,
        epochs=epochs,
        note="held-out accuracy of a 3D CNN told to separate the sets; 0.5 means indistinguishable",
    )


def _rbf_kernel(x: np.ndarray, y: np.ndarray, bandwidth: float) -> np.ndarray:
    squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.exp(-np.maximum(squared, 0) / (2 * bandwidth**2))


def _mmd2(kernel: np.ndarray, n: int) -> float:
    """Unbiased MMD² from the joint kernel matrix of n first and m second items."""
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    m = kernel.shape[0] - n
    term_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(term_x + term_y - 2 * kxy.mean())


def kernel_mmd(
    real: np.ndarray, synthetic: np.ndarray, seed: int, permutations: int = 1000, resamples: int = 300
) -> dict[str, Any]:
    """Unbiased MMD² with a Gaussian kernel (median-distance bandwidth) and a permutation p-value
    (never below 1 / (permutations + 1)); the interval from `resamples` half-set subsamples."""
    rng = np.random.default_rng(seed)
    joint = np.concatenate([real, synthetic]).astype(np.float64)
    n = len(real)
    distances = np.sqrt(np.maximum((joint**2).sum(1)[:, None] + (joint**2).sum(1)[None, :] - 2 * joint @ joint.T, 0))
    bandwidth = float(np.median(distances[np.triu_indices(len(joint), 1)])) or 1.0
    kernel = _rbf_kernel(joint, joint, bandwidth)
    observed = _mmd2(kernel, n)
    exceed = 0
    for _ in range(permutations):
        order = rng.permutation(len(joint))
        if _mmd2(kernel[np.ix_(order, order)], n) >= observed:
            exceed += 1
    p_value = (exceed + 1) / (permutations + 1)

    def resampled(a: np.ndarray, b: np.ndarray) -> float:
        index = np.concatenate([a, n + b])
        return _mmd2(kernel[np.ix_(index, index)], len(a))

    interval = two_set_subsample_interval(resampled, observed, n, len(synthetic), rng, resamples=resamples)
    return headline(
        observed,
        interval,
        {"real": n, "synthetic": len(synthetic)},
        permutation_p_value=p_value,
        permutations=permutations,
        bandwidth=bandwidth,
    )


def _quantiles(values: np.ndarray, count: int = 1000) -> np.ndarray:
    return np.quantile(values, (np.arange(count) + 0.5) / count)


def intensity_wasserstein(
    real: list[np.ndarray],
    synthetic: list[np.ndarray],
    threshold: float,
    seed: int,
    scale: float = 1.0,
    resamples: int = 300,
) -> dict[str, Any]:
    """W1 between the pooled foreground intensities (voxels above `threshold`) of the two sets,
    computed from 1000 quantiles; `scale` converts [-1, 1] units to the scan's units. The interval
    is a bootstrap over volumes with `resamples` draws."""
    rng = np.random.default_rng(seed)
    real_q = np.stack(
        [_quantiles(v[v > threshold]) if (v > threshold).any() else np.full(1000, threshold) for v in real]
    )
    syn_q = np.stack(
        [_quantiles(v[v > threshold]) if (v > threshold).any() else np.full(1000, threshold) for v in synthetic]
    )

    def w1(a: np.ndarray, b: np.ndarray) -> float:
        # Each volume contributes its 1000 quantiles, so pooling them approximates pooling voxels
        # with every volume weighted equally; W1 in 1D is the mean gap between quantile functions.
        return float(np.mean(np.abs(_quantiles(real_q[a].ravel()) - _quantiles(syn_q[b].ravel()))))

    value = w1(np.arange(len(real)), np.arange(len(synthetic)))
    interval = two_set_bootstrap(w1, len(real), len(synthetic), rng, resamples=resamples)
    return headline(
        value * scale,
        (interval[0] * scale, interval[1] * scale),
        {"real": len(real), "synthetic": len(synthetic)},
        normalised_value=value,
        threshold=threshold,
        units="scan units" if scale != 1.0 else "[-1, 1] units",
    )


# The generator doubles its grid 2x per layer, so whatever its upsampling leaves repeats every
# 2, 4, 8... voxels from the volume's corner. Longer periods are a head's own scale.
GRID_PERIODS = (2, 4, 8)


def _profiles(volumes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(N, X, Y, Z) -> per axis, each volume's mean intensity at each position along the axis,
    (N, n), and its mean absolute difference between neighbouring voxels there, (N, n - 1), each
    averaged over the other two axes. A checkerboard alternates the first; the blocks of
    nearest-neighbour upsampling (flat inside, a step at the edge) alternate the second."""
    intensity: list[list[np.ndarray]] = [[], [], []]
    gradient: list[list[np.ndarray]] = [[], [], []]
    for volume in volumes:  # one at a time: at 256³ the differences of a whole set would not fit
        volume = np.asarray(volume, dtype=np.float32)
        for axis in range(3):
            others = tuple(a for a in range(3) if a != axis)
            intensity[axis].append(volume.mean(axis=others))
            gradient[axis].append(np.abs(np.diff(volume, axis=axis)).mean(axis=others))
    return [(np.stack(intensity[a]), np.stack(gradient[a])) for a in range(3)]


def _periodic_part(profile: np.ndarray, period: int) -> float:
    """A profile (n,) -> the RMS over phases of its part that repeats with `period` from position
    0: the profile cut into periods, each less its own mean (which removes the head's slow
    shape), then averaged over the periods."""
    whole = len(profile) // period * period
    periods = profile[:whole].reshape(-1, period)
    phases = (periods - periods.mean(axis=1, keepdims=True)).mean(axis=0)  # (period,)
    return float(np.sqrt(np.mean(phases**2)))


def grid_artefacts(real: np.ndarray, synthetic: np.ndarray, seed: int, resamples: int = 300) -> dict[str, Any]:
    """How much more the synthetic volumes than the real ones repeat on the generator's grid.

    Checkerboards from transposed convolutions, and the blocks nearest-neighbour upsampling
    leaves, sit at the same places in every sample (the grid starts at the volume's corner), so
    they survive averaging over samples; real anatomy does not line up with that grid. For each
    period in GRID_PERIODS and each axis, the grid contrast of a set: the periodic part of its
    mean intensity profile or of its mean gradient profile, whichever is larger, relative to the
    mean gradient. The headline is the largest excess of synthetic over real (0: no more grid
    than real scans), with a bootstrap interval over volumes. (N, X, Y, Z) inputs at full
    resolution, on the same grid."""
    rng = np.random.default_rng(seed)
    real_profiles, synthetic_profiles = _profiles(real), _profiles(synthetic)

    def contrasts(profiles: list[tuple[np.ndarray, np.ndarray]], rows: np.ndarray) -> np.ndarray:
        table = np.zeros((len(GRID_PERIODS), 3))  # (periods, axes)
        for axis, (intensity, gradient) in enumerate(profiles):
            mean_intensity, mean_gradient = intensity[rows].mean(axis=0), gradient[rows].mean(axis=0)
            scale = max(float(mean_gradient.mean()), 1e-12)
            for i, period in enumerate(GRID_PERIODS):
                parts = (_periodic_part(mean_intensity, period), _periodic_part(mean_gradient, period))
                table[i, axis] = max(parts) / scale
        return table

    def excess(a: np.ndarray, b: np.ndarray) -> float:
        return float((contrasts(synthetic_profiles, b) - contrasts(real_profiles, a)).max())

    real_table = contrasts(real_profiles, np.arange(len(real)))
    synthetic_table = contrasts(synthetic_profiles, np.arange(len(synthetic)))
    value = float((synthetic_table - real_table).max())
    interval = two_set_bootstrap(excess, len(real), len(synthetic), rng, resamples=resamples)
    # The largest of nine noisy differences is above 0 even between two real sets: whether the
    # synthetic set's excess is more than that is a permutation test over the pooled volumes.
    pooled = [
        (np.concatenate([ri, si]), np.concatenate([rg, sg]))
        for (ri, rg), (si, sg) in zip(real_profiles, synthetic_profiles)
    ]
    at_least = 0
    for _ in range(resamples):
        order = rng.permutation(len(real) + len(synthetic))
        first, second = order[: len(real)], order[len(real) :]
        at_least += float((contrasts(pooled, second) - contrasts(pooled, first)).max()) >= value
    return headline(
        value,
        interval,
        {"real": len(real), "synthetic": len(synthetic)},
        permutation_p_value=(at_least + 1) / (resamples + 1),
        periods=list(GRID_PERIODS),
        real_contrast=real_table.round(4).tolist(),  # [period][axis]
        synthetic_contrast=synthetic_table.round(4).tolist(),
        note="largest excess of synthetic over real periodic contrast at the generator's upsampling periods; "
        "0 = no more grid than real scans",
    )


class RandomFeatures(nn.Module):
    """A fixed, randomly initialised 3D CNN: globally pooled activations of three stages (112-d)."""

    def __init__(self, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.stages = nn.ModuleList(
            [
                nn.Sequential(nn.Conv3d(1, 16, 3, stride=2, padding=1), nn.LeakyReLU(0.2)),
                nn.Sequential(nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.LeakyReLU(0.2)),
                nn.Sequential(nn.Conv3d(32, 64, 3, stride=2, padding=1), nn.LeakyReLU(0.2)),
            ]
        )
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                fan_in = module.in_channels * 27
                with torch.no_grad():
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                    module.bias.zero_()

    @torch.no_grad()
    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        pooled = []
        x = volumes
        for stage in self.stages:
            x = stage(x)
            pooled.append(x.mean(dim=(2, 3, 4)))
        return torch.cat(pooled, dim=1)  # (N, 112)


def embed(volumes: torch.Tensor, seed: int) -> np.ndarray:
    model = RandomFeatures(seed).eval()
    return torch.cat([model(volumes[i : i + 16]) for i in range(0, len(volumes), 16)]).numpy().astype(np.float64)


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0))


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Kynkäänniemi's precision/recall and Naeem's density/coverage, with k-NN radii."""
    k = max(1, min(k, len(real) - 1, len(fake) - 1))
    real_radii = np.sort(_pairwise(real, real), axis=1)[:, k]  # column 0 is the point itself
    fake_radii = np.sort(_pairwise(fake, fake), axis=1)[:, k]
    real_to_fake = _pairwise(real, fake)  # (R, F)
    precision = float((real_to_fake < real_radii[:, None]).any(axis=0).mean())
    recall = float((real_to_fake < fake_radii[None, :]).any(axis=1).mean())
    density = float((real_to_fake < real_radii[:, None]).sum(axis=0).mean() / k)
    coverage = float((real_to_fake.min(axis=1) < real_radii).mean())
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage, "k": k}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^1/2), the trace via the product's eigenvalues."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues.real, 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def feature_metrics(real: torch.Tensor, synthetic: torch.Tensor, seed: int, resamples: int = 200) -> dict[str, Any]:
    """Precision, recall, density, coverage and the Fréchet distance in random-CNN feature space,
    each with a subsampling interval from `resamples` half-set draws."""
    rng = np.random.default_rng(seed)
    real_features, fake_features = embed(real, seed), embed(synthetic, seed)
    # Standardise with the real set's statistics so that no feature dominates the distances.
    mean, std = real_features.mean(0), real_features.std(0) + 1e-8
    real_features, fake_features = (real_features - mean) / std, (fake_features - mean) / std
    n = {"real": len(real_features), "synthetic": len(fake_features)}
    point = precision_recall_density_coverage(real_features, fake_features)
    out: dict[str, Any] = {}
    for name in ("precision", "recall", "density", "coverage"):

        def statistic(a: np.ndarray, b: np.ndarray, name: str = name) -> float:
            return precision_recall_density_coverage(real_features[a], fake_features[b])[name]

        low, high = two_set_subsample_interval(
            statistic, point[name], n["real"], n["synthetic"], rng, resamples=resamples
        )
        # Keep the interval inside what the metric can take: [0, 1], and density >= 0.
        upper = float("inf") if name == "density" else 1.0
        interval = (min(max(low, 0.0), upper), min(max(high, 0.0), upper))
        out[name] = headline(point[name], interval, n, k=point["k"])
    fd = frechet_distance(real_features, fake_features)
    interval = two_set_subsample_interval(
        lambda a, b: frechet_distance(real_features[a], fake_features[b]),
        fd,
        n["real"],
        n["synthetic"],
        rng,
        resamples=resamples,
    )
    interval = (max(interval[0], 0.0), interval[1])  # a distance
    out["frechet_distance"] = headline(
        fd, interval, n, note="in a fixed random 3D CNN's feature space (standardised); not the ImageNet FID"
    )
    out["feature_space"] = "globally pooled activations of a fixed, randomly initialised 3-stage 3D CNN (112 features)"
    return out
