"""Spectral clustering of a dataset's concepts, for classify's over-clustering (``--cluster spectral``;
docs/method.md, section 6).

k-means places its clusters where the concept features are dense. Spectral clustering instead cuts the
concepts' k-nearest-neighbour graph where it is thin: each concept is linked to its nearest concepts by cosine
similarity, the graph's normalised Laplacian gives every concept a point in a low-dimensional embedding, and
k-means groups those points. One neighbour count makes a graph that is either too sparse (5 neighbours splits
one class into pieces) or too dense (20 joins classes); which count is best differs by dataset and by fit, so
the graph used is the mean of the graphs of several counts (5, 10 and 20 by default), as in a consensus.

Each cluster is then summed up by the pixel-weighted mean of its concepts' features: a centroid, like
k-means', so the merge, the label maps and ``classify --centroids`` on new concepts work unchanged (a concept
takes its nearest centroid's class).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from . import validate as v
from .errors import UsageError
from .kmeans import kmeans, nearest

NEIGHBOURS = (5, 10, 20)
# up to this many concepts the embedding comes from a dense eigen-solver (exact), beyond from LOBPCG on the
# sparse Laplacian: they cost the same here at 1,500 (0.5 s); at 3,000 dense takes 3.3 s, LOBPCG 1.0 s
DENSE_MAX = 1500
_CHUNK_ELEMENTS = 1 << 24  # similarities computed at once while searching neighbours (64 MB)
# beyond this many concepts the clusters are found on a random sample of them: the neighbour search grows with
# the square of the count (50,000 concepts: 23 s on 2 cores, against 3.4 s for k-means; 590,000, COCO's train
# set at 5 concepts an image, would take about 50 minutes by that square, not timed), and the clusters are only
# summed up by their centroids, which a sample of 50,000 pins down; every concept then takes its nearest
# centroid, as always
MAX_POINTS = 50_000


def parse_neighbours(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"5,10,20"`` (or a sequence) -> (5, 10, 20), sorted, each once; a usage error for anything but
    whole numbers 2..1000."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    if not items or items == [""]:
        raise UsageError("--neighbours is empty", "pass neighbour counts separated by commas, e.g. 5,10,20")
    out = set()
    for item in items:
        if isinstance(item, str) and not item.isdigit():
            raise UsageError(
                f"--neighbours {text!r} is not a list of whole numbers",
                "pass neighbour counts separated by commas, e.g. 5,10,20",
            )
        out.add(v.integer("--neighbours", item, min=2, max=1000, hint="pass counts of 2..1000, e.g. 5,10,20"))
    return tuple(sorted(out))


def knn_graph(x: np.ndarray, neighbours: Sequence[int]) -> sp.csr_matrix:
    """The symmetric k-nearest-neighbour graph of the rows of ``x`` by cosine similarity, averaged over the
    neighbour counts given: (n, n), sparse.

    Each point counts itself as its first neighbour (it is dropped again from the Laplacian); an edge found
    from one end weighs 0.5, from both ends 1, in each count's graph."""
    x = torch.as_tensor(np.asarray(x, np.float32))
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = x.shape[0]
    kmax = min(max(neighbours), n)
    idx = torch.empty((n, kmax), dtype=torch.int64)
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for a in range(0, n, step):
        b = min(n, a + step)
        sim = x[a:b] @ x.T
        sim[torch.arange(b - a), torch.arange(a, b)] = np.inf  # itself first, even among duplicates
        idx[a:b] = sim.topk(kmax, dim=1).indices
    idx = idx.numpy()
    graph = sp.csr_matrix((n, n), dtype=np.float64)
    for nb in neighbours:
        nb = min(nb, n)
        g = sp.csr_matrix((np.ones(n * nb), (np.repeat(np.arange(n), nb), idx[:, :nb].ravel())), shape=(n, n))
        graph = graph + 0.5 * (g + g.T)
    return (graph / len(neighbours)).tocsr()


def spectral_embedding(graph: sp.spmatrix, dim: int, seed: int = 0) -> np.ndarray:
    """(n, dim): the eigenvectors of the ``dim`` smallest eigenvalues of the graph's normalised Laplacian,
    each row divided by the square root of its node's degree (the random-walk normalisation, as
    scikit-learn's spectral clustering). Self-loops are ignored; a node without edges keeps degree 1."""
    g = sp.csr_matrix(graph, dtype=np.float64, copy=True)
    g.setdiag(0)
    g.eliminate_zeros()
    n = g.shape[0]
    deg = np.asarray(g.sum(1)).ravel()
    dd = np.sqrt(np.where(deg > 0, deg, 1.0))
    inv = sp.diags(1.0 / dd)
    lap = sp.identity(n, format="csr") - inv @ g @ inv  # I - D^-1/2 A D^-1/2
    dim = min(dim, n)
    if n <= DENSE_MAX or n < 5 * dim:
        _, vecs = np.linalg.eigh(lap.toarray())
        vecs = vecs[:, :dim]
    else:
        import warnings

        from scipy.sparse.linalg import lobpcg

        # L's smallest eigenvectors are the largest of 2I - L (positive definite). LOBPCG iterates on a block of
        # them at once, so a graph of several components (a repeated eigenvalue 0) is solved too, where ARPACK
        # missed some of the repeated ones on such graphs
        start = np.random.default_rng(seed).standard_normal((n, dim))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not reached the requested tolerance": the block is still usable
            _, vecs = lobpcg(2 * sp.identity(n, format="csr") - lap, start, largest=True, tol=1e-6, maxiter=200)
    return vecs / dd[:, None]


def spectral_clusters(
    x: np.ndarray,
    k: int,
    *,
    neighbours: Sequence[int] = NEIGHBOURS,
    n_init: int = 10,
    seed: int = 0,
    weights: np.ndarray | None = None,
    max_points: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Spectral clustering of the rows of ``x`` into ``k`` clusters. Returns their centroids (k', d), the
    weighted mean of each non-empty cluster's rows (k' <= k; fewer only when the embedding's k-means leaves a
    cluster empty), and each row's cluster (n,) in 0..k'-1. ``weights``: positive (classify's pixel counts).
    Deterministic for a given seed.

    More rows than ``max_points`` (default ``MAX_POINTS``): the clusters are found on a random sample of that
    many rows (drawn with ``seed``), and every row's cluster is its nearest centroid."""
    x = np.asarray(x, np.float32)
    n = len(x)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    cap = MAX_POINTS if max_points is None else max_points
    if n > cap:
        pick = np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))
        cents, _ = spectral_clusters(
            x[pick], k, neighbours=neighbours, n_init=n_init, seed=seed, weights=w[pick], max_points=cap
        )
        return cents, nearest(x, cents)
    if k >= n:
        return x.copy(), np.arange(n)
    emb = spectral_embedding(knn_graph(x, neighbours), k, seed)
    # greedy k-means++ seeding (2 + log k draws per centroid, scikit-learn's): with plain k-means++ 10 restarts
    # ended 1-17% above the best inertia in 7 of 10 CamVid fits (seeds 0-4, two ACGs), with greedy in none by
    # more than 0.7%, at the same cost (0.05 s)
    _, lab, _ = kmeans(emb.astype(np.float32), k, n_init=n_init, seed=seed, trials=2 + int(np.log(k)))
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, lab, x * w[:, None])
    mass = np.bincount(lab, weights=w, minlength=k)
    keep = np.bincount(lab, minlength=k) > 0
    cents = sums[keep] / mass[keep, None]
    renumber = np.cumsum(keep) - 1
    return cents.astype(np.float32), renumber[lab]
