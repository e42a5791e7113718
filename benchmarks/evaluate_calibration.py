"""Calibration of `medsynth evaluate` on real scans: do the metrics measure what they claim?

    python benchmarks/evaluate_calibration.py [--data ../shared/data/train/ixi-t1] [--out DIR]

The real set is split by sorted file name into three disjoint parts: a "training" set T (every
other file), a held-out set H and a second real set S (the rest, alternately). Then:

  real vs real     H against S, with T as training data: C2ST near 0.5, MMD not significant,
                   no memorisation flags;
  blurred          H against S blurred (Gaussian, sigma 2 mm): told apart;
  shuffled         H against S with 8 mm blocks shuffled within each volume: told apart;
  noise            H against smooth random noise in a head-sized box: told apart;
  copies           H against T's first volumes, each shifted by 4 mm and with 1% noise, with T as
                   training data: at least 95% flagged as copies;
  collapsed        H against one volume of S repeated (with 1% noise): the mode-collapse warning.

Each derived volume keeps its source's affine and is written as float32 NIfTI, so evaluation
sees it through the same plan and preprocessing as a real scan. Prints one table and writes
calibration.json beside the reports.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medsynth.config import load_config
from medsynth.evaluate import run_evaluation

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "train" / "ixi-t1"


def link_set(files: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for file in files:
        (folder / file.name).symlink_to(file.resolve())
    return folder


def derived_set(files: list[Path], folder: Path, transform, names: list[str] | None = None) -> Path:
    """Write transform(array, spacing, rng) of each file, with the file's own affine."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, file in enumerate(files):
        image = nib.load(file)
        array = np.asarray(image.dataobj, dtype=np.float32)  # (x, y, z), scanner units
        spacing = np.asarray(image.header.get_zooms()[:3], dtype=float)
        out = transform(array, spacing, rng).astype(np.float32)
        name = names[index] if names else file.name
        nib.save(nib.Nifti1Image(out, image.affine), folder / name)
    return folder


def blurred(array, spacing, rng, sigma_mm=2.0):
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))  # SimpleITK indexes (z, y, x)
    image.SetSpacing(tuple(float(s) for s in spacing))
    smooth = sitk.SmoothingRecursiveGaussian(image, sigma_mm)
    return sitk.GetArrayFromImage(smooth).transpose(2, 1, 0)


def block_shuffled(array, spacing, rng, block_mm=8.0):
    block = np.maximum(1, np.round(block_mm / spacing).astype(int))
    counts = np.asarray(array.shape) // block
    trimmed = array[: counts[0] * block[0], : counts[1] * block[1], : counts[2] * block[2]]
    blocks = trimmed.reshape(counts[0], block[0], counts[1], block[1], counts[2], block[2]).transpose(0, 2, 4, 1, 3, 5)
    flat = blocks.reshape(-1, *block)  # (blocks, bx, by, bz)
    flat = flat[rng.permutation(len(flat))]
    out = array.copy()
    out[: counts[0] * block[0], : counts[1] * block[1], : counts[2] * block[2]] = (
        flat.reshape(*counts, *block).transpose(0, 3, 1, 4, 2, 5).reshape(trimmed.shape)
    )
    return out


def smooth_noise(array, spacing, rng):
    noise = rng.normal(0, 1, array.shape).astype(np.float32)
    noise = blurred(noise, spacing, rng, sigma_mm=3.0)
    scale = np.percentile(array, 99)
    box = np.zeros_like(array)
    margin = [s // 6 for s in array.shape]
    box[margin[0] : -margin[0], margin[1] : -margin[1], margin[2] : -margin[2]] = 1
    return box * scale * (0.5 + noise / (noise.std() + 1e-6) * 0.2)


def shifted_copy(array, spacing, rng, shift_mm=4.0):
    shift = int(round(shift_mm / spacing[0]))
    noisy = array + rng.normal(0, 0.01 * np.percentile(array, 99), array.shape)
    return np.roll(noisy, shift, axis=0)


def noisy(array, spacing, rng):
    return array + rng.normal(0, 0.01 * np.percentile(array, 99), array.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=None, help="keep the reports here (default: a temp folder)")
    parser.add_argument("--shape", type=int, default=64)
    args = parser.parse_args()
    files = sorted(p for p in args.data.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    train, rest = files[0::2], files[1::2]
    held_out, second = rest[0::2], rest[1::2]
    config = load_config(None, [f"plan.target_shape=[{args.shape},{args.shape},{args.shape}]", "plan.modality=mr"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = args.out or root / "reports"
        sets = {
            "T": link_set(train, root / "train"),
            "H": link_set(held_out, root / "held_out"),
            "S": link_set(second, root / "second"),
        }
        cases = {
            "real vs real": (sets["S"], True),
            "blurred": (derived_set(second, root / "blurred", blurred), False),
            "shuffled": (derived_set(second, root / "shuffled", block_shuffled), False),
            "noise": (derived_set(second, root / "noise", smooth_noise), False),
            "copies": (derived_set(train[: len(held_out)], root / "copies", shifted_copy), True),
            "collapsed": (
                derived_set(
                    [second[0]] * len(second),
                    root / "collapsed",
                    noisy,
                    [f"c{i:03d}.nii.gz" for i in range(len(second))],
                ),
                False,
            ),
        }
        print(f"IXI split: train {len(train)}, held-out {len(held_out)}, second real set {len(second)}; {args.shape}³")
        results = {}
        header = f"{'case':14s} {'C2ST [95% CI]':22s} {'MMD p':>6s} {'W1':>6s} {'MS-SSIM syn/real':>17s} {'flagged':>8s} {'copy z':>7s} {'collapse?':>9s} {'s':>5s}"
        print(header)
        for name, (synthetic, with_train) in cases.items():
            start = time.perf_counter()
            report = run_evaluation(
                sets["H"], synthetic, out / name.replace(" ", "_"), config, train_dir=sets["T"] if with_train else None
            )
            seconds = time.perf_counter() - start
            c2st = report["c2st"]
            memo = report.get("memorisation")
            diversity = report["diversity_ms_ssim"]
            row = {
                "c2st": c2st["value"],
                "c2st_ci95": c2st["ci95"],
                "mmd_p": report["mmd"]["permutation_p_value"],
                "intensity_w1": report["intensity_wasserstein"]["value"],
                "ms_ssim_synthetic": diversity["synthetic"]["value"],
                "ms_ssim_real": diversity["real"]["value"],
                "flagged_share": memo["flagged_share"]["value"] if memo else None,
                "data_copying_z": memo["data_copying_z"]["value"] if memo else None,
                "mode_collapse_warning": bool(diversity["mode_collapse_warning"]),
                "n": report["n"],
                "seconds": seconds,
            }
            results[name] = row
            ci = f"{c2st['value']:.3f} [{c2st['ci95'][0]:.2f}, {c2st['ci95'][1]:.2f}]"
            flagged = f"{row['flagged_share']:.0%}" if memo else "-"
            z = f"{row['data_copying_z']:.1f}" if memo else "-"
            print(
                f"{name:14s} {ci:22s} {row['mmd_p']:6.3f} {row['intensity_w1']:6.3f} "
                f"{row['ms_ssim_synthetic']:8.3f}/{row['ms_ssim_real']:.3f} {flagged:>8s} {z:>7s} "
                f"{'yes' if row['mode_collapse_warning'] else 'no':>9s} {seconds:5.0f}",
                flush=True,
            )
        out.mkdir(parents=True, exist_ok=True)
        (out / "calibration.json").write_text(json.dumps(results, indent=2))
        print(f"reports in {out}")


if __name__ == "__main__":
    main()
