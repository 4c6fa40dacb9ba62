"""Output safety: the one layer every file and folder acseg writes goes through.

The rules (``docs/reliability.md``, "What acseg may replace"):

1. An existing output is replaced only with ``--overwrite``, and only when it is what acseg writes there: a
   regular file for a file output, a folder holding only what the stage writes for a folder output. Symbolic
   links, devices, FIFOs and sockets are refused, with ``--overwrite`` too.
2. An output is never one of the run's inputs, and an output folder never holds an input (``-o .``, a
   ``--preview`` folder of the photos): paths are compared after resolving ``..`` and links.
3. Temporaries are made with ``O_EXCL`` under unpredictable names in the destination folder (``tempfile``),
   so nothing planted can redirect them, and are renamed into place (a rename replaces a link at the
   destination, it never writes through it). A file whose name must be known in advance (a store's
   ``.NAME.partial`` for ``--resume``) is created the same way and renamed to that name; one found there is
   trusted only when it is a regular file.
4. A lock file beside each output keeps a second writer out. It is opened with ``O_NOFOLLOW``; after locking,
   a writer checks that the inode it locked is still the one at the lock's name (the holder removes the name
   *before* unlocking, so a writer that opened it earlier sees a stale inode and retries).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import AcsegError, UsageError


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a regular file"


def check_output(path: Path, overwrite: bool, *, folder: bool = False, option: str = "-o") -> None:
    """Refuse, before any work, an output that exists without ``overwrite`` or that acseg must never replace
    (rule 1), and one whose folder does not exist."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise AcsegError(f"cannot check {path} ({e.strerror})", f"choose another {option}") from None
    if mode is not None:
        kind = _kind_of(mode)
        if kind == "a symbolic link":
            raise AcsegError(f"{path} is a symbolic link", f"give the path it points to, or choose another {option}")
        if folder and kind != "a folder":
            raise AcsegError(f"{path} exists and is not a folder", f"choose another {option}")
        if not folder and kind == "a folder":
            raise AcsegError(f"{path} is a folder", f"give a file name with {option}")
        if not folder and kind != "a regular file":
            raise AcsegError(f"{path} is {kind}, which acseg never replaces", f"choose another {option}")
        if not overwrite and not (folder and not any(os.scandir(path))):
            raise AcsegError(
                f"{path} already exists" + (" and is not empty" if folder else ""),
                f"pass --overwrite to replace it or choose another {option}",
            )
    if not path.parent.is_dir():
        raise AcsegError(f"folder {path.parent} does not exist", f"create it first or choose another {option}")


def _real(p) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(p)))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_apart(
    output: Path, inputs: Iterable, *, folder: bool = False, photos: Iterable = (), option: str = "-o"
) -> None:
    """Rule 2: ``output`` is none of ``inputs`` (None entries are skipped); an output folder holds none of them,
    nor lies inside a folder given as input or a folder of ``photos`` (where its files could take a photo's
    name, or be taken for photos by the next ``extract``)."""
    out = _real(output)
    folders = sorted({os.path.dirname(_real(p)) for p in photos}) if folder else []
    for i in [*inputs, *folders]:
        if i is None:
            continue
        src = _real(i)
        if out == src:
            raise UsageError(f"{option} {output} is the input {i}", f"write the output elsewhere with {option}")
        if not folder:
            continue
        holds = _inside(src, out)
        if holds or (os.path.isdir(src) and _inside(out, src)):
            raise UsageError(
                f"{option} {output} {'holds' if holds else 'lies inside'} the input {i}",
                f"choose a folder apart from the inputs with {option}",
            )


def temp_path(dest: Path, suffix: str = ".tmp") -> Path:
    """A new empty file beside ``dest`` under an unpredictable name (rule 3); the caller renames or removes it."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    return Path(name)


def temp_folder(dest: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))


def is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def remove_quietly(path: Path) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError:
        pass


def write_atomic(dest: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a fresh temporary beside ``dest``, then rename it to ``dest``; on any failure the
    temporary is removed and ``dest`` is untouched."""
    dest = Path(dest)
    tmp = temp_path(dest)
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        remove_quietly(tmp)
        raise


@contextmanager
def atomic_open(dest: Path, mode: str = "w") -> Iterator:
    """A file object on a fresh temporary that replaces ``dest`` when the block ends without an error."""
    dest = Path(dest)
    tmp = temp_path(dest)
    try:
        with open(tmp, mode) as fh:
            yield fh
        os.replace(tmp, dest)
    except BaseException:
        remove_quietly(tmp)
        raise


def acquire_output_lock(path: Path) -> int:
    """An exclusive lock beside ``path`` (rule 4), so that a second process writing the same output stops at once."""
    lp = lock_path(Path(path))
    for _ in range(100):
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise AcsegError(f"{lp} is a symbolic link", "remove it (acseg makes that lock file itself)") from None
            if e.errno == errno.ENOENT and not lp.parent.is_dir():
                raise AcsegError(f"folder {lp.parent} does not exist", "create it first or choose another -o") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AcsegError(
                f"another acseg process is writing {path}", "wait for it to finish or choose another -o"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(lp))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed that name before unlocking: lock the file now there
    raise AcsegError(f"cannot lock {lp}", "check that no other program keeps replacing it")


def release_output_lock(path: Path, fd: int) -> None:
    """Remove the lock's name while still holding it, then unlock (see rule 4)."""
    try:
        if os.path.samestat(os.fstat(fd), os.lstat(lock_path(Path(path)))):
            os.unlink(lock_path(Path(path)))
    except OSError:
        pass
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def check_files_into(
    folder: Path,
    targets: Iterable[Path],
    overwrite: bool,
    *,
    inputs: Iterable = (),
    photos: Iterable = (),
    option: str = "--preview",
) -> None:
    """Before writing ``targets`` into ``folder`` (made if absent): the folder holds none of the input files
    ``inputs`` and ``photos`` and lies in no folder of ``photos`` (rule 2: a preview taking a photo's name),
    and an existing target is replaced only with ``overwrite`` and only when it is a regular file (rule 1)."""
    folder = Path(folder)
    if os.path.lexists(folder) and not (os.path.isdir(folder) and not os.path.islink(folder)):
        raise AcsegError(f"{option} {folder} exists and is not a folder", f"choose another {option}")
    inputs, photos = [i for i in inputs if i is not None], list(photos)
    check_apart(folder, inputs, folder=True, photos=photos, option=option)
    srcs = {_real(i) for i in [*inputs, *photos]}
    for t in targets:
        if _real(t) in srcs:
            raise UsageError(f"{option} would write {t}, an input", f"choose another {option}")
        try:
            mode = os.lstat(t).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            raise AcsegError(f"{t} is {_kind_of(mode)}, which acseg never replaces", f"choose another {option}")
        if not overwrite:
            raise AcsegError(
                f"{option} {folder} already holds {Path(t).name}",
                f"pass --overwrite to replace what is there, or choose another {option}",
            )


def foreign_entries(folder: Path, expected: set[str]) -> list[str]:
    """The entries of ``folder`` (relative POSIX paths) that are not in ``expected`` (relative file paths)
    nor folders leading to one: what an ``--overwrite`` of a folder output must not remove."""
    dirs = {p.as_posix() for e in expected for p in Path(e).parents}
    out = []
    for root, dnames, fnames in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for d in dnames:
            r = (rel / d).as_posix()
            if r not in dirs or os.path.islink(os.path.join(root, d)):
                out.append(r + "/")
        dnames[:] = [d for d in dnames if (rel / d).as_posix() in dirs and not os.path.islink(os.path.join(root, d))]
        for f in fnames:
            r = (rel / f).as_posix()
            if r not in expected or not is_regular(Path(root) / f):
                out.append(r)
    return sorted(out)


def replace_folder(tmp: Path, dest: Path) -> None:
    """Put the finished folder ``tmp`` at ``dest``, the previous ``dest`` (already checked) removed after."""
    old = None
    if os.path.lexists(dest):
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
