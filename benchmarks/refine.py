"""classify's over-clustering and refine, against k-means on equal features, in one run (issue 27).

For each k-means seed: classify on the TRAIN concepts (fit) and the TEST concepts (--centroids), refine fitted
on the train label maps and applied to the test ones (--head); pass the same stores twice for a transductive
set such as the Weizmann horses. Everything goes through the library stages and the written PNGs are scored
with `acseg score`'s function, on all test images and on the even / odd halves by sorted name (choose on one,
confirm on the other).

Variants:
  kmeans          dataset-level k-means of the L2-normalised tokens into K (60,000-token sample, 3 restarts)
  kmeans-prep     the same on the tokens as the ACG prepares them (centred, whitened): --acg
  classify-1      classify --cluster kmeans --over-cluster 1 (plain k-means into K classes, acseg before issue 27)
  classify        classify with every default (spectral, neighbours 5,10,20, over-cluster 2, exclusivity 0.5)
  refine          classify + refine with every default
  classify kmeans, refine kmeans: the same with classify --cluster kmeans (the default before)
  extra variants: --keep 0,0.5 (refine's blend), --head-kind mlp, --exclusivity 0 (merge by similarity)
  --crf: also refine --crf (the dense CRF on the blended probabilities; about a second per photo)
  --pamr-variants: also cheaper PAMR settings (3 iterations; 3 iterations with dilations up to 16)
  --head-variants: also the head's fit with 100 and 400 steps, and with batches of 4,096, 2,048 and 1,024 tokens

Usage:
  python benchmarks/refine.py --train-features T.h5 --train C_T.h5 --test-features V.h5 --test C_V.h5 \
      --gt GT_DIR -K 11 --ignore 11 [--acg ACG.pt] [--seeds 3] [--extra] [--crf] [--pamr-variants] \
      [--head-variants] --out DIR
Prints one JSON line per variant and a table; seconds of classify and refine are in the rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quality import kmeans_label_maps  # noqa: E402  (benchmarks/, the script's own folder)

from stages.checkpoint import load_checkpoint  # noqa: E402
from stages.classify import classify  # noqa: E402
from stages.config import PAMRParams  # noqa: E402
from stages.refine import HeadConfig, refine  # noqa: E402
from stages.score import score  # noqa: E402


def halves(gt: Path, root: Path) -> list[Path]:
    files = sorted(p for p in gt.iterdir() if p.suffix == ".png")
    out = []
    for i, name in enumerate(("even", "odd")):
        d = root / f"gt_{name}"
        d.mkdir(parents=True, exist_ok=True)
        for f in files[i::2]:
            if not (d / f.name).exists():
                (d / f.name).symlink_to(f.resolve())
        out.append(d)
    return out


def miou(pred: Path, gt: Path, halves_: list[Path], ignore: list[int]) -> list[float]:
    kw = dict(ignore_index=tuple(ignore), workers=2, include_confusion=False)
    r = [score(str(pred), str(gt), allow_missing=False, **kw)["miou"]]
    r += [score(str(pred), str(h), allow_missing=True, **kw)["miou"] for h in halves_]
    return [round(100 * x, 2) for x in r]


def add_set_arguments(ap: argparse.ArgumentParser) -> None:
    """The options naming a data set, shared with merge_bound.py: its concept stores, ground truth and classes."""
    ap.add_argument("--train", required=True, help="concepts store of the train images (fitted on)")
    ap.add_argument("--test", required=True, help="concepts store of the test images (the same for transductive)")
    ap.add_argument("--gt", required=True, help="folder of the test images' ground-truth label maps")
    ap.add_argument("-K", type=int, required=True, help="number of classes")
    ap.add_argument("--ignore", type=int, action="append", default=[], help="ground-truth id to ignore")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-features", required=True)
    ap.add_argument("--test-features", required=True)
    add_set_arguments(ap)
    ap.add_argument("--acg", help="the ACG checkpoint, for the kmeans-prep baseline")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--extra", action="store_true", help="also the losing variants (keep, head kind, exclusivity)")
    ap.add_argument("--crf", action="store_true", help="also refine --crf (about a second per photo)")
    ap.add_argument("--pamr-variants", action="store_true", help="also cheaper PAMR settings")
    ap.add_argument("--head-variants", action="store_true", help="also other steps and batch sizes of the head's fit")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gt = Path(a.gt)
    hv = halves(gt, out)
    rows: dict[str, list] = {}

    def add(name, vals, secs=None):
        rows.setdefault(name, []).append((vals, secs))
        print(json.dumps({"variant": name, "miou_all_even_odd": vals, "seconds": secs}), flush=True)

    prepare = load_checkpoint(a.acg).model.eval().prepare if a.acg else None
    transductive = Path(a.train).resolve() == Path(a.test).resolve()
    variants = [
        ("classify-1", {"over_cluster": 1, "cluster": "kmeans"}),
        ("classify", {}),
        ("classify kmeans", {"cluster": "kmeans"}),
    ]
    if a.extra:
        variants.append(("classify exclusivity=0", {"exclusivity": 0.0}))
    refines = [("refine", {}, HeadConfig()), ("refine pamr=0", {"pamr": PAMRParams(iterations=0)}, HeadConfig())]
    if a.extra:
        refines += [
            ("refine keep=0", {"keep": 0.0}, HeadConfig()),
            ("refine keep=0.5", {"keep": 0.5}, HeadConfig()),
            ("refine mlp", {}, HeadConfig(kind="mlp", lr=3e-3)),
            ("refine pamr=10 224 px", {"pamr": PAMRParams(iterations=10, short_side=224)}, HeadConfig()),
        ]
    if a.pamr_variants:
        refines += [
            ("refine pamr=3", {"pamr": PAMRParams(iterations=3)}, HeadConfig()),
            ("refine pamr=3 to 16", {"pamr": PAMRParams(iterations=3, dilations=(1, 2, 4, 8, 16))}, HeadConfig()),
        ]
    if a.head_variants:
        refines += [
            ("refine steps=100", {}, HeadConfig(steps=100)),
            ("refine batch=4096", {}, HeadConfig(batch_size=4096)),
            ("refine batch=2048", {}, HeadConfig(batch_size=2048)),
            ("refine batch=1024", {}, HeadConfig(batch_size=1024)),
            ("refine steps=400", {}, HeadConfig(steps=400)),
        ]
    if a.crf:
        refines.append(("refine crf", {"crf": True}, HeadConfig()))
    for s in range(a.seeds):
        d = kmeans_label_maps(a.train_features, a.test_features, out / f"km_s{s}", s, a.K)
        add("kmeans", miou(d, gt, hv, a.ignore))
        if prepare is not None:
            with torch.no_grad():
                d = kmeans_label_maps(a.train_features, a.test_features, out / f"kmp_s{s}", s, a.K, prepare=prepare)
            add("kmeans-prep", miou(d, gt, hv, a.ignore))
        for name, kw in variants:
            t0 = time.time()
            fit = classify(a.train, str(out / f"{name}_fit_s{s}"), n_classes=a.K, seed=s, overwrite=True, **kw)
            test = fit.path
            if not transductive:
                test = classify(a.test, str(out / f"{name}_s{s}"), centroids=fit.classes_file, overwrite=True).path
            add(name, miou(Path(test), gt, hv, a.ignore), round(time.time() - t0, 1))
            if name == "classify kmeans":
                todo = [("refine kmeans", {}, HeadConfig())]
            elif name == "classify":
                todo = refines
            else:
                continue
            for rname, rkw, cfg in todo:
                cfg.seed = s
                t0 = time.time()
                r = refine(
                    fit.path, a.train_features, str(out / f"{rname}_fit_s{s}"), config=cfg, overwrite=True, **rkw
                )
                if not transductive:
                    r = refine(
                        test, a.test_features, str(out / f"{rname}_s{s}"), head=r.head_file, overwrite=True, **rkw
                    )
                add(rname, miou(Path(r.path), gt, hv, a.ignore), round(time.time() - t0, 1))
                if rname != "refine":
                    shutil.rmtree(out / f"{rname}_fit_s{s}", ignore_errors=True)
    print()
    print("| variant | mIoU all | even half | odd half | seconds |")
    print("|---|---|---|---|---|")
    for name, vals in rows.items():
        m = np.array([v for v, _ in vals])
        secs = [t for _, t in vals if t is not None]
        cells = " | ".join(f"{m[:, j].mean():.1f} ± {m[:, j].std():.1f}" for j in range(3))
        print(f"| {name} | {cells} | {np.mean(secs):.1f} |" if secs else f"| {name} | {cells} | - |")


if __name__ == "__main__":
    main()
