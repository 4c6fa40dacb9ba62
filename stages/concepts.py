"""Concepts stores: the file ``conceptualize`` writes (``ConceptStore``), and several of them (the shards of
one dataset) read as one (``ConceptSet``, what ``classify`` reads)."""

from __future__ import annotations

import numpy as np

from .errors import AcsegError, UsageError
from .shards import shard_info
from .store import STR, Group, Schema, Store, decode_names


def concepts_schema(dim: int) -> Schema:
    return Schema(
        kind="concepts",
        per_image={
            "grid": (np.int32, (2,)),
            "image_size": (np.int32, (2,)),
            "names": (STR, ()),
            "sources": (STR, ()),
            "n_concepts": (np.int32, ()),
        },
        groups=[
            Group("offsets", {"concept_map": (np.uint8, ())}),
            Group(
                "concept_offsets",
                {
                    "concept_pixels": (np.int32, ()),
                    "concept_mean": (np.float32, (dim,)),
                    "concept_vector": (np.float32, (dim,)),
                    "concept_cls_attn": (np.float32, ()),
                    "concept_prototype": (np.int16, ()),
                },
            ),
        ],
    )


class ConceptStore(Store):
    """A validated concepts store; all of it but the per-token maps is small and read at open."""

    kind = "concepts"

    def _validate(self) -> None:
        super()._validate()
        n = self.n_images
        if n == 0:
            raise AcsegError(f"{self.path} holds no images", "re-run conceptualize on a non-empty feature store")
        self.offsets = self._check_offsets("offsets", "concept_map")
        self._need("concept_map", 1, None, "u")
        self.concept_offsets = self._check_offsets("concept_offsets", "concept_pixels")
        C = self.concept_offsets[-1]
        self.grid = self._need("grid", 2, n, "iu")[:].astype(np.int64)
        self.image_size = self._image_sizes()
        self.names = decode_names(self._need("names", 1, n)[:])
        self.sources = decode_names(self._need("sources", 1, n)[:])
        self.n_concepts = self._need("n_concepts", 1, n, "iu")[:].astype(np.int64)
        self.pixels = self._need("concept_pixels", 1, C, "iu")[:].astype(np.int64)
        mean = self._need("concept_mean", 2, C, "f")
        self.dim = int(mean.shape[1])
        self._need("concept_vector", 2, C, "f")
        self.cls_attn = self._need("concept_cls_attn", 1, C, "f")[:].astype(np.float64)
        if np.any(self.grid.prod(1) != np.diff(self.offsets)) or np.any(
            np.diff(self.concept_offsets) != self.n_concepts
        ):
            raise AcsegError(
                f"{self.path}: per-image counts do not match the packed data",
                "the file is damaged; re-run conceptualize",
            )
        # every concept holds at least one patch, and an image's concepts hold all of its patches (classify
        # weights the concepts by these counts)
        total = np.concatenate([[0], np.cumsum(self.pixels)])
        if (C and self.pixels.min() < 1) or np.any(
            total[self.concept_offsets[1:]] - total[self.concept_offsets[:-1]] != self.grid.prod(1)
        ):
            raise AcsegError(
                f"{self.path}: concept pixel counts do not add up to the images' patches",
                "the file is damaged; re-run conceptualize",
            )

    def means(self) -> np.ndarray:
        a = self._f["concept_mean"][:].astype(np.float32)
        if not np.isfinite(a).all():
            raise AcsegError(
                f"{self.path}: concept features hold NaN or Inf", "the file is damaged; re-run conceptualize"
            )
        return a

    def concept_map(self, i: int) -> np.ndarray:
        a, b = self.offsets[i], self.offsets[i + 1]
        m = self._f["concept_map"][a:b].astype(np.int64).reshape(self.grid[i])
        if m.size and m.max() >= self.n_concepts[i]:
            raise AcsegError(
                f"{self.path}: image {i} has concept ids beyond its {self.n_concepts[i]} concepts",
                "the file is damaged; re-run conceptualize",
            )
        return m

    @property
    def provenance(self) -> dict:
        return self.attr_json("features_provenance", {})


class ConceptSet:
    """Several concepts stores (e.g. the shards of one dataset) seen as one: what classify reads."""

    def __init__(self, paths: list[str]):
        if not paths:
            raise UsageError("no concepts store given", "pass one or more concepts stores")
        self.stores: list[ConceptStore] = []
        try:
            for p in paths:
                self.stores.append(ConceptStore(p))
            self._order_shards()
            self._join()
        except BaseException:
            self.close()
            raise

    def _order_shards(self) -> None:
        """Shards of one split go in shard order, whatever order the shell listed them in (``concepts.10.h5``
        sorts before ``concepts.2.h5``), so the result equals classifying their merged store."""
        infos = [shard_info(s) for s in self.stores]
        if len(self.stores) > 1 and all(infos):
            order = sorted(range(len(infos)), key=lambda j: (infos[j].count, infos[j].index))
            self.stores = [self.stores[j] for j in order]

    def _join(self) -> None:
        first = self.stores[0]
        for s in self.stores[1:]:
            if s.provenance != first.provenance:
                raise AcsegError(
                    f"{s.path.name} and {first.path.name} come from different backbones or feature settings",
                    "classify together only concepts of the same backbone and settings",
                )
            if s.params.get("acg") != first.params.get("acg") or s.params.get("method") != first.params.get("method"):
                raise AcsegError(
                    f"{s.path.name} and {first.path.name} were conceptualized differently (method or ACG)",
                    "conceptualize every part with the same --method and --acg",
                )
        self.names = [n for s in self.stores for n in s.names]
        if len(set(self.names)) != len(self.names):
            seen, dup = set(), None
            for n in self.names:
                if n in seen:
                    dup = n
                    break
                seen.add(n)
            raise AcsegError(
                f"image {dup!r} appears in more than one of the concepts stores",
                "pass each part once (shards of one split never share images)",
            )
        self.sources = [n for s in self.stores for n in s.sources]
        self.grid = np.concatenate([s.grid for s in self.stores])
        self.image_size = np.concatenate([s.image_size for s in self.stores])
        self.cls_attn = np.concatenate([s.cls_attn for s in self.stores])
        self.pixels = np.concatenate([s.pixels for s in self.stores])
        self.n_images = len(self.names)
        counts = np.concatenate([np.diff(s.concept_offsets) for s in self.stores])
        self.concept_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._where = [(j, i) for j, s in enumerate(self.stores) for i in range(s.n_images)]
        self.provenance = first.provenance
        self.backbone = first.backbone
        self.params = first.params
        self.dim = first.dim

    @property
    def identity(self) -> dict:
        if len(self.stores) == 1:
            return self.stores[0].identity
        return {"parts": [s.identity for s in self.stores], "kind": "concepts"}

    def means(self) -> np.ndarray:
        return np.concatenate([s.means() for s in self.stores])

    def concept_map(self, i: int) -> np.ndarray:
        j, k = self._where[i]
        return self.stores[j].concept_map(k)

    def close(self) -> None:
        for s in self.stores:
            s.close()
