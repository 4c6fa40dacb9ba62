"""Spectral clustering of the concepts in place of classify's k-means (issue 27: "clustering the concepts on
their own affinity graph"), an experiment, not a stage option yet.

classify over-clusters the dataset's concepts (token means) into over_cluster x K clusters by weighted k-means,
then merges them into K classes. Here that k-means is replaced, through the classify module's ``kmeans``
attribute, by scikit-learn's SpectralClustering on the concepts' symmetric k-nearest-neighbour graph (cosine,
``--neighbours``; several counts, e.g. 5,10,20: the mean of their graphs), each cluster's centroid being its
pixel-weighted mean; the merge, the label maps and refine are the stages' own, every default. Needs
scikit-learn (a test extra); its kNN search is exact: fine for a few thousand concepts.

Usage (pass the same store and features twice for a transductive set such as the horses):
  python benchmarks/spectral.py --train-features T.h5 --train C_T.h5 --test-features V.h5 --test C_V.h5 \
      --gt GT_DIR -K 11 --ignore 11 [--neighbours 10 | 5,10,20] [--seeds 3] --out DIR
Prints one JSON line per seed: mIoU of classify and of classify + refine, on all / even / odd test images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refine import halves, miou  # noqa: E402  (benchmarks/, the script's own folder)

import stages.classify as classify_module  # noqa: E402
from stages.classify import classify  # noqa: E402
from stages.refine import refine  # noqa: E402


def spectral_kmeans(neighbours: list[int]):
    from sklearn.cluster import SpectralClustering
    from sklearn.neighbors import kneighbors_graph

    def fit(x, k, *, n_init=10, seed=0, weights=None, **_):
        x = np.asarray(x, np.float32)
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        # the symmetric kNN graph (each edge 0.5 or 1, as scikit-learn's own), averaged over the counts given
        graphs = [kneighbors_graph(unit, min(n, len(x) - 1), include_self=True) for n in neighbours]
        affinity = sum(0.5 * (g + g.T) for g in graphs) / len(graphs)
        sc = SpectralClustering(
            n_clusters=k, affinity="precomputed", random_state=seed, assign_labels="kmeans", n_init=n_init
        )
        lab = sc.fit_predict(affinity)
        w = np.ones(len(x)) if weights is None else np.asarray(weights, np.float64)
        cents = np.stack([(x[lab == c] * w[lab == c, None]).sum(0) / w[lab == c].sum() for c in range(k)])
        return cents.astype(np.float32), lab, 0.0

    return fit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-features", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--test-features", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--gt", required=True)
    ap.add_argument("-K", type=int, required=True)
    ap.add_argument("--ignore", type=int, action="append", default=[])
    ap.add_argument("--neighbours", default="10", help="neighbours of the kNN graph; several (5,10,20): their mean")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out, gt = Path(a.out), Path(a.gt)
    out.mkdir(parents=True, exist_ok=True)
    hv = halves(gt, out)
    transductive = Path(a.train).resolve() == Path(a.test).resolve()
    neighbours = [int(n) for n in a.neighbours.split(",")]
    classify_module.kmeans = spectral_kmeans(neighbours)
    for s in range(a.seeds):
        fit = classify(a.train, str(out / f"fit_s{s}"), n_classes=a.K, seed=s, overwrite=True)
        test = fit.path
        if not transductive:
            test = classify(a.test, str(out / f"classify_s{s}"), centroids=fit.classes_file, overwrite=True).path
        r = refine(fit.path, a.train_features, str(out / f"refine_fit_s{s}"), overwrite=True)
        if not transductive:
            r = refine(test, a.test_features, str(out / f"refine_s{s}"), head=r.head_file, overwrite=True)
        row = {"seed": s, "neighbours": neighbours, "classify": miou(Path(test), gt, hv, a.ignore)}
        row["refine"] = miou(Path(r.path), gt, hv, a.ignore)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
