"""classify --crf: dense-CRF refinement (optional package pydensecrf2; the tests that run it skip without it)."""

import json
import sys

import h5py
import numpy as np
import pytest
from helpers import TEST_BACKBONE, cli
from PIL import Image
from planted import planted_images, write_planted_store

from stages.crf import CRFParams, refine
from stages.render import upsample_labels

try:
    import pydensecrf.densecrf  # noqa: F401

    HAVE_CRF = True
except ImportError:
    HAVE_CRF = False
needs_crf = pytest.mark.skipif(not HAVE_CRF, reason="pydensecrf2 (the optional --crf package) is not installed")


def two_colour_photo(h=64, w=96, edge=40, seed=0):
    rng = np.random.default_rng(seed)
    photo = np.zeros((h, w, 3), np.float32)
    photo[:, :edge] = (200, 40, 40)
    photo[:, edge:] = (40, 40, 200)
    return np.clip(photo + rng.normal(scale=4, size=photo.shape), 0, 255).astype(np.uint8)


@needs_crf
def test_crf_moves_a_patch_boundary_onto_the_photo_edge():
    # patches of 16 px: the label edge lies at x = 48, the colour edge at x = 40
    pmap = np.repeat([[3, 3, 3, 7, 7, 7]], 4, axis=0)
    photo = two_colour_photo()
    truth = np.where(np.arange(96) < 40, 3, 7)[None].repeat(64, 0)
    plain = upsample_labels(pmap, (64, 96))
    refined = refine(photo, pmap)
    assert refined.shape == (64, 96) and set(np.unique(refined)) <= {3, 7}
    wrong_plain, wrong_crf = int((plain != truth).sum()), int((refined != truth).sum())
    assert wrong_plain == 8 * 64
    assert wrong_crf < wrong_plain / 4, (wrong_plain, wrong_crf)


@needs_crf
def test_crf_without_iterations_is_the_bilinear_map():
    rng = np.random.default_rng(1)
    pmap = rng.integers(0, 4, size=(6, 8))
    photo = rng.integers(0, 255, size=(90, 120, 3)).astype(np.uint8)
    same = refine(photo, pmap, CRFParams(iterations=0)) == upsample_labels(pmap, (90, 120))
    assert same.mean() > 0.999
    assert (refine(photo, np.full((6, 8), 5), CRFParams()) == 5).all()


@needs_crf
def test_classify_crf_writes_refined_maps_at_the_photo_size(images, tmp_path):
    feats = tmp_path / "f.h5"
    assert cli(["extract", images, "-o", feats, *TEST_BACKBONE]).exit_code == 0
    r = cli(["conceptualize", feats, "--method", "kmeans", "-k", "3", "-q"])
    assert r.exit_code == 0, r.stderr
    conc = r.stdout.strip()
    r = cli(["classify", conc, "-K", "2", "-o", tmp_path / "crf", "--crf", "--crf-iterations", "5", "-q"])
    assert r.exit_code == 0, r.stderr
    r0 = cli(["classify", conc, "-K", "2", "-o", tmp_path / "plain", "-q"])
    assert r0.exit_code == 0, r0.stderr
    pngs = sorted((tmp_path / "crf").glob("*.png"))
    assert len(pngs) == 6
    differ = 0
    for p in pngs:
        assert Image.open(p).size == Image.open(images / p.name).size
        differ += int((np.asarray(Image.open(p)) != np.asarray(Image.open(tmp_path / "plain" / p.name))).sum())
    assert differ > 0  # the CRF did something
    with h5py.File(tmp_path / "crf" / "classes.h5") as f:
        assert json.loads(f.attrs["params"])["crf"]["iterations"] == 5


@pytest.fixture
def planted_store(tmp_path):
    toks, labels, _ = planted_images(n_images=6, seed=2)
    return write_planted_store(tmp_path / "feats.h5", toks, labels)


def test_crf_without_the_package_says_how_to_get_it(planted_store, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    conc = tmp_path / "c.h5"
    assert cli(["conceptualize", planted_store, "--method", "kmeans", "-k", "3", "-o", conc, "-q"]).exit_code == 0
    r = cli(["classify", conc, "-K", "2", "-o", tmp_path / "out", "--crf"])
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and "pip install 'pydensecrf2==1.1'" in r.stderr
    assert not (tmp_path / "out").exists()


def test_crf_needs_the_original_photos(planted_store, tmp_path, monkeypatch):
    import stages.classify

    monkeypatch.setattr(stages.classify, "require_crf", lambda: None)  # runs with or without the package
    conc = tmp_path / "c.h5"
    assert cli(["conceptualize", planted_store, "--method", "kmeans", "-k", "3", "-o", conc, "-q"]).exit_code == 0
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier results")
    r = cli(["classify", conc, "-K", "2", "-o", tmp_path / "out", "--crf", "--overwrite"])
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and "original photos" in r.stderr and "6 of 6" in r.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier results"
    r = cli(["classify", conc, "-K", "2", "-o", tmp_path / "o2", "--crf-iterations", "-1"])
    assert r.exit_code == 2 and "--crf-iterations" in r.stderr


@needs_crf
def test_crf_on_probabilities_without_iterations_is_their_bilinear_argmax():
    import torch

    from stages.crf import refine_probs
    from stages.render import upsample_argmax

    rng = np.random.default_rng(2)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(3, 6, 8)).astype(np.float32)), 0)
    photo = rng.integers(0, 255, size=(90, 120, 3)).astype(np.uint8)
    same = refine_probs(photo, probs, CRFParams(iterations=0)) == upsample_argmax(probs, (90, 120))
    assert same.mean() > 0.999


@needs_crf
def test_refine_crf_writes_maps_at_the_photo_size(images, tmp_path):
    feats = tmp_path / "f.h5"
    assert cli(["extract", images, "-o", feats, *TEST_BACKBONE]).exit_code == 0
    conc = cli(["conceptualize", feats, "--method", "kmeans", "-k", "3", "-q"]).stdout.strip()
    labels = cli(["classify", conc, "-K", "2", "-o", tmp_path / "labels", "-q"]).stdout.strip()
    common = ["refine", labels, "-f", feats, "--steps", "20", "-q"]
    r = cli([*common, "-o", tmp_path / "crf", "--crf", "--crf-iterations", "5"])
    assert r.exit_code == 0, r.stderr
    assert cli([*common, "-o", tmp_path / "plain"]).exit_code == 0
    pngs = sorted((tmp_path / "crf").glob("*.png"))
    assert len(pngs) == 6
    differ = 0
    for p in pngs:
        assert Image.open(p).size == Image.open(images / p.name).size
        differ += int((np.asarray(Image.open(p)) != np.asarray(Image.open(tmp_path / "plain" / p.name))).sum())
    assert differ > 0  # the CRF did something
    with h5py.File(tmp_path / "crf" / "refined.h5") as f:
        assert json.loads(f.attrs["params"])["crf"]["iterations"] == 5


def test_refine_crf_needs_the_original_photos(planted_store, tmp_path, monkeypatch):
    import stages.refine

    monkeypatch.setattr(stages.refine, "require_crf", lambda: None)  # runs with or without the package
    conc = tmp_path / "c.h5"
    assert cli(["conceptualize", planted_store, "--method", "kmeans", "-k", "3", "-o", conc, "-q"]).exit_code == 0
    assert cli(["classify", conc, "-K", "2", "-o", tmp_path / "labels", "-q"]).exit_code == 0
    r = cli(["refine", tmp_path / "labels", "-f", planted_store, "-o", tmp_path / "out", "--crf"])
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and "original photos" in r.stderr and "6 of 6" in r.stderr
    assert not (tmp_path / "out").exists()
    r = cli(["refine", tmp_path / "labels", "-f", planted_store, "-o", tmp_path / "o2", "--crf-iterations", "-1"])
    assert r.exit_code == 2 and "--crf-iterations" in r.stderr
