"""The acseg application: commands registered explicitly, one module each."""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated, Optional

import typer

from stages import __version__

from . import backbones, classify, conceptualize, extract, fit_acg, merge, score

app = typer.Typer(
    name="acseg",
    help="Unsupervised semantic segmentation by adaptive conceptualization (ACSeg), as Unix-style stages.\n\nEach "
    "stage reads a file and prints the path of the file it wrote, so stages chain in pipes:\n\n  acseg extract "
    "imgs/ -o feats.h5 | acseg conceptualize | acseg classify --n-classes 11 -o out/",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool):
    if value:
        sys.stdout.write(f"acseg {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
):
    """acseg: ACSeg as Unix-style stages."""


app.command("extract")(extract.command)
app.command("fit-acg")(fit_acg.command)
app.command("conceptualize")(conceptualize.command)
app.command("classify")(classify.command)
app.command("merge")(merge.command)
app.command("score")(score.command)
app.command("backbones")(backbones.command)


def teardown_can_be_skipped() -> bool:
    """Whether this process can leave without the interpreter's teardown and lose nothing. After torch is
    imported that teardown takes about 0.5 s here (2.2 s against 1.8 s for importing torch and leaving), a
    sixth of a 240-image `conceptualize`. It is skipped only when no HDF5 file is open for writing, no child
    process or other non-daemon thread runs, and no process group is up (torchrun); every file acseg writes
    is closed (or renamed into place) before its command returns."""
    if "torch" not in sys.modules:  # `score` and `--help`: nothing slow to skip
        return False
    if "h5py" in sys.modules:
        import h5py

        if any(fid.get_intent() & h5py.h5f.ACC_RDWR for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)):
            return False
    import multiprocessing
    import threading

    if multiprocessing.active_children():
        return False
    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate()):
        return False
    dist = sys.modules.get("torch.distributed")
    return not (dist is not None and dist.is_available() and dist.is_initialized())


def _leave(code: int) -> None:
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    # A closed downstream pipe (| head) ends us quietly instead of raising at exit.
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        app()
    except SystemExit as e:
        store = sys.modules.get("stages.store")  # never imported here: under a low memory limit h5py may not load
        if (
            store is not None and store.BROKEN_WRITES
        ):  # after a failed HDF5 write, libhdf5's teardown can crash: leave without it
            _leave(e.code if isinstance(e.code, int) else 1)
        if (e.code is None or isinstance(e.code, int)) and teardown_can_be_skipped():
            _leave(e.code or 0)
        raise
