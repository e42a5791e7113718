"""Errors whose message is meant for the user as is. Importing this module costs nothing.

Every error a user can cause or meet (bad input, a bad setting, a run folder that cannot be used,
a full disk, a stopped run) derives from `MedsynthError`, which carries the process exit code. The
CLI catches that one class in one place (`cli.main`) and prints `str(error)` as one line; anything
else that escapes is a bug and keeps its traceback. Exit codes: 1 failure, 2 usage error, 128+N
stopped by signal N.
"""


class MedsynthError(Exception):
    """Base of every user-facing error. `str()` is one line for the user; `exit_code` is the
    process exit status; `level` is how the CLI shows it ("error", or "warning" for a run that
    stopped on purpose)."""

    exit_code: int = 1
    level: str = "error"


class UsageError(MedsynthError):
    """The command was asked for something it cannot do as asked (exit 2): fix the command line."""

    exit_code = 2


class SourceError(MedsynthError):
    """A source cannot be used. `str()` is one line for the user: the source's name and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class WriteError(MedsynthError):
    """An output could not be written (disk full, quota, read-only or missing folder). The file
    it would have replaced is intact: writes are atomic. `str()` is one line for the user."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: cannot write ({reason}); any previous version of it is intact")
        self.path = path
        self.reason = reason


def one_line_reason(exc: BaseException, limit: int | None = 200, *, last: bool = False) -> str:
    """A third-party exception as one line for a user-facing reason: the first non-empty line of
    its text (`last=True`: the last, for libraries such as SimpleITK whose first lines locate the
    error in their own source), or its type's name when it has no text; cut to `limit` characters
    (None: the whole line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = (lines[-1] if last else lines[0]) if lines else type(exc).__name__
    return text if limit is None else text[:limit]
