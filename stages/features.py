"""The feature store: packed per-image patch tokens written by ``extract`` and read by every later stage.

Datasets: ``tokens`` (total_tokens, d) float16; ``cls_attn`` (total_tokens,) float32; ``offsets``
(n+1,) int64 into both; ``grid`` (n, 2) patch rows/cols; ``image_size`` (n, 2) original height/width;
``names`` (n,) image names (relative paths); ``sources`` (n,) absolute paths at extraction time.
"""

from __future__ import annotations

import mmap
import os
import sys
from typing import TYPE_CHECKING

import numpy as np

from .errors import AcsegError
from .store import STR, Group, Schema, Store, decode_names

if TYPE_CHECKING:
    import torch

# torch is imported where a tensor is made (the batches of the ACG's stages), not here: refine reads tokens
# without it, and importing torch costs 2 s of a command that takes a few.


def _f32(a: np.ndarray) -> np.ndarray:
    """float16 -> float32: through torch when the process has it (one CamVid photo's 1,344 x 384 tokens 0.57 ms,
    64 photos 34 ms), else numpy's cast (1.7 ms, 276 ms). A 65,536-entry lookup table took 1.7 ms and 127 ms: it
    gains only on large blocks, which the stages that have torch read. Importing torch for this would cost 2 s."""
    torch = sys.modules.get("torch")
    if a.dtype != np.float16 or torch is None:
        return a.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(a)).float().numpy()


def scratch(reuse: dict, key, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (shape) tensor from memory kept in ``reuse`` under ``key``, grown when too small."""
    import torch

    n = int(np.prod(shape))
    buf = reuse.get(key)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = reuse[key] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


class MappedRows:
    """Rows of a 2-D HDF5 dataset read straight from the file's pages (``mmap``), without the HDF5 library.

    Only for the layout acseg's writer makes: uncompressed, unfiltered, little-endian floats, chunks of whole
    rows (or one contiguous block), every chunk allocated and inside the file. ``MappedRows.of`` returns None
    for anything else, and the caller reads through h5py, which copies through its own buffers and takes
    about twice as long. The mapping is
    private (copy-on-write): nothing reaches the file through it. Stores are replaced by renaming, never
    rewritten in place, so a mapped file does not shrink under its reader.

    Pages read through a map count in the process's resident memory until they are unmapped, so a reader
    that went through a whole 1.4 GB store held 1.4 GB more of it at the end. Every ``RELEASE_BYTES`` read,
    the pages are dropped from the process (``madvise(MADV_DONTNEED)``); they stay in the page cache. Nothing
    is written through the map, so a view still in use reads the same bytes again (mapped anew)."""

    RELEASE_BYTES = 64 << 20

    def __init__(self, path, starts: np.ndarray, rows: int, dtype: np.dtype, row_shape: tuple, n: int):
        self.starts, self.rows, self.dtype, self.row_shape, self.n = starts, rows, dtype, row_shape, n
        self.chunk_bytes = rows * int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        with open(path, "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        self.mm = np.frombuffer(self._map, dtype=np.uint8)
        self._since_release = 0

    def _count(self, nbytes: int) -> None:
        self._since_release += nbytes
        if self._since_release >= self.RELEASE_BYTES:
            self.release()

    def release(self) -> None:
        """Drop every page read so far from this process's memory (they stay cached by the system)."""
        self._since_release = 0
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    @classmethod
    def of(cls, f, ds) -> "MappedRows | None":
        try:
            n, dt = int(ds.shape[0]), np.dtype(ds.dtype)
            if (
                n == 0
                or ds.ndim < 1
                or f.driver != "sec2"
                or f.userblock_size
                or dt.kind != "f"
                or dt.byteorder == ">"
                or ds.id.get_create_plist().get_nfilters()
            ):
                return None
            row_shape = tuple(ds.shape[1:])
            row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dt.itemsize
            if ds.chunks is None:  # one contiguous block
                off = ds.id.get_offset()
                if off is None:
                    return None
                rows, starts = n, np.array([off], np.int64)
            else:
                if tuple(ds.chunks[1:]) != row_shape:
                    return None
                rows = int(ds.chunks[0])
                starts = np.full(-(-n // rows), -1, np.int64)

                def seen(info):
                    i = info.chunk_offset[0] // rows
                    if info.filter_mask == 0 and i < len(starts) and info.size == rows * row_bytes:
                        starts[i] = info.byte_offset

                ds.id.chunk_iter(seen)
                if (starts < 0).any():
                    return None
            if int(starts.max()) + rows * row_bytes > os.path.getsize(f.filename):
                return None  # a chunk past the end: damaged; h5py will say so
            return cls(f.filename, starts, rows, dt, row_shape, n)
        except Exception:  # anything unexpected: read through h5py, which reports damage properly
            return None

    def _chunk(self, c: int) -> np.ndarray:
        o = int(self.starts[c])
        return self.mm[o : o + self.chunk_bytes].view(self.dtype).reshape(self.rows, *self.row_shape)

    def pieces(self, a: int, b: int):
        """(row offset into the result, view) pairs covering rows a..b-1, chunk by chunk."""
        for c in range(a // self.rows, (b - 1) // self.rows + 1):
            lo, hi = max(a, c * self.rows), min(b, (c + 1) * self.rows)
            piece = self._chunk(c)[lo - c * self.rows : hi - c * self.rows]
            yield lo - a, piece
            self._count(piece.nbytes)  # after the caller has used it

    def read(self, a: int, b: int) -> np.ndarray:
        """Rows a..b-1: a view when they lie in one chunk, else one copy."""
        parts = [p for _, p in self.pieces(a, b)]
        if not parts:
            return np.empty((0, *self.row_shape), self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def features_schema(dim: int) -> Schema:
    return Schema(
        kind="features",
        per_image={"grid": (np.int32, (2,)), "image_size": (np.int32, (2,)), "names": (STR, ()), "sources": (STR, ())},
        groups=[Group("offsets", {"tokens": (np.float16, (dim,)), "cls_attn": (np.float32, ())})],
    )


class FeatureStore(Store):
    """A validated feature store. Small per-image tables are read at open; tokens on demand."""

    kind = "features"

    def _validate(self) -> None:
        super()._validate()
        self._maps: dict[str, MappedRows | None] = {}  # made on first read of each field
        n = self.n_images
        tok = self._need("tokens", 2, None, "f")
        self.dim = int(tok.shape[1])
        self._need("cls_attn", 1, tok.shape[0], "f")
        self.offsets = self._check_offsets("offsets", "tokens")
        self.grid = self._need("grid", 2, n, "iu")[:].astype(np.int64)
        self.image_size = self._image_sizes()
        self.names = decode_names(self._need("names", 1, n)[:])
        self.sources = decode_names(self._need("sources", 1, n)[:])
        if self.grid.shape[1:] != (2,) or np.any(self.grid <= 0) or np.any(self.grid.prod(1) != np.diff(self.offsets)):
            raise AcsegError(
                f"{self.path}: grid sizes do not match the token counts", "the file is damaged; re-run extract"
            )
        if n == 0:
            raise AcsegError(f"{self.path} holds no images", "extract features from at least one readable image")
        bb = self.backbone
        if bb.get("dim") not in (None, self.dim):
            raise AcsegError(
                f"{self.path}: backbone dim {bb.get('dim')} but tokens have {self.dim}",
                "the file is damaged; re-run extract",
            )

    @property
    def feature_kind(self) -> str:
        return str(self.params.get("feature", "tokens"))

    def provenance(self) -> dict:
        """What a model fitted on these features must match to be applied to other features."""
        bb = self.backbone
        return {
            "backbone": bb.get("preset"),
            "weights_sha256": bb.get("weights_sha256"),
            "dim": self.dim,
            "feature": self.feature_kind,
            "layer": self.params.get("layer", -1),
        }

    def _finite(self, a, what: str):
        # NaN and Inf survive a sum; one cheap pass (float16 summed in float32, where large sums fit), through
        # torch when the process has it (threaded; numpy casts float16 element by element), else numpy
        torch = sys.modules.get("torch")
        if torch is None:
            total = a.sum(dtype=np.float32) if a.dtype == np.float16 else a.sum()
        else:
            t = a if isinstance(a, torch.Tensor) else torch.from_numpy(a)
            total = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
        if not np.isfinite(float(total)):
            raise AcsegError(f"{self.path}: {what} holds NaN or Inf values", "the file is damaged; re-run extract")
        return a

    def _map(self, field: str) -> MappedRows | None:
        if field not in self._maps:
            self._maps[field] = MappedRows.of(self._f, self._f[field])
        return self._maps[field]

    def _rows(self, field: str, a: int, b: int) -> np.ndarray:
        """Rows a..b-1 of ``field`` as stored (mapped from the file when its layout allows; may be a view)."""
        m = self._map(field)
        return m.read(int(a), int(b)) if m is not None else self._f[field][a:b]

    def tokens(self, i: int) -> np.ndarray:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self._finite(_f32(self._rows("tokens", a, b)), f"tokens of image {i}")

    def cls_attn(self, i: int) -> np.ndarray:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self._finite(self._rows("cls_attn", a, b).astype(np.float32), f"cls_attn of image {i}")

    def grid_tokens(self, i: int) -> np.ndarray:
        h, w = self.grid[i]
        return self.tokens(i).reshape(h, w, self.dim)

    def read_range(self, start: int, stop: int, field: str = "tokens") -> list[np.ndarray]:
        """Images start..stop-1 in one contiguous read."""
        a = self.offsets[start]
        block = self.stored_rows(start, stop, field, np.float32)
        return [block[self.offsets[i] - a : self.offsets[i + 1] - a] for i in range(start, stop)]

    def check_finite(self, start: int, stop: int, field: str = "tokens") -> None:
        """Raise if images start..stop-1 of ``field`` hold NaN or Inf (for callers that read with check=False)."""
        self.stored_rows(start, stop, field)

    def stored_rows(self, start: int, stop: int, field: str = "tokens", dtype=None) -> np.ndarray:
        """Images start..stop-1 of ``field`` as their rows one after another, unpadded, in the stored dtype or
        converted to ``dtype``. Without a conversion it may be a view of the file's pages: read it, do not
        write to it. NaN or Inf, in the file or made by the conversion, raise."""
        a, b = self.offsets[start], self.offsets[stop]
        rows = self._rows(field, a, b)
        if dtype is not None:
            rows = _f32(rows) if np.dtype(dtype) == np.float32 else np.ascontiguousarray(rows, dtype)
        return self._finite(rows, f"{field} of images {start}..{stop - 1}")

    def read_batch(
        self,
        start: int,
        stop: int,
        field: str = "tokens",
        reuse: dict | None = None,
        check: bool = True,
        as_stored: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Images start..stop-1 of ``field`` as one (B, N, ...) float32 tensor padded with zeros, its (B, N)
        validity mask and the token counts. Images of one grid size (the usual case) come straight from one
        contiguous read, without a copy. With ``reuse`` (a dict the caller keeps across calls) the read and the
        conversion go into memory kept from the previous batch, which the result then overwrites: fresh 100 MB
        allocations cost more in page faults than the float16 -> float32 conversion itself. ``check=False``
        skips the pass that looks for NaN and Inf: the caller must find them itself (``check_finite``).
        ``as_stored``: float16 rows stay float16 (half the bytes to move to a GPU, converted there)."""
        import torch

        a, b = self.offsets[start], self.offsets[stop]
        block = self._read_block(field, a, b, reuse, as_stored)
        if check:
            self._finite(block, f"{field} of images {start}..{stop - 1}")
        lens = np.diff(self.offsets[start : stop + 1]).tolist()
        n = max(lens)
        if all(x == n for x in lens):
            return block.view(len(lens), n, *block.shape[1:]), torch.ones(len(lens), n, dtype=torch.bool), lens
        x = block.new_zeros(len(lens), n, *block.shape[1:])
        mask = torch.zeros(len(lens), n, dtype=torch.bool)
        for i, (o, m) in enumerate(zip(self.offsets[start:stop] - a, lens)):
            x[i, :m] = block[o : o + m]
            mask[i, :m] = True
        return x, mask, lens

    def _read_block(self, field: str, a: int, b: int, reuse: dict | None, as_stored: bool = False) -> torch.Tensor:
        """Rows a..b-1 as a float32 tensor of our own (float16 when ``as_stored`` and so stored)."""
        import torch

        ds = self._f[field]
        half = as_stored and ds.dtype == np.float16
        if reuse is None:
            rows = self._rows(field, a, b)
            return torch.from_numpy(np.array(rows, np.float16) if half else _f32(rows))
        shape = (b - a, *ds.shape[1:])
        m = self._map(field)
        if m is not None:  # converted chunk by chunk straight from the file's pages into the kept batch
            out = scratch(reuse, (field, "f16" if half else "f32"), shape, torch.float16 if half else torch.float32)
            for o, piece in m.pieces(int(a), int(b)):
                out[o : o + len(piece)].copy_(torch.from_numpy(piece))
            return out
        raw = scratch(reuse, (field, "raw"), shape, torch.float16 if ds.dtype == np.float16 else torch.float32)
        ds.read_direct(raw.numpy(), np.s_[a:b])
        if raw.dtype == torch.float32 or half:
            return raw
        return scratch(reuse, (field, "f32"), shape, torch.float32).copy_(raw)

    def read_many(self, indices, field: str = "tokens") -> list[np.ndarray]:
        """Arbitrary images, read in sorted order (one read each), returned in the given order."""
        out = {}
        for i in sorted(set(int(i) for i in indices)):
            a, b = self.offsets[i], self.offsets[i + 1]
            out[i] = self._finite(_f32(self._rows(field, a, b)), f"{field} of image {i}")
        return [out[int(i)] for i in indices]
