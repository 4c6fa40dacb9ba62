"""classify's over-clustering: the merge of clusters, its options, and classes files written before it."""

import h5py
import numpy as np
import pytest
from helpers import cli
from PIL import Image
from planted import planted_images, write_planted_store

from stages.classify import ClassStore, classify
from stages.conceptualize import conceptualize
from stages.overcluster import merge_clusters


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def concepts(tmp_path_factory):
    d = tmp_path_factory.mktemp("oc")
    toks, labels, _ = planted_images(n_images=24, seed=5)
    feats = write_planted_store(d / "feats.h5", toks, labels)
    return conceptualize(feats, str(d / "c.h5"), method="kmeans", k=5).path


def test_merge_joins_lookalikes_that_never_meet_and_keeps_apart_those_that_do():
    """Four clusters: a class seen in two conditions (A1 in images 0-9, A2 in 10-19, never together) and two
    classes B, C present in every image. B and C look more alike than A1 and A2; by similarity alone they
    would merge, with the exclusivity A1 and A2 merge."""
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(3, 16)))
    a1, a2 = _unit(base[0] + 0.5 * rng.normal(size=16) / 4), _unit(base[0] + 0.5 * rng.normal(size=16) / 4)
    b = _unit(base[2] + 0.1 * rng.normal(size=16))
    c = _unit(base[2] + 0.1 * rng.normal(size=16))
    cos = lambda u, v: float(u @ v)  # noqa: E731
    assert cos(b, c) > cos(a1, a2)
    feats, image_of, assign = [], [], []
    for img in range(20):
        for cl, f in ((0 if img < 10 else 1, a1 if img < 10 else a2), (2, b), (3, c)):
            feats.append(f)
            image_of.append(img)
            assign.append(cl)
    feats, w = np.array(feats), np.ones(len(feats))
    plain = merge_clusters(feats, w, np.array(image_of), np.array(assign), 4, 3, exclusivity=0.0)
    assert plain[2] == plain[3] and len(set(plain.tolist())) == 3
    lut = merge_clusters(feats, w, np.array(image_of), np.array(assign), 4, 3, exclusivity=0.5)
    assert lut.tolist() == [0, 0, 1, 2]  # numbered by the smallest cluster each group holds
    # nothing to merge: the identity
    assert merge_clusters(feats, w, np.array(image_of), np.array(assign), 4, 4, 0.5).tolist() == [0, 1, 2, 3]


def test_classes_files_without_cluster_classes_still_apply(concepts, tmp_path):
    """A classes.h5 from before over-clustering (one centroid per class, no cluster_class) applies as before."""
    old = tmp_path / "old"
    res = classify(concepts, str(old), n_classes=5, over_cluster=1)
    with h5py.File(res.classes_file, "r") as f:
        assert len(f["centroids"]) == 5
        lut = f["cluster_class"][:]
    assert lut.tolist() == [0, 1, 2, 3, 4]
    legacy = tmp_path / "legacy.h5"
    with h5py.File(res.classes_file, "r") as src, h5py.File(legacy, "w") as dst:
        for k, val in src.attrs.items():
            dst.attrs[k] = val
        for k in src:
            if k != "cluster_class":
                src.copy(k, dst)
    with ClassStore(legacy) as cs:
        assert cs.cluster_class.tolist() == [0, 1, 2, 3, 4]
    a = classify(concepts, str(tmp_path / "a"), centroids=str(legacy))
    for p in old.glob("*.png"):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "a" / p.name)))
    assert a.n_classes == 5
    # over-cluster and exclusivity values are checked like every option
    r = cli(["classify", concepts, "-K", "5", "-o", tmp_path / "x", "--over-cluster", "0"])
    assert r.exit_code == 2 and "--over-cluster" in r.stderr
    r = cli(["classify", concepts, "-K", "5", "-o", tmp_path / "x", "--exclusivity", "-1"])
    assert r.exit_code == 2 and "--exclusivity" in r.stderr
    assert not (tmp_path / "x").exists()
