"""The `medsynth` command. Commands only parse arguments and call library functions.

Heavy modules (torch, nibabel, SimpleITK) are imported inside commands, so `medsynth --help`
answers at once. Exit codes: 0 ok, 1 failure, 2 usage error.
"""

from __future__ import annotations

import json
import sys
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


class Failure(Exception):
    """A failure already explained to the user; carries the exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _load_config(config_path: Path | None, overrides: list[str]):
    from medsynth.config import load_config

    return load_config(config_path, overrides)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  medsynth inspect ~/scans/brains\n\n"
        "  medsynth inspect ~/scans/ct --set plan.target_shape=[128,128,64] --json > report.json"
    )
)
def inspect(
    scan_dir: Path = typer.Argument(..., help="Folder of NIfTI files, DICOM series (any layout) or NRRD/MHA files."),
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    save_plan: Path | None = typer.Option(None, "--save-plan", help="Also write the plan to this JSON file."),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Cache folder (default: $MEDSYNTH_CACHE or ~/.cache/medsynth)."
    ),
) -> None:
    """Show what is in a folder: every volume's geometry, everything skipped and why, and the plan."""
    from medsynth import console
    from medsynth.inspection import inspect_folder, render, skipped_table
    from medsynth.io import discover_sources
    from medsynth.plan import Plan, PlanError

    settings = _load_config(config, set_)
    if not scan_dir.exists():
        raise Failure(f"{scan_dir}: no such file or folder", code=2)
    try:
        with console.progress_reporter(enabled=not json_output or console.interactive()) as progress:
            report = inspect_folder(scan_dir, settings, cache_dir, progress)
    except PlanError as exc:
        # Still show what was skipped: it is the answer to "why is nothing usable?"
        found = discover_sources(scan_dir, settings.io)
        problems = [{"name": s.name, "reason": s.reason} for s in found.problems]
        if json_output:
            console.print_json({"root": str(scan_dir), "sources": [], "skipped": problems, "error": str(exc)})
        elif problems:
            console.out.print(skipped_table(problems, f"{len(problems)} skipped"))
        raise Failure(str(exc)) from None
    if save_plan:
        Plan.from_dict(report["plan"]).save(save_plan)
    if json_output:
        console.print_json(report)
    else:
        render(report)
        if save_plan:
            console.info(f"plan written to {save_plan}")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  medsynth train ~/scans/brains -o runs/brains --config configs/brain-mri-64.yaml\n\n"
        "  medsynth train ~/scans/brains -o runs/brains --max-steps 20000   # resume, and train longer\n\n"
        "  torchrun --nproc_per_node 4 -m medsynth train ~/scans/ct -o runs/ct --config configs/ct-128.yaml"
    )
)
def train(
    scan_dir: Path = typer.Argument(..., help="Folder of training scans (NIfTI, DICOM series, NRRD, MHA)."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Run folder. If it holds a checkpoint, training resumes from it."
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    force: bool = typer.Option(
        False, "--force", help="Start over in a run folder that holds a run with other settings."
    ),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu, cuda, cuda:1 ..."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Generator updates to train to (train.max_steps)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Volumes per update per process (train.batch_size)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed for everything (seed)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Plan and size the models, print parameter and FLOP counts, train nothing."
    ),
) -> None:
    """Train the 3D DCGAN on a folder of scans. Resumes automatically; SIGINT/SIGTERM/SIGUSR1 checkpoint and stop (exit 128+signal)."""
    from medsynth import console
    from medsynth.config import replace

    settings = _load_config(config, set_)
    flags = {
        k: v for k, v in {"max_steps": max_steps, "batch_size": batch_size, "device": device}.items() if v is not None
    }
    if flags:
        settings = replace(settings, train=replace(settings.train, **flags))
    if seed is not None:
        settings = replace(settings, seed=seed)
    if not scan_dir.exists():
        raise Failure(f"{scan_dir}: no such file or folder", code=2)
    if dry_run:
        _dry_run(scan_dir, settings)
        return

    from medsynth import distributed
    from medsynth.checkpoint import CheckpointError
    from medsynth.plan import PlanError
    from medsynth.runs import RunRefused, train_run
    from medsynth.train import TrainingStopped

    try:
        runtime = distributed.setup(settings.train.device)
    except ValueError as exc:
        raise Failure(str(exc), code=2) from None
    try:
        with (
            console.progress_reporter() as progress,
            console.TrainingDisplay(settings.train.max_steps, settings.train.log_every) as display,
        ):
            result = train_run(
                scan_dir,
                output,
                settings,
                runtime,
                force=force,
                progress=progress,
                on_step=display,
                on_message=console.info,
            )
    except RunRefused as exc:
        raise Failure(str(exc), code=2) from None
    except (PlanError, CheckpointError) as exc:
        raise Failure(str(exc)) from None
    except TrainingStopped as exc:
        if runtime.is_main:
            console.warn(str(exc))
        raise typer.Exit(exc.exit_code) from None
    finally:
        distributed.teardown(runtime)
    if runtime.is_main:
        console.info(
            f"done: step {result.step}. Checkpoint {output / 'checkpoints' / 'last.pt'}, previews in {output / 'previews'}, "
            f"metrics in {output / 'metrics.jsonl'}"
        )


@app.command(
    epilog=(
        "Examples:\n\n"
        "  medsynth sample runs/brains -n 100 -o synthetic/ --preview\n\n"
        "  medsynth sample runs/brains/checkpoints/last.pt -n 10000 -o synthetic/ --shard $SLURM_ARRAY_TASK_ID/16\n\n"
        "  medsynth sample runs/ct -n 20 -o synthetic-dicom/ --format dicom"
    )
)
def sample(
    source: Path = typer.Argument(..., help="A run folder (its checkpoints/last.pt) or a checkpoint file."),
    count: int = typer.Option(..., "-n", "--count", help="How many volumes in the whole set (all shards together)."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Folder for the volumes, their JSON sidecars and manifest.json."
    ),
    seed: int = typer.Option(0, "--seed", help="Base seed: sample i uses a seed derived from (seed, i)."),
    batch_size: int = typer.Option(
        8, "--batch-size", help="Volumes generated at a time (memory); the voxels do not depend on it."
    ),
    device: str = typer.Option("auto", "--device", help="auto (default), cpu, cuda, cuda:1 ..."),
    file_format: str = typer.Option(
        "nifti", "--format", help="nifti (.nii.gz files) or dicom (a series folder per sample)."
    ),
    shard: str | None = typer.Option(
        None, "--shard", help="i/k: make only every k-th sample, from i (cluster array jobs)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace samples already in the folder instead of skipping them."
    ),
    preview: bool = typer.Option(False, "--preview", help="Also write preview.png: mid-slices of the first samples."),
) -> None:
    """Write synthetic volumes in real units and real geometry, with a provenance sidecar each."""
    from medsynth import console
    from medsynth.checkpoint import CheckpointError
    from medsynth.distributed import resolve_device
    from medsynth.sample import SampleError, SampleRequest, Shard, run_sampling

    try:
        request = SampleRequest(
            checkpoint=source,
            count=count,
            out_dir=output,
            seed=seed,
            batch_size=batch_size,
            device=resolve_device(device),
            file_format=file_format,
            shard=Shard.parse(shard),
            force=force,
            preview=preview,
        )
    except (SampleError, ValueError) as exc:
        raise Failure(str(exc), code=2) from None
    try:
        with console.progress_reporter() as progress:
            summary = run_sampling(request, progress=progress)
    except (SampleError, CheckpointError) as exc:
        raise Failure(str(exc)) from None
    message = (
        f"{summary['written']} written, {summary['skipped']} already there, in {summary['out_dir']} (manifest.json)"
    )
    if summary["preview"]:
        message += f"; preview {summary['preview']}"
    console.info(message)


@app.command(epilog="Example:\n\n  medsynth demo -o demo/")
def demo(
    output: Path = typer.Option(Path("demo"), "--output", "-o", help="Folder for phantoms, the run and the samples."),
    steps: int = typer.Option(
        1500, "--steps", help="Training steps (about 3 minutes on 2 CPU cores at the default size)."
    ),
    size: int = typer.Option(32, "--size", help="Volume side in voxels: 16, 32 or 64."),
    phantoms: int = typer.Option(32, "--phantoms", help="How many head phantoms to train on."),
    samples: int = typer.Option(8, "--samples", help="Synthetic volumes to write."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option("auto", "--device", help="auto (default), cpu, cuda ..."),
    force: bool = typer.Option(False, "--force", help="Start the demo's training over instead of resuming it."),
) -> None:
    """Run the whole pipeline on built-in head phantoms: train briefly, sample, write previews."""
    from medsynth import console, distributed
    from medsynth.demo import demo_config, run_demo
    from medsynth.runs import RunRefused
    from medsynth.train import TrainingStopped

    settings = demo_config(steps, size, [f"train.batch_size={min(8, phantoms)}", *set_, f"train.device={device}"])
    runtime = distributed.setup(settings.train.device)
    try:
        with (
            console.progress_reporter() as progress,
            console.TrainingDisplay(settings.train.max_steps, settings.train.log_every) as display,
        ):
            result = run_demo(
                output,
                settings,
                runtime,
                phantoms=phantoms,
                samples=samples,
                force=force,
                progress=progress,
                on_step=display,
                on_message=console.info,
            )
    except RunRefused as exc:
        raise Failure(str(exc), code=2) from None
    except TrainingStopped as exc:
        console.warn(str(exc))
        raise typer.Exit(exc.exit_code) from None
    rows = [
        ["training data (phantoms, NIfTI)", result["phantoms"]],
        ["run (checkpoints, metrics.jsonl)", result["run"]],
        ["real volumes, as the model sees them", result["real_preview"]],
        [f"generator at step {result['step']}", result["training_preview"]],
        ["synthetic volumes (NIfTI + sidecars)", result["samples"]],
        ["synthetic volumes, preview", result["sample_preview"] or "-"],
    ]
    console.out.print(console.table("Demo finished", ["what", "where"], rows))


@app.command(
    epilog=(
        "Examples:\n\n"
        "  medsynth evaluate --real held-out/ --synthetic samples/ --train train/ --checkpoint runs/brains -o report/\n\n"
        "  medsynth evaluate --real scans/ --synthetic other-tool-output/ -o report/ --json"
    )
)
def evaluate(
    real: Path = typer.Option(..., "--real", help="Real volumes, ideally held out from training."),
    synthetic: Path = typer.Option(..., "--synthetic", help="Synthetic volumes (any tool's)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for report.json and the figures."),
    train_dir: Path | None = typer.Option(
        None, "--train", help="The training volumes: enables the memorisation audit."
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Use this run's or checkpoint's plan (else one from --real)."
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed for every random choice (folds, permutations, bootstrap)."),
    json_output: bool = typer.Option(False, "--json", help="Print report.json on stdout."),
) -> None:
    """Realism (C2ST, MMD, PRDC, W1), diversity (MS-SSIM) and a memorisation audit, with intervals."""
    from medsynth import console
    from medsynth.checkpoint import CheckpointError, load_checkpoint
    from medsynth.evaluate import run_evaluation, summary_rows
    from medsynth.plan import Plan, PlanError

    settings = _load_config(config, set_)
    for path in (real, synthetic, train_dir):
        if path is not None and not path.exists():
            raise Failure(f"{path}: no such file or folder", code=2)
    try:
        plan = Plan.from_dict(load_checkpoint(checkpoint)["plan"]) if checkpoint else None
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
            )
    except (CheckpointError, PlanError) as exc:
        raise Failure(str(exc)) from None
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


def _flops(gflops: float) -> str:
    if gflops >= 1000:
        return f"{gflops / 1000:.2f} TFLOP"
    if gflops >= 1:
        return f"{gflops:.2f} GFLOP"
    return f"{gflops * 1000:.2f} MFLOP"


def _dry_run(scan_dir: Path, settings) -> None:
    from medsynth import console
    from medsynth.data import fingerprint_folder
    from medsynth.plan import PlanError, make_plan
    from medsynth.runs import describe_models

    try:
        with console.progress_reporter() as progress:
            found = fingerprint_folder(scan_dir, settings, progress=progress)
    except PlanError as exc:
        raise Failure(str(exc)) from None
    plan = make_plan(found.fingerprint, settings.plan)
    sizes = describe_models(settings, plan)
    rows = [
        ["volumes", f"{len(found.sources)} usable, {len(found.discovery.problems)} skipped"],
        ["volume shape", "×".join(map(str, sizes["volume_shape"])) + f" at {plan.spacing[0]:g} mm"],
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
    ]
    console.out.print(console.table("Dry run: nothing trained", ["", ""], rows, show_header=False))


def main() -> None:
    """Entry point: run the app and turn every expected failure into one line and an exit code.

    Usage errors are reported by Typer itself (exit 2). Anything else that escapes is a bug and
    keeps its traceback, so that it gets reported and fixed.
    """
    from medsynth.config import ConfigError
    from medsynth.errors import SourceError, WriteError

    try:
        app()
    except Failure as exc:
        _fail(str(exc), exc.code)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except (SourceError, WriteError) as exc:
        _fail(str(exc), 1)


def _fail(message: str, code: int) -> None:
    from medsynth import console

    console.error(message)
    sys.exit(code)
