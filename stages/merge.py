"""Stage ``merge``: join the shard stores of one split (``shards``) into the store an unsharded run writes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .concepts import ConceptStore, concepts_schema
from .errors import AcsegError, UsageError
from .features import FeatureStore, features_schema
from .images import display_name
from .output import check_apart, check_output
from .shards import PLAN_BATCH, PLAN_NAMES, ShardInfo, has_plan, shard_info, shard_range
from .store import Store, StoreWriter, decode_names

log = logging.getLogger("acseg.merge")


@dataclass
class MergeResult:
    path: str
    kind: str
    n_images: int
    n_shards: int


def _open(path: str) -> Store:
    """Open a features or concepts store, whichever it is."""
    try:
        with h5py.File(path, "r") as f:
            kind = f.attrs.get("kind")
    except Exception:
        kind = None
    if kind == "concepts":
        return ConceptStore(path)
    return FeatureStore(path)  # validates and names what is wrong otherwise


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(display_name(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def merge(inputs: list[str], output: str, *, overwrite: bool = False, chunk: int = 64) -> MergeResult:
    """Join the shard stores ``inputs`` (features, or concepts made from feature shards) into ``output``.

    Checks first, writes nothing unless they pass: same kind, backbone and parameters; shards of one split
    (same inputs, same N); every shard exactly once; every planned image present in exactly one store.
    """
    if not inputs:
        raise UsageError("no shard stores given", "pass the shard stores to merge")
    out = Path(output).absolute()
    check_output(out, overwrite)
    check_apart(out, inputs)
    stores: list[Store] = []
    try:
        for p in inputs:
            stores.append(_open(p))
        return _merge(stores, out, overwrite, chunk)
    finally:
        for s in stores:
            s.close()


def _merge(stores: list[Store], out: Path, overwrite: bool, chunk: int) -> MergeResult:
    first = stores[0]
    infos = []
    for s in stores:
        info = shard_info(s)
        if info is None:
            raise AcsegError(
                f"{s.path.name} is not a shard (it was not made with --shard)",
                "merge only the stores of one 'extract --shard i/N' split",
            )
        infos.append(info)
        if not has_plan(s):
            raise AcsegError(
                f"{s.path.name} is a shard without its shard plan", "the file is damaged; re-run the stage that made it"
            )
        if s.kind != first.kind:
            raise AcsegError(
                f"{s.path.name} holds {s.kind} but {first.path.name} holds {first.kind}",
                "merge stores of one kind at a time",
            )
        if s.backbone != first.backbone:
            raise AcsegError(
                f"{s.path.name} and {first.path.name} come from different backbones",
                "merge only shards extracted with the same backbone and weights",
            )
        a = {k: v for k, v in s.params.items() if k != "shard"}
        b = {k: v for k, v in first.params.items() if k != "shard"}
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise AcsegError(
                f"{s.path.name} and {first.path.name} were made with different settings ({', '.join(diff)})",
                "merge only shards of one split, made with the same options",
            )
        if (info.count, info.n_batches) != (infos[0].count, infos[0].n_batches):
            raise AcsegError(
                f"{s.path.name} is shard {info.index}/{info.count} of {info.n_batches} batches but {first.path.name} "
                f"is {infos[0].index}/{infos[0].count} of {infos[0].n_batches}",
                "merge only the shards of one split (same inputs, same N)",
            )

    plan_names = decode_names(first.read(PLAN_NAMES))
    plan_batch = first.read(PLAN_BATCH).astype(np.int64)
    for s in stores[1:]:
        if decode_names(s.read(PLAN_NAMES)) != plan_names or not np.array_equal(s.read(PLAN_BATCH), plan_batch):
            raise AcsegError(
                f"{s.path.name} and {first.path.name} were planned over different input lists",
                "merge only shards of one split (extract each with the same inputs and --shard i/N)",
            )
    count = infos[0].count

    # Coverage: each shard index once, each planned image in the store of its shard, no name twice.
    by_index: dict[int, ShardInfo] = {}
    for info in infos:
        if info.index in by_index:
            other = by_index[info.index]
            names = [plan_names[i] for i in np.flatnonzero((plan_batch >= info.b0) & (plan_batch < info.b1))]
            raise AcsegError(
                f"shard {info.index}/{count} is given twice ({Path(other.path).name} and {Path(info.path).name}): its "
                f"images {_describe(names)} would appear twice",
                "pass each shard once",
            )
        by_index[info.index] = info
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        lost = []
        for m in missing:
            b0, b1 = shard_range(infos[0].n_batches, m, count)
            lost += [plan_names[i] for i in np.flatnonzero((plan_batch >= b0) & (plan_batch < b1))]
        raise AcsegError(
            f"shard(s) {', '.join(f'{m}/{count}' for m in missing)} missing: {len(lost)} images would be lost "
            f"({_describe(lost)})",
            "extract the missing shards first, then merge all of them",
        )
    order = sorted(range(len(stores)), key=lambda j: infos[j].index)
    batch_of = dict(zip(plan_names, plan_batch.tolist()))
    seen: dict[str, str] = {}
    for j in order:
        s, info = stores[j], infos[j]
        for name in s.names:
            b = batch_of.get(name)
            if b is None or not info.b0 <= b < info.b1:
                raise AcsegError(
                    f"{s.path.name} holds image {_describe([name])}, which its shard {info.index}/{count} does not "
                    f"plan",
                    "the store is damaged or renamed; re-run that shard",
                )
            if name in seen:
                raise AcsegError(
                    f"image {_describe([name])} is in {seen[name]} and {s.path.name}", "pass each shard once"
                )
            seen[name] = s.path.name

    if first.kind == "features":
        return _merge_features(stores, order, infos, out, overwrite, plan_names, plan_batch, batch_of)
    return _merge_concepts(stores, order, infos, out, overwrite, chunk, plan_names, plan_batch)


def _read_split(store: Store, name: str, offsets, idx: list[int]) -> list[np.ndarray]:
    """The packed rows of dataset ``name`` of images ``idx``, one array per image: one read when they are
    consecutive (a batch or a chunk, the usual case), one read per image otherwise."""
    if idx and idx == list(range(idx[0], idx[-1] + 1)):
        a = offsets[idx[0]]
        block = store.read(name, a, offsets[idx[-1] + 1])
        return [block[offsets[i] - a : offsets[i + 1] - a] for i in idx]
    return [store.read(name, offsets[i], offsets[i + 1]) for i in idx]


def _base_attrs(s: Store, parent) -> dict:
    a = {"params": {k: v for k, v in s.params.items() if k != "shard"}, "backbone": s.backbone, "parent": parent}
    for k in ("features_provenance",):
        if s.attr(k) is not None:
            a[k] = s.attr_json(k)
    return a


def _merge_features(stores, order, infos, out, overwrite, plan_names, plan_batch, batch_of) -> MergeResult:
    """Replay every planned batch in order, so the merged store (content hash included) equals an
    unsharded run's."""
    first = stores[0]
    skipped = first.attr_json("skipped", [])[: infos[0].header_skipped]
    attrs = _base_attrs(first, {})
    with StoreWriter(out, features_schema(first.dim), attrs, overwrite=overwrite) as w:
        for j in order:
            s, info = stores[j], infos[j]
            skipped += s.attr_json("skipped", [])[info.header_skipped :]
            per_batch: dict[int, list[int]] = {}
            for i, name in enumerate(s.names):
                per_batch.setdefault(batch_of[name], []).append(i)
            for b in range(info.b0, info.b1):  # batches whose images all failed still count (as in extract)
                idx = per_batch.get(b, [])
                per = {
                    "grid": [s.grid[i] for i in idx],
                    "image_size": [s.image_size[i] for i in idx],
                    "names": [s.names[i] for i in idx],
                    "sources": [s.sources[i] for i in idx],
                }
                toks = _read_split(s, "tokens", s.offsets, idx)
                attn = _read_split(s, "cls_attn", s.offsets, idx)
                w.append(
                    per,
                    {"tokens": toks, "cls_attn": attn},
                    attrs={"batches_done": b + 1, "skipped": skipped, "n_skipped": len(skipped)},
                )
        n = w.n_done
    log.info("merged %d shards: %d images", len(stores), n)
    return MergeResult(str(out), "features", n, len(stores))


def _merge_concepts(stores, order, infos, out, overwrite, chunk, plan_names, plan_batch) -> MergeResult:
    first = stores[0]
    parents = [stores[j].attr_json("parent", {}) for j in order]
    attrs = _base_attrs(first, {"shards": parents})
    schema = concepts_schema(first.dim)
    per_fields = list(schema.per_image)
    groups = schema.groups
    with StoreWriter(out, schema, attrs, overwrite=overwrite) as w:
        for j in order:
            s = stores[j]
            offs = {g.offsets: s.read(g.offsets) for g in groups}
            for a in range(0, s.n_images, chunk):
                b = min(s.n_images, a + chunk)
                per = {k: list(s.read(k, a, b)) for k in per_fields}
                per["names"] = s.names[a:b]
                per["sources"] = s.sources[a:b]
                packed = {}
                for g in groups:
                    off = offs[g.offsets]
                    for name in g.fields:
                        packed[name] = _read_split(s, name, off, list(range(a, b)))
                w.append(per, packed)
        n = w.n_done
    log.info("merged %d shards: %d images", len(stores), n)
    return MergeResult(str(out), "concepts", n, len(stores))
