"""Old code against new, alternated in fresh processes: the whole conceptualize stage and the ACG alone, or
the fit-acg command.

    git worktree add /tmp/old <commit>
    python benchmarks/ab.py --old /tmp/old --new . --features all336.h5 --acg cfinal2.pt --pairs 8
    python benchmarks/ab.py --old /tmp/old --new . --features all336.h5 --method kmeans --pairs 6
    python benchmarks/ab.py --old /tmp/old --new . --features train448.h5 --method fit --batch-size 32 \
        --max-tokens 0 --steps 30 --pairs 3

Each process warms up once, then times 5 stage runs (the median is kept) and, for the ACG, 6 passes of the
forward over 192 images in memory (the median is kept). ``--method kmeans`` times acseg's per-image k-means
stage instead (no checkpoint). ``--method fit`` runs
``acseg fit-acg --steps N`` as a command (what a user runs: the process settings of the command line count)
and reads its steps/s off the fit's own clock in its log, from step 10 to the last (start-up, the mean, the
whitening and the first steps left out), and its loss curve (every 10th step), which old and new should share.
The pairs alternate old, new, old, new: this VM's speed drifts by
20-50% within minutes, so only runs side by side compare. Prints one JSON line per side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import sys, time, tempfile, json
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
from stages.conceptualize import conceptualize
from stages.features import FeatureStore
from stages.checkpoint import load_checkpoint
F, A, M = sys.argv[2], sys.argv[3], sys.argv[4]
d = tempfile.mkdtemp()
kw = dict(acg=A) if M == "acg" else dict(method=M)
conceptualize(F, d + "/w.h5", device="cpu", **kw)
r = []
for i in range(5):
    t = time.perf_counter()
    n = conceptualize(F, d + "/a.h5", device="cpu", overwrite=True, **kw).n_images
    r.append(n / (time.perf_counter() - t))
if M != "acg":
    print(json.dumps({"stage": float(np.median(r)), "infer": float("nan")}))
    sys.exit()
st = FeatureStore(F)
m = min(192, st.n_images)
xs = torch.from_numpy(np.stack(st.read_range(0, m)))
model = load_checkpoint(A).model.eval().cast_(torch.bfloat16)
buf, low = torch.empty(64, *xs.shape[1:]), torch.empty(64, *xs.shape[1:], dtype=torch.bfloat16)
f = []
with torch.inference_mode():
    for rep in range(6):
        t = time.perf_counter()
        for s in range(0, m, 64):
            e = min(m, s + 64)
            model.infer(buf[:e - s].copy_(xs[s:e]), inplace=True, low=low[:e - s])
        f.append(m / (time.perf_counter() - t))
print(json.dumps({"stage": float(np.median(r)), "infer": float(np.median(f))}))
"""


FIT_LOG_FROM = 10


def run_fit(tree: str, a) -> dict:
    """One ``acseg fit-acg`` from source tree ``tree`` in a fresh process: steps/s and the logged losses."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "acg.pt")
        cmd = [sys.executable, "-m", "acseg_cli", "fit-acg", a.features, "-o", out, "-q", "--steps", str(a.steps)]
        cmd += ["--batch-size", str(a.batch_size), "--max-tokens", str(a.max_tokens), "--device", "cpu"]
        env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
        subprocess.run(cmd, check=True, env=env, cwd=d, stdout=subprocess.DEVNULL)
        with open(os.path.join(d, "acg.log.jsonl")) as f:
            hist = [json.loads(line) for line in f if line.strip()]
    first = next(h for h in hist if h["step"] >= FIT_LOG_FROM)
    last = hist[-1]
    sps = (last["step"] - first["step"]) / (last["seconds"] - first["seconds"])
    return {"stage": sps, "losses": [h["loss"] for h in hist]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="source tree of the old code (a git worktree)")
    ap.add_argument("--new", default=".", help="source tree of the new code")
    ap.add_argument("--features", required=True, help="a feature store (images of one grid size)")
    ap.add_argument("--acg", help="an ACG checkpoint fitted on such features (--method acg)")
    ap.add_argument(
        "--method", choices=("acg", "kmeans", "fit"), default="acg", help="which conceptualize to time, or fit-acg"
    )
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30, help="--method fit: steps per fit")
    ap.add_argument("--batch-size", type=int, default=16, help="--method fit")
    ap.add_argument("--max-tokens", type=int, default=768, help="--method fit (0: every token)")
    a = ap.parse_args()
    if a.method == "acg" and not a.acg:
        ap.error("--acg is needed with --method acg")
    res = {"old": [], "new": []}
    for _ in range(a.pairs):
        for side in ("old", "new"):
            if a.method == "fit":
                res[side].append(run_fit(getattr(a, side), a))
                continue
            out = subprocess.run(
                [sys.executable, "-c", CHILD, getattr(a, side), a.features, a.acg or "", a.method],
                capture_output=True,
                text=True,
                check=True,
            )
            res[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    wins = sum(n["stage"] > o["stage"] for o, n in zip(res["old"], res["new"]))
    for side in res:
        stage = [x["stage"] for x in res[side]]
        if a.method == "fit":
            rec = {"steps_per_s": [round(x, 3) for x in stage], "median": round(statistics.median(stage), 3)}
        else:
            rec = {"stage_img_per_s": [round(x) for x in stage], "stage_median": round(statistics.median(stage), 1)}
            if a.method == "acg":
                rec["infer_img_per_s"] = [round(x["infer"]) for x in res[side]]
        print(json.dumps({"side": side, "tree": getattr(a, side), **rec}))
    summary = {"pairs": a.pairs, "new_faster_in": wins}
    if a.method == "fit":
        ratios = [n["stage"] / o["stage"] for o, n in zip(res["old"], res["new"])]
        curves = [(o["losses"], n["losses"]) for o, n in zip(res["old"], res["new"])]
        summary["ratio_per_pair"] = [round(r, 2) for r in ratios]
        summary["max_abs_loss_difference"] = max(abs(x - y) for o, n in curves for x, y in zip(o, n))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
