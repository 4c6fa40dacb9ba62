"""Fixtures; the helpers tests import are in ``helpers``. Tests that start processes, run a whole pipeline or
kill a run are marked ``slow``: ``pytest -m "not slow"`` is the quick loop."""

from pathlib import Path

import pytest
from helpers import make_images


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.delenv("ACSEG_DEBUG", raising=False)


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    make_images(d)
    return d


@pytest.fixture(scope="session")
def valid(tmp_path_factory):
    """Small valid artifacts of every kind (planted features, a 2-step ACG, concepts, classes): the hostile
    corpora derive their broken inputs from these."""
    from planted import planted_images, write_planted_store

    from stages.classify import classify
    from stages.conceptualize import conceptualize
    from stages.config import ACGConfig, TrainConfig
    from stages.fit import fit_acg

    d = tmp_path_factory.mktemp("valid")
    toks, labels, _ = planted_images(n_images=12, seed=1)
    feats = write_planted_store(d / "feats.h5", toks, labels)
    acg = fit_acg(feats, d / "acg.pt", acg=ACGConfig(depth=1), train=TrainConfig(steps=2, batch_size=4)).path
    concepts = conceptualize(feats, str(d / "concepts.h5"), acg=acg).path
    classes = classify(concepts, str(d / "classes"), n_classes=3).classes_file
    return {"features": Path(feats), "acg": Path(acg), "concepts": Path(concepts), "classes": Path(classes), "dir": d}
