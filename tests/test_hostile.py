"""Every stage against the generated hostile corpus (tests/hostile.py): one line `Error: what; what to do`,
exit 1 (2 for usage), no traceback, nothing on stdout, no output under the final name, inputs untouched,
no code run from files. Sets of images skip the bad ones and process the rest."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import hostile
import pytest
from helpers import TEST_BACKBONE, cli, make_images


def _digest(p: Path) -> str:
    if p.is_dir():
        return "dir:" + ",".join(sorted(os.listdir(p)))
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "absent"


def one_error_line(r, code=1):
    """The contract of a refused input, checked on what the command wrote."""
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines, "no message"
    assert lines[-1].startswith("Error: ") and "; " in lines[-1], lines[-1]
    assert sum(x.startswith("Error") for x in lines) == 1
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    return lines[-1]


# -- stores: every reader of every kind ---------------------------------------------------------------------
def _store_commands(kind: str, broken: Path, valid: dict, out: Path) -> dict:
    if kind == "features":
        return {
            "fit-acg": ["fit-acg", broken, "-o", out / "a.pt", "--steps", "2", "--batch-size", "2", "-q"],
            "conceptualize": ["conceptualize", broken, "--acg", valid["acg"], "-o", out / "c.h5", "-q"],
            "conceptualize --method kmeans": ["conceptualize", broken, "--method", "kmeans", "-o", out / "c.h5", "-q"],
            "merge": ["merge", broken, "-o", out / "m.h5", "-q"],
            "refine": ["refine", Path(valid["classes"]).parent, "-f", broken, "-o", out / "r", "-q"],
        }
    if kind == "concepts":
        return {
            "classify": ["classify", broken, "-K", "3", "-o", out / "labels", "-q"],
            "classify (two parts)": ["classify", valid["concepts"], broken, "-K", "3", "-o", out / "labels", "-q"],
            "merge": ["merge", broken, "-o", out / "m.h5", "-q"],
        }
    return {
        "classify --centroids": ["classify", valid["concepts"], "--centroids", broken, "-o", out / "labels", "-q"],
        "refine": ["refine", broken, "-f", valid["features"], "-o", out / "r", "-q"],
    }


STORE_CASES = [
    (kind, case, stage)
    for kind in ("features", "concepts", "classes")
    for case in hostile.stores(kind)
    for stage in _store_commands(kind, Path("x"), {"acg": "", "concepts": "", "classes": "", "features": ""}, Path("o"))
]


@pytest.mark.parametrize("kind,case,stage", STORE_CASES, ids=[f"{k}:{c}:{s}" for k, c, s in STORE_CASES])
def test_hostile_stores(valid, tmp_path, kind, case, stage):
    broken = hostile.stores(kind)[case](valid[kind], tmp_path / f"broken.{kind}.h5")
    before = _digest(broken)
    out = tmp_path / "out"
    out.mkdir()
    one_error_line(cli(_store_commands(kind, broken, valid, out)[stage]))
    assert _digest(broken) == before  # the input is not touched
    visible = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    assert visible == [], visible  # nothing under a final name
    assert not list(out.glob(".*.lock"))


# -- checkpoints --------------------------------------------------------------------------------------------
CKPT_CASES = list(hostile.checkpoints())


@pytest.mark.parametrize("case", CKPT_CASES)
def test_hostile_checkpoints(valid, tmp_path, case):
    broken = hostile.checkpoints()[case](valid["acg"], tmp_path / "broken.pt")
    out = tmp_path / "c.h5"
    one_error_line(cli(["conceptualize", valid["features"], "--acg", broken, "-o", out, "-q"]))
    assert not out.exists()
    assert not (tmp_path / "PWNED").exists()  # nothing in the file was executed


@pytest.mark.parametrize("case", CKPT_CASES)
def test_hostile_files_as_refine_heads(valid, tmp_path, case):
    broken = hostile.checkpoints()[case](valid["acg"], tmp_path / "broken.pt")
    out = tmp_path / "r"
    one_error_line(cli(["refine", valid["classes"], "-f", valid["features"], "--head", broken, "-o", out, "-q"]))
    assert not out.exists()
    assert not (tmp_path / "PWNED").exists()  # nothing in the file was executed


@pytest.mark.parametrize(
    "case", ["truncated", "plain pickle that runs code", "torch file that runs code", "weight of wrong shape"]
)
def test_hostile_resume_states_are_ignored_not_run(valid, tmp_path, case):
    """A broken `.NAME.resume` beside the output: fit-acg starts afresh (it says so), runs nothing from it."""
    out = tmp_path / "acg.pt"
    hostile.checkpoints()[case](valid["acg"], tmp_path / ".acg.pt.resume")
    r = cli(["fit-acg", valid["features"], "-o", out, "--steps", "2", "--batch-size", "2", "--resume", "-q"])
    assert r.exit_code == 0, r.stderr
    assert out.exists() and not (tmp_path / "PWNED").exists()


# -- images -------------------------------------------------------------------------------------------------
IMAGE_CASES = list(hostile.images())


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_each_hostile_image_alone(tmp_path, case):
    d = tmp_path / "imgs"
    d.mkdir()
    hostile.make_image(d, case)
    _, _, usable = hostile.images()[case]
    out = tmp_path / "f.h5"
    # through a list file too, so that non-regular files (a FIFO) reach the decoder
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\n".join(os.fsencode(p) for p in d.iterdir()) + b"\n")
    for src in (d, lst):
        r = cli(["extract", src, "-o", out, *TEST_BACKBONE, "--overwrite"])
        if usable:
            assert r.exit_code == 0, r.stderr
            assert r.stdout.strip() == str(out)
        else:
            one_error_line(r)
            assert not out.exists()


def test_the_whole_image_corpus_in_one_run_stays_contained(tmp_path):
    """All hostile images with good ones, plus a list naming files by ../ and absolute paths: the usable ones
    are extracted, the others skipped with their names, and every output stays inside its folder."""
    d = tmp_path / "corpus"
    d.mkdir()
    for case in IMAGE_CASES:
        if case != "FIFO named .png":  # a folder search lists regular files only
            hostile.make_image(d, case)
    make_images(tmp_path / "good", n=3)
    outside = tmp_path / "elsewhere"
    make_images(outside, n=1, seed=5)
    lst = tmp_path / "lists" / "more.txt"
    lst.parent.mkdir()
    lst.write_text(f"../elsewhere/img_00.png\n{tmp_path / 'good' / 'img_01.png'}\n")
    feats = tmp_path / "f.h5"
    r = cli(["extract", d, lst, "-o", feats, *TEST_BACKBONE])
    assert r.exit_code == 0, r.stderr
    usable = [c for c, (_, _, ok) in hostile.images().items() if ok]
    unusable = [c for c, (_, _, ok) in hostile.images().items() if not ok and c != "FIFO named .png"]
    from stages.features import FeatureStore

    with FeatureStore(feats) as st:
        assert st.n_images == len(usable) + 2
        skipped = json.loads(st.attr("skipped"))
        assert len(skipped) == len(unusable)
        assert all(s["reason"] for s in skipped)
    run = tmp_path / "run"
    r = cli(
        ["conceptualize", feats, "--method", "kmeans", "-o", tmp_path / "c.h5", "--preview", run / "concepts", "-q"]
    )
    assert r.exit_code == 0, r.stderr
    r = cli(["classify", tmp_path / "c.h5", "-K", "3", "-o", run / "labels", "--preview", run / "preview", "-q"])
    assert r.exit_code == 0, r.stderr
    for sub in ("concepts", "labels", "preview"):
        files = [p for p in (run / sub).rglob("*") if p.is_file()]
        assert files and all(p.resolve().is_relative_to((run / sub).resolve()) for p in files)
    assert len(list((run / "labels").glob("*.png"))) == len(usable) + 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["corpus", "good", "elsewhere", "lists", "f.h5", "c.h5", "run"]
    )


# -- score ----------------------------------------------------------------------------------------------------
SCORE_CASES = list(hostile.label_folders())


@pytest.mark.parametrize("case", SCORE_CASES)
def test_hostile_label_folders(tmp_path, case):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    hostile.label_folders()[case](pred, gt)
    before = {p: _digest(p) for p in list(pred.rglob("*")) + list(gt.rglob("*"))}
    one_error_line(cli(["score", pred, gt, "--dataset", "camvid11", "--no-confusion"]))
    assert {p: _digest(p) for p in before} == before


def corpus_counts() -> dict:
    """How many hostile inputs and (input, stage) pairs the suite tries; printed by `python tests/test_hostile.py`."""
    c = {
        "images": len(IMAGE_CASES),
        "image cases (folder, list, all together)": 2 * len(IMAGE_CASES) + 1,
        "store variants": sum(len(hostile.stores(k)) for k in ("features", "concepts", "classes")),
        "store x stage cases": len(STORE_CASES),
        "checkpoints": len(CKPT_CASES),
        "checkpoint cases": len(CKPT_CASES) + 4,
        "label-folder cases": len(SCORE_CASES),
        "full-disk cases": 3 * len(FULL_DISK),
    }
    c["cases"] = (
        c["image cases (folder, list, all together)"]
        + c["store x stage cases"]
        + c["checkpoint cases"]
        + c["label-folder cases"]
        + c["full-disk cases"]
    )
    return c


# -- a full disk, for every stage that writes -----------------------------------------------------------------
def _limited(args, cwd, blocks):
    """Run a command with a file-size limit of ``blocks`` x 512 bytes (a full disk, as the writer sees it)."""
    import resource
    import subprocess
    import sys

    from helpers import cli_env

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (blocks * 512, blocks * 512))

    return subprocess.run(
        [sys.executable, "-m", "acseg_cli", *map(str, args)],
        cwd=cwd,
        env=cli_env(),
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def disk_inputs(tmp_path_factory, valid):
    d = tmp_path_factory.mktemp("disk")
    make_images(d / "imgs", n=4)
    for i in range(2):
        r = cli(["extract", d / "imgs", "--shard", f"{i}/2", "-o", d / f"s{i}.h5", *TEST_BACKBONE, "--batch-size", "1"])
        assert r.exit_code == 0, r.stderr
    return d


FULL_DISK = {
    "extract": lambda v, d, out: [
        "extract",
        d / "imgs",
        "-o",
        out / "x.h5",
        *TEST_BACKBONE,
        "--workers",
        "0",
        "--overwrite",
    ],
    "fit-acg": lambda v, d, out: [
        "fit-acg",
        v["features"],
        "-o",
        out / "x.pt",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "-q",
        "--overwrite",
    ],
    "conceptualize": lambda v, d, out: [
        "conceptualize",
        v["features"],
        "--acg",
        v["acg"],
        "-o",
        out / "x.h5",
        "-q",
        "--overwrite",
    ],
    "classify": lambda v, d, out: ["classify", v["concepts"], "-K", "3", "-o", out / "x", "-q", "--overwrite"],
    "merge": lambda v, d, out: ["merge", d / "s0.h5", d / "s1.h5", "-o", out / "x.h5", "-q", "--overwrite"],
}


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [1, 8, 64])
@pytest.mark.parametrize("stage", list(FULL_DISK))
def test_a_full_disk_is_one_line_for_every_stage(valid, disk_inputs, tmp_path, stage, blocks):
    out = tmp_path / "out"
    out.mkdir()
    args = FULL_DISK[stage](valid, disk_inputs, out)
    target = Path(str(args[args.index("-o") + 1]))
    if target.suffix:  # a previous output that must survive
        target.write_bytes(b"previous output")
    p = _limited(args, tmp_path, blocks)
    if p.returncode == 0 and blocks > 1:  # the limit was large enough for this stage's whole output
        return
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "disk space" in lines[0], p.stderr[-3000:]
    assert p.stdout == ""
    if target.suffix:
        assert target.read_bytes() == b"previous output"
    else:
        assert not target.exists()
    assert [x.name for x in out.iterdir() if x != target] == []  # no partial file or folder left


if __name__ == "__main__":
    print(json.dumps(corpus_counts()))
