"""conceptualize and classify on planted stores; the full pipe through real subprocesses."""

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import TEST_BACKBONE, cli, cli_env
from PIL import Image
from planted import planted_images, write_planted_store

from stages.checkpoint import load_checkpoint
from stages.classify import ClassStore, classify, split_background
from stages.concepts import ConceptStore
from stages.conceptualize import conceptualize
from stages.config import ACGConfig, TrainConfig
from stages.errors import AcsegError, UsageError
from stages.features import FeatureStore
from stages.fit import fit_acg
from stages.modularity import assignment


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("pc")
    toks, labels, classes = planted_images(n_images=40, seed=3)
    path = write_planted_store(d / "feats.h5", toks, labels)
    acg = fit_acg(
        path, d / "acg.pt", acg=ACGConfig(depth=2), train=TrainConfig(steps=300, batch_size=16, lr=3e-3, warmup=10)
    ).path
    return path, labels, classes, acg, d


def planted_gt(gt, labels, classes):
    """The planted classes as ground-truth PNGs at 16 pixels per patch."""
    gt.mkdir()
    for i, (lab, cls) in enumerate(zip(labels, classes)):
        Image.fromarray(cls[lab].astype(np.uint8)).resize((lab.shape[1] * 16, lab.shape[0] * 16), Image.NEAREST).save(
            gt / f"img_{i:03d}.png"
        )
    return gt


def test_concept_counts_adapt_and_maps_are_dense(planted, tmp_path):
    path, labels, classes, acg, _ = planted
    res = conceptualize(path, str(tmp_path / "c.h5"), acg=acg)
    with ConceptStore(res.path) as st:
        right = 0
        for i in range(st.n_images):
            m = st.concept_map(i)
            n = st.n_concepts[i]
            assert sorted(np.unique(m)) == list(range(n))
            assert st.pixels[st.concept_offsets[i] : st.concept_offsets[i + 1]].sum() == m.size
            right += n == len(classes[i])
        assert right / st.n_images >= 0.9
        assert st.attr("kind") == "concepts"
        assert json.loads(st.attr("parent"))["content_sha256"]
        norms = np.linalg.norm(st.means(), axis=1)
        assert np.allclose(norms, 1, atol=1e-4)


def test_whitened_acg_keeps_planted_counts_and_classes(planted, tmp_path):
    """--whiten must not lift the 27 noise directions of the planted store to the level of its 5 signal ones
    (with the regulariser at 1e-3 of the largest eigenvalue only 19 of 40 images kept their count)."""
    path, labels, classes, _, d = planted
    acg = fit_acg(
        path,
        tmp_path / "w.pt",
        acg=ACGConfig(depth=2, whiten=True),
        train=TrainConfig(steps=300, batch_size=16, lr=3e-3, warmup=10),
    ).path
    res = conceptualize(path, str(tmp_path / "c.h5"), acg=acg, precision="fp32")
    model = load_checkpoint(acg).model
    with ConceptStore(res.path) as st, FeatureStore(path) as fs:
        assert np.mean([st.n_concepts[i] == len(classes[i]) for i in range(st.n_images)]) >= 0.9
        # conceptualize whitens inside the attention and the assignment; the explicit route gives the same maps
        agree = []
        for i in range(st.n_images):
            z = model.prepare(torch.from_numpy(fs.tokens(i)))[None]
            with torch.no_grad():
                a = assignment(z, model(z))[0].argmax(-1).numpy()
            ids = st.read("concept_prototype", st.concept_offsets[i], st.concept_offsets[i + 1])
            agree.append(np.mean(ids[st.concept_map(i).ravel()] == a))
        assert np.mean(agree) >= 0.999
    gt = planted_gt(tmp_path / "gt", labels, classes)
    classify(res.path, str(tmp_path / "out"), n_classes=5, background_split=False, seed=0)
    r = cli(["score", tmp_path / "out", gt, "-q"])
    assert r.exit_code == 0 and json.loads(r.stdout)["miou"] >= 0.9


def test_bf16_concepts_agree_with_fp32(planted, tmp_path):
    """The ACG in bfloat16 (acseg's default where the hardware has it) gives the float32 concepts."""
    path, acg = planted[0], planted[3]
    a = conceptualize(path, str(tmp_path / "a.h5"), acg=acg, precision="fp32")
    b = conceptualize(path, str(tmp_path / "b.h5"), acg=acg, precision="bf16")
    with ConceptStore(a.path) as sa, ConceptStore(b.path) as sb:
        assert sa.params["precision"] == "fp32" and sb.params["precision"] == "bf16"
        ma, mb = sa.read("concept_map"), sb.read("concept_map")
        assert (ma == mb).mean() >= 0.995
        assert np.mean(sa.n_concepts == sb.n_concepts) >= 0.95
        same = [i for i in range(sa.n_images) if sa.n_concepts[i] == sb.n_concepts[i]]
        rows = lambda st: np.concatenate([np.arange(st.concept_offsets[i], st.concept_offsets[i + 1]) for i in same])
        va, vb = sa.read("concept_vector")[rows(sa)], sb.read("concept_vector")[rows(sb)]
        cos = (va * vb).sum(1) / np.linalg.norm(va, axis=1) / np.linalg.norm(vb, axis=1)
        assert np.median(cos) > 0.999


def test_precision_is_checked_and_auto_follows_the_hardware(planted, tmp_path, monkeypatch):
    import stages.precision as acg

    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(acg, "native_bf16", lambda device, native=native: native)
        res = conceptualize(planted[0], str(tmp_path / f"{want}.h5"), acg=planted[3])  # precision "auto"
        with ConceptStore(res.path) as st:
            assert st.params["precision"] == want
    assert acg.inference_dtype("fp32", "cpu") == torch.float32 and acg.inference_dtype("bf16", "cpu") == torch.bfloat16
    r = cli(["conceptualize", planted[0], "--acg", planted[3], "-o", str(tmp_path / "c.h5"), "--precision", "fp8"])
    assert r.exit_code == 2 and "Invalid value for '--precision'" in r.stderr and "'fp32'" in r.stderr
    assert not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", ["acg", "kmeans"])
def test_one_bad_value_in_a_later_batch_is_refused(planted, tmp_path, bad, method):
    """conceptualize looks for NaN and Inf in the token norms it computes anyway, not in a pass of its own:
    one bad value in one token of a later batch still stops the run before that batch is written, with the
    reader's message, and nothing under the output's name (the partial file keeps the batches before, for
    --resume); the good store goes through."""
    import shutil

    path, acg = planted[0], planted[3]
    broken = tmp_path / "broken.h5"
    shutil.copy(path, broken)
    with h5py.File(broken, "r+") as f:
        row = int(f["offsets"][13]) + 5  # image 13: the fourth batch of 4
        t = f["tokens"][row]
        t[7] = bad
        f["tokens"][row] = t
    out = tmp_path / "c.h5"
    kw = dict(acg=acg) if method == "acg" else {}
    with pytest.raises(AcsegError, match=r"tokens of images 12\.\.15 holds NaN or Inf values"):
        conceptualize(str(broken), str(out), method=method, batch_size=4, **kw)
    assert not out.exists()
    with h5py.File(tmp_path / ".c.h5.partial") as f:  # kept for --resume: the three good batches, nothing after
        assert len(f["n_concepts"]) == 12 and not f.attrs["complete"]
    r = cli(
        ["conceptualize", broken, "--method", method, "-o", out, "-q", "--batch-size", "4"]
        + (["--acg", acg] if method == "acg" else [])
    )
    assert r.exit_code == 1 and "holds NaN or Inf values" in r.stderr and not out.exists()
    assert conceptualize(path, str(out), method=method, batch_size=4, **kw).n_images == 40


@pytest.mark.parametrize("method, precision", [("acg", "fp32"), ("acg", "bf16"), ("kmeans", "auto")])
def test_batches_sent_as_stored_give_the_same_concepts(planted, tmp_path, monkeypatch, method, precision):
    """To a GPU the batches go as float16 and are converted there, and the summaries are made there. Forced
    on the CPU, that route writes exactly the same concepts store as the usual one."""
    import stages.conceptualize as cmod

    path, acg = planted[0], planted[3]
    kw = dict(method=method, precision=precision, batch_size=16, **({"acg": acg} if method == "acg" else {}))
    a = conceptualize(path, str(tmp_path / "a.h5"), **kw)
    monkeypatch.setattr(cmod, "_transfer_as_stored", lambda device: True)
    b = conceptualize(path, str(tmp_path / "b.h5"), **kw)
    with h5py.File(a.path) as fa, h5py.File(b.path) as fb:
        for name in fa:
            assert np.array_equal(fa[name][:], fb[name][:]), name


def test_kmeans_method_writes_the_same_schema(planted, tmp_path):
    path = planted[0]
    a = conceptualize(path, str(tmp_path / "a.h5"), acg=planted[3])
    b = conceptualize(path, str(tmp_path / "b.h5"), method="kmeans", k=5)
    with h5py.File(a.path) as fa, h5py.File(b.path) as fb:
        assert set(fa.keys()) == set(fb.keys())
        assert all(fa[k].dtype == fb[k].dtype for k in fa)
    with ConceptStore(b.path) as st:
        assert np.all(st.n_concepts <= 5)


def test_classify_recovers_planted_classes(planted, tmp_path):
    path, labels, classes, acg, _ = planted
    c = conceptualize(path, str(tmp_path / "c.h5"), acg=acg).path
    gt = planted_gt(tmp_path / "gt", labels, classes)
    out = tmp_path / "out"
    res = classify(c, str(out), n_classes=5, background_split=False, seed=0)
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(p.name for p in gt.glob("*.png"))
    assert Image.open(out / names[0]).size == Image.open(gt / names[0]).size
    r = cli(["score", out, gt, "-q"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["miou"] >= 0.9
    # apply mode reproduces fit mode
    out2 = tmp_path / "out2"
    classify(c, str(out2), centroids=res.classes_file)
    for n in names:
        assert np.array_equal(np.asarray(Image.open(out / n)), np.asarray(Image.open(out2 / n)))
    with ClassStore(res.classes_file) as cs:
        # over-clustered into twice the classes (the default --over-cluster 2), merged onto the 5
        assert cs.centroids.shape == (10, 32)
        assert sorted(set(cs.cluster_class.tolist())) == list(range(5))
    # unweighted classes (the CLI option; pixel-weighted is the default) recover them too, and the classes
    # file says how they were fitted
    r = cli(["classify", c, "-o", tmp_path / "outw", "-K", "5", "--no-background-split", "--weighting", "none", "-q"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(cli(["score", tmp_path / "outw", gt, "-q"]).stdout)["miou"] >= 0.9
    for folder, weighting in ((out, "pixels"), (tmp_path / "outw", "none")):
        with h5py.File(folder / "classes.h5") as f:
            assert json.loads(f.attrs["params"])["weighting"] == weighting
    # ... and the weights reach the k-means: same seed, same classes, other centroids
    with ClassStore(out / "classes.h5") as a, ClassStore(tmp_path / "outw" / "classes.h5") as b:
        assert a.centroids.shape == b.centroids.shape and not np.allclose(a.centroids, b.centroids, atol=1e-4)
    # a bad weighting is refused before anything is written, and an existing output survives
    r = cli(["classify", c, "-o", tmp_path / "outw", "-K", "5", "--weighting", "area", "--overwrite"])
    assert r.exit_code == 2 and "--weighting" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "outw" / "classes.h5").exists()
    # match to ground truth writes ground-truth ids
    out3 = tmp_path / "out3"
    res3 = classify(c, str(out3), n_classes=5, background_split=False, match_gt=str(gt), dataset="voc")
    assert res3.score["miou"] >= 0.9
    a = np.asarray(Image.open(out3 / names[0]))
    g = np.asarray(Image.open(gt / names[0]))
    assert (a == g).mean() >= 0.9


def test_weighted_kmeans_weights_the_centroids():
    """Each point counts with its weight: a heavy point pulls its cluster's centroid (classify --weighting)."""
    from stages.kmeans import kmeans

    x = np.array([[0.0], [1.0], [10.0]], np.float32)
    plain, _, _ = kmeans(x, 2, n_init=3, seed=0)
    heavy, _, _ = kmeans(x, 2, n_init=3, seed=0, weights=np.array([1.0, 99.0, 1.0]))
    assert np.allclose(np.sort(plain[:, 0]), [0.5, 10.0])
    assert np.allclose(np.sort(heavy[:, 0]), [0.99, 10.0])


def test_greedy_seeding_starts_lower_than_plain_kmeans_pp():
    """trials > 1 (greedy k-means++): each centroid the best of several draws, so the seeds' summed squared
    distance is lower on average; the weights still count in the draws and in the choice."""
    from stages.kmeans import _sqdist, kmeans_pp

    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(60, 5, generator=g) + 6 * torch.randn(1, 5, generator=g) for _ in range(12)])

    def cost(c, w=None):
        d = _sqdist(x, c).min(1).values
        return float(d.sum() if w is None else d @ w)

    plain = [cost(kmeans_pp(x, 12, torch.Generator().manual_seed(s))) for s in range(30)]
    greedy = [cost(kmeans_pp(x, 12, torch.Generator().manual_seed(s), trials=4)) for s in range(30)]
    assert np.mean(greedy) < 0.8 * np.mean(plain)
    # a point of zero weight is never drawn
    w = torch.ones(len(x))
    w[:60] = 0
    for s in range(5):
        c = kmeans_pp(x, 12, torch.Generator().manual_seed(s), w=w, trials=4)
        assert not any(bool((x[:60] == row).all(1).any()) for row in c)


def test_kmeans_distances_with_precomputed_norms():
    """The squared distances k-means uses, with the points' norms computed once, are the pairwise ones."""
    from stages.kmeans import _sqdist, _sqdist_kn, _sqnorm

    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(3, 50, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    ref = torch.cdist(x, c) ** 2
    assert torch.allclose(_sqdist(x, c), ref, atol=1e-4)
    assert torch.allclose(_sqdist(x, c, _sqnorm(x)), ref, atol=1e-4)
    kn = _sqdist_kn(x, c, _sqnorm(x).transpose(-2, -1))  # taken as (k, n), given back as (n, k)
    assert kn.shape == ref.shape and kn.is_contiguous() and torch.allclose(kn, ref, atol=1e-4)


def test_batched_kmeans_recovers_planted_clusters_per_image():
    """Each image is clustered on its own valid tokens: padding takes no part, and images that settle early
    leave the batch without disturbing the others: every image ends at a fixed point of Lloyd's iteration."""
    from stages.kmeans import batched_kmeans

    g = torch.Generator().manual_seed(1)
    B, N, d = 12, 80, 6
    centres = torch.randn(B, 3, d, generator=g) * 2  # each image its own classes
    lab = torch.randint(3, (B, N), generator=g)
    noise = torch.linspace(0.02, 2.0, B)[:, None, None]  # tight images settle at once, loose ones take longer
    x = centres.gather(1, lab[..., None].expand(-1, -1, d)) + noise * torch.randn(B, N, d, generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 50:] = False
    x[1, 50:] = 100.0  # padding far away: it must not pull a centroid
    before = x.clone()
    c, got = batched_kmeans(x, mask, 3, seed=0, iters=100)
    assert torch.equal(x, before)  # the images still iterating are gathered elsewhere, x is left alone
    work = {}  # memory kept across calls: the same results, on a second batch too (a buffer with old rows)
    for xs, ms in ((x, mask), (x[3:], mask[3:]), (x, mask)):
        want = batched_kmeans(xs, ms, 3, seed=0, iters=100)
        kept = batched_kmeans(xs, ms, 3, seed=0, iters=100, work=work)
        assert torch.equal(want[0], kept[0]) and torch.equal(want[1], kept[1])
    assert "kmeans_rows" in work
    for b in range(B):
        xb, gb = x[b][mask[b]], got[b][mask[b]]
        assert torch.equal(gb, torch.cdist(xb, c[b]).argmin(1)), b  # each token at its nearest centroid
        for j in gb.unique().tolist():
            assert torch.allclose(c[b, j], xb[gb == j].mean(0), atol=1e-4), b  # each centroid its tokens' mean
    for b in range(3):  # the tight images: the planted clusters, one to one
        n = int(mask[b].sum())
        pairs = set(zip(lab[b, :n].tolist(), got[b, :n].tolist()))
        assert len(pairs) == len({p[1] for p in pairs}) == len({p[0] for p in pairs}) == 3, b


def test_background_split():
    assert split_background(np.array([0.1, 0.9, 0.8, 0.15])).tolist() == [True, False, False, True]
    assert split_background(np.array([0.5])).tolist() == [False]
    assert split_background(np.array([0.3, 0.3])).tolist() == [False, False]


def test_background_split_choices():
    from stages.classify import background_split_wanted

    assert background_split_wanted("on") is True and background_split_wanted("off") is False
    assert background_split_wanted(True) is True and background_split_wanted(False) is False
    with pytest.raises(UsageError):
        background_split_wanted("auto")


def test_the_split_ranks_concepts_by_attention_density_not_sum():
    from stages.classify import concept_attention_density

    summed = np.array([0.30, 0.35, 0.35])  # a small salient object, two large ground regions
    pixels = np.array([9, 27, 28])
    assert split_background(summed).tolist() == [True, False, False]  # the sum calls the object background
    assert split_background(concept_attention_density(summed, pixels)).tolist() == [False, True, True]


def _figure_ground_run(tmp_path, mode):
    from planted import write_figure_ground_store

    feats, fg = write_figure_ground_store(tmp_path / f"fg_{mode}.h5")
    gt = tmp_path / "gt"
    if not gt.exists():
        gt.mkdir()
        for i, f in enumerate(fg):
            Image.fromarray(f).resize((f.shape[1] * 16, f.shape[0] * 16), Image.NEAREST).save(gt / f"img_{i:03d}.png")
    c = conceptualize(feats, str(tmp_path / f"c_{mode}.h5"), method="kmeans", k=4, overwrite=True).path
    res = classify(c, str(tmp_path / f"out_{mode}"), n_classes=2, background_split=mode, match_gt=str(gt), seed=0)
    with ClassStore(res.classes_file) as cs:
        return res.score["miou"], cs.params


def test_the_split_separates_figure_from_ground_where_it_must(tmp_path):
    """Object photos, -K 2, the split on: the object (dense attention) is foreground, the two ground classes of
    each photo are one background class; without the split k-means mixes them. --match-gt works without a
    preset (the ground truth's ids as they are)."""
    miou_auto, params = _figure_ground_run(tmp_path, "on")
    assert params["background_split"] is True and params["background_split_score"] == "concept attention density"
    assert miou_auto >= 0.85
    miou_off, params = _figure_ground_run(tmp_path, "off")
    assert params["background_split"] is False and miou_off < miou_auto - 0.1
    # the maps are written in the ground truth's own ids: 1 for the object
    agree = []
    for g in sorted((tmp_path / "gt").glob("*.png")):
        m = np.asarray(Image.open(tmp_path / "out_on" / g.name))
        assert set(np.unique(m)) <= {0, 1}
        agree.append((m == np.asarray(Image.open(g))).mean())
    assert np.mean(agree) >= 0.95


def test_the_default_does_not_split(planted, tmp_path):
    path, labels, classes, acg, _ = planted
    c = conceptualize(path, str(tmp_path / "c.h5"), acg=acg).path
    auto = classify(c, str(tmp_path / "auto"), n_classes=5, seed=0)
    off = classify(c, str(tmp_path / "off"), n_classes=5, background_split="off", seed=0)
    with ClassStore(auto.classes_file) as a, ClassStore(off.classes_file) as o:
        assert a.params["background_split"] is False
        assert all(np.array_equal(a.class_map(i), o.class_map(i)) for i in range(a.n_images))
    r = cli(["classify", c, "-o", tmp_path / "bad", "-K", "5", "--background-split", "maybe"])
    assert r.exit_code == 2 and not (tmp_path / "bad").exists()


def test_classify_refuses_escaping_names_and_keeps_existing_output(planted, tmp_path):
    path, labels, classes, acg, _ = planted
    c = conceptualize(path, str(tmp_path / "c.h5"), acg=acg).path
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli(["classify", c, "-K", "3", "-o", out, "-q"])
    assert r.exit_code == 1 and "--overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    evil = tmp_path / "evil.h5"
    evil.write_bytes(open(c, "rb").read())
    with h5py.File(evil, "r+") as f:
        names = f["names"][:]
        names[0] = b"../../escaped"
        f["names"][:] = names
    r = cli(["classify", evil, "-K", "3", "-o", tmp_path / "o2", "-q"])
    assert r.exit_code == 1 and "outside" in r.stderr
    assert not (tmp_path.parent / "escaped.png").exists() and not (tmp_path / "o2").exists()


def test_incompatible_checkpoint_is_refused(planted, tmp_path, images):
    feats = tmp_path / "f.h5"
    assert cli(["extract", images, "-o", feats, *TEST_BACKBONE]).exit_code == 0
    r = cli(["conceptualize", feats, "--acg", planted[3], "-q"])
    assert r.exit_code == 1 and "trained on" in r.stderr and "planted" in r.stderr


@pytest.mark.slow
def test_the_users_pipe_in_real_subprocesses(images, tmp_path):
    """acseg extract imgs/ -o feats.h5 | acseg conceptualize | acseg classify -K 3 -o out | acseg score - out"""
    env = cli_env()
    feats = tmp_path / "feats.h5"
    acg = [sys.executable, "-m", "acseg_cli"]
    sh = (
        f"{' '.join(acg)} extract {images} -o {feats} {' '.join(TEST_BACKBONE)} | "
        f"{' '.join(acg)} conceptualize --fit-steps 20 | "
        f"{' '.join(acg)} classify -K 3 -o {tmp_path / 'out'} -q"
    )
    p = subprocess.run(["bash", "-o", "pipefail", "-c", sh], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"{tmp_path / 'out'}\n"
    assert (tmp_path / "feats.concepts.h5").exists() and (tmp_path / "feats.concepts.acg.pt").exists()
    assert "fitting an ACG" in p.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 6
    p = subprocess.run(["bash", "-c", f"{' '.join(acg)} backbones | head -1"], env=env, capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == ""


def test_previews_are_drawn_for_people(images, tmp_path):
    feats = tmp_path / "f.h5"
    assert cli(["extract", images, "-o", feats, *TEST_BACKBONE]).exit_code == 0
    r = cli(["conceptualize", feats, "--method", "kmeans", "-k", "3", "--preview", tmp_path / "pc", "-q"])
    assert r.exit_code == 0, r.stderr
    pics = sorted((tmp_path / "pc").glob("*.png"))
    assert len(pics) == 6
    src = Image.open(images / pics[0].name)
    assert Image.open(pics[0]).size == src.size and Image.open(pics[0]).mode == "RGB"
    r = cli(["classify", r.stdout.strip(), "-K", "2", "-o", tmp_path / "o", "--preview", tmp_path / "pv", "-q"])
    assert r.exit_code == 0, r.stderr
    pv = np.asarray(Image.open(tmp_path / "pv" / pics[0].name).convert("RGB"))
    W, H = src.size
    # photo | prediction, a caption strip above (18 px), one legend row below (4 + 18 px)
    assert pv.shape == (18 + H + 22, 2 * W, 3)
    assert (pv[:18] < 128).any(), "the captions are drawn"
    from stages.render import palette

    legend = pv[18 + H :]
    pred = np.asarray(Image.open(tmp_path / "o" / pics[0].name))
    for j in np.unique(pred):  # a swatch of each class in the picture, in its colour
        assert (legend == palette(256)[j]).all(-1).sum() >= 100, j


def test_legend_names_come_from_the_preset_when_matched():
    from stages.labelfolder import _class_names

    voc = _class_names("voc", matched=True)
    assert voc(0) == "background" and voc(13) == "horse" and voc(255) == "ignored"
    assert _class_names(None, matched=True)(1) == "class 1"
    assert _class_names("voc", matched=False)(3) == "cluster 3"


def test_implicit_fit_announces_itself_and_reuses_only_a_matching_acg(images, tmp_path):
    feats = tmp_path / "f.h5"
    assert cli(["extract", images, "-o", feats, *TEST_BACKBONE]).exit_code == 0
    acg = tmp_path / "f.concepts.acg.pt"
    r = cli(["conceptualize", feats, "--fit-steps", "4"])
    assert r.exit_code == 0, r.stderr
    assert "fitting an ACG" in r.stderr and "4 steps of 6 images" in r.stderr and "s per step here" in r.stderr
    assert "fitted in 4 steps (ran the fixed schedule of 4 steps)" in r.stderr
    first = acg.read_bytes()
    r = cli(["conceptualize", feats, "--fit-steps", "4", "--overwrite"])  # same settings: reused
    assert r.exit_code == 0 and "reusing" in r.stderr and "fitting" not in r.stderr
    assert acg.read_bytes() == first
    (tmp_path / "f.concepts.h5").unlink()
    r = cli(["conceptualize", feats, "--fit-steps", "5"])  # other settings, no --overwrite: refused, kept
    assert r.exit_code == 1 and "steps=4 (now 5)" in r.stderr and "--overwrite" in r.stderr
    assert f"--acg {acg}" in r.stderr and acg.read_bytes() == first
    assert not (tmp_path / "f.concepts.h5").exists()
    r = cli(["conceptualize", feats, "--fit-steps", "5", "--overwrite"])  # refitted, and it says why
    assert r.exit_code == 0 and "refitting" in r.stderr and "steps=4 (now 5)" in r.stderr
    assert load_checkpoint(acg).train["steps"] == 5
    r = cli(["conceptualize", feats, "--fit-steps", "0"])
    assert r.exit_code == 2 and "auto" in r.stderr


@pytest.mark.slow
def test_background_benchmark_runs_on_a_tiny_figure_ground_set(tmp_path):
    """benchmarks/background.py end to end on planted object photos, so the script cannot rot: one JSON line
    per rule plus the k-means baseline, and the density split ahead of no split there."""
    _figure_ground_run(tmp_path, "on")  # writes the store, its per-image k-means concepts and the label maps
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "background.py"
    c = tmp_path / "c_on.h5"
    p = subprocess.run(
        [
            sys.executable,
            str(script),
            str(c),
            str(c),
            str(tmp_path / "gt"),
            "-K",
            "2",
            "--seeds",
            "1",
            "--variants",
            "off,sum,density,density_global,density_rel1,density_eta0.7,density_ratio3",
            "--features",
            str(tmp_path / "fg_on.h5"),
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["variant"] for r in rows][1:] == [
        "off",
        "sum",
        "density",
        "density_global",
        "density_rel1",
        "density_eta0.7",
        "density_ratio3",
    ]
    miou = {r["variant"]: float(r["miou_all"].split()[0]) for r in rows}
    assert miou["density"] > miou["off"] + 10
