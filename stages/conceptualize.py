"""Stage ``conceptualize``: per-image concepts whose number adapts to each image (docs/method.md, section 3).

``method="acg"``: the ACG's concepts, hard assignment argmax_c cos(x_i, c_c), prototypes that receive no
pixel dropped. ``method="kmeans"``: per-image k-means with k concepts (the paper's baseline). Both write the
same concepts store.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import validate as v
from .checkpoint import check_compatible, load_checkpoint
from .concepts import concepts_schema
from .config import METHODS, PRECISIONS, ACGConfig, TrainConfig
from .errors import AcsegError, UsageError
from .features import FeatureStore, scratch
from .fit import fit_acg
from .images import output_paths
from .kmeans import batched_kmeans
from .modularity import nearest_direction
from .output import check_apart, check_files_into, check_output
from .precision import DTYPE_NAMES, inference_dtype
from .shards import SHARD_ATTR, copy_plan
from .store import StoreWriter

log = logging.getLogger("acseg.conceptualize")


@dataclass
class ConceptualizeResult:
    path: str
    n_images: int
    mean_concepts: float
    acg_path: str | None
    fitted: bool
    fit_steps: int = 0  # the implicit fit's steps and why it stopped (when fitted)
    fit_stop_reason: str = ""


def default_output(features: str) -> str:
    p = Path(features).absolute()
    stem = p.name[: -len(".features.h5")] if p.name.endswith(".features.h5") else p.stem
    return str(p.with_name(f"{stem}.concepts.h5"))


def summarise_batch(
    x: torch.Tensor,
    attn: torch.Tensor,
    mask: torch.Tensor,
    assign: torch.Tensor,
    k: int,
    mean_map: torch.Tensor | None = None,
):
    """Per image of a batch, per prototype: pixel count, L2-normalised mean of the L2-normalised tokens
    (``x`` need not be normalised: each token is weighted by 1/|x_i| inside the product, which saves a pass
    over the batch), CLS-attention sum; and the hard assignment renumbered densely (0..m-1 in prototype order).
    ``mean_map`` (d, d): each mean is mapped by it (a whitened model's whitening) before its normalisation.

    Returns numpy arrays: pixels (B, k), means (B, k, d), attention sums (B, k), active (B, k) bool,
    labels (B, N), and whether every token's norm is finite (a token holding NaN or Inf has a NaN or Inf norm;
    so does one whose squares overflow, which the caller tells apart with an exact check). Prototypes with no
    pixel are inactive (dropped by the caller).
    """
    onehot = F.one_hot(assign, k).to(x.dtype) * mask[..., None].to(x.dtype)  # (B, N, k), on x's device
    pix = onehot.sum(1)
    norm = torch.linalg.vector_norm(x, dim=-1)
    finite = bool(torch.isfinite(norm).all())
    inv = norm.clamp_min_(1e-12).reciprocal_()  # as F.normalize's eps
    sums = torch.bmm((onehot * inv[..., None]).transpose(1, 2), x)
    means = F.normalize(sums if mean_map is None else sums @ mean_map, dim=-1)
    cattn = torch.bmm(attn[:, None, :].to(x.dtype), onehot)[:, 0]
    active = pix > 0
    labels = (active.long().cumsum(1) - 1).gather(1, assign)
    host = lambda t: t.cpu().numpy()  # noqa: E731  (only these small results leave the device)
    return host(pix.round().long()), host(means), host(cattn), host(active), host(labels), finite


def _transfer_as_stored(device: str) -> bool:
    """Whether batches leave the host in the store's dtype (to a GPU) rather than as float32 (CPU work)."""
    return torch.device(device).type != "cpu"


def implicit_fit_differences(acg: str, store: FeatureStore, train: TrainConfig) -> list[str]:
    """Why the checkpoint ``acg`` is not what conceptualize would fit on ``store`` with ``train`` and the
    default ACG (an empty list: it is, and may be reused)."""
    try:
        prev = load_checkpoint(acg, mmap=True)  # only its config and provenance are read here
    except AcsegError:
        return ["not a readable ACG checkpoint"]
    why = []
    if prev.provenance.get("store", {}).get("content_sha256") != store.identity["content_sha256"]:
        why.append("fitted on other features")
    want = ACGConfig(dim=store.dim)
    want.num_heads = want.heads
    for key, value in asdict(want).items():
        if getattr(prev.model.cfg, key) != value:
            why.append(f"fitted with {key}={getattr(prev.model.cfg, key)} (now {value})")
    had = prev.train.get("config") or {}
    for key, value in asdict(train).items():
        if key not in ("log_every", "checkpoint_every") and had.get(key) != value:
            show = lambda v: "auto" if v is None and key in ("steps", "warmup") else v  # noqa: E731
            why.append(f"fitted with {key}={show(had.get(key))} (now {show(value)})")
    return why


def conceptualize(
    features: str,
    output: str | None = None,
    *,
    acg: str | None = None,
    method: str = "acg",
    k: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    device: str | None = None,
    precision: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    fit_train: TrainConfig | None = None,
    preview: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    fit_progress: Callable[[int, int, str], None] | None = None,
) -> ConceptualizeResult:
    """Write a concepts store for every image of ``features``; returns its path and counts."""
    v.choice("--method", method, METHODS)
    v.integer("--batch-size", batch_size, min=1)
    v.choice("--precision", precision, PRECISIONS)
    v.seed("--seed", seed)
    if method == "kmeans":
        v.integer("-k", k, min=1, max=255, hint="pass 1..255 (a concept map holds one byte per token)")
    if method == "acg" and acg is None:
        (fit_train or TrainConfig()).validate()
    device = v.device(device)
    output = output or default_output(features)
    out = Path(output).absolute()
    check_output(out, overwrite)
    check_apart(out, [features, acg])
    store = FeatureStore(features)
    preview_paths = output_paths(Path(preview), store.names, ".png") if preview else []
    if preview:
        try:
            check_files_into(Path(preview), preview_paths, overwrite, inputs=[features, acg], photos=store.sources)
        except BaseException:
            store.close()
            raise
    dtype = inference_dtype(precision, device)
    fitted = False
    fit_res = None
    model = wmap = None
    acg_info = None
    if method == "acg":
        if acg is None:
            acg = str(out.with_name(out.name[:-3] + ".acg.pt" if out.name.endswith(".h5") else out.name + ".acg.pt"))
            fit_train = fit_train or TrainConfig()
            why = implicit_fit_differences(acg, store, fit_train) if Path(acg).exists() else None
            if why == []:
                log.warning("no --acg given: reusing %s, fitted earlier on these features with these settings", acg)
            else:
                if why and not overwrite:
                    raise AcsegError(
                        f"no --acg given, and {Path(acg).name} beside the output was {'; '.join(why)}",
                        f"pass --acg {acg} to use it as it is, or --overwrite to refit it",
                    )
                if why:
                    log.warning("no --acg given: %s was %s; refitting it (--overwrite)", Path(acg).name, "; ".join(why))
                log.warning(
                    "no --acg given: fitting an ACG on %s first (%s of %d images), saved as %s",
                    Path(features).name,
                    fit_train.describe(),
                    min(fit_train.batch_size, store.n_images),
                    acg,
                )
                fit_res = fit_acg(
                    features,
                    acg,
                    train=fit_train,
                    device=device,
                    overwrite=overwrite or why is not None,
                    progress=fit_progress,
                    announce=logging.WARNING,
                )
                fitted = True
        loaded = load_checkpoint(acg, mmap=True)
        check_compatible(loaded.provenance, store.provenance(), Path(acg).name, Path(features).name)
        model = loaded.model.to(device).eval()
        model.cast_(dtype)  # the tokens are prepared (centred, whitened) and assigned in float32
        k = model.cfg.num_prototypes
        wmap = model.feature_whiten if model.cfg.whiten else None
        acg_info = {
            "path": str(Path(acg).absolute()),
            "weights_sha256": loaded.weights_sha256,
            "config": json.loads(model.cfg.to_json()),
        }
    if not 1 <= k <= 255:
        raise UsageError(f"k = {k} concepts is outside 1..255", "choose another -k")
    feature = (
        "mean of L2-normalised tokens"
        if wmap is None
        else "whitened mean of the L2-normalised centred tokens, L2-normalised"
    )
    params = {
        "method": method,
        "k": k,
        "seed": seed,
        "acg": acg_info,
        "concept_feature": feature,
        "precision": DTYPE_NAMES[dtype] if method == "acg" else "fp32",
    }
    attrs = {
        "params": params,
        "backbone": store.backbone,
        "parent": store.identity,
        "features_provenance": store.provenance(),
    }
    if store.attr(SHARD_ATTR) is not None:  # a shard's concepts stay a shard, so 'acseg merge' can join them
        attrs[SHARD_ATTR] = store.attr_json(SHARD_ATTR)
    n = store.n_images
    with StoreWriter(
        out, concepts_schema(store.dim), attrs, overwrite=overwrite, resume=resume, extra=copy_plan(store)
    ) as w:
        start = w.resumed_from
        if progress:
            progress(start, n)
        reuse: dict = {}  # batch memory kept from one batch to the next (fresh 100 MB a batch costs page faults)
        for s in range(start, n, batch_size):
            e = min(n, s + batch_size)
            # the ACG's NaN and Inf are looked for in the summaries' token norms (a pass over the batch saved;
            # they pass through the forward harmlessly); k-means++ would stop on them, so it reads checked
            # to a GPU the tokens go as stored (float16: half the bytes) and are converted there
            x, mask, lens = store.read_batch(
                s, e, reuse=reuse, check=method != "acg", as_stored=_transfer_as_stored(device)
            )
            attn = store.read_batch(s, e, "cls_attn", reuse=reuse)[0]
            with torch.inference_mode():
                xd, md = x.to(device).float(), mask.to(device)
                if method == "acg":
                    # centred in place (x is ours); a whitened model whitens inside its attention instead of
                    # multiplying every token by its d x d matrix
                    low = (
                        scratch(reuse, "low", xd.shape, dtype)
                        if dtype != torch.float32 and xd.device.type == "cpu"
                        else None
                    )
                    xd, vec, directions = model.infer(xd, md, inplace=True, low=low)
                    assign = nearest_direction(xd, directions)
                else:
                    # F.normalize(xd, dim=-1), into memory kept between batches on a CPU
                    unit = scratch(reuse, "unit", xd.shape, xd.dtype) if xd.device.type == "cpu" else None
                    unit = torch.div(xd, torch.linalg.vector_norm(xd, dim=-1, keepdim=True).clamp_min_(1e-12), out=unit)
                    vec, assign = batched_kmeans(unit, md, k, seed=seed + s, work=reuse)
                # summarised where the tokens are: only the small results come back to the host
                pix, means, cattn, active, labels, finite = summarise_batch(xd, attn.to(xd.device), md, assign, k, wmap)
            if not finite:  # before anything of this batch is written
                store.check_finite(s, e)
            vec = vec.float().cpu().numpy()
            m = active.sum(1)
            per = {
                "grid": store.grid[s:e],
                "image_size": store.image_size[s:e],
                "names": store.names[s:e],
                "sources": store.sources[s:e],
                "n_concepts": m,
            }
            ids = [np.flatnonzero(a) for a in active]
            packed = {
                "concept_map": [labels[b, : lens[b]].astype(np.uint8) for b in range(e - s)],
                "concept_pixels": [pix[b, a].astype(np.int32) for b, a in enumerate(ids)],
                "concept_mean": [means[b, a] for b, a in enumerate(ids)],
                "concept_vector": [vec[b, a] for b, a in enumerate(ids)],
                "concept_cls_attn": [cattn[b, a] for b, a in enumerate(ids)],
                "concept_prototype": [a.astype(np.int16) for a in ids],
            }
            if preview:
                for b, i in enumerate(range(s, e)):
                    _preview(
                        preview_paths[i],
                        store.sources[i],
                        packed["concept_map"][b].reshape(store.grid[i]),
                        store.image_size[i],
                    )
            w.append(per, packed)
            if progress:
                progress(e, n)
        n_done = w.n_done
        counts = w.read("n_concepts")
    store.close()
    return ConceptualizeResult(
        str(out),
        n_done,
        float(np.mean(counts)) if n_done else 0.0,
        acg_info["path"] if acg_info else None,
        fitted,
        fit_res.steps if fit_res else 0,
        fit_res.stop_reason if fit_res else "",
    )


def _preview(path: Path, source: str, cmap: np.ndarray, image_size) -> None:
    from .render import (
        display_size,
        load_photo,
        overlay,
        palette,
        save_rgb,
        upsample_labels,
    )

    size = display_size(image_size)
    labels = upsample_labels(cmap, size)
    photo = load_photo(source, size)
    save_rgb(path, overlay(photo, labels, palette(max(16, cmap.max() + 2))[1:]))
