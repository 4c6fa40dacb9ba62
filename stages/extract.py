"""Stage ``extract``: images -> frozen ViT patch features and CLS attention in a feature store."""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import images as im
from . import validate as v
from .backbones import (
    DEFAULT_BACKBONE,
    DEFAULT_FEATURE,
    FEATURE_KINDS,
    create_backbone,
    get_preset,
)
from .errors import AcsegError, UsageError
from .features import features_schema
from .output import check_output
from .precision import extract_precision
from .shards import parse_shard, plan_datasets, shard_range
from .store import StoreWriter

log = logging.getLogger("acseg.extract")


@dataclass
class ExtractResult:
    path: str
    n_images: int
    n_skipped: int
    skipped: list = field(default_factory=list)
    resumed_from: int = 0


def plan_batches(grids: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Group image indices of equal grid size into batches, ordered by their first image.

    Deterministic in the input list, so a resumed run processes exactly the same batches.
    """
    by_grid: dict[tuple[int, int], list[int]] = {}
    for i, g in enumerate(grids):
        if g is not None:
            by_grid.setdefault(tuple(g), []).append(i)
    batches = [idx[s : s + batch_size] for idx in by_grid.values() for s in range(0, len(idx), batch_size)]
    return sorted(batches, key=lambda b: b[0])


class _BatchDataset(torch.utils.data.Dataset):
    """Decodes and resizes one planned batch per item (runs in DataLoader workers)."""

    def __init__(self, items, grids, batches, patch, mean, std, max_pixels):
        self.items, self.grids, self.batches = items, grids, batches
        self.patch, self.mean, self.std, self.max_pixels = patch, mean, std, max_pixels

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, j):
        ok, arrays, sizes, failed = [], [], [], []
        for i in self.batches[j]:
            try:
                img = im.load_rgb(self.items[i].path, self.max_pixels)
                arrays.append(im.resize_normalise(img, self.grids[i], self.patch, self.mean, self.std))
                sizes.append((img.size[1], img.size[0]))
                ok.append(i)
            except im.ImageError as e:
                failed.append((i, str(e)))
        x = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0)
        return j, ok, x, sizes, failed


def _inputs_digest(items) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(
            it.name.encode("utf-8", "surrogateescape") + b"\0" + it.path.encode("utf-8", "surrogateescape") + b"\0"
        )
    return h.hexdigest()


def _plan_digest(grids, batches) -> str:
    """The batch plan (which images, in which batches, at which grid): a resume continues a partial store only
    when its plan is this one, so an image that became readable or a changed --max-aspect cannot shift the
    images left to do."""
    h = hashlib.sha256()
    for b in batches:
        h.update(repr([(int(i), tuple(grids[i])) for i in b]).encode() + b"\n")
    return h.hexdigest()


def extract(
    inputs: list[str],
    output: str,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | None = None,
    random_weights: bool = False,
    short_side: int | None = None,
    feature: str = DEFAULT_FEATURE,
    layer: int = -1,
    batch_size: int = 8,
    workers: int = 1,
    device: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    max_pixels: int | None = None,
    list_text: str | None = None,
    shard: str | None = None,
    max_aspect: float = 8.0,
    precision: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> ExtractResult:
    """Extract features of ``inputs`` (folders, files, list files) into the store ``output``.

    ``progress(done, total)`` is called after every batch. Returns the store's path and counts.
    ``shard="i/N"`` processes only the i-th of N contiguous ranges of the planned batches (see shards.py).
    """
    shard_spec = parse_shard(shard) if shard is not None else None
    preset = get_preset(backbone)
    v.choice("--feature", feature, FEATURE_KINDS)
    max_aspect = v.number("--max-aspect", max_aspect, min=1, hint="pass a ratio >= 1, e.g. 8")
    v.integer("--batch-size", batch_size, min=1)
    v.integer("--workers", workers, min=0)
    if short_side is not None:
        v.integer("--short-side", short_side, min=1, max=16384)
    if max_pixels is not None:
        v.integer("--max-pixels", max_pixels, min=1)
    device = v.device(device)
    precision = extract_precision(precision, device)
    short_side = short_side or preset.short_side
    if short_side < preset.patch:
        raise UsageError(
            f"--short-side {short_side} is smaller than the patch size {preset.patch}", "raise --short-side"
        )
    out = Path(output).absolute()
    check_output(out, overwrite)
    items = im.discover(inputs, list_text)
    if not items:
        raise AcsegError("no images found in the inputs", "pass image files, folders holding images, or a list file")

    # Read headers first: sizes decide the grid, the grid decides the batches.
    skipped: list[dict] = []
    grids: list = []
    for it in items:
        try:
            h, w = im.peek_size(it.path, max_pixels)
            if max(h, w) > max_aspect * min(h, w):
                g = im.target_grid(h, w, short_side, preset.patch)
                raise im.ImageError(
                    f"aspect ratio {max(h, w) / min(h, w):.0f}:1 is beyond --max-aspect {max_aspect:g} ({h}x{w} pixels "
                    f"would make {g[0] * g[1]:,} patches); crop it, or raise --max-aspect"
                )
            grids.append(im.target_grid(h, w, short_side, preset.patch))
        except im.ImageError as e:
            grids.append(None)
            _skip(skipped, it, str(e), strict)
    batches = plan_batches(grids, batch_size)
    if not batches:
        raise AcsegError(
            f"none of the {len(items)} inputs is a readable image", "check the files (see the warnings above)"
        )
    first, stop, extra, shard_attr = 0, len(batches), None, None
    if shard_spec:
        si, sn = shard_spec
        first, stop = shard_range(len(batches), si, sn)
        if first == stop:
            raise UsageError(
                f"shard {si}/{sn} is empty: the inputs make only {len(batches)} batches for {sn} shards",
                "use fewer shards or a smaller --batch-size",
            )
        batch_of = np.full(len(items), -1, np.int32)
        for j, b in enumerate(batches):
            batch_of[b] = j
        extra = plan_datasets([it.name for it in items], batch_of)
        shard_attr = {
            "index": si,
            "count": sn,
            "batches": [first, stop],
            "n_batches": len(batches),
            "header_skipped": len(skipped),
        }

    bb = create_backbone(backbone, weights=weights, random_weights=random_weights, device=device)
    if not -bb.depth <= layer < bb.depth:
        raise UsageError(f"--layer {layer} is outside 0..{bb.depth - 1} (or -1 for the last)", "pick another --layer")
    params = {
        "short_side": short_side,
        "feature": feature,
        "layer": layer % bb.depth,
        "batch_size": batch_size,
        "resize": "bicubic, short side to short_side, sides rounded to multiples of the patch",
        "inputs_sha256": _inputs_digest(items),
        "n_inputs": len(items),
        "max_aspect": max_aspect,
        "plan_sha256": _plan_digest(grids, batches),
        "precision": precision,
    }
    attrs = {"params": params, "backbone": bb.describe(), "parent": {}}
    if shard_attr:
        params["shard"] = f"{shard_spec[0]}/{shard_spec[1]}"
        attrs["shard"] = shard_attr
    schema = features_schema(bb.dim)
    total = sum(len(batches[j]) for j in range(first, stop))
    with StoreWriter(out, schema, attrs, overwrite=overwrite, resume=resume, extra=extra) as w:
        start = first
        if w.resumed_from:
            start = max(first, int(w.attr("batches_done", 0)))
            skipped = json.loads(w.attr("skipped", "[]"))
            log.info("resuming %s after %d images (%d batches)", out.name, w.resumed_from, start - first)
        elif resume:
            log.info("nothing valid to resume for %s; starting afresh", out.name)
        ds = _BatchDataset(items, grids, batches, preset.patch, preset.mean, preset.std, max_pixels)
        todo = list(range(start, stop))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(ds, todo),
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            pin_memory=(device != "cpu"),
        )
        done = sum(len(batches[j]) for j in range(first, start))
        if progress:
            progress(done, total)
        autocast = (
            torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        )
        for j, ok, x, sizes, failed in loader:
            for i, reason in failed:
                _skip(skipped, items[i], reason, strict)
            per_image = {"grid": [], "image_size": [], "names": [], "sources": []}
            packed = {"tokens": [], "cls_attn": []}
            if ok:
                with torch.inference_mode(), autocast:
                    feats, attn, _ = bb(x.to(device, non_blocking=True), feature=feature, layer=layer)
                feats = feats.float().cpu().numpy().astype(np.float16)
                attn = attn.float().cpu().numpy()
                for n, i in enumerate(ok):
                    per_image["grid"].append(grids[i])
                    per_image["image_size"].append(sizes[n])
                    per_image["names"].append(items[i].name)
                    per_image["sources"].append(items[i].path)
                    packed["tokens"].append(feats[n])
                    packed["cls_attn"].append(attn[n])
            w.append(per_image, packed, attrs={"batches_done": j + 1, "skipped": skipped, "n_skipped": len(skipped)})
            done += len(batches[j])
            if progress:
                progress(done, total)
        if w.n_done == 0:
            raise AcsegError(
                f"none of the {len(items)} inputs could be decoded", "check the files (see the warnings above)"
            )
        w.set_attr("skipped", skipped)
        w.set_attr("n_skipped", len(skipped))
        resumed = w.resumed_from
        n_done = w.n_done
    return ExtractResult(str(out), n_done, len(skipped), skipped, resumed)


def _skip(skipped: list, item, reason: str, strict: bool) -> None:
    name = im.display_name(item.name)
    if strict:
        raise AcsegError(f"cannot read image {name}: {reason}", "fix or remove it, or drop --strict to skip it")
    log.warning("skipping %s: %s", name, reason)
    skipped.append({"name": name, "reason": reason})
