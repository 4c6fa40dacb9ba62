"""classify --cluster spectral: the concepts' neighbour graph, its spectral embedding, and the stage option."""

import json

import h5py
import numpy as np
import pytest
from helpers import cli
from PIL import Image
from planted import planted_images, write_planted_store

import stages.spectral as spectral
from stages.classify import classify
from stages.conceptualize import conceptualize
from stages.errors import UsageError
from stages.kmeans import kmeans
from stages.score import score


def _chains(n_per=200, seed=0):
    """Two parallel arcs on the unit sphere in 16-D, each 2 radians long and 0.15 apart: neighbours along an
    arc are closer than across, but the arcs are much longer than their distance."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(16, 3)))
    t = np.sort(rng.uniform(-1, 1, n_per))
    pts, lab = [], []
    for c, off in enumerate((-0.075, 0.075)):
        p = np.cos(t)[:, None] * q[:, 0] + np.sin(t)[:, None] * q[:, 1] + off * q[:, 2]
        pts.append(p + 0.002 * rng.normal(size=p.shape))
        lab += [c] * n_per
    x = np.concatenate(pts)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.array(lab)


def _agree(a, b):
    """Share of rows whose cluster matches, under the best one-to-one matching of two 2-clusterings."""
    same = (a == b).mean()
    return max(same, 1 - same)


def test_spectral_clusters_follow_the_graph_where_kmeans_cuts_across():
    x, truth = _chains()
    _, km, _ = kmeans(x, 2, n_init=10, seed=0)
    assert _agree(km, truth) < 0.75  # k-means halves the arcs along their length
    cents, lab = spectral.spectral_clusters(x, 2, neighbours=(5, 10), seed=0)
    assert _agree(lab, truth) == 1.0
    # the centroids are each cluster's mean (weighted: a weight on one row pulls its cluster's centroid)
    for c in range(2):
        assert np.allclose(cents[c], x[lab == c].mean(0), atol=1e-6)
    w = np.ones(len(x))
    w[0] = 50.0
    heavy, lab2 = spectral.spectral_clusters(x, 2, neighbours=(5, 10), seed=0, weights=w)
    assert np.array_equal(lab2, lab)
    c0 = lab[0]
    assert np.allclose(heavy[c0], (x[lab == c0] * w[lab == c0, None]).sum(0) / w[lab == c0].sum(), atol=1e-6)
    assert not np.allclose(heavy[c0], cents[c0], atol=1e-3)
    # deterministic for a seed
    again, lab3 = spectral.spectral_clusters(x, 2, neighbours=(5, 10), seed=0)
    assert np.array_equal(lab3, lab) and np.array_equal(again, cents)
    # as many clusters as rows: each its own
    few = x[:3]
    c, lab = spectral.spectral_clusters(few, 5)
    assert np.array_equal(c, few) and lab.tolist() == [0, 1, 2]


def _purity(lab, truth):
    """Share of rows in their cluster's majority arc."""
    return sum(np.bincount(truth[lab == c]).max() for c in np.unique(lab)) / len(lab)


def test_many_concepts_are_clustered_on_a_sample_and_labelled_by_nearest_centroid(monkeypatch):
    """Over-clustered (8 clusters on the two arcs, as classify over-clusters), each cluster is a piece of one
    arc, so a concept's nearest centroid is mostly its own arc's, also for the concepts outside the sample.
    (Not all: a centroid sums a curved piece up by its mean, 0.92-1.0 pure here with or without a sample.)"""
    x, truth = _chains(n_per=400)
    _, km, _ = kmeans(x, 8, n_init=10, seed=0)
    assert _purity(km, truth) < 0.8  # k-means' pieces straddle the arcs
    cents, lab = spectral.spectral_clusters(x, 8, neighbours=(5, 10), seed=0, max_points=300)
    assert cents.shape == (8, x.shape[1])
    assert _purity(lab, truth) >= 0.9
    d = ((x[:, None, :] - cents[None]) ** 2).sum(-1)
    assert np.array_equal(lab, d.argmin(1))
    # the sample is drawn with the seed: another seed, another sample, other centroids
    other, _ = spectral.spectral_clusters(x, 8, neighbours=(5, 10), seed=1, max_points=300)
    assert not np.allclose(np.sort(other, 0), np.sort(cents, 0))
    again, lab2 = spectral.spectral_clusters(x, 8, neighbours=(5, 10), seed=0, max_points=300)
    assert np.array_equal(again, cents) and np.array_equal(lab2, lab)
    # the sample holds max_points rows even when that is above the module's default (no second sampling)
    monkeypatch.setattr(spectral, "MAX_POINTS", 100)
    again, lab2 = spectral.spectral_clusters(x, 8, neighbours=(5, 10), seed=0, max_points=300)
    assert np.array_equal(again, cents) and np.array_equal(lab2, lab)


def test_the_graph_is_scikit_learns_symmetric_knn_graph_averaged_over_counts(monkeypatch):
    neighbors = pytest.importorskip("sklearn.neighbors")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 24)).astype(np.float32)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    monkeypatch.setattr(spectral, "_CHUNK_ELEMENTS", 300 * 7)  # several chunks, the last one short
    g = spectral.knn_graph(x, (3, 8))
    ref = [neighbors.kneighbors_graph(unit, n, include_self=True) for n in (3, 8)]
    ref = sum(0.5 * (r + r.T) for r in ref) / 2
    assert abs(g - ref).max() < 1e-12
    assert abs(g - g.T).max() == 0
    # each point is its own first neighbour even among exact duplicates (ties)
    dup = spectral.knn_graph(np.repeat(x[:20], 4, axis=0), (2, 3))
    assert np.allclose(dup.diagonal(), 1.0)
    # more neighbours than points: every point links to all
    full = spectral.knn_graph(x[:4], (10,))
    assert np.allclose(full.toarray(), 1.0)


def test_dense_and_iterative_embeddings_span_the_same_space_on_a_graph_of_several_parts(monkeypatch):
    """Four separate groups: the Laplacian's eigenvalue 0 four times over (the case ARPACK missed)."""
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(4, 32)) * 10
    x = (centres[rng.integers(0, 4, 800)] + rng.normal(size=(800, 32))).astype(np.float32)
    g = spectral.knn_graph(x, (5, 10))
    dense = spectral.spectral_embedding(g, 6, seed=0)
    monkeypatch.setattr(spectral, "DENSE_MAX", 0)
    iterative = spectral.spectral_embedding(g, 6, seed=0)
    a, _ = np.linalg.qr(dense)
    b, _ = np.linalg.qr(iterative)
    assert np.linalg.svd(a.T @ b)[1].min() > 0.999
    # the first four directions mix the parts' indicators (the normalised Laplacian's null vectors are
    # sqrt(degree) on a part, and the embedding divides them by it): constant within each part
    first = dense[:, :4]
    _, part = np.unique(np.round(first, 6), axis=0, return_inverse=True)
    assert len(np.unique(part)) == 4


def test_neighbour_counts_are_parsed_and_checked():
    assert spectral.parse_neighbours("20,5, 10") == (5, 10, 20)
    assert spectral.parse_neighbours("10,10") == (10,)
    assert spectral.parse_neighbours((5, 10)) == (5, 10)
    for bad in ("", "5,,10", "5,x", "1", "5,2000", "-3", "5.5"):
        with pytest.raises(UsageError, match="--neighbours"):
            spectral.parse_neighbours(bad)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("spectral")
    toks, labels, classes = planted_images(n_images=24, seed=5)
    feats = write_planted_store(d / "feats.h5", toks, labels)
    c = conceptualize(feats, str(d / "c.h5"), method="kmeans", k=5).path
    gt = d / "gt"
    gt.mkdir()
    for i, (lab, cls) in enumerate(zip(labels, classes)):
        im = Image.fromarray(cls[lab].astype(np.uint8))
        im.resize((lab.shape[1] * 16, lab.shape[0] * 16), Image.NEAREST).save(gt / f"img_{i:03d}.png")
    return c, gt


def test_classify_cluster_spectral_recovers_planted_classes_and_applies_as_fitted(planted, tmp_path):
    c, gt = planted
    out = tmp_path / "s"
    r = cli(["classify", c, "-o", out, "-K", "5", "--cluster", "spectral", "--neighbours", "4,8", "-q"])
    assert r.exit_code == 0, r.stderr
    assert score(str(out), str(gt))["miou"] >= 0.9
    with h5py.File(out / "classes.h5") as f:
        params = json.loads(f.attrs["params"])
    assert params["cluster"] == "spectral" and params["neighbours"] == [4, 8]
    # other neighbour counts give another fit: the option reaches the graph
    other = classify(c, str(tmp_path / "o"), n_classes=5, cluster="spectral", neighbours="3")
    with h5py.File(other.classes_file) as f, h5py.File(out / "classes.h5") as g:
        assert f["centroids"].shape != g["centroids"].shape or not np.allclose(f["centroids"][:], g["centroids"][:])
    # applying the fitted centroids to the same concepts reproduces the fit's label maps
    applied = classify(c, str(tmp_path / "a"), centroids=str(out / "classes.h5"))
    for p in sorted(out.glob("*.png")):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "a" / p.name)))
    with h5py.File(applied.classes_file) as f:
        params = json.loads(f.attrs["params"])
    assert params["cluster"] is None and params["neighbours"] is None  # applied, not clustered
    # k-means, the default before, stays one option away and says so in its params
    r = cli(["classify", c, "-o", tmp_path / "k", "-K", "5", "--cluster", "kmeans", "-q"])
    assert r.exit_code == 0, r.stderr
    assert score(str(tmp_path / "k"), str(gt))["miou"] >= 0.9
    with h5py.File(tmp_path / "k" / "classes.h5") as f:
        params = json.loads(f.attrs["params"])
    assert params["cluster"] == "kmeans" and params["neighbours"] is None
    # identical concepts (ties everywhere in the graph) still give clusters for every class
    cents, lab = spectral.spectral_clusters(np.ones((50, 8), np.float32), 10, seed=0)
    assert 1 <= len(cents) <= 10 and np.allclose(cents, 1.0)
    assert lab.shape == (50,) and set(lab.tolist()) == set(range(len(cents)))


@pytest.mark.parametrize(
    "args", [["--cluster", "graph"], ["--cluster", "spectral", "--neighbours", "1"], ["--neighbours", "5;10"]]
)
def test_bad_cluster_options_are_usage_errors_before_any_output(planted, tmp_path, args):
    c, _ = planted
    out = tmp_path / "x"
    r = cli(["classify", c, "-o", out, "-K", "5", *args])
    assert r.exit_code == 2, r.stdout
    assert ("--cluster" in r.stderr) or ("--neighbours" in r.stderr)
    assert not out.exists()
