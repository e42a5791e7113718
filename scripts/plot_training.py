"""Plot a run's loss and D(x) / D(G(z)) curves to a PNG (needs matplotlib).

python scripts/plot_training.py RUN_DIR OUT.png [--smooth 50]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from medsynth.metrics import read_metrics


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--smooth", type=int, default=50)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(args.run_dir / "metrics.jsonl")
    step = np.array([r["step"] for r in records])
    figure, (losses, outputs) = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, label in (("loss_d", "D loss"), ("loss_g", "G loss  (-log D(G(z)))")):
        values = moving_average(np.array([r[key] for r in records]), args.smooth)
        losses.plot(step[len(step) - len(values) :], values, label=label)
    losses.set_xlabel("generator step")
    losses.set_ylabel(f"loss (moving average of {args.smooth})")
    losses.legend()
    for key, label in (("d_real", "D(x), real"), ("d_fake", "D(G(z)), generated")):
        values = moving_average(np.array([r[key] for r in records]), args.smooth)
        outputs.plot(step[len(step) - len(values) :], values, label=label)
    outputs.axhline(0.5, color="grey", lw=0.8, ls="--")
    outputs.set_ylim(0, 1)
    outputs.set_xlabel("generator step")
    outputs.set_ylabel("mean discriminator output")
    outputs.legend()
    figure.suptitle(args.title or str(args.run_dir))
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
