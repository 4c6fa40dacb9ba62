"""The feature store: packed per-image patch tokens written by ``extract`` and read by every later stage.

Datasets: ``tokens`` (total_tokens, d) float16; ``cls_attn`` (total_tokens,) float32; ``offsets``
(n+1,) int64 into both; ``grid`` (n, 2) patch rows/cols; ``image_size`` (n, 2) original height/width;
``names`` (n,) image names (relative paths); ``sources`` (n,) absolute paths at extraction time.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import AcsegError
from .store import STR, Group, Schema, Store, decode_names


def _f32(a: np.ndarray) -> np.ndarray:
    """float16 -> float32 through torch (vectorised; numpy's cast is several times slower)."""
    return torch.from_numpy(np.ascontiguousarray(a)).float().numpy() if a.dtype == np.float16 else a.astype(np.float32)


def scratch(reuse: dict, key, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (shape) tensor from memory kept in ``reuse`` under ``key``, grown when too small."""
    n = int(np.prod(shape))
    buf = reuse.get(key)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = reuse[key] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


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
        n = self.n_images
        tok = self._need("tokens", 2, None, "f")
        self.dim = int(tok.shape[1])
        self._need("cls_attn", 1, tok.shape[0], "f")
        self.offsets = self._check_offsets("offsets", "tokens")
        self.grid = self._need("grid", 2, n, "iu")[:].astype(np.int64)
        self.image_size = self._need("image_size", 2, n, "iu")[:].astype(np.int64)
        self.names = decode_names(self._need("names", 1, n)[:])
        self.sources = decode_names(self._need("sources", 1, n)[:])
        if self.grid.shape[1:] != (2,) or np.any(self.grid <= 0) or np.any(self.grid.prod(1) != np.diff(self.offsets)):
            raise AcsegError(f"{self.path}: grid sizes do not match the token counts",
                             "the file is damaged; re-run extract")
        if n == 0:
            raise AcsegError(f"{self.path} holds no images", "extract features from at least one readable image")
        bb = self.backbone
        if bb.get("dim") not in (None, self.dim):
            raise AcsegError(f"{self.path}: backbone dim {bb.get('dim')} but tokens have {self.dim}",
                             "the file is damaged; re-run extract")

    @property
    def feature_kind(self) -> str:
        return str(self.params.get("feature", "tokens"))

    def provenance(self) -> dict:
        """What a model fitted on these features must match to be applied to other features."""
        bb = self.backbone
        return {"backbone": bb.get("preset"), "weights_sha256": bb.get("weights_sha256"), "dim": self.dim,
                "feature": self.feature_kind, "layer": self.params.get("layer", -1)}

    def _finite(self, a, what: str):
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(a)
        if not np.isfinite(float(t.sum())):  # NaN and Inf survive a sum; one cheap pass
            raise AcsegError(f"{self.path}: {what} holds NaN or Inf values", "the file is damaged; re-run extract")
        return a

    def tokens(self, i: int) -> np.ndarray:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self._finite(_f32(self.f["tokens"][a:b]), f"tokens of image {i}")

    def cls_attn(self, i: int) -> np.ndarray:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self._finite(self.f["cls_attn"][a:b].astype(np.float32), f"cls_attn of image {i}")

    def grid_tokens(self, i: int) -> np.ndarray:
        h, w = self.grid[i]
        return self.tokens(i).reshape(h, w, self.dim)

    def read_range(self, start: int, stop: int, field: str = "tokens") -> list[np.ndarray]:
        """Images start..stop-1 in one contiguous read."""
        a, b = self.offsets[start], self.offsets[stop]
        block = self._finite(_f32(self.f[field][a:b]), f"{field} of images {start}..{stop - 1}")
        return [block[self.offsets[i] - a:self.offsets[i + 1] - a] for i in range(start, stop)]

    def read_batch(self, start: int, stop: int, field: str = "tokens",
                   reuse: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Images start..stop-1 of ``field`` as one (B, N, ...) float32 tensor padded with zeros, its (B, N)
        validity mask and the token counts. Images of one grid size (the usual case) come straight from one
        contiguous read, without a copy. With ``reuse`` (a dict the caller keeps across calls) the read and the
        conversion go into memory kept from the previous batch, which the result then overwrites: fresh 100 MB
        allocations cost more in page faults than the float16 -> float32 conversion itself."""
        a, b = self.offsets[start], self.offsets[stop]
        block = self._finite(self._read_f32(field, a, b, reuse), f"{field} of images {start}..{stop - 1}")
        lens = np.diff(self.offsets[start:stop + 1]).tolist()
        n = max(lens)
        if all(x == n for x in lens):
            return block.view(len(lens), n, *block.shape[1:]), torch.ones(len(lens), n, dtype=torch.bool), lens
        x = block.new_zeros(len(lens), n, *block.shape[1:])
        mask = torch.zeros(len(lens), n, dtype=torch.bool)
        for i, (o, m) in enumerate(zip(self.offsets[start:stop] - a, lens)):
            x[i, :m] = block[o:o + m]
            mask[i, :m] = True
        return x, mask, lens

    def _read_f32(self, field: str, a: int, b: int, reuse: dict | None) -> torch.Tensor:
        ds = self.f[field]
        if reuse is None:
            return torch.from_numpy(_f32(ds[a:b]))
        shape = (b - a, *ds.shape[1:])
        raw = scratch(reuse, (field, "raw"), shape, torch.float16 if ds.dtype == np.float16 else torch.float32)
        ds.read_direct(raw.numpy(), np.s_[a:b])
        if raw.dtype == torch.float32:
            return raw
        return scratch(reuse, (field, "f32"), shape, torch.float32).copy_(raw)

    def read_many(self, indices, field: str = "tokens") -> list[np.ndarray]:
        """Arbitrary images, read in sorted order (one read each), returned in the given order."""
        out = {}
        for i in sorted(set(int(i) for i in indices)):
            a, b = self.offsets[i], self.offsets[i + 1]
            out[i] = self._finite(_f32(self.f[field][a:b]), f"{field} of image {i}")
        return [out[int(i)] for i in indices]

    def iter_chunks(self, images_per_chunk: int = 64):
        """Yield (start, stop, tokens list, cls_attn list) over all images, in store order."""
        for s in range(0, self.n_images, images_per_chunk):
            e = min(self.n_images, s + images_per_chunk)
            yield s, e, self.read_range(s, e, "tokens"), self.read_range(s, e, "cls_attn")


def open_features(path) -> FeatureStore:
    return FeatureStore(path)
