"""Stage ``classify``: concepts of the whole dataset -> semantic classes -> label maps (docs/method.md, section 6).

Optionally (``background_split="on"``), per image a 2-means on the concepts' CLS-attention density (the mean
attention of their pixels) splits off the low group as background (class 0). The remaining concepts of the
dataset are over-clustered (spectral clustering of their neighbour graph, stages/spectral.py, or k-means) and
the clusters merged into the other classes (stages/overcluster.py); each concept takes its nearest centroid's
class, each pixel its concept's. Label maps are upsampled smoothly to the original image size and written as
PNGs named after the images.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import validate as v
from .concepts import ConceptSet
from .config import BACKGROUND_SPLITS, CLUSTERINGS, UPSAMPLES, WEIGHTINGS
from .crf import CRFParams, refine, require_crf
from .errors import AcsegError, UsageError
from .images import check_photos, output_paths
from .kmeans import kmeans, nearest
from .labelfolder import (
    CLASSES_FILE,
    ClassMapRows,
    ClassStore,
    draw_previews,
    label_maps_schema,
    match_to_gt,
    prepare_label_folder,
)
from .output import (
    acquire_output_lock,
    check_apart,
    check_files_into,
    check_output,
    release_output_lock,
    replace_folder,
)
from .overcluster import merge_clusters
from .render import (
    read_photo,
    save_label_png,
    upsample_labels,
)
from .spectral import NEIGHBOURS, parse_neighbours, spectral_clusters
from .store import StoreWriter, is_write_error

log = logging.getLogger("acseg.classify")


@dataclass
class ClassifyResult:
    path: str
    n_images: int
    n_classes: int
    classes_file: str
    score: dict | None = None


def background_split_wanted(mode: str | bool) -> bool:
    """``--background-split on|off`` (or a bool) -> whether classify splits off background.

    Off by default: on the default (ACG) concepts no split rule tried beat no split, neither on street scenes
    (CamVid) nor on figure / ground photos (the Weizmann horses); see docs/benchmarks.md."""
    if isinstance(mode, bool):
        return mode
    return v.choice("--background-split", mode, BACKGROUND_SPLITS) == "on"


def concept_attention_density(cls_attn: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """The mean CLS attention of each concept's pixels (its summed attention over its pixel count). The sum
    alone ranks a large concept of weak attention (a field, the sky) above a small salient one."""
    return np.asarray(cls_attn, np.float64) / np.maximum(np.asarray(pixels, np.float64), 1.0)


def split_background(scores: np.ndarray) -> np.ndarray:
    """1-D 2-means (exact: best split of the sorted scores); True for the low (background) group.

    One concept alone, or all scores equal, is foreground.
    """
    m = len(scores)
    bg = np.zeros(m, bool)
    if m < 2 or np.ptp(scores) <= 0:
        return bg
    order = np.argsort(scores, kind="stable")
    s = scores[order].astype(np.float64)
    best, cut = np.inf, 1
    for j in range(1, m):
        lo, hi = s[:j], s[j:]
        cost = ((lo - lo.mean()) ** 2).sum() + ((hi - hi.mean()) ** 2).sum()
        if cost < best - 1e-15:
            best, cut = cost, j
    bg[order[:cut]] = True
    return bg


def classify(
    concepts: str | list[str],
    outdir: str,
    *,
    n_classes: int | None = None,
    background_split: str | bool = "off",
    seed: int = 0,
    n_init: int = 10,
    upsample: str = "bilinear",
    weighting: str = "pixels",
    over_cluster: int = 2,
    exclusivity: float = 0.5,
    cluster: str = "spectral",
    neighbours: str | tuple = NEIGHBOURS,
    centroids: str | None = None,
    match_gt: str | None = None,
    dataset: str | None = None,
    ignore_index: tuple = (),
    preview: str | None = None,
    crf: bool = False,
    crf_params: CRFParams | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ClassifyResult:
    """Cluster the concepts of ``concepts`` (one store, or several parts of one dataset) into classes and
    write label maps into ``outdir``."""
    v.choice("--upsample", upsample, UPSAMPLES)
    v.choice("--weighting", weighting, WEIGHTINGS)
    v.seed("--seed", seed)
    v.integer("--over-cluster", over_cluster, min=1, max=64)
    v.number("--exclusivity", exclusivity, min=0.0, max=100.0)
    v.integer("--n-init", n_init, min=1)
    v.choice("--cluster", cluster, CLUSTERINGS)
    neighbours = parse_neighbours(neighbours)
    if n_classes is not None:
        v.integer("--n-classes", n_classes, min=1, max=65535)
    for i in ignore_index:
        v.integer("--ignore-index", i, min=0, max=65535, hint="pass a label id 0..65535")
    if crf_params is not None:
        v.integer("--crf-iterations", crf_params.iterations, min=0)
    if crf:
        require_crf()
    check_output(Path(outdir).absolute(), overwrite, folder=True)  # before the work, as prepare_label_folder after it
    paths = [concepts] if isinstance(concepts, (str, os.PathLike)) else list(concepts)
    store = ConceptSet([str(p) for p in paths])
    concepts = paths[0] if len(paths) == 1 else f"{len(paths)} concepts stores"
    feats = store.means()
    co = store.concept_offsets
    n = store.n_images
    if crf:
        crf_params = crf_params or CRFParams()
        try:
            check_photos(store.sources)
        except AcsegError:
            store.close()
            raise

    # 1. background split per image
    bg = np.zeros(len(feats), bool)
    fit_params = None
    split_score = "concept attention density"
    if centroids:
        ref = ClassStore(centroids)
        fit_params = ref.params
        ref_prov = ref.attr_json("features_provenance", {})
        for key in ("backbone", "weights_sha256", "dim", "feature", "layer"):
            if ref_prov.get(key) != store.provenance.get(key):
                raise AcsegError(
                    f"{Path(centroids).name} was fitted on {key}={ref_prov.get(key)} but {Path(concepts).name} has "
                    f"{key}={store.provenance.get(key)}",
                    "apply centroids only to concepts from the same backbone and settings",
                )
        background_split = "on" if fit_params["background_split"] else "off"
        if fit_params["background_split"] and "background_split_score" not in fit_params:
            split_score = "summed attention"  # fitted before the split used the density: apply it as fitted
        cents = ref.centroids
        cluster_class = ref.cluster_class
        n_classes = int(fit_params["n_classes"])
        ref.close()
    if n_classes is None or n_classes < 1:
        raise UsageError("--n-classes is required (>= 1)", "pass the number of classes, e.g. --n-classes 21")
    background_split = background_split_wanted(background_split)
    if background_split and n_classes < 2:
        raise UsageError(
            "a background split needs --n-classes >= 2", "raise --n-classes or pass --background-split off"
        )
    if background_split:
        scores = (
            concept_attention_density(store.cls_attn, store.pixels)
            if split_score == "concept attention density"
            else store.cls_attn
        )
        for i in range(n):
            a, b = co[i], co[i + 1]
            bg[a:b] = split_background(scores[a:b])
    fg = ~bg
    k_fg = n_classes - 1 if background_split else n_classes
    offset = 1 if background_split else 0

    # 2. cluster the foreground concepts of the dataset (or apply fitted centroids)
    if not centroids:
        if fg.sum() < k_fg:
            raise AcsegError(
                f"only {int(fg.sum())} foreground concepts for {k_fg} classes",
                "lower --n-classes, use more images, or pass --background-split off",
            )
        w = None if weighting == "none" else store.pixels[fg] if weighting == "pixels" else np.sqrt(store.pixels[fg])
        # over-cluster, then merge down to k_fg classes (stages/overcluster.py)
        k_fit = max(k_fg, min(over_cluster * k_fg, int(fg.sum())))
        if cluster == "spectral":
            cents, _ = spectral_clusters(feats[fg], k_fit, neighbours=neighbours, n_init=n_init, seed=seed, weights=w)
            if len(cents) < k_fg:
                raise AcsegError(
                    f"spectral clustering found only {len(cents)} clusters for {k_fg} classes",
                    "lower --n-classes, raise --neighbours, or pass --cluster kmeans",
                )
            k_fit = len(cents)
        else:
            cents, _, _ = kmeans(feats[fg], k_fit, n_init=n_init, seed=seed, weights=w)
        image_of = np.repeat(np.arange(n), np.diff(co))[fg]
        assign = nearest(feats[fg], cents)  # each concept's cluster, for the merge and its class
        cluster_class = merge_clusters(
            feats[fg],
            np.ones(int(fg.sum())) if w is None else w,
            image_of,
            assign,
            k_fit,
            k_fg,
            exclusivity,
        )
    elif cents.shape[1] != feats.shape[1]:
        raise AcsegError(
            f"centroids have dimension {cents.shape[1]} but the concepts {feats.shape[1]}",
            "apply centroids only to concepts from the same backbone",
        )
    else:
        assign = nearest(feats[fg], cents)
    concept_class = np.zeros(len(feats), np.int64)
    concept_class[fg] = cluster_class[assign] + offset

    # 3. label maps at the original size, into a partial folder renamed when complete
    out = Path(outdir).absolute()
    inputs = [*paths, centroids, match_gt]
    lock = acquire_output_lock(out)
    tmp = None
    try:
        tmp = prepare_label_folder(out, overwrite, inputs, store.sources, stage="classify", store_file=CLASSES_FILE)
        map_paths = output_paths(tmp, store.names, ".png")
        preview_paths = output_paths(Path(preview), store.names, ".png") if preview else []
        if preview:
            check_files_into(Path(preview), preview_paths, overwrite, inputs=inputs, photos=store.sources)
            check_apart(Path(preview), [out], folder=True, option="--preview")
        params = {
            "n_classes": n_classes,
            "background_split": background_split,
            "background_split_score": split_score if background_split else None,
            "seed": seed,
            "n_init": n_init,
            "upsample": upsample,
            "weighting": weighting,
            "over_cluster": None if centroids else over_cluster,
            "exclusivity": None if centroids else exclusivity,
            "cluster": None if centroids else cluster,
            "neighbours": list(neighbours) if cluster == "spectral" and not centroids else None,
            "n_clusters": len(cents),
            "applied_centroids": str(Path(centroids).absolute()) if centroids else None,
            "concept_feature": "concept_mean",
            "crf": crf_params.to_dict() if crf else None,
        }
        attrs = {
            "params": params,
            "backbone": store.backbone,
            "parent": store.identity,
            "features_provenance": store.provenance,
        }
        with StoreWriter(tmp / CLASSES_FILE, label_maps_schema("classes"), attrs) as w:
            rows = ClassMapRows(w, store)
            for i in range(n):
                cmap = store.concept_map(i)
                pmap = concept_class[co[i] + cmap]
                path = map_paths[i]
                if crf:
                    labels = refine(read_photo(store.sources[i], tuple(store.image_size[i])), pmap, crf_params)
                else:
                    labels = upsample_labels(pmap, tuple(store.image_size[i]), upsample)
                save_label_png(path, labels)
                rows.add(pmap)
                if progress:
                    progress(i + 1, n)
            rows.flush()
            w.add_dataset("centroids", np.asarray(cents, np.float32))
            w.add_dataset("cluster_class", np.asarray(cluster_class, np.uint16))
        score_res = None
        if match_gt:
            score_res = match_to_gt(tmp, match_gt, dataset, map_paths, n_classes, tuple(ignore_index))
        if preview:
            draw_previews(preview_paths, store, map_paths, match_gt, dataset, score_res)
        replace_folder(tmp, out)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and is_write_error(e):
            raise AcsegError(
                f"writing the label maps into {out.name} failed ({e.strerror or e})",
                "check free disk space and permissions; the previous output, if any, is untouched",
            ) from None
        raise
    finally:
        store.close()
        release_output_lock(out, lock)
    return ClassifyResult(str(out), n, n_classes, str(out / CLASSES_FILE), score_res)
