"""Conditions: the per-scan values (age, sex, diagnosis, any class or number) a model is trained
on and sampled at. Reading them, matching them to scans, describing them, and scaling them.

Where conditions come from:
- a table (`--conditions TABLE.csv`, or `.tsv`/`.txt` tab-separated): one row per subject, one
  column of IDs, the other columns the conditions;
- class folders (`conditions.class_folders: true`): `SCAN_DIR/<class>/...`, each scan's first
  folder below SCAN_DIR is its value of one categorical column, `class`.

The matching rule (a table). A scan's *name* is its path below the scan folder without the image
extension (`IXI012-HH-1211_T1.nii.gz` -> `IXI012-HH-1211_T1`; `sub-01/anat/sub-01_T1w.nii.gz` has
the parts `sub-01`, `anat`, `sub-01_T1w`). A row whose ID is `I` matches a scan when one part of
its name is `I`, or starts with `I` followed by `_`, `-`, `.` or a space (so `IXI012-HH-1211`
matches `IXI012-HH-1211_T1`, and `sub-1` does not match `sub-10`). Comparison ignores case. Where
several IDs match one scan, the longest wins; two rows with the same ID are an error. The ID
column is `conditions.id_column`, else the column whose values match the most scans.

Kinds: a column whose values are numbers (at least 90% of those present) is continuous; any
other is categorical. `conditions.categorical` / `conditions.continuous` override that (a 0/1
diagnosis column is classes, not a number). Empty cells and NA, N/A, NaN, null, none, ?, missing
are missing values: such a scan still trains, with that condition unknown. A value that cannot be
read as its column's kind is reported and treated as missing.

Scaling: continuous values are standardised with the training scans' mean and standard deviation,
kept in the plan with the range seen, so that `sample` takes values in the table's own units
(years, not z-scores) and refuses values outside the range the model was trained on.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.config import ConditionsConfig
from medsynth.errors import UsageError

MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?", "missing"})
CLASS_FOLDER_COLUMN = "class"
CONTINUOUS, CATEGORICAL = "continuous", "categorical"
NUMERIC_SHARE = 0.9  # a column is numeric when at least this share of its present values are numbers
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".mgz", ".mgh", ".mnc", ".dcm")
_SEPARATORS = "_-. "


class ConditionsError(UsageError):
    """The conditions table cannot be used as given; the message names the file and the reason."""


# ---------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Table:
    path: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]  # cells as written, stripped

    def column(self, name: str) -> list[str]:
        index = self.columns.index(name)
        return [row[index] for row in self.rows]


def read_table(path: str | Path) -> Table:
    """A CSV or TSV file as text cells. The delimiter is tab for .tsv/.tab files, else sniffed
    between comma, semicolon and tab from the header line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often write a BOM
    except FileNotFoundError:
        raise ConditionsError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConditionsError(f"{path}: cannot be read as a text table ({exc})") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ConditionsError(f"{path}: empty; expected a header line and one row per subject")
    if path.suffix.lower() in (".tsv", ".tab"):
        delimiter = "\t"
    else:
        header = lines[0]
        delimiter = max((",", ";", "\t"), key=header.count)
    reader = csv.reader(lines, delimiter=delimiter)
    header = [cell.strip() for cell in next(reader)]
    if len(header) < 2:
        raise ConditionsError(
            f"{path}: the header has one column ({header[0]!r}); expected an ID column and conditions"
        )
    if len(set(header)) != len(header) or "" in header:
        raise ConditionsError(f"{path}: the header has empty or repeated column names: {header}")
    rows = []
    for number, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank lines
        if len(row) != len(header):
            raise ConditionsError(f"{path}, line {number}: {len(row)} cells, the header has {len(header)}")
        rows.append(tuple(cell.strip() for cell in row))
    if not rows:
        raise ConditionsError(f"{path}: a header and no rows")
    return Table(str(path), tuple(header), tuple(rows))


def is_missing(cell: str) -> bool:
    return cell.strip().lower() in MISSING_TOKENS


def parse_number(cell: str) -> float | None:
    """The cell as a finite number, else None."""
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# Matching rows to scans


def scan_name_parts(name: str) -> tuple[str, ...]:
    """The parts of a scan's name that an ID can match: its folders and its file name without
    the image extension. DICOM series names carry details after a space ("study/ser (3 slices)"),
    which are dropped."""
    path = name.split(" (", 1)[0]
    parts = [p for p in re.split(r"[\\/]", path) if p and p != "."]
    if parts:
        last = parts[-1]
        for extension in IMAGE_EXTENSIONS:
            if last.lower().endswith(extension):
                parts[-1] = last[: -len(extension)]
                break
    return tuple(parts)


def id_matches(identifier: str, parts: tuple[str, ...]) -> bool:
    """Whether a table ID names this scan, by the rule in the module docstring."""
    wanted = identifier.strip().lower()
    if not wanted:
        return False
    for part in parts:
        part = part.lower()
        if part == wanted or (part.startswith(wanted) and part[len(wanted)] in _SEPARATORS):
            return True
    return False


def match_rows(table: Table, id_column: str, scan_names: list[str]) -> tuple[list[int | None], list[str]]:
    """For each scan, the index of its row (None: no row), and the IDs that match no scan."""
    ids = table.column(id_column)
    seen: dict[str, int] = {}
    for index, identifier in enumerate(ids):
        key = identifier.strip().lower()
        if key in seen:
            raise ConditionsError(
                f"{table.path}: ID {identifier!r} is on two rows ({seen[key] + 2} and {index + 2}); "
                "which one is the scan's is ambiguous"
            )
        if key and not is_missing(key):
            seen[key] = index
    rows: list[int | None] = []
    used: set[int] = set()
    for name in scan_names:
        parts = scan_name_parts(name)
        candidates = [i for key, i in seen.items() if id_matches(key, parts)]
        best = max(candidates, key=lambda i: len(ids[i]), default=None)
        rows.append(best)
        if best is not None:
            used.add(best)
    unmatched = [ids[i] for i in seen.values() if i not in used]
    return rows, unmatched


def guess_id_column(table: Table, scan_names: list[str]) -> str:
    """The column whose values match the most scans (ties: the leftmost)."""
    parts = [scan_name_parts(n) for n in scan_names]
    best, best_count = table.columns[0], -1
    for column in table.columns:
        values = {v.strip().lower() for v in table.column(column) if v.strip()}
        count = sum(any(id_matches(v, p) for v in values) for p in parts)
        if count > best_count:
            best, best_count = column, count
    if best_count <= 0:
        example = scan_names[0] if scan_names else "(no scans)"
        raise ConditionsError(
            f"{table.path}: no column's values match the scan names (e.g. {example}); "
            "set conditions.id_column, and see the matching rule in docs/conditioning.md"
        )
    return best


# ---------------------------------------------------------------------------------------------
# Columns: their kind and scaling (what the plan keeps)


def outward_range(low: float, high: float) -> tuple[float, float]:
    """The training values' range as the plan keeps it: rounded outward to two significant figures
    of its width (ages 20.17 to 79.41 become 20 to 80). The plan travels with every checkpoint and
    sample, and the exact youngest and oldest ages of a cohort are a patient's own values."""
    width = high - low
    scale = width if width > 0 else abs(high)
    step = 10.0 ** (math.floor(math.log10(scale)) - 1) if scale > 0 else 1.0
    return round(math.floor(low / step) * step, 10), round(math.ceil(high / step) * step, 10)


@dataclass(frozen=True)
class ConditionColumn:
    """One condition as the plan keeps it. Continuous: the training scans' mean, standard
    deviation and range, in the table's units. Categorical: the classes, sorted."""

    name: str
    kind: str  # CONTINUOUS or CATEGORICAL
    mean: float | None = None
    std: float | None = None
    minimum: float | None = None
    maximum: float | None = None
    categories: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "kind": self.kind}
        if self.kind == CONTINUOUS:
            data.update(mean=self.mean, std=self.std, minimum=self.minimum, maximum=self.maximum)
        else:
            data["categories"] = list(self.categories or ())
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConditionColumn:
        categories = data.get("categories")
        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            mean=data.get("mean"),
            std=data.get("std"),
            minimum=data.get("minimum"),
            maximum=data.get("maximum"),
            categories=tuple(categories) if categories is not None else None,
        )

    def standardise(self, value: float) -> float:
        assert self.kind == CONTINUOUS and self.mean is not None and self.std
        return (value - self.mean) / self.std

    def in_units(self, standardised: float) -> float:
        assert self.kind == CONTINUOUS and self.mean is not None and self.std
        return standardised * self.std + self.mean


@dataclass
class ScanConditions:
    """Every scan's conditions: values in the table's units (None: missing), per column."""

    columns: tuple[ConditionColumn, ...]
    values: list[dict[str, float | str | None]]  # one dict per scan, in scan order
    source: str  # the table's path, or "class folders"
    id_column: str | None = None
    rows: list[int | None] = field(default_factory=list)  # each scan's table row (None: none)
    unmatched_ids: list[str] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)  # one line each, for people
    notes: list[str] = field(default_factory=list)

    def codes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the model sees: (continuous (n, c) float32, standardised, 0 where missing;
        present (n, c) bool; classes (n, k) int64, 1 + the category's index, 0 where missing)."""
        return encode(self.columns, self.values)


def encode(
    columns: tuple[ConditionColumn, ...], values: list[dict[str, Any]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Conditions in the table's units -> the model's codes (see `ScanConditions.codes`)."""
    continuous = [c for c in columns if c.kind == CONTINUOUS]
    categorical = [c for c in columns if c.kind == CATEGORICAL]
    numbers = np.zeros((len(values), len(continuous)), dtype=np.float32)
    present = np.zeros((len(values), len(continuous)), dtype=bool)
    classes = np.zeros((len(values), len(categorical)), dtype=np.int64)
    for i, row in enumerate(values):
        for j, column in enumerate(continuous):
            value = row.get(column.name)
            if value is not None:
                numbers[i, j], present[i, j] = column.standardise(float(value)), True
        for j, column in enumerate(categorical):
            value = row.get(column.name)
            if value is not None:
                classes[i, j] = 1 + (column.categories or ()).index(str(value))
    return numbers, present, classes


def infer_kind(cells: list[str]) -> str:
    present = [c for c in cells if not is_missing(c)]
    numbers = sum(parse_number(c) is not None for c in present)
    return CONTINUOUS if present and numbers >= NUMERIC_SHARE * len(present) else CATEGORICAL


def describe_columns(
    names: list[str], cells: dict[str, list[str | None]], kinds: dict[str, str], where: list[str], source: str
) -> tuple[tuple[ConditionColumn, ...], list[dict[str, Any]], list[str]]:
    """Parse each scan's cells by its column's kind; scale continuous columns over the scans.
    `cells[name][i]` is scan i's cell (None: the scan has no row); `where[i]` names scan i."""
    columns: list[ConditionColumn] = []
    values: list[dict[str, Any]] = [{} for _ in where]
    unparsed: list[str] = []
    for name in names:
        kind = kinds[name]
        parsed: list[float | str | None] = []
        for scan, cell in zip(where, cells[name]):
            if cell is None or is_missing(cell):
                parsed.append(None)
            elif kind == CONTINUOUS:
                number = parse_number(cell)
                if number is None:
                    unparsed.append(f"{source}: {scan}: {name} = {cell!r} is not a number; treated as missing")
                parsed.append(number)
            else:
                parsed.append(cell)
        present = [v for v in parsed if v is not None]
        if not present:
            raise ConditionsError(f"{source}: column {name!r} has no value for any scan")
        if kind == CONTINUOUS:
            array = np.asarray(present, dtype=np.float64)
            std = float(array.std())
            low, high = outward_range(float(array.min()), float(array.max()))
            columns.append(
                ConditionColumn(
                    name,
                    CONTINUOUS,
                    mean=float(array.mean()),
                    std=std if std > 0 else 1.0,  # one value only: nothing to scale, keep it finite
                    minimum=low,
                    maximum=high,
                )
            )
        else:
            columns.append(ConditionColumn(name, CATEGORICAL, categories=tuple(sorted({str(v) for v in present}))))
        for i, value in enumerate(parsed):
            values[i][name] = value
    return tuple(columns), values, unparsed


def conditions_from_table(
    path: str | Path,
    scan_names: list[str],
    id_column: str | None = None,
    use: tuple[str, ...] | None = None,
    categorical: tuple[str, ...] = (),
    continuous: tuple[str, ...] = (),
) -> ScanConditions:
    """Read `path`, match its rows to the scans and describe the columns in `use` (None: all but
    the ID column). Raises ConditionsError for a table that cannot be used."""
    table = read_table(path)
    for setting, named in (("conditions.id_column", [id_column] if id_column else []),
                           ("conditions.columns", list(use or ())),
                           ("conditions.categorical", list(categorical)),
                           ("conditions.continuous", list(continuous))):  # fmt: skip
        unknown = [n for n in named if n not in table.columns]
        if unknown:
            raise ConditionsError(
                f"{table.path}: {setting} names {unknown}, not columns of the table {list(table.columns)}"
            )
    both = sorted(set(categorical) & set(continuous))
    if both:
        raise ConditionsError(f"conditions.categorical and conditions.continuous both name {both}")
    id_column = id_column or guess_id_column(table, scan_names)
    names = [c for c in (use or table.columns) if c != id_column]
    if not names:
        raise ConditionsError(f"{table.path}: no condition columns besides the ID column {id_column!r}")
    rows, unmatched = match_rows(table, id_column, scan_names)
    cells = {n: [table.rows[r][table.columns.index(n)] if r is not None else None for r in rows] for n in names}
    kinds = {}
    notes = []
    for name in names:
        if name in categorical:
            kinds[name] = CATEGORICAL
        elif name in continuous:
            kinds[name] = CONTINUOUS
        else:
            matched = [c for c in cells[name] if c is not None]
            kinds[name] = infer_kind(matched)
            distinct = {parse_number(c) for c in matched if not is_missing(c)}
            if (
                kinds[name] == CONTINUOUS
                and len(distinct) <= 5
                and all(v is not None and v.is_integer() for v in distinct)
            ):
                notes.append(
                    f"{name}: numbers with {len(distinct)} distinct values, read as continuous; "
                    f"if they are classes, set conditions.categorical=[{name}]"
                )
    columns, values, unparsed = describe_columns(names, cells, kinds, scan_names, table.path)
    return ScanConditions(columns, values, table.path, id_column, rows, unmatched, unparsed, notes)


def conditions_from_folders(scan_names: list[str]) -> ScanConditions:
    """Class folders: each scan's first folder below the scan folder is its class."""
    classes: list[str | None] = []
    loose = []
    for name in scan_names:
        parts = scan_name_parts(name)
        classes.append(parts[0] if len(parts) > 1 else None)
        if len(parts) <= 1:
            loose.append(name)
    if loose:
        raise ConditionsError(
            f"conditions.class_folders: {len(loose)} scan(s) lie directly in the scan folder, in no class folder "
            f"(e.g. {loose[0]}); put each scan under SCAN_DIR/<class>/"
        )
    found = sorted({c for c in classes if c is not None})
    if len(found) < 2:
        raise ConditionsError(
            f"conditions.class_folders: one class folder ({found[0] if found else 'none'}); a condition needs at least two classes"
        )
    column = ConditionColumn(CLASS_FOLDER_COLUMN, CATEGORICAL, categories=tuple(found))
    return ScanConditions((column,), [{CLASS_FOLDER_COLUMN: c} for c in classes], "class folders")


def scan_conditions(settings: ConditionsConfig, scan_names: list[str]) -> ScanConditions | None:
    """The conditions of these scans under `settings` (the config's `conditions` section), or None
    when no source of conditions is set."""
    if settings.table:
        return conditions_from_table(
            settings.table,
            scan_names,
            id_column=settings.id_column,
            use=settings.columns,
            categorical=settings.categorical or (),
            continuous=settings.continuous or (),
        )
    if settings.class_folders:
        return conditions_from_folders(scan_names)
    return None


def conditions_report(found: ScanConditions, scan_names: list[str]) -> dict[str, Any]:
    """What `inspect` shows: per column its kind, coverage and distribution; scans with no row,
    rows with no scan, values that could not be read."""
    columns = []
    for column in found.columns:
        present = [row[column.name] for row in found.values if row.get(column.name) is not None]
        entry: dict[str, Any] = {**column.to_dict(), "present": len(present), "of": len(found.values)}
        if column.kind == CATEGORICAL:
            entry["counts"] = {c: sum(v == c for v in present) for c in column.categories or ()}
        columns.append(entry)
    no_row = [n for n, r in zip(scan_names, found.rows) if r is None] if found.rows else []
    return {
        "source": found.source,
        "id_column": found.id_column,
        "columns": columns,
        "scans_without_row": no_row,
        "rows_without_scan": list(found.unmatched_ids),
        "unparsed": list(found.unparsed),
        "notes": list(found.notes),
    }


# ---------------------------------------------------------------------------------------------
# What the model sees


@dataclass(frozen=True)
class ConditionSpec:
    """The shape of a model's condition codes: `continuous` numbers, then one class index per
    categorical column, each with `categories[j]` classes (index 0 is "unknown").

    A code row is [value_1 .. value_c, present_1 .. present_c, class_1 .. class_k] (float32):
    standardised values (0 where missing), 1/0 presence flags, class indices as whole numbers."""

    continuous: int
    categories: tuple[int, ...]

    @property
    def width(self) -> int:
        return 2 * self.continuous + len(self.categories)

    @classmethod
    def of(cls, columns: tuple[dict[str, Any], ...] | None) -> ConditionSpec | None:
        """The spec of a plan's `conditions` (None: an unconditional model)."""
        if not columns:
            return None
        return cls(
            continuous=sum(c["kind"] == CONTINUOUS for c in columns),
            categories=tuple(len(c["categories"]) for c in columns if c["kind"] == CATEGORICAL),
        )


def condition_codes(columns: tuple[ConditionColumn, ...], values: list[dict[str, Any]]) -> np.ndarray:
    """Conditions in the table's units -> code rows (n, width) float32, as `ConditionSpec` lays them out."""
    numbers, present, classes = encode(columns, values)
    return np.concatenate([numbers * present, present, classes], axis=1).astype(np.float32)


def plan_columns(plan_conditions: tuple[dict[str, Any], ...]) -> tuple[ConditionColumn, ...]:
    return tuple(ConditionColumn.from_dict(c) for c in plan_conditions)


def check_against_plan(found: ScanConditions, plan_conditions: tuple[dict[str, Any], ...]) -> None:
    """A resumed run (or `--plan`) keeps its plan's conditions and scaling: the table must give the
    same columns with the same kinds, and no class the plan does not know."""
    planned = {c.name: c for c in plan_columns(plan_conditions)}
    given = {c.name: c for c in found.columns}
    if list(planned) != list(given) or any(planned[n].kind != given[n].kind for n in planned):
        raise ConditionsError(
            f"{found.source}: conditions {[(c.name, c.kind) for c in found.columns]} differ from the plan's "
            f"{[(c.name, c.kind) for c in planned.values()]}; use the table the run was started with"
        )
    for name, column in given.items():
        if column.kind == CATEGORICAL:
            new = sorted(set(column.categories or ()) - set(planned[name].categories or ()))
            if new:
                raise ConditionsError(f"{found.source}: {name} has class(es) {new} the plan does not know")


# ---------------------------------------------------------------------------------------------
# Asking for conditions at sampling time


@dataclass(frozen=True)
class SampleConditions:
    """What each output file is made at: file j uses latent `latent_index[j]` (the noise of
    (seed, latent_index[j])) and the conditions `values[j]`, in the table's units."""

    values: list[dict[str, float | str]]
    latent_index: list[int]
    warnings: list[str] = field(default_factory=list)

    def codes(self, plan_conditions: tuple[dict[str, Any], ...]) -> np.ndarray:
        return condition_codes(plan_columns(plan_conditions), self.values)  # type: ignore[arg-type]


def _describe(column: ConditionColumn) -> str:
    if column.kind == CONTINUOUS:
        return f"{column.name} (a number, trained on {column.minimum:g} to {column.maximum:g})"
    return f"{column.name} ({', '.join(column.categories or ())})"


def _column_named(name: str, columns: dict[str, ConditionColumn]) -> ConditionColumn:
    if name in columns:
        return columns[name]
    folded = [c for n, c in columns.items() if n.lower() == name.lower()]
    if len(folded) == 1:
        return folded[0]
    import difflib

    close = difflib.get_close_matches(name, list(columns), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConditionsError(
        f"--condition {name}: the model has no condition {name!r}{hint}; it takes "
        + "; ".join(_describe(c) for c in columns.values())
    )


def _value(
    column: ConditionColumn, text: str, where: str, allow_extrapolation: bool, warnings: list[str]
) -> float | str:
    """One value in the table's units, checked against what the model was trained on."""
    if column.kind == CATEGORICAL:
        categories = column.categories or ()
        if text in categories:
            return text
        folded = [c for c in categories if c.lower() == text.strip().lower()]
        if len(folded) == 1:
            return folded[0]
        raise ConditionsError(
            f"{where}: {column.name} = {text!r} is not a class the model knows ({', '.join(categories)})"
        )
    number = parse_number(text)
    if number is None:
        raise ConditionsError(f"{where}: {column.name} = {text!r} is not a number")
    assert column.minimum is not None and column.maximum is not None
    if not column.minimum <= number <= column.maximum:
        message = (
            f"{where}: {column.name} = {number:g} is outside the range the model was trained on "
            f"({column.minimum:g} to {column.maximum:g})"
        )
        if not allow_extrapolation:
            raise ConditionsError(message + "; give a value inside it, or --allow-extrapolation to make it anyway")
        warnings.append(message + ": made anyway (--allow-extrapolation); a GAN's output there is a guess")
    return number


def _sweep(column: ConditionColumn, text: str, allow_extrapolation: bool, warnings: list[str]) -> list[float]:
    """START:STOP:COUNT, COUNT evenly spaced values from START to STOP inclusive."""
    parts = text.split(":")
    where = f"--condition {column.name}={text}"
    if column.kind != CONTINUOUS:
        raise ConditionsError(
            f"{where}: a sweep (START:STOP:COUNT) needs a continuous condition; {column.name} is categorical"
        )
    if len(parts) != 3 or parse_number(parts[0]) is None or parse_number(parts[1]) is None or not parts[2].isdigit():
        raise ConditionsError(f"{where}: a sweep is START:STOP:COUNT, e.g. {column.name}=20:80:4")
    count = int(parts[2])
    if count < 2:
        raise ConditionsError(f"{where}: a sweep needs a COUNT of at least 2")
    start, stop = float(parts[0]), float(parts[1])
    values = [float(v) for v in np.linspace(start, stop, count)]
    for value in (start, stop):
        _value(column, f"{value!r}", where, allow_extrapolation, warnings)
    return values


def sample_conditions(
    plan_conditions: tuple[dict[str, Any], ...] | None,
    given: list[str] | tuple[str, ...],
    table: str | Path | None,
    count: int | None,
    allow_extrapolation: bool = False,
) -> SampleConditions | None:
    """The conditions of each file of a `sample` request, or None for an unconditional model
    (with no condition asked for). Every condition the model takes must be given, by
    `--condition NAME=VALUE` (the same for every file), `--condition NAME=START:STOP:COUNT` (a
    sweep: each of the `count` latents at every value, so the same "person" at each) or a
    `--conditions-table` (one file per row)."""
    if not plan_conditions:
        if given or table:
            raise ConditionsError(
                "this model was trained without conditions: --condition and --conditions-table do not apply"
            )
        if count is None:
            raise ConditionsError("give -n, the number of volumes")
        return None
    columns = {c.name: c for c in plan_columns(plan_conditions)}
    warnings: list[str] = []
    fixed: dict[str, float | str] = {}
    sweep: tuple[str, list[float]] | None = None
    for entry in given:
        name, sep, text = entry.partition("=")
        if not sep or not name.strip():
            raise ConditionsError(f"--condition {entry!r}: expected NAME=VALUE, e.g. Age=72 or Sex=F")
        column = _column_named(name.strip(), columns)
        if column.name in fixed or (sweep and sweep[0] == column.name):
            raise ConditionsError(f"--condition {column.name} is given twice")
        if ":" in text:
            if sweep is not None:
                raise ConditionsError(
                    f"--condition {column.name}={text}: one sweep at a time ({sweep[0]} is swept already)"
                )
            sweep = (column.name, _sweep(column, text, allow_extrapolation, warnings))
        else:
            fixed[column.name] = _value(
                column, text.strip(), f"--condition {column.name}", allow_extrapolation, warnings
            )
    if table is not None:
        if sweep is not None:
            raise ConditionsError("--conditions-table gives one file per row; a sweep goes without it")
        rows = _table_rows(table, columns, fixed, allow_extrapolation, warnings)
        if count is not None and count != len(rows):
            raise ConditionsError(f"{table}: {len(rows)} rows, but -n {count}; leave out -n to make one volume per row")
        return SampleConditions(rows, list(range(len(rows))), warnings)
    missing = [c for n, c in columns.items() if n not in fixed and not (sweep and sweep[0] == n)]
    if missing:
        raise ConditionsError(
            "this model is conditional: give "
            + "; ".join(f"--condition {_describe(c)}" for c in missing)
            + ", or --conditions-table with one row per volume"
        )
    if count is None:
        raise ConditionsError("give -n, the number of volumes (latent vectors, with a sweep)")
    if sweep is None:
        return SampleConditions([dict(fixed) for _ in range(count)], list(range(count)), warnings)
    name, values = sweep
    files = [{**fixed, name: value} for _ in range(count) for value in values]
    return SampleConditions(files, [i for i in range(count) for _ in values], warnings)


def _table_rows(
    path: str | Path,
    columns: dict[str, ConditionColumn],
    fixed: dict[str, float | str],
    allow_extrapolation: bool,
    warnings: list[str],
) -> list[dict[str, float | str]]:
    table = read_table(path)
    named = {}
    for header in table.columns:
        try:
            named[header] = _column_named(header, columns).name
        except ConditionsError:
            continue  # an ID or notes column: not a condition
    missing = [c for n, c in columns.items() if n not in named.values() and n not in fixed]
    if missing:
        raise ConditionsError(f"{path}: no column for " + "; ".join(_describe(c) for c in missing))
    rows = []
    for number, row in enumerate(table.rows, start=2):
        values: dict[str, float | str] = dict(fixed)
        for header, name in named.items():
            cell = row[table.columns.index(header)]
            if is_missing(cell):
                raise ConditionsError(f"{path}, line {number}: {name} is empty; every volume needs every condition")
            values[name] = _value(columns[name], cell, f"{path}, line {number}", allow_extrapolation, warnings)
        rows.append(values)
    return rows
