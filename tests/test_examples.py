"""The examples Makefile and the shell pipe run end to end on the bundled photos with the random test backbone."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, cli_env

EXAMPLES = ROOT / "examples"
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(args, env, check=True):
    p = subprocess.run(["make", "--no-print-directory", "-C", str(EXAMPLES), *args], env=env, capture_output=True,
                       text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


@needs_make
def test_examples_makefile_runs_and_redoes_only_what_changed(tmp_path):
    env = cli_env()
    images = tmp_path / "images"
    shutil.copytree(EXAMPLES / "camvid" / "images", images)
    out = tmp_path / "out"
    args = [f"ACSEG={sys.executable} -m acseg_cli", "BACKBONE=test-vit", "BACKBONE_FLAGS=--random-weights",
            f"IMAGES={images}", f"GT={EXAMPLES / 'camvid' / 'labels'}", f"OUT={out}", "STEPS=5", "SEEDS=0 1", "-j2"]
    p = make(args, env)
    for s in (0, 1):
        r = json.loads((out / f"score-s{s}.json").read_text())
        assert r["n_images"] == 8 and 0 <= r["miou"] <= 1
        assert len(list((out / f"labels-s{s}").glob("*.png"))) == 8
        assert len(list((out / f"preview-s{s}").glob("*.png"))) == 8
    assert "seed 0: mIoU" in p.stdout and "pictures:" in p.stdout
    targets = [str(out / "score-s0.json"), str(out / "score-s1.json")]
    assert make([*args, "-q", *targets], env, check=False).returncode == 0, "a second run must find everything up to date"
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
    p = subprocess.run(["bash", str(EXAMPLES / "pipeline.sh"), str(EXAMPLES / "camvid" / "images"),
                        str(EXAMPLES / "camvid" / "labels"), str(tmp_path / "o")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("mIoU ")
    assert json.loads((tmp_path / "o" / "score.json").read_text())["n_images"] == 8


def test_score_external_script(tmp_path):
    env = cli_env()
    env["ACSEG"] = f"{sys.executable} -m acseg_cli"
    labels = EXAMPLES / "camvid" / "labels"
    p = subprocess.run(["bash", str(EXAMPLES / "score_external.sh"), str(labels), str(labels), "camvid11", "-q"],
                       env=env, capture_output=True, text=True, timeout=300)
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
    p = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "demo", f"VENV={venv}", f"DEMO_OUT={tmp_path}",
                        "DEMO_ARGS=BACKBONE=test-vit BACKBONE_FLAGS=--random-weights STEPS=5"],
                       env=cli_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "seed 0: mIoU" in p.stdout and "pictures:" in p.stdout
    assert json.loads((tmp_path / "score-s0.json").read_text())["n_images"] == 8
