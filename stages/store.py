"""HDF5 artifacts passed between stages: schema, atomic writing, resume, validated reading.

Every artifact is one HDF5 file with root attributes (see ``README.md``, "File formats"):

``kind``, ``schema_version``, ``acseg_version``, ``created``, ``command``, ``params`` (JSON),
``backbone`` (JSON), ``parent`` (JSON), ``uid``, ``content_sha256``, ``n_images`` and ``complete``
(written last).

Per-image arrays are packed: a variable-length quantity (tokens, concepts) lives in one
``(total, ...)`` dataset per field, indexed by an ``(n_images + 1,)`` offsets dataset. Writing goes to
``.<name>.partial`` in the destination folder, flushed after every batch, renamed when complete; a lock
file keeps a second writer out.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from . import __version__
from .errors import AcsegError
from .output import (
    acquire_output_lock,
    check_output,
    is_regular,
    release_output_lock,
    remove_quietly,
    temp_path,
)

SCHEMA_VERSION = 1
BROKEN_WRITES: list[str] = []  # HDF5 files whose writes failed in this process (their handles cannot be trusted)
_ABANDONED: list = []  # their h5py handles, kept alive so that they are never closed
WRITE_ERRNOS = {errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


def is_write_error(exc: BaseException | None) -> bool:
    """Whether an exception (or one it came from) is the disk refusing a write: full, quota, size limit, I/O."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return True
        text = str(exc)
        if any(t in text for t in ("File too large", "No space left", "Disk quota", "write failed")):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


STR = h5py.string_dtype("utf-8")


def command_line() -> str:
    prog = Path(sys.argv[0]).name
    if prog in ("__main__.py", "acseg"):
        prog = "acseg"
    return " ".join([prog, *sys.argv[1:]])


@dataclass
class Group:
    """Fields packed along one axis, indexed by one offsets dataset."""

    offsets: str
    fields: dict[str, tuple[np.dtype, tuple[int, ...]]]


@dataclass
class Schema:
    kind: str
    per_image: dict[str, tuple[object, tuple[int, ...]]]
    groups: list[Group] = field(default_factory=list)


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


class StoreWriter:
    """Append-only writer of one artifact, atomic and resumable.

    Use as a context manager: on a clean exit the file is finalised and renamed; on an exception the
    partial file is kept (so ``resume=True`` can continue it) and the lock released.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        schema: Schema,
        attrs: dict,
        *,
        overwrite: bool = False,
        resume: bool = False,
        chunk_rows: int = 4096,
        extra: dict[str, np.ndarray] | None = None,
    ):
        self.path = Path(path).absolute()
        self.extra = extra or {}  # fixed datasets written at creation (e.g. a shard's plan), outside the schema
        self.schema = schema
        self.attrs = attrs
        self.overwrite = overwrite
        self.resume = resume
        self.chunk_rows = chunk_rows
        self.tmp = partial_path(self.path)
        self._f: h5py.File | None = None
        self._lock_fd: int | None = None
        self.resumed_from = 0
        self._hash = hashlib.sha256()
        self._handles: dict = {}  # dataset handles of the open file (a lookup by name costs more than the write)
        self._handles_file = None

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> "StoreWriter":
        check_output(self.path, self.overwrite)
        self._acquire_lock()
        try:
            try:
                if self.resume and is_regular(self.tmp) and self._try_resume():
                    return self
                self._create(rename_to=self.tmp)
            except (OSError, RuntimeError) as e:
                if is_write_error(e):
                    self._write_failed(e)
                raise
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                try:
                    self._finish()
                except (OSError, RuntimeError) as e:
                    if is_write_error(e):
                        self._write_failed(e)
                    raise
            elif self._f is not None:
                if is_write_error(exc):  # the disk refused a write here or in another file of this stage
                    self._abandon()
                else:
                    try:
                        self._f.close()
                    except Exception:
                        pass
                    self._f = None
        finally:
            self._release_lock()

    def _acquire_lock(self) -> None:
        self._lock_fd = acquire_output_lock(self.path)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            release_output_lock(self.path, self._lock_fd)
            self._lock_fd = None

    def _create(self, rename_to: Path | None = None) -> Path:
        """A new file under an unpredictable name (nothing planted can be opened or written through), renamed
        while open to ``rename_to`` (None: kept under its own name, e.g. a resume's copy). Returns its path."""
        fresh = temp_path(self.tmp, ".h5")
        try:
            f = h5py.File(fresh, "w")
            if not os.path.samestat(os.fstat(f.id.get_vfd_handle()), os.lstat(fresh)):
                f.close()
                raise AcsegError(
                    f"{fresh} was replaced while acseg created it", "check who else writes into that folder"
                )
            if rename_to is not None:
                os.replace(fresh, rename_to)
        except BaseException:
            remove_quietly(fresh)
            raise
        self._f = f
        for k, v in self._root_attrs().items():
            f.attrs[k] = v
        f.attrs["complete"] = False
        f.attrs["n_done"] = 0
        for name, (dtype, shape) in self.schema.per_image.items():
            f.create_dataset(
                name,
                shape=(0, *shape),
                maxshape=(None, *shape),
                dtype=dtype,
                chunks=(max(1, min(1024, self.chunk_rows)), *shape),
            )
        for g in self.schema.groups:
            f.create_dataset(g.offsets, data=np.zeros(1, np.int64), maxshape=(None,), chunks=(1024,))
            for name, (dtype, shape) in g.fields.items():
                rows = max(
                    1,
                    self.chunk_rows
                    if not shape
                    else max(1, (1 << 20) // (np.dtype(dtype).itemsize * int(np.prod(shape)))),
                )
                f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=(rows, *shape))
        for name, data in self.extra.items():
            if data.dtype == object:
                f.create_dataset(name, data=np.array(encode_strs(data), dtype=object), dtype=STR)
            else:
                f.create_dataset(name, data=data)
        f.flush()
        return rename_to or fresh

    def _root_attrs(self) -> dict:
        a = {
            "kind": self.schema.kind,
            "schema_version": SCHEMA_VERSION,
            "acseg_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command_line(),
            "uid": uuid.uuid4().hex,
        }
        for k, v in self.attrs.items():
            a[k] = (
                v if isinstance(v, (str, int, float, bool, np.integer, np.floating)) else json.dumps(v, sort_keys=True)
            )
        return a

    def _try_resume(self) -> bool:
        """Continue a partial file if it validates and was made with the same parameters.

        The completed part (the first ``n_done`` images) is copied into a fresh file that replaces the
        partial one: a process killed in the middle of a write can leave HDF5's internal structures (e.g. the
        heap of variable-length strings) damaged in ways that only show on the next write.
        """
        try:
            old = h5py.File(self.tmp, "r")
        except Exception:
            return False
        fresh = None
        try:
            with old:
                a = old.attrs
                ok = a.get("kind") == self.schema.kind and int(a.get("schema_version", -1)) == SCHEMA_VERSION
                want = self._root_attrs()
                ok = ok and all(a.get(k) == want[k] for k in ("params", "backbone", "parent") if k in want)
                n = int(a.get("n_done", -1))
                if not ok or n < 0:
                    return False
                fresh = self._create()
                f = self._f
                for k, v in a.items():
                    f.attrs[k] = v
                for name in self.schema.per_image:
                    f[name].resize(n, axis=0)
                    f[name][:] = old[name][:n]
                for g in self.schema.groups:
                    off = old[g.offsets][: n + 1]
                    if len(off) != n + 1:
                        raise ValueError("offsets too short")
                    f[g.offsets].resize(n + 1, axis=0)
                    f[g.offsets][:] = off
                    end = int(off[-1])
                    for name in g.fields:
                        f[name].resize(end, axis=0)
                        step = 1 << 20
                        for s0 in range(0, end, step):
                            f[name][s0 : min(end, s0 + step)] = old[name][s0 : min(end, s0 + step)]
                f.flush()
            self._f.close()
            os.replace(fresh, self.tmp)
            self._f = h5py.File(self.tmp, "r+")
            self._hash = hashlib.sha256(bytes.fromhex(str(self._f.attrs.get("hash_chain", ""))))
            self.resumed_from = n
            return True
        except Exception:
            if self._f is not None:
                try:
                    self._f.close()
                except Exception:
                    pass
                self._f = None
            if fresh is not None:
                remove_quietly(fresh)
            return False

    # -- writing ---------------------------------------------------------------------------------
    @property
    def n_done(self) -> int:
        assert self._f is not None
        return int(self._f.attrs["n_done"])

    def append(
        self, per_image: dict[str, Sequence], packed: dict[str, Sequence[np.ndarray]], attrs: dict | None = None
    ) -> None:
        """Append one batch of images, set ``attrs`` and flush. ``packed`` maps field -> one array per image.

        A failed write (full disk, file-size limit, I/O error) becomes one clear error; the partial file is
        then removed, since a half-written HDF5 file cannot be trusted, and the final name is untouched.
        """
        try:
            self._append(per_image, packed, attrs)
        except (OSError, RuntimeError) as e:
            self._write_failed(e)

    def _abandon(self) -> None:
        """Give up a file the disk refused to write: its handle is kept open, never closed (closing an HDF5
        file whose metadata cannot be written can crash libhdf5; the process then leaves without library
        teardown, see acseg_cli.app), and the partial file is removed. The final name is untouched."""
        if str(self.tmp) not in BROKEN_WRITES:
            BROKEN_WRITES.append(str(self.tmp))
        if self._f is not None:
            _ABANDONED.append(self._f)
            self._f = None
        remove_quietly(self.tmp)

    def _write_failed(self, e: Exception):
        """A write the disk refused: one clear error."""
        self._abandon()
        raise AcsegError(
            f"writing {self.path.name} failed ({_write_reason(e)})",
            "check free disk space and permissions; the previous output, if any, is untouched",
        ) from None

    def _ds(self, name: str) -> h5py.Dataset:
        if self._handles_file is not self._f:
            self._handles, self._handles_file = {}, self._f
        d = self._handles.get(name)
        if d is None:
            d = self._handles[name] = self._f[name]
        return d

    def _append(self, per_image, packed, attrs) -> None:
        f = self._f
        assert f is not None
        n = self.n_done
        b = len(next(iter(per_image.values())))
        for name in self.schema.per_image:
            if b == 0:  # a batch whose images all failed to decode: nothing to add, the batch still counts
                break
            d = self._ds(name)
            d.resize(n + b, axis=0)
            d[n : n + b] = encode_strs(per_image[name]) if d.dtype == STR else per_image[name]
        for g in self.schema.groups:
            off = self._ds(g.offsets)
            start = int(off[n])
            lens = None
            for name in g.fields:
                parts = packed[name]
                these = [len(p) for p in parts]
                if lens is None:
                    lens = these
                elif lens != these:
                    raise ValueError(f"packed field {name} has lengths {these}, expected {lens}")
                d = self._ds(name)
                data = np.concatenate(parts, axis=0) if len(parts) else np.zeros((0,) + d.shape[1:], d.dtype)
                d.resize(start + len(data), axis=0)
                d[start : start + len(data)] = data
                self._hash.update(np.ascontiguousarray(data.astype(d.dtype, copy=False)).tobytes())
            ends = start + np.cumsum(np.asarray(lens, np.int64))
            off.resize(n + 1 + b, axis=0)
            off[n + 1 : n + 1 + b] = ends
        for k, v in (attrs or {}).items():
            self.set_attr(k, v)
        f.attrs["n_done"] = n + b
        # The running hash is chained through an attribute so a resumed file hashes like a fresh one.
        chain = hashlib.sha256(self._hash.digest()).hexdigest()
        self._hash = hashlib.sha256(bytes.fromhex(chain))
        f.attrs["hash_chain"] = chain
        f.flush()

    def attr(self, key: str, default=None):
        """An attribute of the file being written, as stored."""
        assert self._f is not None
        return self._f.attrs.get(key, default)

    def read(self, name: str) -> np.ndarray:
        """The rows written so far of dataset ``name``."""
        assert self._f is not None
        return self._f[name][:]

    def add_dataset(self, name: str, data: np.ndarray) -> None:
        """A fixed dataset outside the schema, written whole (e.g. classify's centroids, known only at the end)."""
        assert self._f is not None
        self._f.create_dataset(name, data=data)

    def set_attr(self, key: str, value) -> None:
        assert self._f is not None
        self._f.attrs[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value, sort_keys=True)

    def _finish(self) -> None:
        f = self._f
        assert f is not None
        f.attrs["n_images"] = self.n_done
        f.attrs["content_sha256"] = f.attrs.get("hash_chain", hashlib.sha256(b"").hexdigest())
        f.attrs["complete"] = True
        f.flush()
        f.close()
        self._f = None
        os.replace(self.tmp, self.path)


def _write_reason(e: Exception) -> str:
    """The OS's words from an HDF5 write error (``error message = 'File too large'``), else its first line."""
    import re

    text = str(e)
    m = re.search(r"error message = '([^']+)'", text)
    if m:
        return m.group(1)
    return text.splitlines()[0][:120]


class Store:
    """A validated, read-only artifact. Subclasses add kind-specific accessors."""

    kind = ""
    JSON_ATTRS = {
        "params": dict,
        "backbone": dict,
        "parent": dict,
        "features_provenance": dict,
        "shard": dict,
        "skipped": list,
    }  # the JSON attributes a store may hold, and the type each must have
    MAX_SIDE = 65535  # largest image side a store may record (a 16-bit PNG's limit)
    MAX_PIXELS = 1 << 28  # largest image a store may record (268 megapixels; Pillow refuses more than 179 by default)

    def __init__(self, path: str | os.PathLike, *, kind: str | None = None):
        self.path = Path(path).absolute()
        kind = kind or self.kind
        if not self.path.exists():
            raise AcsegError(f"{path} does not exist", "check the path")
        if self.path.is_dir():
            raise AcsegError(f"{path} is a folder, not an acseg {kind} file", "pass the .h5 file")
        try:
            self._f = h5py.File(self.path, "r")
        except Exception:
            raise AcsegError(f"{path} is not an HDF5 file", f"pass a {kind} file written by acseg") from None
        a = self._f.attrs
        got = a.get("kind")
        if got is None:
            self.close()
            raise AcsegError(f"{path} is an HDF5 file but not one of acseg's", f"pass a {kind} file written by acseg")
        if got != kind:
            self.close()
            raise AcsegError(f"{path} holds {got}, not {kind}", f"pass a {kind} file (the output of the right stage)")
        sv = int(a.get("schema_version", -1))
        if sv > SCHEMA_VERSION:
            self.close()
            raise AcsegError(
                f"{path} has schema version {sv}, newer than this acseg understands ({SCHEMA_VERSION})", "upgrade acseg"
            )
        if sv != SCHEMA_VERSION:
            self.close()
            raise AcsegError(
                f"{path} has schema version {sv}; this acseg reads {SCHEMA_VERSION}", "re-run the stage that made it"
            )
        if not bool(a.get("complete", False)):
            self.close()
            raise AcsegError(
                f"{path} is incomplete (its writer was interrupted)", "re-run the stage that made it, with --resume"
            )
        try:
            self.n_images = int(a.get("n_images", -1))
        except (TypeError, ValueError):
            self.n_images = -1
        for key, kind_ in self.JSON_ATTRS.items():
            if key in a:
                value = self.attr_json(key)
                if not isinstance(value, kind_):
                    self.close()
                    raise AcsegError(
                        f"{path}: attribute {key} is not a JSON {'object' if kind_ is dict else 'list'}",
                        "the file is damaged; re-run the stage that made it",
                    )
        self._validate()

    def _need(self, name: str, ndim: int | None = None, length: int | None = None, dtype_kind: str | None = None):
        if name not in self._f:
            raise AcsegError(
                f"{self.path} lacks dataset '{name}'", "the file is damaged; re-run the stage that made it"
            )
        d = self._f[name]
        if not isinstance(d, h5py.Dataset):
            raise AcsegError(
                f"{self.path}: '{name}' is not a dataset", "the file is damaged; re-run the stage that made it"
            )
        if ndim is not None and d.ndim != ndim:
            raise AcsegError(
                f"{self.path}: dataset '{name}' has {d.ndim} dimensions, expected {ndim}",
                "the file is damaged; re-run the stage that made it",
            )
        if length is not None and d.shape[0] != length:
            raise AcsegError(
                f"{self.path}: dataset '{name}' has {d.shape[0]} rows, expected {length}",
                "the file is damaged; re-run the stage that made it",
            )
        if dtype_kind is not None and d.dtype.kind not in dtype_kind:
            raise AcsegError(
                f"{self.path}: dataset '{name}' has dtype {d.dtype}",
                "the file is damaged; re-run the stage that made it",
            )
        return d

    def _check_offsets(self, name: str, total_of: str) -> np.ndarray:
        off = self._need(name, 1, self.n_images + 1, "iu")[:].astype(np.int64)
        total = self._need(total_of).shape[0]
        if off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != total:
            raise AcsegError(
                f"{self.path}: offsets '{name}' do not index '{total_of}'",
                "the file is damaged; re-run the stage that made it",
            )
        return off

    def _image_sizes(self) -> np.ndarray:
        """The ``image_size`` dataset, checked: every side 1..MAX_SIDE and at most MAX_PIXELS pixels, so that a
        lying size cannot make a stage allocate gigabytes for one label map."""
        sizes = self._need("image_size", 2, self.n_images, "iu")[:].astype(np.int64)
        if sizes.size and (
            sizes.shape[1] != 2
            or sizes.min() < 1
            or sizes.max() > self.MAX_SIDE
            or (sizes[:, 0] * sizes[:, 1]).max() > self.MAX_PIXELS
        ):
            raise AcsegError(
                f"{self.path}: image sizes outside 1..{self.MAX_SIDE} per side or above {self.MAX_PIXELS:,} pixels",
                "the file is damaged; re-run the stage that made it",
            )
        return sizes

    def _validate(self) -> None:
        if self.n_images < 0:
            raise AcsegError(f"{self.path} lacks n_images", "the file is damaged; re-run the stage that made it")

    def attr(self, key: str, default=None):
        """An attribute as stored (``attr_json`` decodes the JSON ones)."""
        return self._f.attrs.get(key, default)

    def has(self, name: str) -> bool:
        """Whether the file holds ``name`` (a dataset or group)."""
        return name in self._f

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of dataset ``name`` (all of them by default)."""
        return self._f[name][start:stop]

    def attr_json(self, key: str, default=None):
        v = self._f.attrs.get(key)
        if v is None:
            return default
        try:
            return json.loads(v)
        except (TypeError, ValueError):
            raise AcsegError(
                f"{self.path}: attribute {key} is not valid JSON", "the file is damaged; re-run the stage that made it"
            ) from None

    @property
    def params(self) -> dict:
        return self.attr_json("params", {})

    @property
    def backbone(self) -> dict:
        return self.attr_json("backbone", {})

    @property
    def identity(self) -> dict:
        """What a child artifact records as its parent."""
        return {
            "path": str(self.path),
            "uid": str(self._f.attrs.get("uid", "")),
            "content_sha256": str(self._f.attrs.get("content_sha256", "")),
            "kind": self.kind,
        }

    def close(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def encode_strs(values) -> list:
    """Names as stored: UTF-8, with undecodable bytes of file names (held as surrogates) kept as they were."""
    return [v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v for v in values]


def decode_names(arr: Iterable) -> list[str]:
    return [x.decode("utf-8", "surrogateescape") if isinstance(x, bytes) else str(x) for x in arr]
