"""The hostile corpus, part two (issue 24): outputs never destroy what acseg did not write, writes are never
redirected through planted links, garbage is refused, bad option values are usage errors before any file
exists, lying files and resource claims end in one line. Each case failed on the code before that issue."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import TEST_BACKBONE, cli, make_images
from PIL import Image
from test_hostile import _limited, one_error_line

from stages.classify import classify
from stages.errors import AcsegError


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real (random) photos, their features, ACG and concepts: for cases that need the photos' folder."""
    d = tmp_path_factory.mktemp("photos")
    make_images(d / "imgs", n=4)
    feats = d / "f.h5"
    assert cli(["extract", d / "imgs", "-o", feats, *TEST_BACKBONE]).exit_code == 0
    r = cli(["conceptualize", feats, "--method", "kmeans", "-o", d / "c.h5", "-q"])
    assert r.exit_code == 0, r.stderr
    return {"dir": d, "imgs": d / "imgs", "features": feats, "concepts": d / "c.h5"}


def digest(p: Path) -> str:
    if p.is_dir():
        return "dir:" + json.dumps(sorted((str(q.relative_to(p)), digest(q)) for q in p.rglob("*") if q.is_file()))
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "absent"


# -- outputs destroy nothing they did not write ---------------------------------------------------------------
@pytest.mark.parametrize("stage", ["classify", "conceptualize"])
def test_preview_never_replaces_a_file_without_overwrite(photos, tmp_path, stage):
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "img_00.png").write_bytes(b"a picture of mine")
    args = (
        ["classify", photos["concepts"], "-K", "2", "-o", tmp_path / "labels"]
        if stage == "classify"
        else ["conceptualize", photos["features"], "--method", "kmeans", "-o", tmp_path / "c.h5"]
    )
    msg = one_error_line(cli([*args, "--preview", prev, "-q"]))
    assert "already holds img_00.png" in msg and "--overwrite" in msg
    assert (prev / "img_00.png").read_bytes() == b"a picture of mine"
    assert not (tmp_path / "labels").exists() and not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize("stage", ["classify", "conceptualize"])
def test_preview_into_the_photos_folder_is_refused_even_with_overwrite(photos, tmp_path, stage):
    before = digest(photos["imgs"])
    args = (
        ["classify", photos["concepts"], "-K", "2", "-o", tmp_path / "labels"]
        if stage == "classify"
        else ["conceptualize", photos["features"], "--method", "kmeans", "-o", tmp_path / "c.h5"]
    )
    msg = one_error_line(cli([*args, "--preview", photos["imgs"], "--overwrite", "-q"]), code=2)
    assert "input" in msg
    assert digest(photos["imgs"]) == before


def test_classify_overwrite_of_a_folder_it_did_not_write_is_refused(valid, tmp_path, monkeypatch):
    """`-o . --overwrite` once removed the concepts store and an unrelated file."""
    work = tmp_path / "work"
    work.mkdir()
    concepts = work / "concepts.h5"
    concepts.write_bytes(valid["concepts"].read_bytes())
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    msg = one_error_line(cli(["classify", "concepts.h5", "-K", "3", "-o", ".", "--overwrite", "-q"]), code=2)
    assert "holds the input" in msg
    assert (work / "notes.txt").read_text() == "mine" and concepts.read_bytes() == valid["concepts"].read_bytes()
    # a folder with a file of someone else's in it: refused, nothing removed
    out = tmp_path / "labels"
    assert cli(["classify", valid["concepts"], "-K", "3", "-o", out, "-q"]).exit_code == 0
    (out / "mine.txt").write_text("keep")
    before = digest(out)
    msg = one_error_line(cli(["classify", valid["concepts"], "-K", "3", "-o", out, "--overwrite", "-q"]))
    assert "mine.txt" in msg and "did not write" in msg
    assert digest(out) == before
    # the classify output alone is replaced
    (out / "mine.txt").unlink()
    r = cli(["classify", valid["concepts"], "-K", "2", "-o", out, "--overwrite", "-q"])
    assert r.exit_code == 0, r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or old folder left


@pytest.mark.parametrize("stage", ["conceptualize", "fit-acg", "merge"])
def test_an_output_is_never_its_own_input(valid, tmp_path, stage):
    feats = tmp_path / "sub" / "feats.h5"
    feats.parent.mkdir()
    feats.write_bytes(valid["features"].read_bytes())
    alias = tmp_path / "sub" / ".." / "sub" / "feats.h5"  # the same file by another spelling
    args = {
        "conceptualize": ["conceptualize", feats, "--acg", valid["acg"], "-o", alias],
        "fit-acg": ["fit-acg", feats, "-o", alias, "--steps", "2"],
        "merge": ["merge", feats, "-o", alias],
    }[stage]
    msg = one_error_line(cli([*args, "--overwrite", "-q"]), code=2)
    assert "is the input" in msg
    assert feats.read_bytes() == valid["features"].read_bytes()


def test_fit_acg_outputs_of_two_names_keep_their_own_log_and_curve(valid, tmp_path):
    for name in ("a.v1", "a.v2"):
        r = cli(
            [
                "fit-acg",
                valid["features"],
                "-o",
                tmp_path / name,
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--depth",
                "1",
                "-q",
                "--json",
            ]
        )
        assert r.exit_code == 0, r.stderr
        res = json.loads(r.stdout)
        assert Path(res["log"]).name == f"{name}.log.jsonl" and Path(res["plot"]).name == f"{name}.loss.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a.v1", "a.v1.log.jsonl", "a.v1.loss.png", "a.v2", "a.v2.log.jsonl", "a.v2.loss.png"]
    )


def test_fit_acg_never_replaces_a_side_file_it_did_not_write(valid, tmp_path):
    (tmp_path / "acg.loss.png").write_bytes(b"my plot")
    msg = one_error_line(cli(["fit-acg", valid["features"], "-o", tmp_path / "acg.pt", "--steps", "2", "-q"]))
    assert "acg.loss.png already exists" in msg
    assert (tmp_path / "acg.loss.png").read_bytes() == b"my plot" and not (tmp_path / "acg.pt").exists()


def test_conceptualize_keeps_a_cached_acg_of_other_settings(valid, tmp_path):
    out = tmp_path / "c.h5"
    cached = tmp_path / "c.acg.pt"
    cached.write_bytes(valid["acg"].read_bytes())  # fitted with 2 steps: not the implicit fit's settings
    msg = one_error_line(cli(["conceptualize", valid["features"], "-o", out, "--fit-steps", "3", "-q"]))
    assert "--overwrite" in msg
    assert cached.read_bytes() == valid["acg"].read_bytes()


def test_a_second_classify_on_one_folder_stops_at_once(valid, tmp_path):
    from stages.output import acquire_output_lock, release_output_lock

    out = tmp_path / "labels"
    fd = acquire_output_lock(out.absolute())
    try:
        msg = one_error_line(cli(["classify", valid["concepts"], "-K", "3", "-o", out, "-q"]))
    finally:
        release_output_lock(out.absolute(), fd)
    assert "another acseg process is writing" in msg
    assert not out.exists()


def test_an_output_in_a_missing_folder_is_refused_before_the_work(valid, tmp_path):
    """classify and refine said "No such file or directory (.x.lock); check free disk space" after their work;
    now one line that names the folder, before it (and the lock itself says the same to any caller)."""
    from stages.output import acquire_output_lock

    labels = tmp_path / "labels"
    assert cli(["classify", valid["concepts"], "-K", "3", "-o", labels, "-q"]).exit_code == 0
    runs = {
        "classify": ["classify", valid["concepts"], "-K", "3"],
        "refine": ["refine", labels, "-f", valid["features"], "--pamr", "0"],
    }
    for stage, args in runs.items():
        msg = one_error_line(cli([*args, "-o", tmp_path / "missing" / "out", "-q"]))
        assert f"folder {tmp_path / 'missing'} does not exist" in msg, (stage, msg)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(AcsegError, match="does not exist"):
        acquire_output_lock(tmp_path / "missing" / "out")


def test_names_differing_only_by_extension_get_a_map_each(tmp_path):
    d = tmp_path / "imgs"
    make_images(d, n=2)
    (d / "img_00.png").rename(d / "a.png")
    Image.open(d / "img_01.png").convert("RGB").save(d / "a.jpg")
    (d / "img_01.png").unlink()
    assert cli(["extract", d, "-o", tmp_path / "f.h5", *TEST_BACKBONE]).exit_code == 0
    assert (
        cli(
            ["conceptualize", tmp_path / "f.h5", "--method", "kmeans", "-k", "2", "-o", tmp_path / "c.h5", "-q"]
        ).exit_code
        == 0
    )
    r = cli(["classify", tmp_path / "c.h5", "-K", "2", "-o", tmp_path / "labels"])
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "labels").glob("*.png")) == ["a.jpg.png", "a.png.png"]
    assert "share a name" in r.stderr


def test_extract_resume_after_the_plan_changed_starts_afresh(tmp_path):
    """A partial store planned with --max-aspect 2 (the wide photo skipped) must not be continued by a run
    that plans it in: it would drop or repeat images."""
    d = tmp_path / "imgs"
    make_images(d, n=4)
    Image.fromarray(np.zeros((40, 200, 3), np.uint8)).save(d / "img_01w.png")  # a panorama, 5:1
    out = tmp_path / "f.h5"
    assert cli(["extract", d, "-o", out, *TEST_BACKBONE, "--max-aspect", "2", "--batch-size", "1"]).exit_code == 0
    partial = tmp_path / ".f.h5.partial"
    out.rename(partial)
    with h5py.File(partial, "r+") as f:  # as if killed after its first batch
        f.attrs["complete"] = False
    r = cli(["extract", d, "-o", out, *TEST_BACKBONE, "--batch-size", "1", "--resume"])
    assert r.exit_code == 0, r.stderr
    from stages.features import FeatureStore

    with FeatureStore(out) as st:
        assert sorted(st.names) == sorted(p.name for p in d.iterdir()) and st.params["max_aspect"] == 8.0


@pytest.mark.parametrize("what", ["FIFO", "symlink to a file", "dangling symlink"])
def test_overwrite_never_replaces_what_is_not_a_regular_file(valid, tmp_path, what):
    target = tmp_path / "c.h5"
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim")
    if what == "FIFO":
        os.mkfifo(target)
    else:
        target.symlink_to(victim if what == "symlink to a file" else tmp_path / "nowhere" / "x.h5")
    msg = one_error_line(
        cli(["conceptualize", valid["features"], "--acg", valid["acg"], "-o", target, "--overwrite", "-q"])
    )
    assert "never replaces" in msg or "symbolic link" in msg
    assert os.path.lexists(target) and victim.read_bytes() == b"victim"
    assert not (tmp_path / "nowhere").exists()


def test_confusion_png_is_written_whole_or_not_at_all(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 11, (24, 32)).astype(np.uint8)).save(gt / f"im{i}.png")
        Image.fromarray(rng.integers(0, 5, (24, 32)).astype(np.uint8)).save(pred / f"im{i}.png")
    png = tmp_path / "conf.png"
    png.write_bytes(b"previous picture")
    p = _limited(["score", pred, gt, "--dataset", "camvid11", "--confusion-png", png, "-q"], tmp_path, 8)  # 4 KB
    assert p.returncode == 1, p.stderr
    assert png.read_bytes() == b"previous picture"
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []


# -- writes are never redirected -------------------------------------------------------------------------------
@pytest.mark.parametrize("resume", [False, True])
def test_a_planted_partial_link_is_not_followed(tmp_path, resume):
    d = tmp_path / "imgs"
    make_images(d, n=2)
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir(), outside.mkdir()
    (work / ".f.h5.partial").symlink_to(outside / "x.h5")
    r = cli(["extract", d, "-o", work / "f.h5", *TEST_BACKBONE, *(["--resume"] if resume else [])])
    assert r.exit_code == 0, r.stderr
    assert list(outside.iterdir()) == []
    assert (work / "f.h5").is_file() and not (work / "f.h5").is_symlink()


def test_a_planted_lock_link_is_refused_and_creates_nothing(valid, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / ".c.h5.lock").symlink_to(elsewhere / "created")
    msg = one_error_line(
        cli(["conceptualize", valid["features"], "--acg", valid["acg"], "-o", tmp_path / "c.h5", "-q"])
    )
    assert "symbolic link" in msg
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "c.h5").exists()


def test_planted_links_at_fit_side_files_are_refused(valid, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim")
    (tmp_path / "a.loss.png").symlink_to(victim)
    msg = one_error_line(
        cli(["fit-acg", valid["features"], "-o", tmp_path / "a.pt", "--steps", "2", "--overwrite", "-q"])
    )
    assert "symbolic link" in msg and victim.read_bytes() == b"victim"


def test_temporaries_have_unpredictable_names(valid, tmp_path, monkeypatch):
    """Every temporary of every writer is made by tempfile (O_EXCL), so no name can be planted in advance."""
    import tempfile

    made = []
    real = tempfile.mkstemp

    def spy(*a, **k):
        fd, name = real(*a, **k)
        made.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    out = tmp_path / "a.pt"
    r = cli(["fit-acg", valid["features"], "-o", out, "--steps", "2", "--batch-size", "2", "--depth", "1", "-q"])
    assert r.exit_code == 0, r.stderr
    assert sorted(Path(m).name.split(".")[1] for m in made) == ["a", "a", "a"]  # checkpoint, log, curve
    assert all(Path(m).parent == tmp_path for m in made)
    made.clear()
    r = cli(["classify", valid["concepts"], "-K", "2", "-o", tmp_path / "labels", "--preview", tmp_path / "prev", "-q"])
    assert r.exit_code == 0, r.stderr
    maps = [m for m in made if Path(m).name.startswith(".img_")]
    assert len(maps) == 2 * 12  # a label map and a preview per image, each through a fresh temporary


def test_a_lock_taken_on_a_removed_name_is_taken_again(tmp_path, monkeypatch):
    """Rule 4: writer B opens the lock file while A holds it; A removes the name and unlocks before B's flock
    runs. B's flock then succeeds on a file no longer at the name: B must notice, retry, and end up holding the
    file at the name, so that a third writer C is refused (without the check, B and C both held "the" lock)."""
    import fcntl

    from stages import output

    target = tmp_path / "x.h5"
    a = output.acquire_output_lock(target)
    real_flock, raced = fcntl.flock, []

    def flock(fd, op):
        if op & fcntl.LOCK_EX and not raced:  # B, between its open and its flock
            raced.append(fd)
            output.release_output_lock(target, a)
        return real_flock(fd, op)

    monkeypatch.setattr(output.fcntl, "flock", flock)
    b = output.acquire_output_lock(target)
    monkeypatch.setattr(output.fcntl, "flock", real_flock)
    assert raced  # the race happened
    held = os.fstat(b)
    assert os.path.samestat(held, os.lstat(output.lock_path(target)))  # (inode numbers may be reused: not compared)
    with pytest.raises(Exception, match="another acseg process"):
        output.acquire_output_lock(target)  # C
    output.release_output_lock(target, b)
    assert not output.lock_path(target).exists()


# -- garbage is refused ----------------------------------------------------------------------------------------
def _edit_checkpoint(src: Path, dst: Path, fn) -> Path:
    obj = torch.load(src, map_location="cpu", weights_only=True)
    fn(obj)
    torch.save(obj, dst)
    return dst


@pytest.mark.parametrize(
    "case",
    [
        "NaN weight",
        "Inf prototype",
        "float16 weights",
        "float64 weights",
        "provenance a JSON list",
        "config a JSON list",
        "train a number",
    ],
)
def test_lying_or_broken_checkpoints_are_refused(valid, tmp_path, case):
    def nan(o):
        k = next(iter(o["state_dict"]))
        o["state_dict"][k] = o["state_dict"][k].clone().fill_(float("nan"))

    def inf_proto(o):
        k = next(k for k in o["state_dict"] if "proto" in k)
        o["state_dict"][k] = o["state_dict"][k].clone().fill_(float("inf"))

    fns = {
        "NaN weight": nan,
        "Inf prototype": inf_proto,
        "float16 weights": lambda o: o.__setitem__("state_dict", {k: v.half() for k, v in o["state_dict"].items()}),
        "float64 weights": lambda o: o.__setitem__("state_dict", {k: v.double() for k, v in o["state_dict"].items()}),
        "provenance a JSON list": lambda o: o.__setitem__("provenance", "[1, 2]"),
        "config a JSON list": lambda o: o.__setitem__("config", "[]"),
        "train a number": lambda o: o.__setitem__("train", "3"),
    }
    bad = _edit_checkpoint(valid["acg"], tmp_path / "bad.pt", fns[case])
    one_error_line(cli(["conceptualize", valid["features"], "--acg", bad, "-o", tmp_path / "c.h5", "-q"]))
    assert not (tmp_path / "c.h5").exists()


def test_extract_refuses_weights_holding_nan(tmp_path):
    from stages.backbones import create_backbone

    bb = create_backbone("test-vit", random_weights=True)
    sd = {k: v.clone() for k, v in bb.vit.state_dict().items()}
    sd[next(k for k in sd if k.endswith("weight"))].fill_(float("nan"))
    torch.save(sd, tmp_path / "w.pth")
    make_images(tmp_path / "imgs", n=2)
    msg = one_error_line(
        cli(
            [
                "extract",
                tmp_path / "imgs",
                "-o",
                tmp_path / "f.h5",
                "--backbone",
                "test-vit",
                "--weights",
                tmp_path / "w.pth",
                "-q",
            ]
        )
    )
    assert "NaN" in msg and not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("case", ["without optimizer", "step a string", "optimizer of another model"])
def test_resume_states_that_cannot_continue_are_ignored(valid, tmp_path, case, monkeypatch):
    out = tmp_path / "acg.pt"
    r = cli(
        [
            "fit-acg",
            valid["features"],
            "-o",
            out,
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--depth",
            "1",
            "--checkpoint-every",
            "2",
            "-q",
        ]
    )
    assert r.exit_code == 0, r.stderr
    rp = tmp_path / ".acg.pt.resume"
    # the resume state of step 2, rebuilt from the finished checkpoint with the fields a resume reads
    obj = torch.load(out, map_location="cpu", weights_only=True)
    obj.update(
        optimizer={"state": {}, "param_groups": []},
        step=2,
        history="[]",
        torch_rng=torch.get_rng_state(),
        world=1,
        schedule="{}",
    )
    obj["train"] = json.dumps({"config": json.loads(obj["train"])["config"]})
    if case == "without optimizer":  # the optimizer of every other case has no parameter group: it does not fit
        obj.pop("optimizer")
    elif case == "step a string":
        obj["step"] = "2"
    torch.save(obj, rp)
    loads = []
    import stages.checkpoint as ckpt

    real = ckpt.load_checkpoint
    monkeypatch.setattr(
        ckpt, "load_checkpoint", lambda p, mmap=False: (loads.append((Path(p).name, mmap)), real(p, mmap))[1]
    )
    r = cli(
        [
            "fit-acg",
            valid["features"],
            "-o",
            out,
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--depth",
            "1",
            "--checkpoint-every",
            "2",
            "--resume",
            "--overwrite",
        ]
    )
    assert r.exit_code == 0, r.stderr
    assert "starting afresh" in r.stderr
    assert loads and all(m for name, m in loads if name == rp.name)  # mapped, never read whole


def test_conceptualize_negative_batch_size_writes_nothing(valid, tmp_path):
    for bs in ("-1", "0"):
        one_error_line(
            cli(
                [
                    "conceptualize",
                    valid["features"],
                    "--acg",
                    valid["acg"],
                    "-o",
                    tmp_path / "c.h5",
                    "--batch-size",
                    bs,
                    "-q",
                ]
            ),
            code=2,
        )
    assert list(tmp_path.iterdir()) == []


# -- bad option values are usage errors, before any file exists ------------------------------------------------
def _usage_cases(v: dict, d: Path) -> dict:
    fit = ["fit-acg", v["features"], "-o", d / "a.pt", "--steps", "2", "-q"]
    con = ["conceptualize", v["features"], "--acg", v["acg"], "-o", d / "c.h5", "-q"]
    cla = ["classify", v["concepts"], "-K", "3", "-o", d / "labels", "-q"]
    ext = ["extract", d / "imgs", "-o", d / "f.h5", *TEST_BACKBONE]
    return {
        "fit --prototypes 0": [*fit, "--prototypes", "0"],
        "fit --prototypes 300": [*fit, "--prototypes", "300"],
        "fit --dropout 1.5": [*fit, "--dropout", "1.5"],
        "fit --max-tokens -5": [*fit, "--max-tokens", "-5"],
        "fit --lr nan": [*fit, "--lr", "nan"],
        "fit --lr -1": [*fit, "--lr", "-1"],
        "fit --seed -1": [*fit, "--seed", "-1"],
        "fit --depth 0": [*fit, "--depth", "0"],
        "fit --mlp-ratio 0": [*fit, "--mlp-ratio", "0"],
        "fit --heads -3": [*fit, "--heads", "-3"],
        "fit --checkpoint-every -1": [*fit, "--checkpoint-every", "-1"],
        "fit --tau inf": [*fit, "--tau", "inf"],
        "fit --device nonsense": [*fit, "--device", "nonsense"],
        "fit --device cuda (no GPU)": [*fit, "--device", "cuda"],
        "conceptualize --batch-size 0": [*con, "--batch-size", "0"],
        "conceptualize --device cuda:7": [*con, "--device", "cuda:7"],
        "conceptualize --seed -2": [*con, "--seed", "-2"],
        "classify --n-init 0": [*cla, "--n-init", "0"],
        "classify --ignore-index -1": [*cla, "--ignore-index", "-1"],
        "classify --seed -1": [*cla, "--seed", "-1"],
        "extract --max-aspect nan": [*ext, "--max-aspect", "nan"],
        "extract --workers -1": [*ext, "--workers", "-1"],
        "extract --device nonsense": [*ext, "--device", "nonsense"],
        "score --ignore-index 70000": ["score", d / "pred", d / "gt", "--ignore-index", "70000"],
        "score --ignore-index -1": ["score", d / "pred", d / "gt", "--ignore-index", "-1"],
        "score --workers -3": ["score", d / "pred", d / "gt", "--workers", "-3"],
    }


USAGE = list(_usage_cases({"features": "", "acg": "", "concepts": ""}, Path(".")))


@pytest.mark.parametrize("case", USAGE)
def test_bad_option_values_are_usage_errors_before_any_file(valid, tmp_path, case):
    if torch.cuda.is_available() and "cuda" in case:
        pytest.skip("this machine has a GPU")
    make_images(tmp_path / "imgs", n=1)
    for sub in ("pred", "gt"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / sub / "a.png")
    before = sorted(p.name for p in tmp_path.iterdir())
    one_error_line(cli(_usage_cases(valid, tmp_path)[case]), code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# -- lying stores and resource claims ---------------------------------------------------------------------------
def _lying_store(src: Path, dst: Path, fn) -> Path:
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        fn(f)
    return dst


LYING = {
    "backbone a JSON list": ("features", lambda f: f.attrs.__setitem__("backbone", "[1]")),
    "params a JSON list": ("features", lambda f: f.attrs.__setitem__("params", "[]")),
    "parent a JSON string": ("concepts", lambda f: f.attrs.__setitem__("parent", '"x"')),
    "features_provenance a JSON list": ("concepts", lambda f: f.attrs.__setitem__("features_provenance", "[]")),
    "skipped not JSON": ("features", lambda f: f.attrs.__setitem__("skipped", "{oops")),
    "n_images a string": ("features", lambda f: f.attrs.__setitem__("n_images", "twelve")),
    "image_size 0": ("concepts", lambda f: f["image_size"].__setitem__(0, [0, 5])),
    "image_size negative": ("features", lambda f: f["image_size"].__setitem__(0, [-4, 5])),
    "image_size 20000 x 20000": ("concepts", lambda f: f["image_size"].__setitem__(0, [20000, 20000])),
}


@pytest.mark.parametrize("case", list(LYING))
def test_lying_store_attributes_end_in_one_line(valid, tmp_path, case):
    kind, fn = LYING[case]
    bad = _lying_store(valid[kind], tmp_path / f"bad.{kind}.h5", fn)
    args = (
        ["conceptualize", bad, "--acg", valid["acg"], "-o", tmp_path / "c.h5", "-q"]
        if kind == "features"
        else ["classify", bad, "-K", "3", "-o", tmp_path / "labels", "-q"]
    )
    one_error_line(cli(args))


def test_lying_classes_and_shards_end_in_one_line(valid, tmp_path):
    classes = classify(str(valid["concepts"]), str(tmp_path / "ref"), n_classes=3).classes_file
    bad = _lying_store(
        Path(classes),
        tmp_path / "bad_classes.h5",
        lambda f: f.attrs.__setitem__("params", json.dumps({**json.loads(f.attrs["params"]), "n_classes": "3"})),
    )
    one_error_line(cli(["classify", valid["concepts"], "--centroids", bad, "-o", tmp_path / "labels", "-q"]))
    d = tmp_path / "sh"
    make_images(d / "imgs", n=4)
    for i in range(2):
        assert (
            cli(
                ["extract", d / "imgs", "--shard", f"{i}/2", "-o", d / f"s{i}.h5", *TEST_BACKBONE, "--batch-size", "1"]
            ).exit_code
            == 0
        )
    with h5py.File(d / "s1.h5", "r+") as f:
        del f["shard_plan"]
    msg = one_error_line(cli(["merge", d / "s0.h5", d / "s1.h5", "-o", d / "m.h5", "-q"]))
    assert "shard plan" in msg


def test_score_counts_only_the_ids_that_occur(tmp_path):
    """One pixel of id 12000 once made a 12000 x 15000 matrix (1.4 GB, and more for its bincount)."""
    import tracemalloc

    from stages.score import score

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    p = np.zeros((20, 30), np.uint16)
    p[0, 0] = 12000
    g = np.ones((20, 30), np.uint16)
    g[5:, :] = 15000
    Image.fromarray(p).save(pred / "a.png")
    Image.fromarray(g).save(gt / "a.png")
    tracemalloc.start()
    res = score(str(pred), str(gt))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 << 20, peak
    assert res["class_names"] == ["1", "15000"] and res["prediction_ids"] == [0, 12000]
    assert res["matching"] == {"0": 1, "12000": 0}
    r = cli(["score", pred, gt, "--confusion-png", tmp_path / "c.png", "-q"])
    assert r.exit_code == 0, r.stderr
    assert Image.open(tmp_path / "c.png").size[0] < 1000


def test_score_all_ignored_ground_truth_is_an_error(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(pred / "a.png")
    Image.fromarray(np.full((8, 8), 11, np.uint8)).save(gt / "a.png")
    msg = one_error_line(cli(["score", pred, gt, "--dataset", "camvid11"]))
    assert "every ground-truth pixel is ignored" in msg


def test_score_pairs_upper_case_png_names(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(pred / "a.PNG", format="PNG")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(gt / "a.png")
    r = cli(["score", pred, gt, "-q"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["n_images"] == 1


def test_sixteen_bit_greyscale_is_decoded_without_float64_copies(tmp_path):
    import tracemalloc

    from stages.images import load_rgb

    a = (np.arange(1200 * 1600) % 65536).astype(np.uint16).reshape(1200, 1600)
    Image.fromarray(a).save(tmp_path / "g.png")
    tracemalloc.start()
    rgb = np.asarray(load_rgb(str(tmp_path / "g.png")))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * a.nbytes + 3 * a.size + (8 << 20), peak  # float64 copies were 8 bytes a pixel each
    want = np.floor(a / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], want)


@pytest.mark.slow
def test_the_exit_handler_imports_nothing(tmp_path):
    """The exit handler once imported h5py (through stages.store) to look for failed writes: under a low
    `ulimit -v` that import failed and printed a 60-line traceback. `score` never needs h5py, so a `score`
    run must end without it loaded, and under a 400 MB address-space limit with one line."""
    import subprocess
    import sys

    from helpers import cli_env

    code = (
        "import sys, resource; resource.setrlimit(resource.RLIMIT_AS, (400 << 20, 400 << 20)); "
        "sys.argv = ['acseg', 'score', 'nowhere', 'nothing']\n"
        "from acseg_cli.app import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n"
        "    print('h5py loaded' if 'h5py' in sys.modules else 'h5py not loaded', file=sys.stderr); raise\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ") and lines[-1] == "h5py not loaded", p.stderr


def test_memory_advice_names_only_options_the_command_has(capfd):
    import typer

    from acseg_cli.options import stage

    def without(quiet: bool = False):
        raise MemoryError

    def with_batches(batch_size: int = 8):
        raise MemoryError

    for fn, says in ((without, False), (with_batches, True)):
        with pytest.raises(typer.Exit):
            stage(fn)()
        err = capfd.readouterr().err
        assert err.startswith("Error: out of memory") and ("--batch-size" in err) == says, err
