"""Kill every stage at random points, resume, and compare with an uninterrupted run.

For each stage (extract, fit-acg, conceptualize, classify): run it once uninterrupted (the reference), then
N times: start it, send SIGKILL (or SIGINT every third time) after a random fraction of the reference's run
time, check that nothing exists under the final name unless it is complete and valid, re-run with
--resume (classify: a plain re-run) and compare the result with the reference: features bit for bit,
checkpoints weight for weight, concepts dataset for dataset, label maps pixel for pixel.

  python benchmarks/killpoints.py [--n 20] [--images examples/camvid/images]

Uses the random test backbone so that a run takes seconds; prints one JSON line per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ACSEG = [sys.executable, "-m", "acseg_cli"]


def run(args, timeout=600):
    return subprocess.run([*ACSEG, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def same_h5(a: Path, b: Path, skip=("uid", "created", "command", "hash_chain")) -> bool:
    with h5py.File(a) as fa, h5py.File(b) as fb:
        if set(fa.keys()) != set(fb.keys()):
            return False
        for k in fa:
            x, y = fa[k][:], fb[k][:]
            if x.shape != y.shape or not np.array_equal(x, y):
                return False
        return True


def same_ckpt(a: Path, b: Path) -> bool:
    import torch

    sa = torch.load(a, weights_only=True)["state_dict"]
    sb = torch.load(b, weights_only=True)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def same_dir(a: Path, b: Path) -> bool:
    from PIL import Image

    pa = sorted(p.name for p in a.glob("*.png"))
    if pa != sorted(p.name for p in b.glob("*.png")):
        return False
    if not all(np.array_equal(np.asarray(Image.open(a / n)), np.asarray(Image.open(b / n))) for n in pa):
        return False
    return same_h5(a / "classes.h5", b / "classes.h5")


def valid_or_absent(path: Path, kind: str) -> bool:
    if not path.exists():
        return True
    try:
        if kind == "ckpt":
            from stages.checkpoint import load_checkpoint

            load_checkpoint(path)
        elif kind == "dir":
            from stages.classify import ClassStore

            ClassStore(path / "classes.h5").close()
        else:
            with h5py.File(path) as f:
                return bool(f.attrs.get("complete", False))
        return True
    except Exception:
        return False


def partials(out: Path) -> list[Path]:
    return [out.with_name(f".{out.name}.{sfx}") for sfx in ("partial", "resume")]


def start_and_wait_for_writing(args, out: Path, timeout=120):
    """Start a stage; return (process, seconds until its partial output appeared)."""
    p = subprocess.Popen([*ACSEG, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while p.poll() is None and not any(q.exists() for q in partials(out)) and time.time() - t0 < timeout:
        time.sleep(0.01)
    return p, time.time() - t0


def trial_loop(name, args_for, out_for, kind, compare, resume_flag, n, rng, workdir: Path):
    ref = out_for(workdir / f"{name}-ref")
    t0 = time.time()
    p, t_write = start_and_wait_for_writing(args_for(ref), ref)
    while p.poll() is None and not ref.exists():
        time.sleep(0.01)
    t_done = time.time() - t0
    p.communicate()
    assert p.returncode == 0, p.stderr
    dur = time.time() - t0
    work = max(0.05, t_done - t_write)  # the writing phase: from the partial file to the final name
    stats = {
        "stage": name,
        "trials": 0,
        "killed_mid_run": 0,
        "killed_while_writing": 0,
        "sigint": 0,
        "resumed_equal": 0,
        "final_name_invalid": 0,
        "reference_seconds": round(dur, 2),
        "writing_phase_seconds": round(work, 2),
        "failures": [],
    }
    for t in range(n):
        out = out_for(workdir / f"{name}-t{t}")
        sig = signal.SIGINT if t % 3 == 2 else signal.SIGKILL
        p, _ = start_and_wait_for_writing(args_for(out), out)
        time.sleep(rng.uniform(0.0, 1.0) * work)  # a random point of the writing phase
        if p.poll() is None:
            stats["killed_while_writing"] += any(q.exists() for q in partials(out))
            p.send_signal(sig)
            stats["killed_mid_run"] += 1
            stats["sigint"] += sig == signal.SIGINT
        p.communicate()
        if not valid_or_absent(out, kind):
            stats["final_name_invalid"] += 1
            stats["failures"].append(f"trial {t}: invalid file under the final name")
        r = run([*args_for(out), *resume_flag])
        if r.returncode != 0:
            stats["failures"].append(f"trial {t}: resume failed: {r.stderr.strip()[-200:]}")
        elif compare(ref, out):
            stats["resumed_equal"] += 1
        else:
            stats["failures"].append(f"trial {t}: resumed output differs from the reference")
        stats["trials"] += 1
    return stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--images", default=str(ROOT / "examples" / "camvid" / "images"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default="extract,fit-acg,conceptualize,classify")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    bb = ["--backbone", "test-vit", "--random-weights", "--short-side", "224", "-q"]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        imgs = d / "images"  # the bundled photos five times over, so each stage writes for a few seconds
        imgs.mkdir()
        for k in range(5):
            for q in sorted(Path(a.images).iterdir()):
                os.symlink(q.absolute(), imgs / f"{k}_{q.name}")
        a.images = str(imgs)
        feats = d / "feats.h5"
        assert run(["extract", a.images, "-o", feats, *bb, "--batch-size", "1"]).returncode == 0
        acg = d / "acg.pt"
        assert run(["fit-acg", feats, "-o", acg, "--steps", "30", "--batch-size", "4", "-q"]).returncode == 0
        conc = d / "conc.h5"
        assert run(["conceptualize", feats, "--acg", acg, "-o", conc, "-q"]).returncode == 0
        plans = {
            "extract": (
                lambda o: ["extract", a.images, "-o", o, *bb, "--batch-size", "1", "--workers", "0"],
                lambda base: base.with_suffix(".h5"),
                "h5",
                same_h5,
                ["--resume", "--overwrite"],
            ),
            "fit-acg": (
                lambda o: [
                    "fit-acg",
                    feats,
                    "-o",
                    o,
                    "--steps",
                    "150",
                    "--batch-size",
                    "4",
                    "--checkpoint-every",
                    "10",
                    "-q",
                ],
                lambda base: base.with_suffix(".pt"),
                "ckpt",
                same_ckpt,
                ["--resume", "--overwrite"],
            ),
            "conceptualize": (
                lambda o: ["conceptualize", feats, "--acg", acg, "-o", o, "--batch-size", "1", "-q"],
                lambda base: base.with_suffix(".h5"),
                "h5",
                same_h5,
                ["--resume", "--overwrite"],
            ),
            "classify": (
                lambda o: ["classify", conc, "-K", "4", "-o", o, "-q"],
                lambda base: base,
                "dir",
                same_dir,
                ["--overwrite"],
            ),
        }
        for name in a.stages.split(","):
            args_for, out_for, kind, compare, flag = plans[name]
            print(json.dumps(trial_loop(name, args_for, out_for, kind, compare, flag, a.n, rng, d)), flush=True)


if __name__ == "__main__":
    main()
