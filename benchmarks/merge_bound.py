"""How much could a better merge gain? An upper-bound study of classify's over-clusters (issue 27).

classify over-clusters the concepts into F x K clusters and merges them into K classes without labels. This
script clusters the TRAIN concepts into F x K clusters with classify's own clustering (``--over-cluster 1``,
every other default), applies them to the TEST concepts, and scores the test label maps three ways against
the ground truth:

  hungarian   the F x K clusters as they are, one-to-one (most clusters match nothing)
  majority    each cluster mapped to the class it overlaps most (the usual over-clustering protocol)
  best merge  the clusters mapped to classes to maximise the mIoU: majority, then moving one cluster at a
              time to another class while the mIoU rises (a local optimum, so a lower bound of the best
              merge). A mapping of clusters to classes is a merge into at most K groups scored one-to-one:
              no merge rule that sees no labels can score above the best merge of the same clusters.

and classify with every default (its own merge) for reference. The gap between classify and the best merge
is what any merge rule could still win on these clusters; it uses the test labels, so it is a diagnostic,
never a setting.

Usage:
  python benchmarks/merge_bound.py --train C_T.h5 --test C_V.h5 --gt GT_DIR -K 11 --ignore 11 \
      [--factors 1,2,3,4] [--seed 0] --out DIR
Pass the same store twice for a transductive set. Prints one JSON line per factor and a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refine import add_set_arguments  # noqa: E402  (benchmarks/, the script's own folder)

from stages.classify import classify  # noqa: E402
from stages.score import score  # noqa: E402


def miou_of_mapping(conf: np.ndarray, mapping: np.ndarray) -> float:
    """conf (clusters, K) pixel counts of each cluster on each class; mapping (clusters,) class of each
    cluster -> the mIoU of the label maps with every cluster relabelled to its class (mean over the K)."""
    k = conf.shape[1]
    inter = np.zeros(k)
    pred = np.zeros(k)
    np.add.at(inter, mapping, conf[np.arange(len(mapping)), mapping])
    np.add.at(pred, mapping, conf.sum(1))
    gt = conf.sum(0)
    union = gt + pred - inter
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 0.0)))


def best_mapping(conf: np.ndarray) -> tuple[np.ndarray, float]:
    """The majority mapping improved by single moves (one cluster to another class) while the mIoU rises."""
    mapping = conf.argmax(1)
    best = miou_of_mapping(conf, mapping)
    improved = True
    while improved:
        improved = False
        for c in range(len(mapping)):
            for k in range(conf.shape[1]):
                if k == mapping[c]:
                    continue
                trial = mapping.copy()
                trial[c] = k
                m = miou_of_mapping(conf, trial)
                if m > best + 1e-12:
                    mapping, best, improved = trial, m, True
    return mapping, best


def main():
    ap = argparse.ArgumentParser()
    add_set_arguments(ap)
    ap.add_argument("--factors", default="1,2,3,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    transductive = Path(a.train).resolve() == Path(a.test).resolve()
    kw = dict(ignore_index=tuple(a.ignore), workers=2)

    def labelled(name, **ckw):
        fit = classify(a.train, str(out / f"{name}_fit"), seed=a.seed, overwrite=True, **ckw)
        if transductive:
            return fit.path
        return classify(a.test, str(out / name), centroids=fit.classes_file, overwrite=True).path

    ref = 100 * score(labelled("classify", n_classes=a.K), a.gt, include_confusion=False, **kw)["miou"]
    print(json.dumps({"variant": "classify (every default)", "miou": round(ref, 2)}), flush=True)
    rows = []
    for f in (int(x) for x in a.factors.split(",")):
        d = labelled(f"over{f}", n_classes=f * a.K, over_cluster=1)
        hung = 100 * score(d, a.gt, include_confusion=False, **kw)["miou"]
        res = score(d, a.gt, protocol="majority", **kw)
        conf = np.asarray(res["confusion"], dtype=np.float64)  # (prediction ids present, K)
        if conf.shape[1] != a.K:
            sys.exit(f"the confusion matrix has {conf.shape[1]} classes, not {a.K}")
        maj = 100 * miou_of_mapping(conf, conf.argmax(1))
        mapping, best = best_mapping(conf)
        row = {
            "factor": f,
            "clusters": int(conf.shape[0]),
            "hungarian": round(hung, 2),
            "majority": round(maj, 2),
            "majority (score)": round(100 * res["miou"], 2),
            "best merge": round(100 * best, 2),
            "classes used": int(len(set(mapping.tolist()))),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"classify with every default: {ref:.2f}")
    print("| clusters (factor x K) | hungarian | majority | best merge (lower bound) | classes used |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['clusters']} ({r['factor']} x K) | {r['hungarian']:.2f} | {r['majority']:.2f} | "
            f"{r['best merge']:.2f} | {r['classes used']} |"
        )


if __name__ == "__main__":
    main()
