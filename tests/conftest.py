import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ACSEG_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.delenv("ACSEG_DEBUG", raising=False)


import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def make_images(folder: Path, n: int = 6, size=(80, 96), seed: int = 0) -> list[Path]:
    """Small random photos (some sizes differ, so batches group by grid)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = size if i % 3 else (size[1], size[0])
        a = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(a).save(p)
        out.append(p)
    return out


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

    from stages.acg import ACGConfig
    from stages.classify import classify
    from stages.conceptualize import conceptualize
    from stages.fit import TrainConfig, fit_acg

    d = tmp_path_factory.mktemp("valid")
    toks, labels, _ = planted_images(n_images=12, seed=1)
    feats = write_planted_store(d / "feats.h5", toks, labels)
    acg = fit_acg(feats, d / "acg.pt", acg=ACGConfig(depth=1), train=TrainConfig(steps=2, batch_size=4)).path
    concepts = conceptualize(feats, str(d / "concepts.h5"), acg=acg).path
    classes = classify(concepts, str(d / "classes"), n_classes=3).classes_file
    return {"features": Path(feats), "acg": Path(acg), "concepts": Path(concepts), "classes": Path(classes), "dir": d}


TEST_BACKBONE = ["--backbone", "test-vit", "--random-weights", "-q"]


def cli(args, input=None):
    from typer.testing import CliRunner

    from acseg_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env
