"""Diversity within a set, and whether synthetic volumes copy training volumes.

Diversity: mean pairwise 3D MS-SSIM within the synthetic set beside the same within the real set.
A generator that collapsed onto a few modes makes samples much more alike than real scans are.

Memorisation: every synthetic volume's nearest training volume, by normalised cross-correlation
maximised over small shifts. The reference is what genuinely new data looks like: the held-out
real volumes' nearest-training similarities. A synthetic volume more similar to a training volume
than almost every held-out real volume is (above their 99th percentile) is flagged as a likely
copy. The data-copying statistic of Meehan, Chaudhuri & Dasgupta (2020) compares the two
distance distributions as a Mann-Whitney z-score: strongly negative (below -3) means the samples
sit systematically closer to the training data than new data does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medsynth.evaluate.similarity import max_shifted_ncc, pairwise_ms_ssim
from medsynth.evaluate.stats import bootstrap_interval, headline, mann_whitney_z, normal_cdf, wilson_interval


def _pairs(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    all_pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)])
    if len(all_pairs) > limit:
        all_pairs = all_pairs[rng.choice(len(all_pairs), limit, replace=False)]
    return all_pairs


def diversity(
    real: torch.Tensor, synthetic: torch.Tensor, seed: int, max_pairs: int = 300, resamples: int = 1000
) -> dict[str, Any]:
    """Mean pairwise MS-SSIM within each set (higher = more alike = less diverse), over at most
    `max_pairs` random pairs per set, with a bootstrap interval from `resamples` draws."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for name, volumes in (("real", real), ("synthetic", synthetic)):
        if len(volumes) < 2:
            out[name] = None
            continue
        pairs = _pairs(len(volumes), max_pairs, rng)
        scores = pairwise_ms_ssim(volumes, pairs)
        interval = bootstrap_interval(
            lambda index, scores=scores: float(scores[index].mean()), len(scores), rng, resamples=resamples
        )
        out[name] = headline(float(scores.mean()), interval, {"volumes": len(volumes), "pairs": len(pairs)})
    warning = None
    if out["real"] and out["synthetic"]:
        gap = out["synthetic"]["value"] - out["real"]["value"]
        # Collapse: samples clearly more alike than real scans, beyond both intervals' reach.
        if gap > 0.05 and out["synthetic"]["ci95"][0] > out["real"]["ci95"][1]:
            warning = (
                f"possible mode collapse: synthetic volumes are more alike (MS-SSIM {out['synthetic']['value']:.3f}) "
                f"than real ones ({out['real']['value']:.3f})"
            )
    out["mode_collapse_warning"] = warning
    out["note"] = "mean pairwise 3D MS-SSIM within each set; higher means less diverse"
    return out


def memorisation(
    synthetic: torch.Tensor,
    held_out: torch.Tensor,
    train: torch.Tensor,
    seed: int,
    max_shift: int = 2,
    quantile: float = 0.99,
    resamples: int = 500,
) -> dict[str, Any]:
    """Nearest-training similarity of synthetic vs held-out real volumes; flags likely copies. The
    data-copying z gets a bootstrap interval from `resamples` draws."""
    rng = np.random.default_rng(seed)
    synthetic_ncc = max_shifted_ncc(synthetic, train, max_shift)  # (S, T)
    held_out_ncc = max_shifted_ncc(held_out, train, max_shift)  # (H, T)
    synthetic_best, synthetic_neighbour = synthetic_ncc.max(dim=1)
    held_out_best, _ = held_out_ncc.max(dim=1)
    synthetic_best, held_out_best = synthetic_best.numpy(), held_out_best.numpy()
    threshold = float(np.quantile(held_out_best, quantile)) if len(held_out_best) else float("nan")
    flagged = synthetic_best > threshold
    n = {"synthetic": len(synthetic_best), "held_out_real": len(held_out_best), "train": len(train)}
    z = mann_whitney_z(1 - synthetic_best, 1 - held_out_best)  # distances: 1 - NCC
    share = headline(
        float(flagged.mean()),
        wilson_interval(int(flagged.sum()), len(flagged)),
        n,
        threshold_ncc=threshold,
        rule=f"nearest-training NCC above the {quantile:.0%} quantile of held-out real volumes' nearest-training NCC",
    )
    copying = headline(
        z,
        bootstrap_interval(
            lambda index: mann_whitney_z(1 - synthetic_best[index], 1 - held_out_best),
            len(synthetic_best),
            rng,
            resamples=resamples,
        ),
        n,
        p_value_copying=normal_cdf(z),
        note="Mann-Whitney z of synthetic vs held-out distances to the training set (Meehan et al. 2020); below -3 suggests copying",
    )
    order = np.argsort(-synthetic_best)
    return {
        "flagged_share": share,
        "data_copying_z": copying,
        "synthetic_nearest_ncc": {
            "median": float(np.median(synthetic_best)),
            "max": float(synthetic_best.max()),
        },
        "held_out_nearest_ncc": {
            "median": float(np.median(held_out_best)),
            "max": float(held_out_best.max()) if len(held_out_best) else None,
        },
        "closest": [
            {
                "synthetic": int(i),
                "train": int(synthetic_neighbour[i]),
                "ncc": float(synthetic_best[i]),
                "flagged": bool(flagged[i]),
            }
            for i in order[: min(8, len(order))]
        ],
        "max_shift_voxels": max_shift,
    }
