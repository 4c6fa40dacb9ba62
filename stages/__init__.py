"""acseg's library: every stage of the ACSeg pipeline as plain Python.

Nothing in this package imports typer or rich; the command line lives in ``acseg_cli``.
"""

__version__ = "0.1.0"

from .errors import AcsegError  # noqa: E402,F401
