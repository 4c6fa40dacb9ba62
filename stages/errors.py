"""The one error type a stage raises for bad data or a failed run.

``str(err)`` is the line the CLI prints after ``Error: ``: what happened, then what to do.
"""


class AcsegError(Exception):
    """A data or runtime error that a user can act on (the CLI exits 1)."""

    def __init__(self, what: str, todo: str = ""):
        self.what = what
        self.todo = todo
        super().__init__(f"{what}; {todo}" if todo else what)


class UsageError(AcsegError):
    """Wrong options or arguments (the CLI exits 2)."""
