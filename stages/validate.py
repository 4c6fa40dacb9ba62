"""The one validation layer for option values: every stage checks its numbers and choices here, first,
so that a bad value is a usage error (the CLI exits 2) before any file is opened or made.

Each check names the option as the CLI spells it; the Python API raises the same ``UsageError``.
"""

from __future__ import annotations

import math

from .errors import UsageError


def integer(option: str, value, *, min: int | None = None, max: int | None = None, hint: str = "") -> int:
    """``value`` as an int within [min, max] (bool and non-integral floats are refused)."""
    if not isinstance(value, int) or isinstance(value, bool):
        try:
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError
            value = int(value)
        except (TypeError, ValueError, OverflowError):
            raise UsageError(
                f"{option} {value!r} is not a whole number", hint or f"pass a whole number to {option}"
            ) from None
    _within(option, value, min, max, hint)
    return value


def number(
    option: str,
    value,
    *,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    below: float | None = None,
    hint: str = "",
) -> float:
    """``value`` as a finite float within [min, max] and (above, below)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{option} {value!r} is not a number", hint or f"pass a number to {option}") from None
    if not math.isfinite(value):
        raise UsageError(f"{option} {value:g} is not a finite number", hint or f"pass a finite number to {option}")
    _within(option, value, min, max, hint)
    if above is not None and not value > above:
        raise UsageError(f"{option} {value:g} must be above {above:g}", hint or f"pass a value above {above:g}")
    if below is not None and not value < below:
        raise UsageError(f"{option} {value:g} must be below {below:g}", hint or f"pass a value below {below:g}")
    return value


def _within(option: str, value, lo, hi, hint: str) -> None:
    if lo is not None and value < lo or hi is not None and value > hi:
        rng = (
            f"{lo:g}..{hi:g}" if lo is not None and hi is not None else f">= {lo:g}" if lo is not None else f"<= {hi:g}"
        )
        raise UsageError(f"{option} {value:g} is outside {rng}", hint or f"pass a value {rng} to {option}")


def choice(option: str, value: str, choices) -> str:
    if value not in choices:
        raise UsageError(f"unknown {option} {value!r}", f"choose one of: {', '.join(choices)}")
    return value


SEED_MAX = 2**32 - 1


def seed(option: str, value) -> int:
    return integer(option, value, min=0, max=SEED_MAX)


def device(value: str | None) -> str:
    """A torch device this machine has: ``None`` -> cuda when available, else cpu. A name torch does not know,
    or a GPU the machine lacks, is a usage error."""
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(value)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown --device {value!r}", "pass cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError(
                f"--device {value}: this machine has no CUDA GPU", "pass --device cpu, or leave --device out"
            )
        if d.index is not None and d.index >= n:
            raise UsageError(f"--device {value}: this machine has {n} CUDA GPU(s)", f"pass cuda:0 .. cuda:{n - 1}")
    elif d.type not in ("cpu", "mps"):
        raise UsageError(f"--device {value}: acseg runs on cpu or cuda", "pass cpu or cuda")
    elif d.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"--device {value}: this machine has no MPS device", "pass --device cpu")
    return value
