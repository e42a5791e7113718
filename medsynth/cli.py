"""The `medsynth` command. Commands only parse arguments and call library functions.

Heavy modules (torch, nibabel, SimpleITK) are imported inside commands, so `medsynth --help`
answers at once. Exit codes: 0 ok, 1 failure, 2 usage error.
"""

from __future__ import annotations

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


def main() -> None:
    """Entry point: run the app and turn every expected failure into one line and an exit code.

    Usage errors are reported by Typer itself (exit 2). Anything else that escapes is a bug and
    keeps its traceback, so that it gets reported and fixed.
    """
    from medsynth.config import ConfigError
    from medsynth.errors import SourceError

    try:
        app()
    except Failure as exc:
        _fail(str(exc), exc.code)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except SourceError as exc:
        _fail(str(exc), 1)


def _fail(message: str, code: int) -> None:
    from medsynth import console

    console.error(message)
    sys.exit(code)
