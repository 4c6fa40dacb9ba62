"""Which background rule: classify's split variants on the same concepts, scored in one run.

For each variant, classes are fitted on the TRAIN concepts and applied to the TEST concepts (pass the same
store twice for a transductive set such as the Weizmann horses), over several k-means seeds, and scored with
dataset-level Hungarian matching on all test images and on the even / odd halves (sorted by name), so that a
rule can be chosen on one half and checked on the other. Label maps are scored in memory: each concept map
is upsampled once (bilinear) and relabelled per variant, which can differ from classify's own upsampling of
class maps by a few boundary pixels.

Variants (the split is per image, a 1-D 2-means; the low group is the background class 0):
  off             no split: k-means over all concepts into K classes
  sum             on each concept's summed CLS attention (acseg's rule before the density)
  density         on each concept's mean CLS attention (summed attention / pixels; acseg's rule now)
  density_etaX    the density split only in images where it explains at least X of the variance (Otsu's
                  between-class share); other images' concepts go to the nearest class, background included
  density_ratioX  the same, gated on the foreground's density being X times the background's

Baseline on equal features (``--features STORE``): dataset-level k-means of the L2-normalised tokens into K
classes (fitted on a sample of 60,000 tokens, 3 restarts), every token labelled, scored the same way.

Usage:
  python benchmarks/background.py TRAIN.concepts.h5 TEST.concepts.h5 GT_DIR -K 11 --ignore 11 --seeds 5
  python benchmarks/background.py horses.concepts.h5 horses.concepts.h5 horses/labels -K 2 --seeds 5
Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.classify import concept_attention_density, split_background  # noqa: E402
from stages.concepts import ConceptSet  # noqa: E402
from stages.kmeans import kmeans, nearest  # noqa: E402
from stages.render import upsample_labels  # noqa: E402

VARIANTS = "off,sum,density,density_eta0.5,density_eta0.7,density_ratio2,density_ratio3"


def hungarian_miou(conf: np.ndarray) -> float:
    """mIoU in percent of a (predicted, true) confusion matrix after one-to-one Hungarian matching, over the
    classes present in the ground truth (score's protocol)."""
    K = conf.shape[0]
    rows, cols = linear_sum_assignment(conf, maximize=True)
    m = np.zeros((K, K), np.int64)
    for p, t in zip(rows, cols):
        m[t] += conf[p]
    tp = np.diag(m)
    iou = tp / np.maximum(m.sum(0) + m.sum(1) - tp, 1)
    return 100 * float(iou[conf.sum(0) > 0].mean())


def load(path: str) -> dict:
    s = ConceptSet([path])
    d = dict(
        feats=s.means(),
        pix=s.pixels.astype(np.float64),
        attn=s.cls_attn.astype(np.float64),
        co=s.concept_offsets.copy(),
        names=list(s.names),
        maps=[s.concept_map(i) for i in range(s.n_images)],
    )
    s.close()
    return d


def between_share(m: np.ndarray, w: np.ndarray, bg: np.ndarray) -> float:
    """Share of the (pixel-weighted) variance of ``m`` that the split ``bg`` explains."""
    if bg.all() or not bg.any():
        return 0.0
    mu = np.average(m, weights=w)
    total = np.average((m - mu) ** 2, weights=w)
    between = sum(w[g].sum() * (np.average(m[g], weights=w[g]) - mu) ** 2 for g in (bg, ~bg)) / w.sum()
    return float(between / total) if total > 0 else 0.0


def image_rule(d: dict, i: int, variant: str) -> tuple[np.ndarray, bool]:
    """(background mask of image i's concepts, whether the rule decides this image)."""
    a, b = d["co"][i], d["co"][i + 1]
    s, n = d["attn"][a:b], d["pix"][a:b]
    if variant == "off":
        return np.zeros(b - a, bool), True
    if variant == "sum":
        return split_background(s), True
    m = concept_attention_density(s, n)
    bg = split_background(m)
    if variant == "density":
        return bg, True
    if variant.startswith("density_eta"):
        return bg, between_share(m, n, bg) >= float(variant[len("density_eta") :])
    if variant.startswith("density_rel"):  # density relative to the image's mean attention per patch
        rel = m * n.sum()
        return rel < float(variant[len("density_rel") :]), True
    if variant == "density_global":
        return d["global_bg"][a:b], True
    if variant.startswith("density_ratio"):
        if bg.all() or not bg.any():
            return bg, False
        ratio = np.average(m[~bg], weights=n[~bg]) / max(1e-12, np.average(m[bg], weights=n[bg]))
        return bg, ratio >= float(variant[len("density_ratio") :])
    raise SystemExit(f"unknown variant {variant!r}")


def global_split(d: dict) -> np.ndarray:
    """Background concepts by one 2-means over the log attention density of every concept of the dataset
    (relative to each image's mean), instead of one per image."""
    rel = np.concatenate(
        [
            concept_attention_density(d["attn"][a:b], d["pix"][a:b]) * d["pix"][a:b].sum()
            for a, b in zip(d["co"][:-1], d["co"][1:])
        ]
    )
    return split_background(np.log(np.maximum(rel, 1e-9)))


def masks(d: dict, variant: str) -> tuple[np.ndarray, np.ndarray]:
    if variant == "density_global" and "global_bg" not in d:
        d["global_bg"] = global_split(d)
    bg = np.zeros(len(d["feats"]), bool)
    decided = np.zeros(len(d["feats"]), bool)
    for i in range(len(d["names"])):
        a, b = d["co"][i], d["co"][i + 1]
        m, ok = image_rule(d, i, variant)
        if ok:
            bg[a:b], decided[a:b] = m, True
    return bg, decided


def run(tr: dict, te: dict, gts: list, ups: list, halves: dict, K: int, ignore: int | None, variant: str, seed: int):
    split = variant != "off"
    bg_tr, _ = masks(tr, variant)
    k_fg = K - 1 if split else K
    cents, _, _ = kmeans(tr["feats"][~bg_tr], k_fg, n_init=10, seed=seed, weights=tr["pix"][~bg_tr])
    bc = None
    if split and bg_tr.any():
        bc = np.average(tr["feats"][bg_tr], axis=0, weights=tr["pix"][bg_tr])
        bc /= np.linalg.norm(bc)
    bg_te, dec_te = masks(te, variant)
    cls = np.zeros(len(te["feats"]), np.int64)
    off = 1 if split else 0
    fg = ~bg_te & dec_te
    cls[fg] = nearest(te["feats"][fg], cents) + off
    und = ~dec_te
    if und.any():
        allc = np.vstack([bc[None], cents]) if bc is not None else cents
        cls[und] = nearest(te["feats"][und], allc) + (0 if bc is not None else off)
    conf = {h: np.zeros((K, K), np.int64) for h in ("all", "even", "odd")}
    for i in range(len(te["names"])):
        pred, g = cls[te["co"][i] + ups[i]], gts[i]
        valid = g != ignore if ignore is not None else np.ones(g.shape, bool)
        c = np.bincount(pred[valid] * K + g[valid], minlength=K * K).reshape(K, K)
        conf["all"] += c
        conf["even" if i in halves["even"] else "odd"] += c
    return (
        {h: hungarian_miou(c) for h, c in conf.items()},
        float((bg_te & dec_te).sum() / max(1, len(bg_te))),
        float(dec_te.mean()),
    )


def kmeans_baseline(
    features: str, gts: list, halves: dict, K: int, ignore: int | None, seeds: int, names: list
) -> None:
    from stages.features import FeatureStore

    rows = {h: [] for h in ("all", "even", "odd")}
    with FeatureStore(features) as st:
        index = {n: i for i, n in enumerate(st.names)}
        toks = [st.tokens(index[n]) for n in names]
        grids = [st.grid[index[n]] for n in names]
    unit = [t / np.linalg.norm(t, axis=1, keepdims=True) for t in toks]
    allt = np.concatenate(unit)
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        sample = allt[rng.choice(len(allt), min(60000, len(allt)), replace=False)]
        cents, _, _ = kmeans(sample, K, n_init=3, seed=seed)
        conf = {h: np.zeros((K, K), np.int64) for h in rows}
        for i, (u, grid) in enumerate(zip(unit, grids)):
            lab = nearest(u, cents).reshape(grid)
            g = gts[i]
            pred = upsample_labels(lab, g.shape)
            valid = g != ignore if ignore is not None else np.ones(g.shape, bool)
            c = np.bincount(pred[valid] * K + g[valid], minlength=K * K).reshape(K, K)
            conf["all"] += c
            conf["even" if i in halves["even"] else "odd"] += c
        for h, c in conf.items():
            rows[h].append(hungarian_miou(c))
    row = {"variant": "dataset-level k-means on the features", "K": K, "seeds": seeds}
    for h, v in rows.items():
        row[f"miou_{h}"] = f"{np.mean(v):.1f} +- {np.std(v):.1f}"
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("train")
    ap.add_argument("test")
    ap.add_argument("gt", type=Path)
    ap.add_argument("-K", type=int, required=True)
    ap.add_argument("--ignore", type=int, default=None, help="ground-truth id to ignore (CamVid: 11)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--features", help="the TEST feature store: also score dataset-level k-means on its tokens")
    a = ap.parse_args()
    tr = load(a.train)
    te = tr if a.test == a.train else load(a.test)
    gts, ups = [], []
    for i, n in enumerate(te["names"]):
        g = np.asarray(Image.open(a.gt / (Path(n).stem + ".png"))).astype(np.int64)
        gts.append(g)
        ups.append(upsample_labels(te["maps"][i], g.shape))
    order = np.argsort(te["names"])
    halves = {"even": set(order[0::2].tolist()), "odd": set(order[1::2].tolist())}
    if a.features:
        kmeans_baseline(a.features, gts, halves, a.K, a.ignore, a.seeds, te["names"])
    for v in a.variants.split(","):
        rs = [run(tr, te, gts, ups, halves, a.K, a.ignore, v, s) for s in range(a.seeds)]
        row = {"variant": v, "K": a.K, "seeds": a.seeds}
        for h in ("all", "even", "odd"):
            x = np.array([r[0][h] for r in rs])
            row[f"miou_{h}"] = f"{x.mean():.1f} +- {x.std():.1f}"
        row["background_concepts"] = round(rs[0][1], 3)
        row["images_decided"] = round(rs[0][2], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
