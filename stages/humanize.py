"""Numbers for people, shared by the library's log lines and the CLI's progress (no torch import)."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """``seconds`` for people: '42 s', '3.5 min', '1.2 h'."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
