"""fit-acg on planted-cluster stores: the groups are recovered; checkpoints, resume, CLI errors."""

import json
import logging

import numpy as np
import pytest
import torch
from helpers import cli
from planted import planted_images, write_planted_store
from sklearn.metrics import adjusted_rand_score

from stages.checkpoint import load_checkpoint, resume_path
from stages.config import TrainConfig
from stages.errors import AcsegError
from stages.features import FeatureStore
from stages.fit import fit_acg
from stages.modularity import assignment

FAST = dict(steps=300, batch_size=16, lr=3e-3, warmup=10, log_every=20)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    toks, labels, classes = planted_images()
    path = write_planted_store(d / "feats.h5", toks, labels)
    return path, labels, classes, d


@pytest.fixture(scope="module")
def trained(planted):
    path, labels, classes, d = planted
    from stages.config import ACGConfig

    res = fit_acg(path, d / "acg.pt", acg=ACGConfig(depth=2), train=TrainConfig(**FAST))
    return res


def planted_agreement(model, path, labels, classes):
    """(mean adjusted Rand index of each image's concepts against its planted groups, share of images with the
    planted number of concepts)."""
    aris, right = [], 0
    with FeatureStore(path) as st:
        for i in range(st.n_images):
            x = torch.from_numpy(st.tokens(i))[None]
            with torch.no_grad():
                a = assignment(x, model(x)).argmax(-1)[0].numpy()
            aris.append(adjusted_rand_score(labels[i].ravel(), a))
            right += len(np.unique(a)) == len(classes[i])
    return float(np.mean(aris)), right / len(labels)


def test_planted_groups_are_recovered(planted, trained):
    path, labels, classes, _ = planted
    ari, right = planted_agreement(load_checkpoint(trained.path).model, path, labels, classes)
    assert ari >= 0.9 and right >= 0.9


def test_checkpoints_from_before_heads_were_recorded_keep_their_heads(trained, tmp_path):
    """num_heads = 0 ("auto") was written before checkpoints recorded the number; auto then meant one head per
    64 dims. Loading must rebuild that model, not today's auto (one per 128), whose weights have the same shapes."""
    from stages.acg import create_acg

    obj = torch.load(trained.path, weights_only=True)
    assert json.loads(obj["config"])["num_heads"] > 0  # new checkpoints record the number
    torch.manual_seed(0)
    two = create_acg(dim=128, num_prototypes=3, depth=1, num_heads=2).eval()  # old auto for 128 dims: 2 heads
    cfg = json.loads(two.cfg.to_json())
    cfg["num_heads"] = 0
    torch.save(dict(obj, config=json.dumps(cfg), state_dict=two.state_dict()), tmp_path / "old.pt")
    m = load_checkpoint(tmp_path / "old.pt").model
    assert m.cfg.heads == 2
    x = torch.randn(2, 10, 128)
    with torch.no_grad():
        assert torch.allclose(m(x), two(x), atol=1e-5)


def test_the_checkpoint_records_its_weights_hash_and_concepts_name_the_model_by_it(planted, trained, tmp_path):
    """fit-acg records sha256 over the state dict (name, dtype, shape, bytes); conceptualize names its model
    by it instead of hashing the file on every run. A checkpoint without it (written before) is hashed from its
    weights, to the same value; any change to a weight, a name or a dtype changes the hash."""
    from stages.conceptualize import conceptualize
    from stages.digests import weights_sha256

    obj = torch.load(trained.path, weights_only=True)
    rec = obj["weights_sha256"]
    assert rec == weights_sha256(obj["state_dict"]) == load_checkpoint(trained.path).weights_sha256
    old = {k: v for k, v in obj.items() if k != "weights_sha256"}
    torch.save(old, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").weights_sha256 == rec
    torch.save(dict(old, weights_sha256="not a hash"), tmp_path / "odd.pt")
    assert load_checkpoint(tmp_path / "odd.pt").weights_sha256 == rec
    sd = obj["state_dict"]
    name = sorted(sd)[0]
    changed = dict(sd, **{name: sd[name].clone()})
    changed[name].view(-1)[0] += 1
    renamed = {("x" + k if k == name else k): v for k, v in sd.items()}
    recast = dict(sd, **{name: sd[name].double()})
    assert len({rec, weights_sha256(changed), weights_sha256(renamed), weights_sha256(recast)}) == 4
    res = conceptualize(planted[0], str(tmp_path / "c.h5"), acg=trained.path, precision="fp32")
    from stages.concepts import ConceptStore

    with ConceptStore(res.path) as st:
        assert st.params["acg"]["weights_sha256"] == rec and "sha256" not in st.params["acg"]


def test_training_log_plot_and_checkpoint_provenance(planted, trained):
    path = planted[0]
    lines = [json.loads(s) for s in open(trained.log_path)]
    assert lines[0]["step"] == 0 and lines[-1]["step"] == FAST["steps"] - 1
    assert {"loss", "modularity", "active_concepts", "lr"} <= set(lines[0])
    assert lines[-1]["loss"] < lines[0]["loss"]
    from PIL import Image

    assert Image.open(trained.plot_path).size == (720, 400)
    ck = load_checkpoint(trained.path)
    with FeatureStore(path) as st:
        assert ck.provenance["store"]["content_sha256"] == st.attr("content_sha256")
        assert ck.provenance["dim"] == st.dim and ck.provenance["backbone"] == "planted"


def test_deterministic_on_cpu_and_resume_matches(planted, tmp_path):
    path = planted[0]
    cfg = dict(steps=12, batch_size=8, lr=1e-3, warmup=2, checkpoint_every=5)
    # on the CPU: CUDA kernels need not be deterministic
    a = fit_acg(path, tmp_path / "a.pt", train=TrainConfig(**cfg), device="cpu")
    b = fit_acg(path, tmp_path / "b.pt", train=TrainConfig(**cfg), device="cpu")
    sa, sb = load_checkpoint(a.path).model.state_dict(), load_checkpoint(b.path).model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # interrupt after step 10 (a resume state at step 10 is left), then resume

    calls = {"n": 0}

    def boom(done, total, extra):
        calls["n"] += 1
        if done == 11:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_acg(path, tmp_path / "c.pt", train=TrainConfig(**cfg), progress=boom, device="cpu")
    assert not (tmp_path / "c.pt").exists() and resume_path(tmp_path / "c.pt").exists()
    c = fit_acg(path, tmp_path / "c.pt", train=TrainConfig(**cfg), resume=True, device="cpu")
    assert c.resumed_from == 10
    sc = load_checkpoint(c.path).model.state_dict()
    assert all(torch.allclose(sa[k], sc[k], atol=1e-6) for k in sa)
    assert not resume_path(tmp_path / "c.pt").exists()


def test_cli_prints_path_and_rejects_bad_checkpoints(planted, tmp_path):
    path = planted[0]
    r = cli(["fit-acg", "-o", tmp_path / "x.pt", "--steps", "3", "--batch-size", "4", "-q"], input=f"{path}\n")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == f"{tmp_path / 'x.pt'}\n"
    bad = tmp_path / "trunc.pt"
    bad.write_bytes((tmp_path / "x.pt").read_bytes()[:200])
    with pytest.raises(AcsegError, match="cannot be read|not a loadable"):
        load_checkpoint(bad)
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "acseg-acg-1", "x": 1}, evil)  # a valid zip container, then poison it
    import zipfile

    with zipfile.ZipFile(evil) as z:
        names = z.namelist()
    with zipfile.ZipFile(evil, "w") as z:
        for n in names:
            z.writestr(n, pickle.dumps({"format": "acseg-acg-1", "boom": Evil()}) if n.endswith("data.pkl") else b"")
    with pytest.raises(AcsegError):
        load_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()
    r = cli(["conceptualize", path, "--acg", evil, "-o", tmp_path / "c.h5", "-q"])
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "pwned").exists()


def test_whitened_model_sees_identity_covariance_and_round_trips(planted, tmp_path):
    """--whiten: the checkpoint carries mean and ZCA matrix; the prepared training tokens' variances are
    l / (l + mean(l)) along the raw covariance's eigenvectors (near 1 for strong directions, small for weak
    ones); the model loads and conceptualizes; a model without it has no such buffer (old checkpoints load)."""
    from stages.concepts import ConceptStore
    from stages.conceptualize import conceptualize
    from stages.config import ACGConfig

    path = planted[0]
    res = fit_acg(
        path, tmp_path / "w.pt", acg=ACGConfig(depth=1, whiten=True), train=TrainConfig(steps=3, batch_size=4)
    )
    m = load_checkpoint(res.path).model
    assert "feature_whiten" in m.state_dict()
    with FeatureStore(path) as st:
        x = torch.from_numpy(np.concatenate(st.read_range(0, st.n_images)))
    xc = x.double() - m.feature_center.double()
    lam = torch.linalg.eigvalsh(xc.T @ xc / len(xc))
    z = m.prepare(x).double()
    got = torch.linalg.eigvalsh(z.T @ z / len(z))
    assert torch.allclose(got, (lam / (lam + lam.mean())).sort().values, atol=0.02)
    assert got.max() > 0.8 and got.max() / got.min() > 3  # not equalised: plain ZCA would make them all 1
    c = conceptualize(path, str(tmp_path / "c.h5"), acg=res.path)
    with ConceptStore(c.path) as cs:
        assert np.allclose(np.linalg.norm(cs.means(), axis=1), 1, atol=1e-4)
    plain = fit_acg(
        path, tmp_path / "p.pt", acg=ACGConfig(depth=1, whiten=False), train=TrainConfig(steps=2, batch_size=4)
    )
    assert "feature_whiten" not in load_checkpoint(plain.path).model.state_dict()


@pytest.mark.slow
def test_loading_a_checkpoint_is_cheap_and_leaves_the_random_state(trained):
    """Building the model on the meta device once imported torch._dynamo and sympy (torch.randn and torch.eye
    there; 1.2-1.5 s in every conceptualize process); loading must not, nor move the global random state."""
    import subprocess
    import sys

    from helpers import ROOT, cli_env

    code = (
        "import sys, torch; from stages.checkpoint import load_checkpoint; s = torch.get_rng_state(); "
        f"m = load_checkpoint({str(trained.path)!r}, mmap=True).model; "
        "print(sorted(k for k in ('torch._dynamo', 'sympy') if k in sys.modules), torch.equal(s, "
        "torch.get_rng_state()))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["[]", "True"]


def _mixed_store(tmp_path, nan_at=None):
    """Images of three grid sizes (so batches are padded), 16 dims."""
    from planted import write_planted_store

    rng = np.random.default_rng(1)
    shapes = [(4, 6), (5, 5), (3, 7)] * 6
    toks = [rng.normal(size=(h * w, 16)) for h, w in shapes]
    if nan_at is not None:
        toks[nan_at][2, 3] = np.nan
    return write_planted_store(tmp_path / "mixed.h5", toks, [np.zeros(s, np.int64) for s in shapes])


def test_batches_from_memory_equal_the_batches_read_from_the_file(tmp_path):
    """fit-acg holds the tokens in memory when they fit (on a GPU, reading each batch from the file took longer
    than the step): the batches must be exactly the streamed ones, with padding, a token subsample and the
    share of each of several processes, and the batch prefetched for the next step must not overwrite this one."""
    from stages.batches import ResidentTokens, read_batch

    path = _mixed_store(tmp_path)
    with FeatureStore(path) as st:
        mem = ResidentTokens(st, "cpu")
        padded = 0
        for cfg in (TrainConfig(batch_size=6, max_tokens=0), TrainConfig(batch_size=7, max_tokens=20, seed=4)):
            for step in range(4):
                for rank, world in ((0, 1), (0, 2), (1, 2)):
                    x, m = read_batch(st, cfg, step, rank, world)
                    y, n = mem.batch(cfg, step, rank, world)
                    padded += not m.all()
                    assert torch.equal(m, n) and torch.equal(x, y), (cfg, step, rank)
        assert padded >= 6
        a, _ = mem.batch(cfg, 10)
        kept = a.clone()
        b, _ = mem.batch(cfg, 11)
        assert torch.equal(a, kept) and not torch.equal(a[:, :5], b[:, :5])


def test_a_fit_from_memory_equals_a_fit_from_the_file(planted, tmp_path):
    path = planted[0]
    cfg = dict(steps=6, batch_size=8, lr=1e-3, warmup=2, max_tokens=40)
    a = fit_acg(path, tmp_path / "a.pt", train=TrainConfig(**cfg), device="cpu", preload=True)
    b = fit_acg(path, tmp_path / "b.pt", train=TrainConfig(**cfg), device="cpu", preload=False)
    sa, sb = load_checkpoint(a.path).model.state_dict(), load_checkpoint(b.path).model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.final_loss == b.final_loss


@pytest.mark.parametrize("delta", ["plain", "tanh"])
def test_cached_graphs_keep_the_loss_curve_of_graphs_built_every_step(planted, tmp_path, delta, caplog, monkeypatch):
    """issue 28's contract: the compiled loss with every graph kept between steps, with the 12 that 200 kB hold
    (the others built at their steps), and with none kept, gives the loss curve of soft_modularity (the path
    without numba) to 1e-5, tokens subsampled."""
    import stages.fit
    from stages.graphs import kernel_available

    if not kernel_available():
        pytest.skip("numba is not installed")
    path = planted[0]
    cfg = TrainConfig(steps=25, batch_size=6, lr=3e-3, warmup=2, max_tokens=40, log_every=1, delta=delta)
    curves = {}
    for name, memory in (("soft_modularity", None), ("all kept", None), ("some kept", 200_000), ("none kept", 0)):
        with monkeypatch.context() as m, caplog.at_level(logging.DEBUG, logger="acseg.fit"):
            if name == "soft_modularity":
                m.setattr(stages.fit, "kernel_available", lambda: False)
            r = fit_acg(path, tmp_path / f"{name}.pt", train=cfg, device="cpu", graph_memory=memory)
        curves[name] = np.array([h["loss"] for h in r.history])
    assert "fit-acg: 47 graphs kept (1 MB), 0 computed" in caplog.text  # every image the 25 steps drew
    assert "fit-acg: 12 graphs kept (0 MB), 109 computed" in caplog.text  # 64 tokens per image: 16 kB a graph
    assert "fit-acg: 0 graphs kept (0 MB), 150 computed" in caplog.text  # 25 steps of 6
    assert len(curves["soft_modularity"]) == 25
    for name in ("all kept", "some kept", "none kept"):
        assert np.abs(curves[name] - curves["soft_modularity"]).max() < 1e-5, name
    assert np.ptp(curves["soft_modularity"]) > 0.01  # a curve that moves, not a flat line


def test_tokens_held_in_memory_are_checked(tmp_path):
    from stages.batches import ResidentTokens

    with FeatureStore(_mixed_store(tmp_path, nan_at=5)) as st, pytest.raises(AcsegError, match="NaN or Inf"):
        ResidentTokens(st, "cpu")


def test_fit_cli_preload_and_stream(planted, tmp_path):
    path = planted[0]
    for flag in ("--preload", "--stream"):
        r = cli(
            [
                "fit-acg",
                path,
                "-o",
                tmp_path / f"{flag[2:]}.pt",
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--depth",
                "1",
                "--device",
                "cpu",
                flag,
                "-q",
            ]
        )
        assert r.exit_code == 0, r.stderr
    sa = load_checkpoint(tmp_path / "preload.pt").model.state_dict()
    sb = load_checkpoint(tmp_path / "stream.pt").model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("free_gib, expected_one", [(64, 1 << 30), (2, 1 << 29)])
def test_the_cpu_preload_budget_is_shared_by_the_machines_processes(monkeypatch, free_gib, expected_one):
    import os

    from stages.batches import preload_budget

    pages = {"SC_AVPHYS_PAGES": free_gib << 18, "SC_PAGE_SIZE": 4096}  # free memory fixed, not this machine's
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    assert preload_budget("cpu") == expected_one  # 1 GiB, or a quarter of the free memory if less
    assert preload_budget("cpu", 16) == expected_one // 16


def test_warmup_scales_with_the_schedule():
    from stages.schedule import Schedule

    assert [TrainConfig(steps=n).warmup_steps for n in (1, 20, 60, 200, 2500, 10000)] == [1, 1, 3, 10, 100, 100]
    assert TrainConfig(steps=None).warmup_steps == 20
    assert TrainConfig(steps=60, warmup=7).warmup_steps == 7
    for n in (10, 60, 200):  # a short fixed schedule reaches its peak rate, then decays to zero
        cfg = TrainConfig(steps=n, lr=1e-3)
        lrs = [Schedule(cfg).lr(s) for s in range(n)]
        assert max(lrs) == pytest.approx(1e-3)
        assert lrs[-1] < 0.05e-3 or n <= 10 and lrs[-1] < 0.3e-3
        assert lrs.index(max(lrs)) == cfg.warmup_steps - 1


def _run_schedule(cfg, curve):
    from stages.schedule import Schedule

    sched = Schedule(cfg)
    lrs = []
    for step, q in enumerate(curve):
        lrs.append(sched.lr(step))
        if sched.observe(step, q):
            return step + 1, sched, lrs
    return None, sched, lrs


def test_auto_schedule_stops_after_the_plateau_and_cools_down():
    cfg = TrainConfig(steps=None, lr=1e-3, converge_window=50, converge_tol=0.01)
    # rises for 150 steps, then flat with noise far below 1% of it
    rng = np.random.default_rng(0)
    curve = np.minimum(np.arange(3000) / 150, 1) * 0.3 + rng.normal(0, 0.0005, 3000)
    done, sched, lrs = _run_schedule(cfg, curve)
    w = cfg.warmup_steps
    # windows are compared every 50 steps after the warm-up: the first pair wholly past the rise (steps
    # 170-269) ends at w + 5 * 50 = 270
    assert sched.decay_from == w + 250 == 270
    assert done == 270 + round(0.2 * 270)
    assert "converged" in sched.reason
    assert lrs[w] == pytest.approx(1e-3) and lrs[269] == pytest.approx(1e-3)  # the peak rate until converged
    assert lrs[-1] < 0.03e-3 and all(a >= b for a, b in zip(lrs[270:], lrs[271:]))


def test_auto_schedule_never_passes_its_cap():
    cfg = TrainConfig(steps=None, max_steps=300, converge_window=20)
    done, sched, lrs = _run_schedule(cfg, np.arange(1000) * 0.01)  # never stops rising
    assert done == 300 and "cap of 300" in sched.reason
    assert sched.decay_from + sched.decay_len == 300 and lrs[-1] < 0.05 * cfg.lr
    done, sched, _ = _run_schedule(TrainConfig(steps=None, max_steps=1), [0.1])
    assert done == 1


def test_auto_fit_stops_early_recovers_planted_groups_and_says_why(planted, tmp_path):
    path, labels, classes, _ = planted
    from stages.config import ACGConfig

    res = fit_acg(
        path,
        tmp_path / "auto.pt",
        acg=ACGConfig(depth=2),
        train=TrainConfig(steps=None, max_steps=2500, converge_window=25, lr=3e-3, log_every=20),
    )
    assert res.steps < 600 and "converged" in res.stop_reason
    lines = [json.loads(s) for s in open(res.log_path)]
    assert lines[-1]["step"] == res.steps - 1 and lines[-1]["stop_reason"] == res.stop_reason
    assert all("stop_reason" not in r for r in lines[:-1])
    ck = load_checkpoint(res.path)
    assert ck.train["steps"] == res.steps and ck.train["stop_reason"] == res.stop_reason
    assert ck.train["config"]["steps"] is None
    assert planted_agreement(ck.model, path, labels, classes)[0] >= 0.9


def test_auto_fit_resumed_matches_the_uninterrupted_one(planted, tmp_path):
    """The convergence decision travels with the resume state: the resumed fit stops at the same step with the
    same weights."""
    path = planted[0]
    cfg = dict(steps=None, max_steps=200, converge_window=4, converge_tol=10.0, batch_size=8, checkpoint_every=5)
    a = fit_acg(path, tmp_path / "a.pt", train=TrainConfig(**cfg), device="cpu")
    # tol 10: converged at the first check (20 warm-up + 8 steps = 28), then 6 cool-down steps
    assert a.steps == 28 + round(0.2 * 28) and "converged" in a.stop_reason

    def boom(done, total, extra):
        if done == 31:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_acg(path, tmp_path / "c.pt", train=TrainConfig(**cfg), progress=boom, device="cpu")
    c = fit_acg(path, tmp_path / "c.pt", train=TrainConfig(**cfg), resume=True, device="cpu")
    assert c.resumed_from == 30 and c.steps == a.steps and c.stop_reason == a.stop_reason
    sa, sc = load_checkpoint(a.path).model.state_dict(), load_checkpoint(c.path).model.state_dict()
    assert all(torch.allclose(sa[k], sc[k], atol=1e-6) for k in sa)
    assert not resume_path(tmp_path / "c.pt").exists()


def test_loss_curve_ticks_are_round_and_cover_the_range():
    from stages.fitlog import nice_ticks

    assert nice_ticks(0, 300, 6) == [0, 50, 100, 150, 200, 250, 300]
    assert nice_ticks(-0.213, -0.05, 5) == [-0.2, -0.15, -0.1, -0.05]
    t = nice_ticks(0.1234, 0.1301, 5)
    assert all(0.1234 <= v <= 0.1301 for v in t) and 3 <= len(t) <= 8
    assert nice_ticks(1.0, 1.0) == [1.0]


def test_durations_read_as_people_say_them():
    from stages.humanize import duration

    assert [duration(s) for s in (0, 42.4, 89, 90, 210, 5399, 5400, 9000)] == [
        "0 s",
        "42 s",
        "89 s",
        "1.5 min",
        "3.5 min",
        "90.0 min",
        "1.5 h",
        "2.5 h",
    ]
