"""Per-step training metrics: one JSON line per step in RUN_DIR/metrics.jsonl, and TensorBoard
scalars when the `tensorboard` package is installed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends to metrics.jsonl. On resume, lines after the resumed step are dropped first: they
    came from steps whose weights were lost with the interruption, and will be redone."""

    def __init__(self, run_dir: Path, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._handle = None
        self._tensorboard = None
        if not enabled:
            return
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:
                    continue  # a line cut short by the interruption
            self.path.write_text("".join(f"{line}\n" for line in kept))
        self._handle = open(self.path, "a", buffering=1)  # noqa: SIM115 (lives as long as the run)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is optional
            self._tensorboard = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._handle is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._handle.write(json.dumps(clean) + "\n")
        if self._tensorboard is not None:
            step = record["step"]
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
