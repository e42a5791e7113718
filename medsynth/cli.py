"""The `medsynth` command. Commands only parse arguments and call library functions.

Heavy modules (torch, nibabel, SimpleITK) are imported inside commands, so `medsynth --help`
answers at once. Typer checks what it can before a command runs (paths that must exist, closed
sets of choices, counts): those are usage errors, exit 2. Every other expected failure is a
`medsynth.errors.MedsynthError`, caught in one place, `main()`, and shown as one line with its
exit code: 0 ok, 1 failure, 2 usage error, 128+N stopped by signal N.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer

app = typer.Typer(
    name="medsynth",
    help="Synthetic 3D medical images from a 3D DCGAN trained on your NIfTI and DICOM scans.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from medsynth import __version__

        typer.echo(f"medsynth {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Synthetic 3D medical images from a 3D DCGAN trained on your NIfTI and DICOM scans."""


CONFIG_HELP = "YAML config file (see configs/). Settings: defaults < this file < --set < flags."
SET_HELP = "Override one setting, e.g. --set plan.target_shape=[128,128,64]. Repeatable."
LABELS_HELP = (
    "Folder of label maps (segmentations) to pair with the images: each image pairs with the file of its own "
    "name, or its name plus _seg, _label, _labels or _mask before the extension (case01.nii.gz with "
    "case01_seg.nii.gz). Not needed for an nnU-Net v2 or Decathlon dataset folder (dataset.json, imagesTr, "
    "labelsTr), which brings its own."
)
CONDITIONS_HELP = (
    "CSV or TSV table of per-scan conditions (age, sex, class): an ID column and one column per condition. A row "
    "matches a scan whose name (or a folder of it) equals its ID or starts with it and _ - . or a space "
    "(IXI012-HH-1211 matches IXI012-HH-1211_T1.nii.gz); numbers are continuous, text categorical "
    "(conditions.* settings override)."
)
CLASS_FOLDERS_HELP = (
    "Each scan's first folder below SCAN_DIR is its class (SCAN_DIR/<class>/...): a categorical condition."
)
THREADS_HELP = (
    "Compute threads for this process (default: one per available core). Give each of several processes its share."
)


class OutputFormat(str, enum.Enum):
    """What `sample` writes (mirrors medsynth.sample.FORMATS, which --help must not import)."""

    nifti = "nifti"
    dicom = "dicom"
    nnunet = "nnunet"


class DemoSize(str, enum.Enum):
    """Volume sides the demo is tuned for."""

    small = "16"
    medium = "32"
    large = "64"


# Existence checks that Typer makes before the command runs (a usage error, exit 2).
EXISTING = {"exists": True, "resolve_path": False}
EXISTING_FILE = {"exists": True, "dir_okay": False}


def _load_config(
    config_path: Path | None,
    overrides: list[str],
    labels: Path | None = None,
    conditions: Path | None = None,
    class_folders: bool = False,
):
    from medsynth.config import load_config, replace, with_labels_dir

    settings = load_config(config_path, overrides)
    if labels is not None:  # resolved, so a resumed run compares the folder, not how it was typed
        settings = with_labels_dir(settings, labels.resolve())
    if conditions is not None or class_folders:
        chosen = {"table": str(conditions.resolve())} if conditions is not None else {"class_folders": True}
        settings = replace(settings, conditions=replace(settings.conditions, **chosen))
    return settings


@app.command(
    epilog=(
        "Examples:\n\n"
        "  medsynth inspect ~/scans/brains\n\n"
        "  medsynth inspect ~/scans/ct --set plan.target_shape=[128,128,64] --json > report.json\n\n"
        "  medsynth inspect ~/scans/hippocampus --labels ~/scans/hippocampus-labels\n\n"
        "  medsynth inspect ~/scans/ixi --conditions participants.csv   # matching, coverage, distributions\n\n"
        "  medsynth inspect ~/nnUNet_raw/Dataset004_Hippocampus   # its labelsTr and dataset.json"
    )
)
def inspect(
    scan_dir: Path = typer.Argument(
        ...,
        help="Folder (or one file) of NIfTI, MGH/MGZ, MINC, NRRD/MHA files or DICOM series (any layout).",
        **EXISTING,
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP, **EXISTING_FILE),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    labels: Path | None = typer.Option(None, "--labels", help=LABELS_HELP, exists=True, file_okay=False),
    conditions: Path | None = typer.Option(None, "--conditions", help=CONDITIONS_HELP, **EXISTING_FILE),
    class_folders: bool = typer.Option(False, "--class-folders", help=CLASS_FOLDERS_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    save_plan: Path | None = typer.Option(
        None, "--save-plan", help="Also write the plan to this JSON file (for `train --plan`).", dir_okay=False
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Cache folder (default: $MEDSYNTH_CACHE or ~/.cache/medsynth)."
    ),
    memory_check: bool = typer.Option(
        False,
        "--memory",
        help="Also measure the memory of one training step and of sampling with this plan (a few steps in a "
        "child process), beside what the device has: as `train --dry-run` does.",
    ),
) -> None:
    """Show what is in a folder: every volume's geometry, everything skipped and why, and the plan."""
    from medsynth import console
    from medsynth.inspection import failure_report, inspect_folder, render, render_failure
    from medsynth.pipeline import NoUsableSources
    from medsynth.plan import Plan

    settings = _load_config(config, set_, labels, conditions, class_folders)
    try:
        with console.progress_reporter(enabled=not json_output or console.interactive()) as progress:
            report = inspect_folder(scan_dir, settings, cache_dir, progress)
    except NoUsableSources as exc:
        # Still list every item and its reason: together they answer "why is nothing usable?"
        failure = failure_report(scan_dir, exc)
        if json_output:
            console.print_json(failure)
        else:
            render_failure(failure)
        raise
    if save_plan:
        Plan.from_dict(report["plan"]).save(save_plan)
    planned = None
    if memory_check:
        from medsynth import memory
        from medsynth.distributed import resolve_device

        plan = Plan.from_dict(report["plan"])
        device = str(resolve_device(settings.train.device))
        settings, planned, note = memory.plan_to_fit(settings, plan, device, plan.n_sources, measure_sampling=True)
        report["memory"] = {**planned.to_dict(), "note": note}
    if json_output:
        console.print_json(report)
    else:
        render(report)
        if planned is not None:
            if report["memory"]["note"]:
                console.info(report["memory"]["note"])
            console.out.print(console.table("Memory", ["", ""], _memory_rows(planned, settings), show_header=False))
            if not planned.fits:
                console.warn(memory.refusal(planned, settings))
        if save_plan:
            console.info(f"plan written to {save_plan}")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  medsynth train ~/scans/brains -o runs/brains --config configs/brain-mri-64.yaml\n\n"
        "  medsynth train ~/scans/brains -o runs/brains --max-steps 20000   # resume, and train longer\n\n"
        "  medsynth inspect ~/scans/brains --save-plan plan.json   # edit it, then:\n\n"
        "  medsynth train ~/scans/brains -o runs/brains --plan plan.json\n\n"
        "  medsynth train ~/scans/hippocampus --labels ~/scans/hippocampus-labels -o runs/hippo\n\n"
        "  torchrun --nproc_per_node 4 -m medsynth train ~/scans/ct -o runs/ct --config configs/ct-128.yaml"
    )
)
def train(
    scan_dir: Path = typer.Argument(..., help="Folder of training scans (NIfTI, DICOM series, NRRD, MHA).", **EXISTING),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Run folder. If it holds a checkpoint, training resumes from it.", file_okay=False
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP, **EXISTING_FILE),
    plan_file: Path | None = typer.Option(
        None,
        "--plan",
        help="Train with this plan (from `inspect --save-plan`) instead of deriving one. A resumed run keeps its own.",
        **EXISTING_FILE,
    ),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    labels: Path | None = typer.Option(
        None,
        "--labels",
        help=LABELS_HELP + " The model then learns image and label map together, and `sample` writes both.",
        exists=True,
        file_okay=False,
    ),
    conditions: Path | None = typer.Option(None, "--conditions", help=CONDITIONS_HELP, **EXISTING_FILE),
    class_folders: bool = typer.Option(False, "--class-folders", help=CLASS_FOLDERS_HELP),
    init_from: Path | None = typer.Option(
        None,
        "--init-from",
        help="Start from another run's weights (run folder or checkpoint; same model and volume shape), "
        "with fresh optimisers and this data's plan: fine-tuning on a small set.",
        **EXISTING,
    ),
    force: bool = typer.Option(
        False, "--force", help="Start over in a run folder that holds a run with other settings."
    ),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu, cuda, cuda:1 ..."),
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Generator updates to train to (train.max_steps)."
    ),
    max_minutes: float | None = typer.Option(
        None,
        "--max-minutes",
        min=0.001,
        help="Training wall time to stop at, summed over resumes (train.max_minutes); the run ends at whichever limit comes first.",
    ),
    batch_size: str | None = typer.Option(
        None,
        "--batch-size",
        help="Volumes per update per process (train.batch_size); auto: the largest that fits in memory, measured.",
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed for everything (seed)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Plan and size the models, print parameter and FLOP counts, train nothing."
    ),
) -> None:
    """Train the 3D DCGAN on a folder of scans. Resumes automatically; SIGINT/SIGTERM/SIGUSR1 checkpoint and stop (exit 128+signal)."""
    from medsynth import console
    from medsynth.config import replace
    from medsynth.plan import Plan

    settings = _load_config(config, set_, labels, conditions, class_folders)
    flags = {
        k: v
        for k, v in {
            "max_steps": max_steps,
            "max_minutes": max_minutes,
            "batch_size": batch_size,
            "device": device,
        }.items()
        if v is not None
    }
    if flags:
        settings = _with_train_flags(settings, flags)
    if seed is not None:
        settings = replace(settings, seed=seed)
    plan = Plan.load(plan_file) if plan_file else None
    _set_threads(threads)
    if dry_run:
        _dry_run(scan_dir, settings, plan)
        return

    from medsynth.runs import train_run

    with _training_session(settings) as (runtime, progress, display):
        result = train_run(
            scan_dir,
            output,
            settings,
            runtime,
            force=force,
            progress=progress,
            on_step=display,
            on_event=display.event,
            on_message=console.info,
            plan=plan,
            init_from=init_from,
        )
    if runtime.is_main:
        console.info(
            f"done: step {result.step}. Checkpoint {output / 'checkpoints' / 'last.pt'}, previews in {output / 'previews'}, "
            f"metrics in {output / 'metrics.jsonl'}"
        )


def _with_train_flags(settings, flags: dict):
    """`settings` with train options given as flags, checked as `--set train.KEY=VALUE` would be."""
    from medsynth.config import config_from_dict, config_to_dict

    data = config_to_dict(settings)
    for key, value in flags.items():
        data["train"][key] = int(value) if key == "batch_size" and str(value).isdigit() else value
    return config_from_dict(data)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        from medsynth.distributed import set_threads

        set_threads(threads)


@contextlib.contextmanager
def _training_session(settings) -> Iterator:
    """What train and demo share: the process group (torchrun) or device, the progress bar and
    the training display, torn down however the run ends."""
    from medsynth import console, distributed

    runtime = distributed.setup(settings.train.device)
    try:
        with (
            console.progress_reporter() as progress,
            console.TrainingDisplay(
                settings.train.max_steps, settings.train.log_every, settings.train.max_minutes
            ) as display,
        ):
            yield runtime, progress, display
    finally:
        distributed.teardown(runtime)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  medsynth sample runs/brains -n 100 -o synthetic/ --preview\n\n"
        "  medsynth sample runs/brains/checkpoints/last.pt -n 10000 -o synthetic/ --shard $SLURM_ARRAY_TASK_ID/16\n\n"
        "  medsynth sample runs/ct -n 20 -o synthetic-dicom/ --format dicom\n\n"
        "  medsynth sample runs/hippo -n 200 -o ~/nnUNet_raw --format nnunet --dataset-id 901   # a labelled run\n\n"
        "  medsynth sample runs/ixi -n 20 -o women-72/ --condition Age=72 --condition Sex=F   # a conditional run\n\n"
        "  medsynth sample runs/ixi -n 4 -o sweep/ --condition Age=25:75:3 --condition Sex=M   # each latent at 3 ages\n\n"
        "  medsynth sample runs/ixi -o cohort/ --conditions-table cohort.csv   # one volume per row"
    )
)
def sample(
    source: Path = typer.Argument(..., help="A run folder (its checkpoints/last.pt) or a checkpoint file."),
    count: int | None = typer.Option(
        None,
        "-n",
        "--count",
        min=1,
        help="How many volumes in the whole set (all shards together); with a sweep, how many latents (each "
        "made at every value); with --conditions-table, one per row if left out.",
    ),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="Folder for the volumes, their JSON sidecars and manifest.json. With --format nnunet: the "
        "nnUNet_raw folder, which gets DatasetNNN_Name/ (sidecars and manifest in its medsynth/ folder).",
        file_okay=False,
    ),
    seed: int = typer.Option(0, "--seed", help="Base seed: sample i uses a seed derived from (seed, i)."),
    batch_size: int = typer.Option(
        8, "--batch-size", min=1, help="Volumes generated at a time (memory); the voxels do not depend on it."
    ),
    device: str = typer.Option("auto", "--device", help="auto (default), cpu, cuda, cuda:1 ..."),
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    file_format: OutputFormat = typer.Option(
        OutputFormat.nifti,
        "--format",
        help="nifti (.nii.gz files) or dicom (a series folder per sample). A run trained with label maps also "
        "writes each sample's label map, as NIfTI in either format (name_label.nii.gz). nnunet (runs trained "
        "with label maps only): an nnU-Net v2 raw dataset, imagesTr/synth_00000_0000.nii.gz, "
        "labelsTr/synth_00000.nii.gz and dataset.json, checked when the last shard finishes.",
    ),
    dataset_id: int | None = typer.Option(
        None,
        "--dataset-id",
        help="--format nnunet: the dataset id NNN, 1-999 (default 900). nnU-Net's own datasets use ids below "
        "500; 500-999 are for your own.",
    ),
    dataset_name: str | None = typer.Option(
        None,
        "--dataset-name",
        help="--format nnunet: the dataset name, letters, digits and _ (default: from the run folder's name, "
        "runs/hippo -> SyntheticHippo).",
    ),
    shard: str | None = typer.Option(
        None, "--shard", help="i/k: make only every k-th sample, from i (cluster array jobs)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace samples already in the folder instead of skipping them."
    ),
    preview: bool = typer.Option(False, "--preview", help="Also write preview.png: mid-slices of the first samples."),
    condition: list[str] = typer.Option(
        [],
        "--condition",
        help="A conditional model's condition, NAME=VALUE in the training table's units (Age=72, Sex=F), or a "
        "sweep NAME=START:STOP:COUNT (Age=25:75:3: each latent at 25, 50 and 75). Repeat for each condition.",
    ),
    conditions_table: Path | None = typer.Option(
        None,
        "--conditions-table",
        help="CSV/TSV with one row per volume and a column per condition (a balanced cohort); --condition "
        "fills any column it lacks.",
        **EXISTING_FILE,
    ),
    allow_extrapolation: bool = typer.Option(
        False,
        "--allow-extrapolation",
        help="Make volumes at numbers outside the range the model was trained on (refused otherwise), with a warning.",
    ),
) -> None:
    """Write synthetic volumes in real units and real geometry, with a provenance sidecar each."""
    from medsynth import console
    from medsynth.distributed import resolve_device
    from medsynth.sample import SampleRequest, Shard, run_sampling

    _set_threads(threads)
    request = SampleRequest(
        checkpoint=source,
        count=count,
        out_dir=output,
        seed=seed,
        batch_size=batch_size,
        device=resolve_device(device),
        file_format=file_format.value,
        shard=Shard.parse(shard),
        force=force,
        preview=preview,
        dataset_id=dataset_id,
        dataset_name=dataset_name,
        conditions=tuple(condition),
        conditions_table=conditions_table,
        allow_extrapolation=allow_extrapolation,
    )
    with console.progress_reporter() as progress:
        summary = run_sampling(request, progress=progress)
    for warning in summary["warnings"]:
        console.warn(warning)
    where = summary["nnunet"]["folder"] if "nnunet" in summary else summary["out_dir"]
    manifest = os.path.relpath(summary["manifest"], where)
    message = f"{summary['written']} written, {summary['skipped']} already there, in {where} ({manifest})"
    if summary["preview"]:
        message += f"; preview {summary['preview']}"
    console.info(message)
    if "nnunet" in summary:
        _report_nnunet_dataset(summary["nnunet"])


def _report_nnunet_dataset(dataset: dict) -> None:
    """One line per problem nnU-Net would refuse (exit 1), or one line on how to use the dataset."""
    import shlex

    from medsynth import console
    from medsynth.sample import SampleError

    if not dataset["checked"]:
        console.info(
            f"{dataset['present']} of the {dataset['count']} cases are in {dataset['folder']} so far: "
            "the job that completes the set checks the dataset"
        )
        return
    problems = dataset["problems"]
    for problem in problems:
        console.error(f"{dataset['folder']}: {problem}")
    if problems:
        counted = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        raise SampleError(f"{dataset['folder']}: not a valid nnU-Net dataset ({counted} above)")
    console.info(
        f"nnU-Net dataset ready ({dataset['num_training']} cases): export nnUNet_raw={shlex.quote(dataset['raw_root'])}"
        f", then nnUNetv2_plan_and_preprocess -d {dataset['dataset_id']} --verify_dataset_integrity"
    )


@app.command(epilog="Example:\n\n  medsynth demo -o demo/")
def demo(
    output: Path = typer.Option(
        Path("demo"), "--output", "-o", help="Folder for phantoms, the run and the samples.", file_okay=False
    ),
    steps: int = typer.Option(
        1500, "--steps", min=1, help="Training steps (about 3 minutes on 2 CPU cores at the default size)."
    ),
    size: DemoSize = typer.Option(DemoSize.medium, "--size", help="Volume side in voxels."),
    phantoms: int = typer.Option(32, "--phantoms", min=2, help="How many head phantoms to train on."),
    samples: int = typer.Option(8, "--samples", min=1, help="Synthetic volumes to write."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option("auto", "--device", help="auto (default), cpu, cuda ..."),
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    force: bool = typer.Option(False, "--force", help="Start the demo's training over instead of resuming it."),
) -> None:
    """Run the whole pipeline on built-in head phantoms: train briefly, sample, write previews."""
    from medsynth import console
    from medsynth.demo import demo_config, run_demo

    _set_threads(threads)
    # Batches must fill a whole number of PacGAN packs (model.pack = 2): round down to even.
    batch_size = max(2, min(8, phantoms) // 2 * 2)
    settings = demo_config(steps, int(size.value), [f"train.batch_size={batch_size}", *set_, f"train.device={device}"])
    with _training_session(settings) as (runtime, progress, display):
        result = run_demo(
            output,
            settings,
            runtime,
            phantoms=phantoms,
            samples=samples,
            force=force,
            progress=progress,
            on_step=display,
            on_event=display.event,
            on_message=console.info,
        )
    rows = [
        ["training data (phantoms, NIfTI)", result["phantoms"]],
        ["run (checkpoints, metrics.jsonl)", result["run"]],
        ["real volumes, as the model sees them", result["real_preview"]],
        [f"generator at step {result['step']}", result["training_preview"]],
        ["synthetic volumes (NIfTI + sidecars)", result["samples"]],
        ["synthetic volumes, preview", result["sample_preview"] or "-"],
    ]
    console.out.print(console.table("Demo finished", ["what", "where"], rows))


class UtilityTask(str, enum.Enum):
    """Downstream checks `evaluate --utility` runs (mirrors medsynth.evaluate.utility.TASKS)."""

    segmentation = "segmentation"


# The segmenter's default budget (mirrors medsynth.evaluate.utility.DEFAULT_STEPS, which --help must not import).
UTILITY_STEPS = 400


@app.command(
    epilog=(
        "Examples:\n\n"
        "  medsynth evaluate --real held-out/ --synthetic samples/ --train train/ --checkpoint runs/brains -o report/\n\n"
        "  medsynth evaluate --real scans/ --synthetic other-tool-output/ -o report/ --json\n\n"
        "  medsynth evaluate --utility segmentation --real test/ --real-labels test-labels/ --train train/ "
        "--train-labels train-labels/ --synthetic samples/ --checkpoint runs/hippo --real-subsets 5,10,20 -o report/"
    )
)
def evaluate(
    real: Path = typer.Option(..., "--real", help="Real volumes, ideally held out from training.", **EXISTING),
    synthetic: Path = typer.Option(..., "--synthetic", help="Synthetic volumes (any tool's).", **EXISTING),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for report.json and the figures.", file_okay=False),
    train_dir: Path | None = typer.Option(
        None,
        "--train",
        help="The training volumes: enables the memorisation audit (and, with --utility, trains the reference segmenter).",
        **EXISTING,
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Use this run's or checkpoint's plan (else one from --real)."
    ),
    utility: UtilityTask | None = typer.Option(
        None,
        "--utility",
        help=(
            "Downstream check: 'segmentation' trains one fixed 3D U-Net on the real --train pairs, on the synthetic "
            "pairs and on both, and reports each one's Dice on the held-out --real pairs (train on synthetic, test on "
            'real). Needs MONAI: pip install "medsynth[utility]".'
        ),
    ),
    train_labels: Path | None = typer.Option(
        None, "--train-labels", help="Label maps of the --train images (pairing as for train --labels).", **EXISTING
    ),
    real_labels: Path | None = typer.Option(
        None, "--real-labels", help="Label maps of the held-out --real images.", **EXISTING
    ),
    synthetic_labels: Path | None = typer.Option(
        None,
        "--synthetic-labels",
        help="Label maps of the --synthetic images (default: beside them, name_label.nii.gz, as sample writes them).",
        **EXISTING,
    ),
    real_subsets: str | None = typer.Option(
        None,
        "--real-subsets",
        help=(
            "Small-data experiment, e.g. 5,10,20: also train on only that many real pairs (evenly spaced by sorted "
            "name), alone and with the synthetic pairs."
        ),
    ),
    utility_steps: int = typer.Option(
        UTILITY_STEPS,
        "--utility-steps",
        min=1,
        help="Optimiser steps of each segmenter training, the same for every training set.",
    ),
    conditions: Path | None = typer.Option(
        None,
        "--conditions",
        help="The real scans' conditions table, for the conditional check (default: the --checkpoint run's table). "
        "The check runs when the run is conditional, --train is given and the samples record their conditions.",
        **EXISTING_FILE,
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP, **EXISTING_FILE),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed for every random choice (folds, permutations, bootstrap)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print report.json on stdout."),
) -> None:
    """Realism (C2ST, MMD, PRDC, W1), diversity (MS-SSIM) and a memorisation audit, with intervals;
    with --utility segmentation, the Dice a segmenter trained on the synthetic pairs reaches on real ones."""
    from medsynth import console
    from medsynth.checkpoint import load_checkpoint
    from medsynth.evaluate import run_evaluation, summary_rows
    from medsynth.plan import Plan

    utility_request = _utility_request(
        utility, train_labels, real_labels, synthetic_labels, real_subsets, utility_steps, train_dir
    )
    settings = _load_config(config, set_, conditions=conditions)
    _set_threads(threads)
    payload = load_checkpoint(checkpoint) if checkpoint else None
    plan = Plan.from_dict(payload["plan"]) if payload else None
    condition_settings = settings.conditions
    if payload is not None and conditions is None:  # the run's own table and matching settings
        from medsynth.config import config_from_dict

        condition_settings = config_from_dict(payload["config"]).conditions
    with console.progress_reporter(enabled=not json_output or console.interactive()) as progress:
        report = run_evaluation(
            real,
            synthetic,
            output,
            settings,
            train_dir=train_dir,
            plan=plan,
            seed=seed,
            progress=progress,
            on_message=console.info,
            utility=utility_request,
            conditions=condition_settings,
        )
    if json_output:
        console.print_json(json.loads((output / "report.json").read_text()))
        return
    console.out.print(
        console.table(
            f"Evaluation ({output / 'report.json'})", ["metric", "value [95% CI]", "n", "reading"], summary_rows(report)
        )
    )
    for line in report["verdict"]:
        console.out.print(line)
    for warning in report["warnings"]:
        console.warn(warning)
    console.info("figures: " + ", ".join(report["figures"].values()))


def _utility_request(utility, train_labels, real_labels, synthetic_labels, real_subsets, steps, train_dir):
    """evaluate's utility options as a UtilityRequest (None without --utility); usage errors in one line."""
    from medsynth.errors import UsageError

    if utility is None:
        given = [
            name
            for name, value in (
                ("--train-labels", train_labels),
                ("--real-labels", real_labels),
                ("--synthetic-labels", synthetic_labels),
                ("--real-subsets", real_subsets),
                ("--utility-steps", None if steps == UTILITY_STEPS else steps),
            )
            if value is not None
        ]
        if given:
            raise UsageError(f"{', '.join(given)} belong(s) to the utility check: add --utility segmentation")
        return None
    if train_dir is None:
        raise UsageError("--utility segmentation needs --train: the real training images it trains the reference on")
    subsets: tuple[int, ...] = ()
    if real_subsets:
        try:
            subsets = tuple(sorted({int(part) for part in real_subsets.split(",") if part.strip()}))
        except ValueError:
            raise UsageError(
                f"--real-subsets {real_subsets}: give whole numbers separated by commas, e.g. 5,10,20"
            ) from None
        if not subsets or min(subsets) < 1:
            raise UsageError(f"--real-subsets {real_subsets}: give counts of at least 1, e.g. 5,10,20")
    from medsynth.evaluate.utility import SegmenterRecipe, UtilityRequest

    return UtilityRequest(
        train_labels=train_labels,
        real_labels=real_labels,
        synthetic_labels=synthetic_labels,
        real_subsets=subsets,
        recipe=SegmenterRecipe(steps=steps),
    )


def _flops(gflops: float) -> str:
    if gflops >= 1000:
        return f"{gflops / 1000:.2f} TFLOP"
    if gflops >= 1:
        return f"{gflops:.2f} GFLOP"
    return f"{gflops * 1000:.2f} MFLOP"


def _dry_run(scan_dir: Path, settings, plan=None) -> None:
    from medsynth import console, memory
    from medsynth.distributed import Runtime, resolve_device
    from medsynth.pipeline import fingerprint_folder, plan_with_conditions, plan_with_labels
    from medsynth.plan import format_triple, make_plan
    from medsynth.precision import bf16_time_ratio, choose_precision, cpu_description, native_bf16
    from medsynth.runs import describe_models, time_training_step, with_batch_size

    with console.progress_reporter() as progress:
        found = fingerprint_folder(scan_dir, settings, progress=progress)
    plan = plan_with_labels(plan or make_plan(found.fingerprint, settings.plan), found)  # sizes the paired model
    plan, _ = plan_with_conditions(plan, [source.name for source in found.sources], settings)  # and a conditional one
    device = resolve_device(settings.train.device)
    # Memory first, measured in child processes: a step that does not fit is never run here.
    settings, planned, note = memory.plan_to_fit(settings, plan, str(device), len(found.sources), measure_sampling=True)
    if note:
        console.info(note)
    if planned.batch_size is not None:
        settings = with_batch_size(settings, planned.batch_size)  # auto resolved
    sizes = describe_models(settings, plan)
    machine = cpu_description() if device.type == "cpu" else str(device)
    rows = [
        ["volumes", f"{len(found.sources)} usable, {len(found.discovery.problems)} skipped"],
        ["volume shape", format_triple(sizes["volume_shape"], 0) + f" at {format_triple(plan.spacing)} mm"],
        *_hierarchical_rows(settings, plan),
        [
            "generator",
            f"{sizes['generator_parameters']:,} parameters, {_flops(sizes['generator_gflops_per_volume'])} per volume",
        ],
        [
            "discriminator",
            f"{sizes['discriminator_parameters']:,} parameters, {_flops(sizes['discriminator_gflops_per_volume'])} per volume",
        ],
        [
            "one training step",
            f"{_flops(sizes['gflops_per_step'])} at batch {sizes['batch_size']} (forward + backward)",
        ],
        ["device", f"{device}: {machine}"],
        *_memory_rows(planned, settings),
    ]
    # One real step in each precision this device runs natively; emulated bf16 is never timed,
    # since one step of it can take minutes: the small probe's ratio says enough. A step that
    # does not fit is not timed either.
    runtime = Runtime(device=device)
    timed = {"fp32": time_training_step(settings, plan, runtime, "off")} if planned.fits else {}
    if native_bf16(device) and planned.fits:
        timed["bf16"] = time_training_step(settings, plan, runtime, "bf16")
    for name, seconds in timed.items():
        rate = sizes["batch_size"] / seconds
        rows.append(
            [
                f"step time, {name}",
                f"{seconds:.2f} s ({rate:.1f} volumes/s, {_flops(sizes['gflops_per_step'] / seconds)}/s)",
            ]
        )
    if "bf16" not in timed and device.type == "cpu":
        ratio = bf16_time_ratio(str(device))
        rows.append(
            ["step time, bf16", f"not timed: emulated on this CPU (a Conv3d measured {ratio:.0f}x slower than fp32)"]
        )
    choice = choose_precision(settings.train.amp, device)
    rows.append(["training will use", choice.reason])
    rows.append(["run length", _run_length(settings.train, timed.get("bf16" if choice.bf16 else "fp32"))])
    console.out.print(console.table("Dry run: nothing trained", ["", ""], rows, show_header=False))
    if choice.warning:
        console.warn(choice.warning)
    if not planned.fits:
        from medsynth.runs import RunRefused

        raise RunRefused(memory.refusal(planned, settings))


def _run_length(train, step_seconds: float | None) -> str:
    """What ends the run: train.max_steps, or the time budget, with the steps it allows at the timed speed."""
    words = f"{train.max_steps:,} steps"
    if train.max_minutes is None:
        return words + (f", about {_duration_words(train.max_steps * step_seconds)}" if step_seconds else "")
    budget = f"{train.max_minutes:g} minutes of training (train.max_minutes), whichever comes first"
    if not step_seconds:
        return f"{words} or {budget}"
    steps = int(60 * train.max_minutes / step_seconds)
    ends = f"about {min(steps, train.max_steps):,} steps" if steps < train.max_steps else f"{words} first"
    return f"{words} or {budget}: {ends} at the step time above"


def _duration_words(seconds: float) -> str:
    return f"{seconds / 3600:.1f} hours" if seconds >= 5400 else f"{seconds / 60:.0f} minutes"


def _hierarchical_rows(settings, plan) -> list[list[str]]:
    """The hierarchical model's views, when it is on: what a training step makes at full resolution."""
    slabs = settings.model.hierarchical_slabs
    if not slabs:
        return []
    from medsynth.hierarchical import view_shapes
    from medsynth.plan import format_triple

    low, slab = view_shapes(plan.target_shape, slabs)
    return [
        [
            "hierarchical model",
            f"{slabs} slabs of {format_triple(slab, 0)}: a step makes one, and the volume at {format_triple(low, 0)}",
        ]
    ]


def _memory_rows(planned, settings) -> list[list[str]]:
    """The dry run's memory lines: the measured (or predicted) peaks and what the device has."""
    from medsynth.memory import SAFETY, describe_bytes

    how = (
        "measured"
        if planned.measured
        else "predicted from measured batches " + ", ".join(str(p.batch_size) for p in planned.probes)
    )
    batch = planned.batch_size or settings.model.pack
    auto = " (train.batch_size auto)" if settings.train.batch_size == "auto" else ""
    precision = "bf16" if planned.probes[0].amp == "bf16" else "fp32"
    rows = [
        [
            "memory, a training step",
            f"{describe_bytes(planned.peak_bytes)} at batch {batch}{auto}, {precision}, {how}"
            + (" (peak resident memory, PyTorch included)" if planned.probes[0].device == "cpu" else ""),
        ],
        [
            "memory, the run",
            f"{describe_bytes(planned.peak_bytes + planned.cache_bytes)}: the step and "
            f"{describe_bytes(planned.cache_bytes)} of cached volumes it memory-maps",
        ],
    ]
    if planned.sample is not None:
        rows.append(
            [
                "memory, sampling",
                f"{describe_bytes(planned.sample.peak_bytes)} at {planned.sample.batch_size} volumes a batch (fp32), measured",
            ]
        )
    rows.append(
        [
            "memory available",
            f"{describe_bytes(planned.available_bytes)}; a run plans on {SAFETY:.0%}: {describe_bytes(planned.budget_bytes)}",
        ]
    )
    largest = planned.largest_batch
    if largest is None:
        fitting = f"none (not even {settings.model.pack})"
    elif planned.limited_by_data:  # memory is not what stops it: `auto` takes at most one batch an epoch
        fitting = f"{largest}, the data's limit (one batch an epoch); memory would allow more"
    else:
        fitting = str(largest)
    rows.append(["largest batch that fits", fitting])
    rows.append(
        [
            "activation checkpointing",
            "on (train.activation_checkpointing)" if settings.train.activation_checkpointing else "off",
        ]
    )
    return rows


def main() -> None:
    """Entry point: run the app and turn every expected failure into one line and an exit code.

    Usage errors that Typer finds (a missing path, a choice not on the list) and every
    MedsynthError are caught here, once, and shown as one line: a log that a cluster job leaves
    behind should say what went wrong on a line that grep finds. Anything else that escapes is a
    bug and keeps its traceback, so that it gets reported and fixed.
    """
    from medsynth.errors import MedsynthError

    # Click's UsageError, found from Typer's public BadParameter: recent Typer vendors click.
    click_usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    try:
        code = app(standalone_mode=False)
    except click_usage_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `medsynth` alone: the help, as Typer shows it
            exc.show()
        else:
            command = exc.ctx.command_path if exc.ctx else "medsynth"
            _say("error", f"{exc.format_message()} (see {command} --help)")
        sys.exit(exc.exit_code)
    except MedsynthError as exc:
        _say(exc.level, str(exc))
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _say(level: str, message: str) -> None:
    # Under torchrun every process meets the same failure: one of them says so.
    if int(os.environ.get("RANK", "0")) == 0:
        from medsynth import console

        (console.warn if level == "warning" else console.error)(message)
