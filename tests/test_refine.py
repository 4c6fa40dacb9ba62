"""classify's over-clustering merge and the refine stage: planted data, fit against apply, refused inputs."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from helpers import ROOT, cli, cli_env
from PIL import Image
from planted import planted_images, write_planted_photos, write_planted_store
from test_hostile import one_error_line

from stages.classify import classify
from stages.conceptualize import conceptualize
from stages.refine import (
    HEAD_FILE,
    LEGACY_HEAD_FORMAT,
    REFINED_FILE,
    HeadConfig,
    _gradients,
    create_head,
    fit_head,
    load_head,
    unit,
)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_head_recovers_planted_classes_from_noisy_labels():
    rng = np.random.default_rng(1)
    centers = _unit(rng.normal(size=(4, 32))) * 5  # 7 noise stds apart: the classes separable
    true = rng.integers(0, 4, 6000)
    x = (centers[true] + rng.normal(size=(6000, 32))).astype(np.float32)
    noisy = np.where(rng.random(6000) < 0.3, rng.integers(0, 4, 6000), true)
    assert (noisy == true).mean() < 0.8
    tokens = unit(x.copy())
    assert np.allclose(np.linalg.norm(tokens, axis=1), 1.0, atol=1e-6)
    rng_state = np.random.get_state()[1].copy()
    for kind in ("linear", "mlp"):
        net = fit_head(tokens, noisy, 4, HeadConfig(kind=kind, hidden=64, steps=150, batch_size=512, lr=1e-2))
        assert (net.logits(tokens).argmax(1) == true).mean() > 0.97, kind
    assert np.array_equal(np.random.get_state()[1], rng_state)  # a stage leaves the process's RNG alone


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_gradients_are_torch_autograd(kind):
    """The head's hand-written backward pass against torch's autograd on the same weights and batch."""
    rng = np.random.default_rng(2)
    x = unit(rng.normal(size=(64, 12)).astype(np.float32))
    y = rng.integers(0, 5, 64)
    net = create_head(HeadConfig(kind=kind, hidden=16), 12, 5, rng)
    got = _gradients(net, x, y)
    params = {k: torch.tensor(a, requires_grad=True) for k, a in net.weights.items()}
    xt = torch.from_numpy(x)
    if kind == "linear":
        z = xt @ params["weight"].T + params["bias"]
    else:
        z = torch.relu(xt @ params["0.weight"].T + params["0.bias"]) @ params["2.weight"].T + params["2.bias"]
    assert np.allclose(net.logits(x), z.detach().numpy(), atol=1e-6)
    torch.nn.functional.cross_entropy(z, torch.from_numpy(y)).backward()
    assert set(got) == set(params)
    for k, t in params.items():
        assert np.allclose(got[k], t.grad.numpy(), atol=1e-6), k


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A planted store, per-image k-means concepts, classes fitted on them."""
    d = tmp_path_factory.mktemp("refine")
    toks, labels, classes = planted_images(n_images=24, seed=5)
    photos = write_planted_photos(d / "photos", labels, classes)
    feats = write_planted_store(d / "feats.h5", toks, labels, sources=photos)
    concepts = conceptualize(feats, str(d / "c.h5"), method="kmeans", k=5).path
    out = classify(concepts, str(d / "classes"), n_classes=5, seed=0)
    return {"features": feats, "labels": out.path, "d": d, "gt": (labels, classes)}


def test_fit_and_apply_give_the_same_labels(labelled, tmp_path):
    r = cli(["refine", labelled["labels"], "-f", labelled["features"], "-o", tmp_path / "fit", "--steps", "40", "-q"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str((tmp_path / "fit").absolute())
    head = tmp_path / "fit" / HEAD_FILE
    assert head.is_file() and (tmp_path / "fit" / REFINED_FILE).is_file()
    # the labels path also comes from stdin, as from classify's stdout
    r = cli(
        ["refine", "-f", labelled["features"], "--head", head, "-o", tmp_path / "app", "-q"], input=labelled["labels"]
    )
    assert r.exit_code == 0, r.stderr
    pngs = sorted(p.name for p in (tmp_path / "fit").glob("*.png"))
    assert len(pngs) == 24 and pngs == sorted(p.name for p in (tmp_path / "app").glob("*.png"))
    for n in pngs:
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "fit" / n)), np.asarray(Image.open(tmp_path / "app" / n))
        )
    h = load_head(head)
    assert h.n_classes == 5 and h.dim == 32 and h.cfg.steps == 40
    with h5py.File(tmp_path / "app" / REFINED_FILE) as f:
        applied = json.loads(f.attrs["params"])["applied_head"]
    assert applied == {"path": str(head.absolute()), "weights_sha256": h.weights_sha256} and len(h.weights_sha256) == 64
    # the planted classes survive: refined maps agree with the ground truth up to one renaming
    labels, classes = labelled["gt"]
    with h5py.File(tmp_path / "fit" / REFINED_FILE) as f:
        params = json.loads(f.attrs["params"])
        assert params["fitted"] and params["keep"] == 0.3
    from stages.labelfolder import LabelMapStore

    with LabelMapStore(tmp_path / "fit" / REFINED_FILE) as st:
        conf = np.zeros((5, 5), int)
        for i in range(st.n_images):
            np.add.at(conf, (classes[i][labels[i]].ravel(), st.class_map(i).ravel()), 1)
    assert conf.max(1).sum() / conf.sum() > 0.9
    # a refine output can be refined again
    r = cli(["refine", tmp_path / "fit", "-f", labelled["features"], "-o", tmp_path / "again", "--steps", "5", "-q"])
    assert r.exit_code == 0, r.stderr


def test_a_head_file_of_earlier_versions_applies_as_before(labelled, tmp_path):
    """refine wrote its head as a torch file (head.pt, acseg-head-1) before: such a file still applies, with the
    labels of the same weights in today's file."""
    fit = tmp_path / "fit"
    args = ["refine", labelled["labels"], "-f", labelled["features"], "--steps", "20", "-q"]
    assert cli([*args, "-o", fit, "--head-kind", "mlp", "--hidden", "8"]).exit_code == 0
    h = load_head(fit / HEAD_FILE)
    legacy = {
        "format": LEGACY_HEAD_FORMAT,
        "config": json.dumps(h.cfg.__dict__, sort_keys=True),
        "n_classes": h.n_classes,
        "dim": h.dim,
        "provenance": json.dumps(h.provenance, sort_keys=True),
        "state_dict": {k: torch.from_numpy(a) for k, a in h.net.weights.items()},
        "weights_sha256": "0" * 64,
    }
    torch.save(legacy, tmp_path / "head.pt")
    old = load_head(tmp_path / "head.pt")
    assert old.cfg == h.cfg and old.weights_sha256 == "0" * 64
    assert all(np.array_equal(old.net.weights[k], a) for k, a in h.net.weights.items())
    for name, head in (("new", fit / HEAD_FILE), ("old", tmp_path / "head.pt")):
        assert cli([*args, "-o", tmp_path / name, "--head", head]).exit_code == 0
    for png in sorted((tmp_path / "new").glob("*.png")):
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "old" / png.name)))
    # a torch file that is not a head, and a head archive holding a pickled array: refused like any other file
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    one_error_line(cli([*args, "-o", tmp_path / "o", "--head", tmp_path / "other.pt"]))
    with np.load(fit / HEAD_FILE) as z:
        entries = {k: z[k] for k in z.files}
    entries["config"] = np.array([h.cfg.__dict__], dtype=object)  # stored as a pickle
    with open(tmp_path / "pickled.npz", "wb") as fh:
        np.savez(fh, **entries)
    msg = one_error_line(cli([*args, "-o", tmp_path / "o", "--head", tmp_path / "pickled.npz"]))
    assert "not a refine head" in msg and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_refine_runs_without_torch(labelled, tmp_path):
    """refine (fit and apply, PAMR and plain upsampling) never imports torch: its import is 2 s of the command."""
    block = (
        "import sys, runpy, importlib.abc\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('refine imported torch')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "sys.argv = ['acseg'] + sys.argv[1:]\n"
        "runpy.run_module('acseg_cli', run_name='__main__')\n"
    )
    common = [sys.executable, "-c", block, "refine", "-f", labelled["features"], "-q"]
    runs = [
        [labelled["labels"], "-o", tmp_path / "fit", "--steps", "20"],
        [labelled["labels"], "-o", tmp_path / "app", "--head", tmp_path / "fit" / HEAD_FILE],
        [labelled["labels"], "-o", tmp_path / "plain", "--steps", "20", "--pamr", "0"],
    ]
    for extra in runs:
        r = subprocess.run(
            [*map(str, common), *map(str, extra)], capture_output=True, text=True, env=cli_env(), cwd=ROOT
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == str(extra[2])


def test_bad_inputs_are_refused(labelled, tmp_path):
    d = labelled["d"]
    fit = tmp_path / "fit"
    assert (
        cli(["refine", labelled["labels"], "-f", labelled["features"], "-o", fit, "--steps", "5", "-q"]).exit_code == 0
    )
    # a bad option value: usage error before anything exists
    for opt, val in (("--keep", "1.5"), ("--steps", "0"), ("--lr", "-1"), ("--head-kind", "conv")):
        r = cli(["refine", labelled["labels"], "-f", labelled["features"], "-o", tmp_path / "bad", opt, val, "-q"])
        assert r.exit_code == 2, (opt, r.stderr)
        assert not (tmp_path / "bad").exists()
    # a head for other features (another backbone's, and another dimension's)
    toks, labels, _ = planted_images(n_images=24, seed=5)
    other = write_planted_store(d / "other.h5", toks, labels, backbone="planted-b")
    msg = one_error_line(
        cli(["refine", labelled["labels"], "-f", other, "--head", fit / HEAD_FILE, "-o", tmp_path / "o"])
    )
    assert "backbone" in msg
    toks16, labels16, _ = planted_images(n_images=24, dim=16, seed=5)
    small = write_planted_store(d / "small.h5", toks16, labels16)
    one_error_line(cli(["refine", labelled["labels"], "-f", small, "-o", tmp_path / "o"]))
    # labels of images the store does not hold
    toks8, labels8, _ = planted_images(n_images=30, seed=6)
    more = write_planted_store(d / "more.h5", toks8, labels8)
    c8 = conceptualize(more, str(d / "c8.h5"), method="kmeans", k=5).path
    cl8 = classify(c8, str(d / "classes8"), n_classes=5).path
    msg = one_error_line(cli(["refine", cl8, "-f", labelled["features"], "-o", tmp_path / "o"]))
    assert "img_024" in msg
    # a damaged head, a head of another class count
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a head")
    one_error_line(cli(["refine", labelled["labels"], "-f", labelled["features"], "--head", bad, "-o", tmp_path / "o"]))
    c3 = classify(labelled["d"] / "c.h5", str(tmp_path / "classes3"), n_classes=3).path
    msg = one_error_line(
        cli(["refine", c3, "-f", labelled["features"], "--head", fit / HEAD_FILE, "-o", tmp_path / "o"])
    )
    assert "5 classes" in msg
    assert not (tmp_path / "o").exists()
    # an existing output is kept without --overwrite; with it, only refine's own files are replaced
    before = sorted(p.name for p in fit.iterdir())
    one_error_line(cli(["refine", labelled["labels"], "-f", labelled["features"], "-o", fit]))
    (fit / "notes.txt").write_text("mine")
    one_error_line(cli(["refine", labelled["labels"], "-f", labelled["features"], "-o", fit, "--overwrite"]))
    assert sorted(p.name for p in fit.iterdir()) == sorted([*before, "notes.txt"])


def test_pamr_reads_the_photos_and_can_be_turned_off(labelled, tmp_path):
    feats, labels = labelled["features"], labelled["labels"]
    common = ["refine", labels, "-f", feats, "--steps", "20", "-q"]
    r = cli([*common, "-o", tmp_path / "bad", "--pamr", "-1"])
    assert r.exit_code == 2 and "--pamr" in r.stderr and not (tmp_path / "bad").exists()
    assert cli([*common, "-o", tmp_path / "on"]).exit_code == 0
    assert cli([*common, "-o", tmp_path / "off", "--pamr", "0"]).exit_code == 0
    with h5py.File(tmp_path / "on" / REFINED_FILE) as f:
        assert json.loads(f.attrs["params"])["pamr"] == {
            "iterations": 5,
            "short_side": 160,
            "sigma": 0.05,
            "dilations": [1, 2, 4, 8, 12, 24],
        }
    with h5py.File(tmp_path / "off" / REFINED_FILE) as f:
        assert json.loads(f.attrs["params"])["pamr"] is None
    # the patch labels are the same; only the upsampling differs (test_pamr checks that it follows the edges)
    from stages.labelfolder import LabelMapStore

    with LabelMapStore(tmp_path / "on" / REFINED_FILE) as a, LabelMapStore(tmp_path / "off" / REFINED_FILE) as b:
        assert all(np.array_equal(a.class_map(i), b.class_map(i)) for i in range(a.n_images))
    # without the photos: one line that says how to go on, and --pamr 0 goes on
    photos, away = labelled["d"] / "photos", labelled["d"] / "photos-away"
    photos.rename(away)
    try:
        msg = one_error_line(cli([*common, "-o", tmp_path / "o"]))
        assert "photos" in msg and "--pamr 0" in msg and not (tmp_path / "o").exists()
        assert cli([*common, "-o", tmp_path / "o", "--pamr", "0"]).exit_code == 0
    finally:
        away.rename(photos)
    # a photo that cannot be decoded, met half-way through: the same one line, the
    # previous output untouched
    victim = sorted(photos.iterdir())[len(list(photos.iterdir())) // 2]
    good = victim.read_bytes()
    victim.write_bytes(b"not a photo")
    try:
        msg = one_error_line(cli([*common, "-o", tmp_path / "on", "--overwrite"]))
        assert victim.name in msg and "--pamr 0" in msg
        with h5py.File(tmp_path / "on" / REFINED_FILE) as f:
            assert json.loads(f.attrs["params"])["pamr"]["iterations"] == 5
    finally:
        victim.write_bytes(good)
