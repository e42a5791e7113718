"""docs/reliability.md is written by the reliability tests themselves, never by hand.

Each test calls `record(...)` with what it ran and what happened. The table is only rewritten
when MEDSYNTH_UPDATE_RELIABILITY is set (`make test-slow` sets it), so the default suite's short
variants do not replace the full runs' counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
RECORDS = DOCS / "reliability.json"
TABLE = DOCS / "reliability.md"

HEADER = """# Reliability

Written by the tests in `tests/` when run with `make test-slow` (which sets
`MEDSYNTH_UPDATE_RELIABILITY=1`); do not edit by hand. The default suite runs shorter variants of
the same tests.

| fault class | how it is tested | cases | result |
|---|---|---|---|
"""


def record(key: str, fault_class: str, how: str, cases: int, result: str) -> None:
    if not os.environ.get("MEDSYNTH_UPDATE_RELIABILITY"):
        return
    records = json.loads(RECORDS.read_text()) if RECORDS.exists() else {}
    records[key] = {"fault_class": fault_class, "how": how, "cases": cases, "result": result}
    RECORDS.write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
    rows = [f"| {r['fault_class']} | {r['how']} | {r['cases']} | {r['result']} |" for _, r in sorted(records.items())]
    TABLE.write_text(HEADER + "\n".join(rows) + "\n")
