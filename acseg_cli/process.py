"""Everything the command line sets for the whole process, in one place; the library (``stages``) sets none of it.

- ``setup()``, at entry: a closed downstream pipe (``| head``) ends the process quietly.
- ``filter_failed_write_reports()``, as each command starts (``options.stage``; typer sets its own
  ``sys.excepthook`` when the application is called, so not earlier): after a failed HDF5 write, h5py's handles
  complain again while being freed ("Exception ignored in ObjectID.__dealloc__", with a traceback) around
  acseg's one error line, so those reports (and only those) are dropped.
- ``bound_heap()``, by ``extract``: glibc hands large buffers back to the OS.
- ``keep_heap()``, by ``fit-acg`` (not under ``--stream``) and ``refine``: glibc keeps freed buffers for the
  next use instead.
- ``leave()``, at exit: without the interpreter's teardown, when that loses nothing (see there).
"""

from __future__ import annotations

import os
import signal
import sys


def setup() -> None:
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def _broken_writes() -> list:
    store = sys.modules.get("stages.store")  # never imported here: under a low memory limit h5py may not load
    return store.BROKEN_WRITES if store is not None else []


def filter_failed_write_reports() -> None:
    """Install (once each) the two filters; idempotent."""
    prev = sys.unraisablehook
    if not getattr(prev, "_acseg", False):

        def hook(unraisable) -> None:
            text = f"{unraisable.exc_value} {unraisable.err_msg or ''} {unraisable.object!r}"
            if isinstance(unraisable.exc_value, (RuntimeError, OSError)) and (
                "write failed" in text or "__dealloc__" in text and _broken_writes()
            ):
                import logging

                log = logging.getLogger("acseg.store")
                log.debug("ignored while freeing a failed HDF5 file: %s", unraisable.exc_value)
                return
            prev(unraisable)

        hook._acseg = True
        sys.unraisablehook = hook
    prev_except = sys.excepthook
    if not getattr(prev_except, "_acseg", False):

        def excepthook(kind, value, tb) -> None:  # Cython prints the traceback through here first
            if isinstance(value, (RuntimeError, OSError)) and "write failed" in str(value):
                return
            prev_except(kind, value, tb)

        excepthook._acseg = True
        sys.excepthook = excepthook


def bound_heap() -> None:
    """Hand large buffers back to the OS (glibc): without this, extract's heap keeps growing with the number of
    images, about 0.2 MB per image at 448 tokens (measured: 500 images 1,292 MB -> 1,042 MB with it)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: buffers above 64 KB are mmap'ed and unmapped when freed
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD: return free heap tops above 64 KB
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def keep_heap() -> None:
    """Serve every buffer from glibc's heap and keep what is freed there: a training loop frees and allocates
    the same large tensors at every step, and glibc maps buffers above 32 MB afresh each time, so each step paid
    the kernel's page faults again for every one of them (1-12 ms per MB on this project's VM; fit-acg at
    batch 16 and 768 tokens ran 0.94 -> 0.35 s per step with this; refine, which does the same per photo, fit
    and apply on the CamVid photos 19.7-21.2 -> 16.3-16.5 s, peak memory unchanged). The heap then stays at the peak.
    Not for extract, whose heap grew with the images until ``bound_heap``; conceptualize and classify together
    gained 4-10% in two runs, not adopted before their memory over large stores is measured again."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no buffer is mmap'ed, so none is unmapped when freed
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of free heap top
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def teardown_can_be_skipped() -> bool:
    """Whether this process can leave without the interpreter's teardown and lose nothing. After torch is
    imported that teardown took 0.4 s on an idle 2-core VM (2.2 s against 1.8 s for importing torch and
    leaving), a sixth of a 240-image `conceptualize`, and 1.2-2.2 s on a busy one; after numba's compiled
    loops ran (refine's PAMR, without torch), 0.5-0.7 s against 0.03 s skipped. It is skipped only when no
    HDF5 file is open for writing, no child process or other non-daemon thread runs, and no process group is
    up (torchrun); every file acseg writes is closed (or renamed into place) before its command returns."""
    if "torch" not in sys.modules and "numba" not in sys.modules:  # `score`, `--help`: nothing slow to skip
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


def leave(code) -> None:
    """Leave with exit status ``code`` through ``os._exit`` when the teardown must or may be skipped, else
    return (the caller then leaves normally). Must: after a failed HDF5 write, whose handles are kept open on
    purpose, libhdf5's teardown can crash. May: ``teardown_can_be_skipped``, for a numeric status (a message
    is left to Python to print). Logging, stdout and stderr are flushed first."""
    numeric = code is None or isinstance(code, int)
    if _broken_writes():
        status = code or 0 if numeric else 1
    elif numeric and teardown_can_be_skipped():
        status = code or 0
    else:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
