"""Errors whose message is meant for the user as is. Importing this module costs nothing."""


class SourceError(Exception):
    """A source cannot be used. `str()` is one line for the user: the source's name and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason
