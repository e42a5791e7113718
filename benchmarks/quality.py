"""The quality benchmark: which recipe makes the most realistic volumes from the same data and budget.

    python benchmarks/quality.py --data ../shared/data/train/ixi-t1 --config configs/brain-mri-64.yaml \\
        --variant default= --variant lazy-r1="loss.r1_interval=16 loss.share_fake=true" \\
        --steps 1500 --out bench/quality-ixi

For the data folder it makes its own split: sorted by name, every fourth scan (the 4th, 8th, ...)
is held out and never trained on. Then, for each variant (a name and `--set` overrides on top of
--config), the ordinary commands a user would type:

    medsynth train  SPLIT/train -o OUT/runs/NAME --config C --set ... --max-steps STEPS
    medsynth sample OUT/runs/NAME -n SAMPLES -o OUT/samples/NAME
    medsynth evaluate --real SPLIT/held-out --synthetic OUT/samples/NAME --train SPLIT/train ...

and one row per variant: C2ST accuracy with its 95% interval, kernel MMD², coverage, MS-SSIM
diversity of synthetic against real, foreground intensity W1, memorisation flags, the steps
reached and the training wall time. The table goes to OUT/quality.md (with the machine it ran on)
and OUT/quality.json.

It runs unattended and resumes: a variant whose report exists is not redone, and a stopped training
run continues from its checkpoint (medsynth's exact resume). With --minutes, training stops at that
wall-time budget instead (SIGTERM: medsynth checkpoints and exits), and the row says the step reached.

Fine-tuning (`medsynth train --init-from`) is compared on a small dataset that resembles a larger
one: --train-rest-of 40 trains a source run on the training scans that --train-subset 40 leaves
out, and the small-data variants then train on those 40 from scratch or from the source:

    python benchmarks/quality.py ... --train-rest-of 40 --variant source= --out bench/ft-source
    python benchmarks/quality.py ... --train-subset 40 --variant scratch= \
        --variant fine-tuned="--init-from bench/ft-source/runs/source" --out bench/ft
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from medsynth.atomic import atomic_write_bytes, atomic_write_json
from medsynth.distributed import resolve_device
from medsynth.precision import machine_description


def split_scans(data: Path, split_dir: Path) -> tuple[Path, Path, int, int]:
    """Symlink every fourth entry of `data` by sorted name into held-out/, the rest into train/.
    Entries are image files and series folders alike: whatever `medsynth train` would read."""
    entries = sorted(p for p in data.iterdir() if not p.name.startswith("."))
    if len(entries) < 8:
        sys.exit(f"{data}: {len(entries)} entries; the benchmark needs at least 8 to hold out a quarter")
    train_dir, held_dir = split_dir / "train", split_dir / "held-out"
    for folder in (train_dir, held_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for i, entry in enumerate(entries):
        link = (held_dir if i % 4 == 3 else train_dir) / entry.name
        if not link.exists():
            link.symlink_to(entry.resolve())
    return train_dir, held_dir, len(entries) - len(entries) // 4, len(entries) // 4


def subset_of(train_dir: Path, size: int) -> tuple[list[Path], list[Path]]:
    """`size` training entries spread evenly over the sorted names, and the rest: the small new
    dataset of a fine-tuning comparison and the larger one its source run trains on."""
    entries = sorted(train_dir.iterdir())
    if not 0 < size < len(entries):
        sys.exit(f"--train-subset {size}: the training split has {len(entries)} entries")
    chosen = {round(i * len(entries) / size) for i in range(size)}
    return [e for i, e in enumerate(entries) if i in chosen], [e for i, e in enumerate(entries) if i not in chosen]


def link_folder(folder: Path, entries: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        if not (folder / entry.name).exists():
            (folder / entry.name).symlink_to(entry.resolve())
    return folder


def medsynth(*args: str, timeout_s: float | None = None) -> tuple[int, float]:
    """Run one medsynth command as a user would; returns (exit code, wall seconds). With a timeout,
    the command gets SIGTERM when it runs out (training checkpoints and stops on it)."""
    command = [sys.executable, "-m", "medsynth", *args]
    print("$ medsynth " + shlex.join(args), flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command)
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        code = process.wait()
    return code, time.perf_counter() - start


def trained_steps(run: Path) -> int:
    """The last step in the run's metrics log (0 if none)."""
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return 0
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    return int(json.loads(lines[-1]).get("step", 0)) if lines else 0


def row_from_report(name: str, report: dict, steps: int, train_seconds: float) -> dict:
    """The figures the table shows, each as (value, low, high) where the report has an interval."""

    def metric(entry: dict | None) -> list[float | None] | None:
        if not entry:
            return None
        return [entry["value"], *entry.get("ci95", [None, None])]

    diversity = report["diversity_ms_ssim"]
    memo = report.get("memorisation", {})
    return {
        "variant": name,
        "steps": steps,
        "train_minutes": round(train_seconds / 60.0, 1),
        "c2st": metric(report.get("c2st")),
        "c2st_full": metric(report.get("c2st_full_resolution")),
        "grid": metric(report.get("grid_artefacts")),
        "mmd": metric(report.get("mmd")),
        "coverage": metric(report.get("coverage")),
        "ms_ssim_real": metric(diversity.get("real")),
        "ms_ssim_synthetic": metric(diversity.get("synthetic")),
        "intensity_w1": metric(report.get("intensity_wasserstein")),
        "flagged_share": metric(memo.get("flagged_share")),
        "copying_z": metric(memo.get("data_copying_z")),
        "n": report["n"],
    }


def _foreground_geometry(volume, spacing) -> tuple[list[float], float]:
    """(centroid in mm from the grid's corner, foreground volume in mL) of one volume on the plan's
    grid. Foreground: above a fifth of the way from the minimum to the 99th percentile, so the
    real units of samples and the [-1, 1] of the cache are treated alike."""
    import numpy as np

    low, high = float(volume.min()), float(np.percentile(volume, 99))
    mask = volume > low + 0.2 * (high - low)
    centre = np.argwhere(mask).mean(axis=0) * np.asarray(spacing)
    return centre.tolist(), float(mask.sum() * np.prod(spacing) / 1000.0)


def geometry_summary(volumes, spacing) -> dict[str, float]:
    """Where the head lies on the plan's grid and how big it is: the spread of the foreground's
    centroid and the mean and spread of its volume. Augmentation that leaked into samples (shifts,
    scaling) shows as a spread unlike the real scans', preprocessed onto the same grid."""
    import numpy as np

    measured = [_foreground_geometry(v, spacing) for v in volumes]
    centroids = np.array([c for c, _ in measured])
    sizes = np.array([m for _, m in measured])
    return {
        "n": len(sizes),
        "centroid_spread_mm": float(np.linalg.norm(centroids.std(axis=0))),
        "volume_ml_mean": float(sizes.mean()),
        "volume_ml_sd": float(sizes.std()),
    }


def samples_geometry(samples: Path, spacing) -> dict[str, float]:
    import nibabel as nib
    import numpy as np

    return geometry_summary(
        (np.asarray(nib.load(str(p)).dataobj, dtype=np.float32) for p in sorted(samples.glob("*.nii.gz"))), spacing
    )


def real_geometry_on_grid(held_dir: Path, run: Path) -> dict[str, float]:
    """The held-out scans preprocessed with a run's plan (medsynth's own pipeline and cache)."""
    import numpy as np

    from medsynth.checkpoint import load_checkpoint
    from medsynth.config import config_from_dict
    from medsynth.plan import Plan

    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    from medsynth.pipeline import prepare_dataset

    plan = Plan.from_dict(payload["plan"])
    prepared = prepare_dataset(held_dir, config_from_dict(payload["config"]), plan=plan)
    return {**geometry_summary((np.load(e.path) for e in prepared.entries), plan.spacing), "spacing": plan.spacing}


def _cell(value: list[float | None] | None, digits: int = 3) -> str:
    if not value:
        return "-"
    main, low, high = value
    return f"{main:.{digits}f}" + (f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None else "")


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | steps | train min | C2ST acc [95% CI] | C2ST full res | grid excess | MMD² | coverage | "
        "MS-SSIM synth (real) | W1 | flagged | copying z |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        real = r["ms_ssim_real"][0] if r["ms_ssim_real"] else float("nan")
        lines.append(
            f"| {r['variant']} | {r['steps']} | {r['train_minutes']} | {_cell(r['c2st'])} | "
            f"{_cell(r.get('c2st_full'))} | {_cell(r.get('grid'))} | {_cell(r['mmd'], 4)} | "
            f"{_cell(r['coverage'], 2)} | {_cell(r['ms_ssim_synthetic'])} ({real:.3f}) | {_cell(r['intensity_w1'], 1)} | "
            f"{_cell(r['flagged_share'], 2)} | {_cell(r['copying_z'], 1)} |"
        )
    return "\n".join(lines)


def geometry_table(rows: list[dict], real: dict[str, float]) -> str:
    """Head position and size: the augmentation-leak check (issue 11)."""
    lines = [
        "| set | centroid spread mm | foreground mL, mean ± sd |",
        "|---|---|---|",
        f"| held-out real ({real['n']}) | {real['centroid_spread_mm']:.1f} | "
        f"{real['volume_ml_mean']:.0f} ± {real['volume_ml_sd']:.0f} |",
    ]
    for r in rows:
        g = r["geometry"]
        lines.append(
            f"| {r['variant']} ({g['n']}) | {g['centroid_spread_mm']:.1f} | {g['volume_ml_mean']:.0f} ± {g['volume_ml_sd']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of scans; a quarter is held out")
    parser.add_argument("--config", type=Path, help="base config for every variant")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help='NAME=OVERRIDES, e.g. lazy-r1="loss.r1_interval=16 loss.share_fake=true"; NAME= for the config as '
        'is; words starting with -- go to medsynth train as options, e.g. tuned="--init-from RUN"',
    )
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="generator updates per variant")
    budget.add_argument("--minutes", type=float, help="training wall time per variant")
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument(
        "--train-subset", type=int, metavar="N", help="train on N of the training scans only (a small dataset)"
    )
    subset.add_argument(
        "--train-rest-of",
        type=int,
        metavar="N",
        help="train on the training scans --train-subset N leaves out (a fine-tuning source run)",
    )
    parser.add_argument("--samples", type=int, default=64, help="synthetic volumes per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="compute threads for every command")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    variants = [v.split("=", 1) if "=" in v else (v, "") for v in (args.variant or ["default="])]

    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_description(resolve_device("auto"))
    print(f"ran on: {machine}", flush=True)
    train_dir, held_dir, n_train, n_held = split_scans(args.data, args.out / "split")
    print(f"split of {args.data}: {n_train} training, {n_held} held out (every fourth by sorted name)", flush=True)
    if args.train_subset or args.train_rest_of:
        subset, rest = subset_of(train_dir, args.train_subset or args.train_rest_of)
        if args.train_subset:
            train_dir, n_train = link_folder(args.out / "split" / f"train-{len(subset)}", subset), len(subset)
        else:
            train_dir, n_train = link_folder(args.out / "split" / f"train-without-{len(subset)}", rest), len(rest)
        print(f"training on {n_train} of them: {train_dir}", flush=True)
    common = [*(["--threads", str(args.threads)] if args.threads else [])]
    real_geometry = None  # measured on the first run's plan grid
    rows = []
    for name, overrides in variants:
        run, samples, report_dir = args.out / "runs" / name, args.out / "samples" / name, args.out / "eval" / name
        timing_file = run / "quality-train-seconds.json"
        if not (report_dir / "report.json").exists():
            # "--option value" words go to `medsynth train` as they are (e.g. --init-from RUN); the
            # other words are settings, each passed with --set.
            words, sets = shlex.split(overrides), []
            while words:
                word = words.pop(0)
                sets += [word, words.pop(0)] if word.startswith("--") else ["--set", word]
            config = ["--config", str(args.config)] if args.config else []
            steps = ["--max-steps", str(args.steps)] if args.steps else []
            spent = json.loads(timing_file.read_text())["seconds"] if timing_file.exists() else 0.0
            remaining = None if args.minutes is None else max(0.0, args.minutes * 60 - spent)
            if remaining is None or remaining > 0:
                code, seconds = medsynth(
                    "train", str(train_dir), "-o", str(run), *config, *sets, *steps,
                    "--seed", str(args.seed), *common, timeout_s=remaining,
                )  # fmt: skip
                atomic_write_json(timing_file, {"seconds": spent + seconds})
                if code != 0 and not (run / "checkpoints" / "last.pt").exists():
                    sys.exit(f"variant {name}: training failed (exit {code})")
            code, _ = medsynth(
                "sample", str(run), "-n", str(args.samples), "-o", str(samples), "--seed", str(args.seed + 1), *common
            )
            if code != 0:
                sys.exit(f"variant {name}: sampling failed (exit {code})")
            code, _ = medsynth(
                "evaluate", "--real", str(held_dir), "--synthetic", str(samples), "--train", str(train_dir),
                "--checkpoint", str(run), "-o", str(report_dir), "--seed", str(args.seed), *common,
            )  # fmt: skip
            if code != 0:
                sys.exit(f"variant {name}: evaluation failed (exit {code})")
        report = json.loads((report_dir / "report.json").read_text())
        seconds = json.loads(timing_file.read_text())["seconds"] if timing_file.exists() else float("nan")
        row = {**row_from_report(name, report, trained_steps(run), seconds), "overrides": overrides}
        if real_geometry is None:  # the held-out scans on the grid of the first run with a checkpoint
            first = next(r for n, _ in variants if (r := args.out / "runs" / n / "checkpoints" / "last.pt").exists())
            real_geometry = real_geometry_on_grid(held_dir, first.parent.parent)
        row["geometry"] = samples_geometry(samples, real_geometry["spacing"])
        rows.append(row)
        text = table(rows) + "\n\n" + geometry_table(rows, real_geometry)
        print(text, flush=True)
        header = (
            f"Quality benchmark: {args.data} ({n_train} train / {n_held} held out), config "
            f"{args.config or 'defaults'}, trained on {n_train}, budget {f'{args.steps} steps' if args.steps else f'{args.minutes} min'}, "
            f"{args.samples} samples each.\nRan on: {machine}\n"
            f"Command: python {shlex.join(sys.argv)}\n\n"
        )
        atomic_write_bytes(args.out / "quality.md", (header + text + "\n").encode())
        atomic_write_json(
            args.out / "quality.json",
            {"machine": machine, "data": str(args.data), "real_geometry": real_geometry, "rows": rows},
        )
    print(f"table: {args.out / 'quality.md'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
