"""Over-clustering and merging for classify (docs/method.md, section 6).

k-means with exactly K clusters over the concepts of a dataset spends clusters on the variance that matters
least for classes: on CamVid it split the sky and the road each into two clusters by lighting (the test
sequences differ), and left cars, poles and pedestrians without a cluster. classify therefore clusters
into more clusters than classes (``over_cluster`` x K) and merges them, greedily, two at a time, until K
remain. The pair merged next is the one with the highest

    cos(centroid_a, centroid_b) - exclusivity * cooccurrence(a, b)

where the centroids are the pixel-weighted means of the merged groups' concepts, and the co-occurrence is
the share of images holding both groups among those holding the rarer one. Two clusters that never meet in
one image but look alike (the sunny and the overcast sky) are likely one class seen in two conditions; two
clusters that meet in most images (the road and the pavement) are likely two things, since the ACG already
puts one thing of an image into one concept.
"""

from __future__ import annotations

import numpy as np


def merge_clusters(
    feats: np.ndarray,
    weights: np.ndarray,
    image_of: np.ndarray,
    assign: np.ndarray,
    n_clusters: int,
    n_classes: int,
    exclusivity: float,
) -> np.ndarray:
    """Merge ``n_clusters`` clusters of points into ``n_classes`` groups.

    feats (n, d) points (unit rows), weights (n,) their weights, image_of (n,) the image each belongs to,
    assign (n,) their cluster in 0..n_clusters-1. Returns (n_clusters,) the group of each cluster,
    0..n_classes-1, numbered by the smallest cluster id each group holds. Deterministic: ties go to the
    lowest pair of group ids."""
    n_clusters, n_classes = int(n_clusters), int(n_classes)
    if n_classes >= n_clusters:
        return np.arange(n_clusters, dtype=np.int64)
    w = np.asarray(weights, np.float64)
    sums = np.zeros((n_clusters, feats.shape[1]), np.float64)
    np.add.at(sums, assign, np.asarray(feats, np.float64) * w[:, None])
    _, img = np.unique(image_of, return_inverse=True)
    present = np.zeros((img.max(initial=-1) + 1, n_clusters), bool)
    present[img, assign] = True
    members = [[a] for a in range(n_clusters)]
    while len(members) > n_classes:
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        cen = sums / np.maximum(norms, 1e-12)
        p = present.astype(np.float64)
        both = p.T @ p
        count = p.sum(0)
        cooc = both / np.maximum(np.minimum(count[:, None], count[None, :]), 1.0)
        score = cen @ cen.T - exclusivity * cooc
        score[np.tril_indices(len(members))] = -np.inf
        a, b = np.unravel_index(int(np.argmax(score)), score.shape)  # a < b
        members[a] += members[b]
        sums[a] += sums[b]
        present[:, a] |= present[:, b]
        del members[b]
        sums = np.delete(sums, b, axis=0)
        present = np.delete(present, b, axis=1)
    order = sorted(range(len(members)), key=lambda g: min(members[g]))
    lut = np.empty(n_clusters, np.int64)
    for new, g in enumerate(order):
        lut[members[g]] = new
    return lut
