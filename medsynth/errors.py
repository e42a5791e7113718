"""Errors whose message is meant for the user as is. Importing this module costs nothing."""


class SourceError(Exception):
    """A source cannot be used. `str()` is one line for the user: the source's name and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class WriteError(Exception):
    """An output could not be written (disk full, quota, read-only or missing folder). The file
    it would have replaced is intact: writes are atomic. `str()` is one line for the user."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: cannot write ({reason}); any previous version of it is intact")
        self.path = path
        self.reason = reason
