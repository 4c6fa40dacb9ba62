"""The examples Makefile and the shell pipe run end to end on the bundled photos with the random test backbone."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers import ROOT, cli_env

EXAMPLES = ROOT / "examples"
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
pytestmark = pytest.mark.slow  # every test here runs the examples as real processes


def make(args, env, check=True):
    p = subprocess.run(
        ["make", "--no-print-directory", "-C", str(EXAMPLES), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


@needs_make
def test_examples_makefile_runs_and_redoes_only_what_changed(tmp_path):
    env = cli_env()
    images = tmp_path / "images"
    shutil.copytree(EXAMPLES / "camvid" / "images", images)
    out = tmp_path / "out"
    args = [
        f"ACSEG={sys.executable} -m acseg_cli",
        "BACKBONE=test-vit",
        "BACKBONE_FLAGS=--random-weights",
        f"IMAGES={images}",
        f"GT={EXAMPLES / 'camvid' / 'labels'}",
        f"OUT={out}",
        "STEPS=5",
        "SEEDS=0 1",
        "-j2",
    ]
    p = make(args, env)
    for s in (0, 1):
        r = json.loads((out / f"score-s{s}.json").read_text())
        assert r["n_images"] == 8 and 0 <= r["miou"] <= 1
        assert len(list((out / f"labels-s{s}").glob("*.png"))) == 8
        assert len(list((out / f"refined-s{s}").glob("*.png"))) == 8  # what was scored: refine's maps
        assert (out / f"refined-s{s}" / "head.npz").is_file()
        assert len(list((out / f"preview-s{s}").glob("*.png"))) == 8
    assert "seed 0: mIoU" in p.stdout and "pictures:" in p.stdout
    targets = [str(out / "score-s0.json"), str(out / "score-s1.json")]
    assert make([*args, "-q", *targets], env, check=False).returncode == 0, (
        "a second run must find everything up to date"
    )
    stamp = (out / "feats.h5").stat().st_mtime
    time.sleep(1.1)
    os.utime(images / sorted(os.listdir(images))[0])
    assert make([*args, "-q", *targets], env, check=False).returncode != 0
    make(args, env)
    assert (out / "feats.h5").stat().st_mtime > stamp


def test_pipeline_script_runs_as_a_pipe(tmp_path):
    env = cli_env()
    env["ACSEG"] = f"{sys.executable} -m acseg_cli"
    env["EXTRACT_FLAGS"] = "--backbone test-vit --random-weights --overwrite -q"
    env["FIT_STEPS"] = "5"
    p = subprocess.run(
        [
            "bash",
            str(EXAMPLES / "pipeline.sh"),
            str(EXAMPLES / "camvid" / "images"),
            str(EXAMPLES / "camvid" / "labels"),
            str(tmp_path / "o"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("mIoU ")
    assert json.loads((tmp_path / "o" / "score.json").read_text())["n_images"] == 8


def test_score_external_script(tmp_path):
    env = cli_env()
    env["ACSEG"] = f"{sys.executable} -m acseg_cli"
    labels = EXAMPLES / "camvid" / "labels"
    p = subprocess.run(
        ["bash", str(EXAMPLES / "score_external.sh"), str(labels), str(labels), "camvid11", "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["miou"] == 1.0
    p = subprocess.run(["bash", str(EXAMPLES / "score_external.sh")], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "usage" in p.stderr


@needs_make
def test_the_readme_demo_target(tmp_path):
    """`make demo` itself, on the bundled photos, with the random test backbone instead of the real one."""
    venv = os.path.dirname(os.path.dirname(sys.executable))
    if not os.path.exists(os.path.join(venv, "bin", "pip")):
        pytest.skip("the tests do not run inside a virtual environment")
    p = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(ROOT),
            "demo",
            f"VENV={venv}",
            f"DEMO_OUT={tmp_path}",
            "DEMO_ARGS=BACKBONE=test-vit BACKBONE_FLAGS=--random-weights STEPS=5",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "seed 0: mIoU" in p.stdout and "pictures:" in p.stdout
    assert json.loads((tmp_path / "score-s0.json").read_text())["n_images"] == 8


def _same_store(a, b):
    import h5py
    import numpy as np

    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert fa.attrs["content_sha256"] == fb.attrs["content_sha256"]
        for k in fa:
            if isinstance(fa[k], h5py.Dataset):
                assert np.array_equal(fa[k][:], fb[k][:]), k


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("unsharded") / "feats.h5"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "acseg_cli",
            "extract",
            str(EXAMPLES / "camvid" / "images"),
            "-o",
            str(out),
            "--backbone",
            "test-vit",
            "--random-weights",
            "--batch-size",
            "2",
            "-q",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    return out


@needs_make
def test_sharded_makefile_with_make_j(tmp_path, unsharded):
    args = [
        f"ACSEG={sys.executable} -m acseg_cli",
        f"IMAGES={EXAMPLES / 'camvid' / 'images'}",
        f"OUT={tmp_path}",
        "SHARDS=3",
        "EXTRACT_FLAGS=--backbone test-vit --random-weights --batch-size 2 --workers 0",
        "-j3",
    ]
    p = make(["-f", "sharded.mk", *args], cli_env())
    assert p.stdout.count("--shard") == 3
    assert sorted(x.name for x in (tmp_path / "shards").iterdir()) == [f"feats.{i}.h5" for i in range(3)]
    _same_store(tmp_path / "feats.h5", unsharded)
    assert make(["-f", "sharded.mk", *args, "-q"], cli_env(), check=False).returncode == 0  # up to date


def test_parallel_extract_script(tmp_path, unsharded):
    env = cli_env()
    env["ACSEG"] = f"{sys.executable} -m acseg_cli"
    cmd = [
        "bash",
        str(EXAMPLES / "parallel_extract.sh"),
        str(EXAMPLES / "camvid" / "images"),
        str(tmp_path),
        "2",
        "--backbone",
        "test-vit",
        "--random-weights",
        "--batch-size",
        "2",
        "--workers",
        "0",
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(tmp_path / "feats.h5")
    _same_store(tmp_path / "feats.h5", unsharded)
    p = subprocess.run(cmd[:2], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "usage" in p.stderr


def test_slurm_scripts_as_plain_bash(tmp_path, unsharded):
    """The array tasks run as Slurm would start them (its environment variables), without Slurm."""
    env = cli_env()
    env.update(
        ACSEG=f"{sys.executable} -m acseg_cli",
        IMAGES=str(EXAMPLES / "camvid" / "images"),
        OUT=str(tmp_path),
        SLURM_ARRAY_TASK_COUNT="2",
        EXTRACT_FLAGS="--backbone test-vit --random-weights --batch-size 2 -q",
        WORKERS="0",
    )
    for i in (0, 1):
        p = subprocess.run(
            ["bash", str(EXAMPLES / "slurm" / "extract.sbatch")],
            env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr
    p = subprocess.run(
        ["bash", str(EXAMPLES / "slurm" / "extract.sbatch")],
        env={**env, "SLURM_ARRAY_TASK_ID": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and "already done" in p.stderr  # a re-queued finished task does nothing
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "acseg_cli",
            "merge",
            str(tmp_path / "shards" / "feats.1.h5"),
            str(tmp_path / "shards" / "feats.0.h5"),
            "-o",
            str(tmp_path / "feats.h5"),
            "-q",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    _same_store(tmp_path / "feats.h5", unsharded)
