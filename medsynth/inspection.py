"""`medsynth inspect`: what is in a folder, what was skipped and why, and the plan it would get."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsynth import console
from medsynth.conditions import CONTINUOUS, conditions_report
from medsynth.config import Config
from medsynth.io import Skipped, Source
from medsynth.io.labels import PairingError
from medsynth.io.nifti import format_name
from medsynth.pipeline import (
    Fingerprinted,
    NoUsableSources,
    Progress,
    fingerprint_folder,
    plan_with_conditions,
    plan_with_labels,
    unlabeled_images,
)
from medsynth.plan import format_triple, make_plan

# Beyond this many pairs, `inspect` summarises them by the label values they hold.
_PAIRS_LISTED = 12
_UNLABELED_LISTED = 20


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
    verdict = ""
    planned = found
    if found.labelled is not None:
        try:  # the images training would use, under labels.unlabeled
            planned = unlabeled_images(found, config)
        except PairingError as exc:
            verdict = f"train would refuse: {exc}"
    plan = plan_with_labels(make_plan(planned.fingerprint, config.plan), planned)
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
    report = {
        "root": str(root),
        "sources": sources,
        "skipped": _items([s for s in found.skipped if not s.ignored]),
        "ignored": _items([s for s in found.skipped if s.ignored]),
        "fingerprint": summary,
        "plan": plan.to_dict(),
    }
    if found.labelled is not None:
        report["labels"] = _label_report(found, config, verdict)
    names = [source.name for source in planned.sources]
    plan, conditions = plan_with_conditions(plan, names, config)
    if conditions is not None:
        report["conditions"] = conditions_report(conditions, names)
        report["plan"] = plan.to_dict()
    return report


def _label_report(found: Fingerprinted, config: Config, verdict: str) -> dict[str, Any]:
    """The pairing: each image's label map and its values, the images without one and why."""
    labelled = found.labelled
    assert labelled is not None
    values, names = found.label_set()
    pairs = [
        {"image": source.name, "label": label.name, "values": list(found_values or ())}
        for source, label, found_values in zip(found.sources, found.labels, found.label_values)
        if label is not None
    ]
    if not verdict and found.unlabeled:
        verdict = f"train skips the {len(found.unlabeled)} unlabeled image(s) (labels.unlabeled = skip)"
    return {
        "layout": labelled.layout,
        "label_dir": labelled.label_root,
        "notes": list(labelled.notes),
        "n_images": len(found.sources),
        "pairs": pairs,
        "unlabeled": [{"name": name, "reason": reason} for name, reason in found.unlabeled.items()],
        "label_set": {"values": list(values), "names": list(names)},
        "unlabeled_policy": "skip" if config.labels.skip_unlabeled else "refuse",
        "verdict": verdict,
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

    if "labels" in report:
        render_labels(report["labels"])
    if "conditions" in report:
        render_conditions(report["conditions"])

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
        ["why this shape", plan.get("shape_reason") or "set in the config (plan.target_shape)"],
        ["target spacing", format_triple(plan["spacing"]) + f" mm, a {format_triple(extent, 0)} mm field of view"],
        ["why this spacing", plan["spacing_reason"]],
        [
            "axes",
            "resampled onto world (RAS) axes" if plan["deoblique"] else "voxel axes kept (plan.deoblique = false)",
        ],
        ["intensity window", window],
        ["synthetic output dtype", plan["output_dtype"]],
    ]
    if plan.get("label_values") is not None:
        plan_rows.append(["label set", _label_set(plan["label_values"], plan["label_names"])])
    for column in plan.get("conditions") or ():
        plan_rows.append([f"condition {column['name']}", _condition_in_plan(column)])
    plan_rows += [["note", n] for n in plan["notes"]]
    out.print(console.table("Plan", ["", ""], plan_rows, show_header=False))


def _label_set(values: list[int], names: list[str]) -> str:
    return ", ".join(f"{v} {n}" for v, n in zip(values, names)) or "none found"


def render_labels(labels: dict[str, Any]) -> None:
    """The pairing, short for large sets: a count, the label values (per file for a few files,
    else grouped by the values they hold), then the problems one per line."""
    out = console.out
    pairs = labels["pairs"]
    out.print(
        f"Labels: {len(pairs)} of {labels['n_images']} images paired with label maps "
        f"({labels['layout']}: {labels['label_dir']})",
        markup=False,
    )
    for note in labels["notes"]:
        out.print(f"  {note}", markup=False)
    out.print(f"  label set: {_label_set(labels['label_set']['values'], labels['label_set']['names'])}", markup=False)
    if pairs and len(pairs) <= _PAIRS_LISTED:
        rows = [[p["image"], p["label"], ", ".join(map(str, p["values"]))] for p in pairs]
        out.print(console.table("Image and label map pairs", ["image", "label map", "values"], rows))
    elif pairs:
        groups: dict[tuple[int, ...], list[str]] = {}
        for p in pairs:
            groups.setdefault(tuple(p["values"]), []).append(p["image"])
        rows = [
            [
                ", ".join(map(str, values)),
                str(len(images)),
                ", ".join(images[:3]) + (", ..." if len(images) > 3 else ""),
            ]
            for values, images in sorted(groups.items(), key=lambda kv: -len(kv[1]))
        ]
        out.print(console.table("Label values found", ["values", "label maps", "e.g."], rows))
    unlabeled = labels["unlabeled"]
    if unlabeled:
        rows = [[u["name"], u["reason"]] for u in unlabeled[:_UNLABELED_LISTED]]
        if len(unlabeled) > _UNLABELED_LISTED:
            rows.append([f"and {len(unlabeled) - _UNLABELED_LISTED} more", "(all of them in --json)"])
        out.print(console.table(f"{len(unlabeled)} without a usable label map", ["image", "why"], rows))
    if labels["verdict"]:
        out.print(labels["verdict"], markup=False)


def _condition_in_plan(column: dict[str, Any]) -> str:
    if column["kind"] == CONTINUOUS:
        return (
            f"continuous, standardised with mean {_format_value(column['mean'])} and sd {_format_value(column['std'])}; "
            f"sample accepts {_format_value(column['minimum'])} … {_format_value(column['maximum'])}"
        )
    return "categorical: " + ", ".join(column["categories"])


def _distribution(column: dict[str, Any]) -> str:
    if column["kind"] == CONTINUOUS:
        return (
            f"mean {_format_value(column['mean'])} ± {_format_value(column['std'])}, "
            f"range {_format_value(column['minimum'])} … {_format_value(column['maximum'])}"
        )
    return ", ".join(f"{name} {count}" for name, count in column["counts"].items())


def render_conditions(conditions: dict[str, Any]) -> None:
    """Each condition column (kind, coverage, distribution), then each problem on its own line."""
    out = console.out
    source = conditions["source"]
    matched = f", rows matched by {conditions['id_column']}" if conditions["id_column"] else ""
    rows = [[c["name"], c["kind"], f"{c['present']} of {c['of']}", _distribution(c)] for c in conditions["columns"]]
    out.print(
        console.table(f"Conditions ({source}{matched})", ["column", "kind", "scans with a value", "values"], rows)
    )
    for note in conditions["notes"]:
        out.print(f"  note: {note}", markup=False)
    without, unused = conditions["scans_without_row"], conditions["rows_without_scan"]
    if without:
        out.print(
            f"  {len(without)} scan(s) have no row (they train with every condition unknown): {', '.join(without)}",
            markup=False,
        )
    if unused:
        listed = ", ".join(unused[:10]) + (f" and {len(unused) - 10} more" if len(unused) > 10 else "")
        out.print(f"  {len(unused)} row(s) match no scan: {listed}", markup=False)
    for line in conditions["unparsed"]:
        out.print(f"  {line}", markup=False)
