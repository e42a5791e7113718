"""All terminal output: the only module that imports rich.

Results (tables, JSON) go to stdout; progress, warnings and errors go to stderr, so that
`medsynth inspect DIR --json > out.json` stays clean. Progress bars are drawn only on a terminal;
in logs (cluster jobs, CI) they become a plain line every few seconds.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Without a terminal rich assumes 80 columns, which folds file names in logs; use a wide page.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
out = Console(highlight=False, soft_wrap=False, width=_WIDTH)
err = Console(stderr=True, highlight=False)


def interactive() -> bool:
    return err.is_terminal


def error(message: str) -> None:
    """One line, no traceback: what went wrong and, where known, the file."""
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    err.print(message, markup=False, highlight=False, soft_wrap=True)


def table(title: str | None, columns: list[str], rows: list[list[str]], **kwargs) -> Table:
    result = Table(title=title, title_justify="left", show_lines=False, **kwargs)
    for column in columns:
        result.add_column(column, overflow="fold")
    for row in rows:
        result.add_row(*(escape(cell) for cell in row))  # file names may contain [brackets]
    return result


class _LogProgress:
    """Progress for logs: a line when a phase starts, every `interval` seconds, and at the end."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self.phase: str | None = None
        self.last = 0.0
        self.started = 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if phase != self.phase:
            self.phase, self.last, self.started = phase, now, now
            if total:
                info(f"{phase}: 0/{total}")
            return
        if done == total or now - self.last >= self.interval:
            self.last = now
            rate = done / max(now - self.started, 1e-9)
            info(f"{phase}: {done}/{total} ({rate:.1f}/s)")


@contextmanager
def progress_reporter(enabled: bool = True) -> Iterator:
    """Yield a `(phase, done, total)` callback: a rich progress bar on a terminal, log lines otherwise."""
    if not enabled:
        yield None
        return
    if not interactive():
        yield _LogProgress()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bars.add_task(phase, total=total)
        bars.update(tasks[phase], completed=done, total=total)

    with bars:
        yield update


def print_json(data) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2, allow_nan=False) + "\n")


class TrainingDisplay:
    """Training progress: a live bar with the latest losses on a terminal; without one (cluster
    logs, CI), a plain line every `log_every` steps. Guard events are always printed."""

    def __init__(self, total_steps: int, log_every: int = 10, max_minutes: float | None = None):
        self.total = total_steps
        self.max_minutes = max_minutes  # a time budget ends the run before total_steps if it comes first
        self.start: int | None = None  # the first step seen (a resumed run starts part-way)
        self.log_every = log_every
        self.started = time.monotonic()
        self._bar = None
        self._task = None

    def __enter__(self) -> TrainingDisplay:
        if interactive():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=err,
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=0, status="starting")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    @staticmethod
    def status(metrics: dict) -> str:
        parts = [f"D {metrics['loss_d']:.3f}", f"G {metrics['loss_g']:.3f}"]
        if "d_real" in metrics:
            parts.append(f"D(x) {metrics['d_real']:.2f} D(G(z)) {metrics['d_fake']:.2f}")
        if "volumes_per_s" in metrics:
            parts.append(f"{metrics['volumes_per_s']:.1f} vol/s")
        return " | ".join(parts)

    def event(self, message: str) -> None:
        """Something happened to the run (a divergence rollback): always shown, as a warning."""
        warn(message)

    def __call__(self, step: int, metrics: dict) -> None:
        if self.start is None:
            self.start, self.started = step - 1, time.monotonic()
        if self._bar is not None:
            self._bar.update(self._task, completed=step, status=self.status(metrics))
            return
        if step % self.log_every == 0 or step == self.total:
            done = step - (self.start or 0)
            elapsed = time.monotonic() - self.started
            eta = elapsed / max(done, 1) * (self.total - step)
            if self.max_minutes is not None and "trained_s" in metrics:
                eta = min(eta, max(0.0, 60 * self.max_minutes - metrics["trained_s"]))
            info(f"step {step}/{self.total} | {self.status(metrics)} | eta {_duration(eta)}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
