"""Behaviour every command shares: input from stdin, the stdout path protocol, errors and exit codes,
logging and progress on stderr."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, List, Optional

import typer
from rich.console import Console

from stages.datasets import DATASETS
from stages.errors import AcsegError, UsageError
from stages.humanize import duration

err_console = Console(stderr=True, highlight=False)

# -- shared option types ------------------------------------------------------------------------
Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging on stderr (-vv: tracebacks).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object per artifact instead of its path.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its partial file.")]
# the options of the stages that write label maps (classify, refine)
MatchGt = Annotated[
    Optional[str],
    typer.Option("--match-gt", help="Ground-truth folder: write maps in its class ids (Hungarian matching)."),
]
IgnoreIndex = Annotated[
    Optional[List[int]],
    typer.Option(
        "--ignore-index",
        help="Ground-truth id(s) --match-gt ignores (as score's); without a preset the first one also marks "
        "unmatched clusters (default 255).",
    ),
]
Preview = Annotated[
    Optional[str], typer.Option("--preview", help="Write photo / prediction (/ ground truth) pictures here.")
]
CrfIterations = Annotated[int, typer.Option("--crf-iterations", help="Mean-field iterations of --crf.")]
InputArg = Annotated[
    Optional[str], typer.Argument(help="Input file; omitted or '-' reads its path from stdin.", show_default=False)
]
Device = Annotated[
    Optional[str], typer.Option("--device", help="torch device (default: cuda when available, else cpu).")
]

_state = {"verbose": 0}


def choices(name: str, values) -> type[Enum]:
    """The values of an option that is a choice, as typer wants them: ``--help`` lists them and any other value
    is a usage error (exit 2) before the command runs. The command passes ``.value`` on to the library."""
    return Enum(name, [(v, v) for v in values], type=str)


def value_of(x):
    """An option's plain value (a choice's string)."""
    return x.value if isinstance(x, Enum) else x


def _auto_or_int(value: str, minimum: int) -> int | None:
    """'auto' -> None; else an integer >= ``minimum`` (a usage error otherwise)."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither 'auto' nor a number of steps") from None
    if n < minimum:
        raise typer.BadParameter(f"{n} steps: give 'auto' or a number >= {minimum}")
    return n


def steps_option(value: str) -> int | None:
    """``--steps``/``--fit-steps``: 'auto' (None: until converged) or a positive number of steps."""
    return _auto_or_int(value, 1)


def warmup_option(value: str) -> int | None:
    """``--warmup``: 'auto' (None: 5% of the steps, at most 100) or a number of steps >= 0."""
    return _auto_or_int(value, 0)


def debug_enabled() -> bool:
    return _state["verbose"] >= 2 or os.environ.get("ACSEG_DEBUG", "") not in ("", "0")


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    _state["verbose"] = verbose
    level = (
        logging.ERROR
        if quiet
        else (logging.DEBUG if verbose >= 2 else logging.INFO if verbose >= 1 else logging.WARNING)
    )
    root = logging.getLogger("acseg")
    root.handlers.clear()
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if level > logging.INFO else "%(message)s"))
    root.addHandler(h)
    root.setLevel(level)
    root.propagate = False
    _state["quiet"] = quiet
    _state["level"] = level


def info(msg: str) -> None:
    """A line for people on stderr (hidden by -q)."""
    if not _state.get("quiet"):
        err_console.print(msg, soft_wrap=True, markup=False)


def fail(msg: str, code: int = 1):
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:  # under torchrun: every rank runs the same command
        rank = os.environ.get("RANK", "0")
        if code == 2 and rank != "0":
            raise typer.Exit(code)  # a usage error is the same on every rank: rank 0 says it
        msg = f"(rank {rank} of {world}) {msg}"
    sys.stderr.write(f"Error: {msg}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def _path_of_line(line: str) -> str:
    """A path line, or the ``path`` of a ``--json`` line."""
    try:
        obj = json.loads(line) if line.startswith("{") else None
    except ValueError:
        obj = None
    return obj["path"] if isinstance(obj, dict) and "path" in obj else line


def _stdin_paths(first_only: bool) -> list[str]:
    stdin = sys.stdin
    if stdin is None or stdin.isatty():
        fail("no input: pass FILE or pipe a path", 2)
    paths = []
    for line in stdin:
        line = line.strip()
        if line:
            paths.append(_path_of_line(line))
            if first_only:
                break
    if not paths:
        fail("no input: pass FILE or pipe a path", 2)
    return paths


def resolve_input(arg: Optional[str]) -> str:
    """The input path: the argument, or the first non-empty line of stdin when omitted or '-'."""
    if arg not in (None, "-"):
        return arg
    return _stdin_paths(first_only=True)[0]


def resolve_inputs(args: Optional[list[str]]) -> list[str]:
    """Several input paths: the arguments, with '-' (or no argument) standing for every path line on stdin."""
    args = list(args or ["-"])
    out: list[str] = []
    for a in args:
        out += _stdin_paths(first_only=False) if a == "-" else [a]
    return out


def emit(path: str, as_json: bool = False, **extra) -> None:
    """The one line a stage prints on stdout per artifact."""
    p = str(Path(path).absolute())
    line = json.dumps({"path": p, **extra}, sort_keys=True, default=str) if as_json else p
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def stage(fn: Callable) -> Callable:
    """Wrap a command: library errors -> one line and exit 1 (2 for usage), Ctrl-C -> 130, closed pipe -> quiet."""

    import inspect

    has_batch_size = "batch_size" in inspect.signature(fn).parameters  # the advice names only options it has

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .process import filter_failed_write_reports

        filter_failed_write_reports()
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except UsageError as e:
            _trace()
            fail(str(e), 2)
        except AcsegError as e:
            _trace()
            fail(str(e), 1)
        except KeyboardInterrupt:
            sys.stderr.write("Interrupted.\n")
            raise typer.Exit(130)
        except BrokenPipeError:
            _quiet_pipe()
            raise typer.Exit(0)
        except MemoryError:
            _trace()
            fail(
                "out of memory; "
                + (
                    "lower --batch-size or process fewer images at once"
                    if has_batch_size
                    else "process fewer images at once, or free memory"
                ),
                1,
            )
        except OSError as e:
            _trace()
            fail(f"{e.strerror or e} ({e.filename or 'I/O'}); check free disk space and permissions", 1)
        except Exception as e:  # a bug: say so in one line, the traceback on demand
            _trace()
            fail(f"internal error: {type(e).__name__}: {e}; re-run with -vv or ACSEG_DEBUG=1 and report it", 1)

    return wrapper


def _trace() -> None:
    if debug_enabled():
        import traceback

        traceback.print_exc(file=sys.stderr)


def _quiet_pipe() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except Exception:
        pass


class Progress:
    """A rich progress bar on a terminal; plain periodic lines otherwise; nothing with -q."""

    def __init__(self, description: str, unit: str = "images", total_is_bound: bool = False):
        """``total_is_bound``: the total is a cap the work may stop short of (fit-acg --steps auto), so the
        time left is an upper bound."""
        self.description, self.unit, self.total_is_bound = description, unit, total_is_bound
        self.enabled = not _state.get("quiet")
        self.tty = sys.stderr.isatty()
        self._bar = None
        self._task = None
        self._t0 = time.monotonic()
        self._last = self._t0
        self.extra = ""

    def __enter__(self):
        if self.enabled and self.tty:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RP

            self._bar = RP(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[extra]}"),
                console=err_console,
                redirect_stdout=False,
                redirect_stderr=False,
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=None, extra="")
        return self

    def __call__(self, done: int, total: int, extra: str = "") -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total, extra=extra)
            return
        now = time.monotonic()
        if done >= total or now - self._last >= 10.0:
            self._last = now
            rate = done / max(1e-9, now - self._t0)
            bound = "at most " if self.total_is_bound else ""
            eta = f", {bound}{duration((total - done) / rate)} left" if 0 < done < total and rate > 0 else ""
            sys.stderr.write(
                f"{self.description}: {done}/{total} {self.unit} ({rate:.1f}/s{eta}) {extra}".rstrip() + "\n"
            )
            sys.stderr.flush()

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False


# classify's and refine's --dataset (score's has its own help)
GtPreset = Annotated[
    Optional[choices("Dataset", DATASETS)],
    typer.Option(
        "--dataset",
        "-d",
        help="Preset of the ground truth for --match-gt (none: its ids are the classes, as score reads them).",
    ),
]
