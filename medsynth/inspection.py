"""`medsynth inspect`: what is in a folder, what was skipped and why, and the plan it would get."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsynth import console
from medsynth.config import Config
from medsynth.io import Skipped, Source
from medsynth.io.nifti import format_name
from medsynth.pipeline import NoUsableSources, Progress, fingerprint_folder
from medsynth.plan import format_triple, make_plan


def _kind_label(source: Source) -> str:
    if source.kind == "nifti":  # read by nibabel: NIfTI, MGH or MINC
        return format_name(source.paths[0])
    if source.kind == "itk":
        return "ITK"
    if source.kind == "dicom":
        if len(source.paths) > 1:
            return f"DICOM ({len(source.paths)} files)"
        return "DICOM (Siemens mosaic)" if source.dicom and source.dicom.mosaic else "DICOM (multi-frame)"
    return source.kind


def _items(skipped: list[Skipped]) -> list[dict[str, str]]:
    return [{"name": s.name, "reason": s.reason} for s in skipped]


def inspect_folder(
    root: str | Path, config: Config, cache_dir: Path | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """The whole report as plain data (what `--json` prints). Raises NoUsableSources, which
    carries every item's reason, if nothing is usable."""
    found = fingerprint_folder(root, config, cache_dir, progress)
    plan = make_plan(found.fingerprint, config.plan)
    by_name = {s.name: s for s in found.sources}
    sources = []
    for fp in found.fingerprint.sources:
        sources.append(
            {
                "name": fp.name,
                "kind": _kind_label(by_name[fp.name]),
                "shape": list(fp.shape),
                "spacing_mm": [round(s, 4) for s in fp.spacing],
                "orientation": fp.orientation,
                "obliquity_degrees": fp.obliquity_degrees,
                "modality": fp.modality,
                "header_modality": fp.header_modality,
                "intensity": {k: round(v, 4) for k, v in fp.percentiles.items()},
                "foreground_fraction": round(fp.foreground_fraction, 4),
                "foreground_extent_mm": [round(e, 1) for e in fp.foreground_extent_mm],
                "value_dtype": fp.value_dtype,
                "warnings": list(fp.warnings),
            }
        )
    summary = found.fingerprint.to_dict()
    summary.pop("sources")
    summary["n_sources"] = len(sources)
    summary["outliers"] = [{"name": n, "reason": r} for n, r in summary["outliers"]]
    return {
        "root": str(root),
        "sources": sources,
        "skipped": _items([s for s in found.skipped if not s.ignored]),
        "ignored": _items([s for s in found.skipped if s.ignored]),
        "fingerprint": summary,
        "plan": plan.to_dict(),
    }


def failure_report(root: str | Path, error: NoUsableSources) -> dict[str, Any]:
    """What `--json` prints when nothing is usable: every item found, each with its reason. None is
    merely "ignored" here: when nothing is usable, each is part of the answer to "why not?"."""
    return {"root": str(root), "sources": [], "skipped": _items(error.skipped), "ignored": [], "error": str(error)}


def render_failure(report: dict[str, Any]) -> None:
    """The text form of `failure_report`; the error itself is printed by the CLI, on stderr."""
    skipped = report["skipped"]
    if skipped:
        console.out.print(skipped_table(skipped, f"{len(skipped)} skipped"))
    else:
        console.out.print(f"Nothing found in {report['root']}", markup=False)


def _format_value(value: float) -> str:
    """An intensity for people: whole units from 100 up (999.98 is "1000", never "1e+03"), three
    significant digits below."""
    if abs(value) >= 99.95:
        return f"{value:.0f}"
    return f"{value:.3g}"


def skipped_table(skipped: list[dict[str, str]], title: str):
    return console.table(title, ["item", "reason"], [[s["name"], s["reason"]] for s in skipped])


def render(report: dict[str, Any]) -> None:
    out = console.out
    sources, skipped = report["sources"], report["skipped"]
    rows = []
    for s in sources:
        intensity = s["intensity"]
        modality = s["modality"].upper() + (
            f" ({s['header_modality']})"
            if s["header_modality"] and s["header_modality"].lower() != s["modality"]
            else ""
        )
        rows.append(
            [
                s["name"],
                s["kind"],
                format_triple(s["shape"], 0),
                format_triple(s["spacing_mm"]),
                s["orientation"] + (f" ~{s['obliquity_degrees']:.0f}°" if s["obliquity_degrees"] >= 1 else ""),
                modality,
                f"{_format_value(intensity['min'])} … {_format_value(intensity['max'])}",
                str(len(s["warnings"])) if s["warnings"] else "",
            ]
        )
    out.print(
        console.table(
            f"{len(sources)} volume{'s' if len(sources) != 1 else ''} in {report['root']}",
            ["source", "kind", "shape", "spacing mm", "orient.", "modality", "intensity range", "warn."],
            rows,
        )
    )
    warned = [(s["name"], w) for s in sources for w in s["warnings"]]
    if warned:
        out.print(console.table("Warnings (the volume is used)", ["source", "warning"], [[n, w] for n, w in warned]))
    if skipped:
        out.print(skipped_table(skipped, f"{len(skipped)} skipped"))
    if report["ignored"]:
        out.print("Ignored: " + "; ".join(f"{i['name']} ({i['reason']})" for i in report["ignored"]), markup=False)

    fp = report["fingerprint"]
    counts = ", ".join(f"{n} {m.upper()}" for m, n in fp["modality_counts"].items())
    orientations = ", ".join(f"{n} {o}" for o, n in sorted(fp["orientation_counts"].items(), key=lambda kv: -kv[1]))
    summary_rows = [
        ["volumes", f"{fp['n_sources']} ({counts})"],
        ["stored orientations", orientations + " (all reoriented to RAS)"],
        ["median shape", format_triple(fp["median_shape"], 0)],
        ["median spacing", format_triple(fp["median_spacing"]) + " mm"],
        ["median foreground extent", format_triple(fp["median_extent_mm"], 0) + " mm (R×A×S)"],
        ["median foreground fraction", f"{fp['median_foreground_fraction']:.0%}"],
    ]
    out.print(console.table("Fingerprint", ["", "median over the set"], summary_rows))
    if fp["outliers"]:
        out.print(
            console.table(
                f"{len(fp['outliers'])} outlier{'s' if len(fp['outliers']) != 1 else ''} (used, but look at them)",
                ["source", "why"],
                [[o["name"], o["reason"]] for o in fp["outliers"]],
            )
        )

    plan = report["plan"]
    if plan["intensity_mode"] == "fixed":
        window = f"fixed {plan['window'][0]:g} … {plan['window'][1]:g} HU → [-1, 1]"
    else:
        low, high = plan["percentiles"]
        window = (
            f"per volume: p{low:g} of all voxels … p{high:g} of foreground → [-1, 1]; "
            f"samples written at the typical {_format_value(plan['window'][0])} … {_format_value(plan['window'][1])}"
        )
    extent = [n * s for n, s in zip(plan["target_shape"], plan["spacing"])]
    plan_rows = [
        ["modality", plan["modality"].upper()],
        ["target shape", format_triple(plan["target_shape"], 0) + " (RAS)"],
        ["target spacing", format_triple(plan["spacing"]) + f" mm, a {format_triple(extent, 0)} mm field of view"],
        ["why this spacing", plan["spacing_reason"]],
        [
            "axes",
            "resampled onto world (RAS) axes" if plan["deoblique"] else "voxel axes kept (plan.deoblique = false)",
        ],
        ["intensity window", window],
        ["synthetic output dtype", plan["output_dtype"]],
    ]
    plan_rows += [["note", n] for n in plan["notes"]]
    out.print(console.table("Plan", ["", ""], plan_rows, show_header=False))
