"""The evaluation report's figures (matplotlib, drawn off-screen)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsynth.atomic import atomic_write
from medsynth.preview import orthogonal_slices


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    plt = _pyplot()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100))
    plt.close(figure)
    return path


def intensity_histograms(
    real: list[np.ndarray], synthetic: list[np.ndarray], threshold: float, to_units, units: str, path: Path
) -> Path:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 3.6))
    bins = np.linspace(threshold, 1.0, 80)
    for name, volumes, colour in (("real", real, "tab:blue"), ("synthetic", synthetic, "tab:orange")):
        values = np.concatenate([v[v > threshold].ravel() for v in volumes]) if volumes else np.zeros(0)
        axis.hist(
            to_units(values),
            bins=to_units(bins),
            density=True,
            histtype="step",
            lw=1.8,
            color=colour,
            label=f"{name} (n={len(volumes)})",
        )
    axis.set_xlabel(f"foreground intensity ({units})")
    axis.set_ylabel("density")
    axis.set_title("Foreground intensity distributions")
    axis.legend()
    figure.tight_layout()
    return _save(figure, path)


def _row(volume: np.ndarray, spacing) -> list[np.ndarray]:
    return orthogonal_slices(volume, spacing)


def slice_grid(real: list[np.ndarray], synthetic: list[np.ndarray], spacing, path: Path, count: int = 4) -> Path:
    """Mid-slices (axial, coronal, sagittal) of real volumes beside synthetic ones."""
    plt = _pyplot()
    rows = min(count, max(len(real), len(synthetic)))
    figure, axes = plt.subplots(rows, 6, figsize=(12, 2.1 * rows), squeeze=False)
    for r in range(rows):
        for block, (name, volumes) in enumerate((("real", real), ("synthetic", synthetic))):
            planes = _row(volumes[r], spacing) if r < len(volumes) else [np.zeros((2, 2))] * 3
            for c, plane in enumerate(planes):
                axis = axes[r, 3 * block + c]
                axis.imshow(plane, cmap="gray", vmin=-1, vmax=1)
                axis.set_axis_off()
                if r == 0:
                    axis.set_title(f"{name}: {('axial', 'coronal', 'sagittal')[c]}", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def pairs(pairs_to_show: list[tuple[np.ndarray, np.ndarray, str]], spacing, path: Path, title: str) -> Path:
    """Synthetic volume beside its nearest training volume, one pair per row."""
    plt = _pyplot()
    rows = max(1, len(pairs_to_show))
    figure, axes = plt.subplots(rows, 6, figsize=(12, 2.1 * rows), squeeze=False)
    for r, (synthetic, train, label) in enumerate(pairs_to_show):
        for block, volume in enumerate((synthetic, train)):
            for c, plane in enumerate(_row(volume, spacing)):
                axis = axes[r, 3 * block + c]
                axis.imshow(plane, cmap="gray", vmin=-1, vmax=1)
                axis.set_axis_off()
        axes[r, 0].set_title(label, fontsize=8, loc="left")
    if not pairs_to_show:
        axes[0, 0].set_title("none", fontsize=9)
        for axis in axes[0]:
            axis.set_axis_off()
    figure.suptitle(title + "   (left: synthetic, right: nearest training volume)", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)
