"""Synthetic feature stores with planted groups of tokens (for the ACG, conceptualize and classify)."""

from __future__ import annotations

import numpy as np

from stages.features import features_schema
from stages.store import StoreWriter


def planted_images(n_images=48, dim=32, grid=(8, 8), n_classes=5, groups=(2, 5), noise=0.5, seed=0):
    """Each image: 2..5 groups, each group a class from a global pool; tokens = class direction + noise.

    Returns (tokens per image, group label map per image, class of each group per image).
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    h, w = grid
    toks, labels, classes = [], [], []
    for _ in range(n_images):
        g = int(rng.integers(groups[0], groups[1] + 1))
        cls = rng.choice(n_classes, g, replace=False)
        # contiguous regions: vertical stripes of random widths, each at least one column
        cuts = np.sort(rng.choice(np.arange(1, w), g - 1, replace=False))
        col_group = np.searchsorted(cuts, np.arange(w), side="right")
        lab = np.tile(col_group, (h, 1))
        t = centers[cls[lab.ravel()]] * 3.0 + rng.normal(scale=noise * 3.0 / np.sqrt(dim), size=(h * w, dim))
        toks.append(t.astype(np.float32))
        labels.append(lab)
        classes.append(cls)
    return toks, labels, classes


def write_planted_photos(folder, labels, classes, patch=16, seed=0):
    """One PNG per planted image, each class a flat colour (plus noise) on its groups' patches; -> their paths."""
    from pathlib import Path

    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = np.array([[200, 40, 40], [40, 160, 40], [40, 40, 200], [220, 200, 60], [120, 60, 160]] * 4, np.float32)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (lab, cls) in enumerate(zip(labels, classes)):
        img = colours[cls[lab]].repeat(patch, 0).repeat(patch, 1)
        img = np.clip(img + rng.normal(scale=6, size=img.shape), 0, 255).astype(np.uint8)
        paths.append(str(folder / f"img_{i:03d}.png"))
        Image.fromarray(img).save(paths[-1])
    return paths


def write_planted_store(path, toks, labels, *, backbone="planted", patch=16, sources=None):
    h, w = labels[0].shape
    dim = toks[0].shape[1]
    attrs = {
        "params": {"feature": "tokens", "layer": 0, "short_side": h * patch},
        "backbone": {"preset": backbone, "dim": dim, "patch": patch, "weights_sha256": "0" * 64},
        "parent": {},
    }
    with StoreWriter(path, features_schema(dim), attrs) as wr:
        for i, (t, lab) in enumerate(zip(toks, labels)):
            # CLS attention: higher on groups whose first column is > 0 (so a background split has signal)
            attn = np.where(lab.ravel() == 0, 0.1, 1.0).astype(np.float32) / t.shape[0]
            wr.append(
                {
                    "grid": [lab.shape],
                    "image_size": [(lab.shape[0] * patch, lab.shape[1] * patch)],
                    "names": [f"img_{i:03d}.png"],
                    "sources": [sources[i] if sources else f"/nonexistent/img_{i:03d}.png"],
                },
                {"tokens": [t.astype(np.float16)], "cls_attn": [attn]},
            )
    return str(path)


def write_figure_ground_store(
    path, n_images=24, dim=32, grid=(8, 8), object_size=3, attention_ratio=2.5, seed=0, patch=16
):
    """Object photos: one object (the same class in every image, ``object_size`` squared tokens) on a ground of
    two of four ground classes (two large regions). The object's tokens get ``attention_ratio`` times the CLS
    attention of the ground's, so its attention *density* is the highest, while each ground region's summed
    attention is larger than the object's. Returns (store path, figure/ground label maps: 1 object, 0 ground)."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(5, dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    h, w = grid
    toks, fg = [], []
    for _ in range(n_images):
        lab = np.zeros((h, w), np.int64)  # region ids: 0, 1 ground halves; 2 the object
        lab[:, w // 2 :] = 1
        r, c = rng.integers(0, h - object_size + 1), rng.integers(0, w - object_size + 1)
        lab[r : r + object_size, c : c + object_size] = 2
        ground = rng.choice(4, 2, replace=False) + 1
        cls = np.array([ground[0], ground[1], 0])
        t = dirs[cls[lab.ravel()]] * 3.0 + rng.normal(scale=0.2 * 3.0 / np.sqrt(dim), size=(h * w, dim))
        toks.append(t.astype(np.float32))
        fg.append((lab == 2).astype(np.uint8))
    attrs = {
        "params": {"feature": "tokens", "layer": 0, "short_side": h * patch},
        "backbone": {"preset": "planted", "dim": dim, "patch": patch, "weights_sha256": "0" * 64},
        "parent": {},
    }
    with StoreWriter(path, features_schema(dim), attrs) as wr:
        for i, (t, f) in enumerate(zip(toks, fg)):
            attn = np.where(f.ravel() == 1, attention_ratio, 1.0).astype(np.float32)
            wr.append(
                {
                    "grid": [f.shape],
                    "image_size": [(f.shape[0] * patch, f.shape[1] * patch)],
                    "names": [f"img_{i:03d}.png"],
                    "sources": [f"/nonexistent/img_{i:03d}.png"],
                },
                {"tokens": [t.astype(np.float16)], "cls_attn": [attn / attn.sum()]},
            )
    return str(path), fg
