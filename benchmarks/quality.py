"""Quality on CamVid: fit on the unlabelled train images, score on the labelled test images.

Variants (all in one run, same features, several seeds):
  (a) dataset-level k-means on the patch tokens, K = 11
  (aw) the same on the tokens as the --acg checkpoint prepares them (centred, whitened): is ACSeg's lead the
       whitening's?
  (b) per-image k-means concepts (k = 5) + classify
  (bw) the same on the tokens as the --acg checkpoint prepares them
  (c) ACSeg: fit-acg + conceptualize + classify, with acseg's defaults and the variants named on the command line

Usage: python benchmarks/quality.py --train TRAIN.h5 --test TEST.h5 --gt CAMVID/testannot [--seeds 5] [--variants a,b,c]
       [--weighting pixels|none|sqrt-pixels] [--halves]   (--halves: also the even/odd test images apart)
Features come from `acseg extract` (offline ViT-S/14, 448 short side). Prints a table and JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.checkpoint import load_checkpoint  # noqa: E402
from stages.classify import classify  # noqa: E402
from stages.conceptualize import conceptualize  # noqa: E402
from stages.config import ACGConfig, TrainConfig  # noqa: E402
from stages.crf import refine  # noqa: E402
from stages.features import FeatureStore  # noqa: E402
from stages.fit import fit_acg  # noqa: E402
from stages.kmeans import kmeans  # noqa: E402
from stages.render import load_photo, save_label_png, upsample_labels  # noqa: E402
from stages.score import score  # noqa: E402

GT = Path()  # the CamVid test label maps (--gt), set by set_gt


def set_gt(path: Path) -> None:
    global GT
    if not path.is_dir():
        sys.exit(f"no label maps at {path}: pass --gt CAMVID/testannot")
    GT = path.resolve()


HALVES: dict[str, Path] = {}  # --halves: "even"/"odd" -> a folder of links to every other test label map


def make_halves(root: Path) -> None:
    """The test label maps sorted by name, split into the even- and odd-numbered ones (links), so a setting
    can be chosen on one half and checked on the other."""
    files = sorted(GT.glob("*.png"))
    for i, half in enumerate(("even", "odd")):
        d = root / f"gt_{half}"
        d.mkdir(parents=True, exist_ok=True)
        for f in files[i::2]:
            if not (d / f.name).exists():
                (d / f.name).symlink_to(f)
        HALVES[half] = d


def miou(pred_dir: Path) -> tuple:
    """(mIoU, pixel accuracy) on all test images, then mIoU on each half when --halves is on."""
    r = score(str(pred_dir), str(GT), dataset="camvid11", allow_missing=False, workers=2)
    halves = tuple(
        score(str(pred_dir), str(d), dataset="camvid11", allow_missing=True, workers=2, include_confusion=False)["miou"]
        for d in HALVES.values()
    )
    return (r["miou"], r["pixel_accuracy"], *halves)


def variant_a(
    train: str,
    test: str,
    out: Path,
    seed: int,
    K: int = 11,
    sample: int = 60000,
    crf: bool = False,
    prepare=None,
    tag: str = "a",
):
    """Dataset-level k-means on L2-normalised tokens, scored (``kmeans_label_maps``)."""
    d = out / f"{tag}{'_crf' if crf else ''}_s{seed}"
    return miou(kmeans_label_maps(train, test, d, seed, K, sample, crf, prepare))


def kmeans_label_maps(
    train: str, test: str, d: Path, seed: int, K: int = 11, sample: int = 60000, crf: bool = False, prepare=None
) -> Path:
    """Dataset-level k-means on L2-normalised tokens: fit on a train sample, label every test token, write the
    label maps into ``d``. ``prepare`` (an ACG's ``prepare``): the tokens as that model sees them (centred,
    whitened) first. Also the baseline of benchmarks/refine.py."""
    rng = np.random.default_rng(seed)
    prep = (lambda t: t) if prepare is None else (lambda t: prepare(torch.from_numpy(t)).numpy())
    with FeatureStore(train) as tr:
        toks = np.concatenate(tr.read_range(0, tr.n_images))
    toks = prep(toks[rng.choice(len(toks), min(sample, len(toks)), replace=False)])
    toks /= np.linalg.norm(toks, axis=1, keepdims=True)
    cents, _, _ = kmeans(toks, K, n_init=3, seed=seed)
    d.mkdir(parents=True, exist_ok=True)
    with FeatureStore(test) as te:
        for i in range(te.n_images):
            x = prep(te.tokens(i))
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            lab = ((x[:, None, :] - cents[None]) ** 2).sum(-1).argmin(1).reshape(te.grid[i])
            size = tuple(te.image_size[i])
            labels = refine(load_photo(te.sources[i], size), lab) if crf else upsample_labels(lab, size)
            save_label_png(d / Path(te.names[i]).with_suffix(".png"), labels)
    return d


@contextmanager
def prepared_reads(prepare):
    """Every token batch that a FeatureStore reads comes out through ``prepare`` (an ACG's centring and
    whitening): per-image k-means on the features the ACG sees, without writing a second store."""
    orig = FeatureStore.read_batch

    def read_batch(self, start, stop, field="tokens", reuse=None, **kwargs):
        x, mask, lens = orig(self, start, stop, field, reuse, **kwargs)
        return (prepare(x) if field == "tokens" else x), mask, lens

    FeatureStore.read_batch = read_batch
    try:
        with torch.no_grad():
            yield
    finally:
        FeatureStore.read_batch = orig


def concepts_and_classify(
    train_c: str,
    test_c: str,
    out: Path,
    tag: str,
    seed: int,
    K: int,
    bg: bool,
    weighting: str = "pixels",
    crf: bool = False,
):
    fit_dir = out / f"{tag}_train_s{seed}"
    classify(train_c, str(fit_dir), n_classes=K, background_split=bg, seed=seed, overwrite=True, weighting=weighting)
    d = out / f"{tag}{'_crf' if crf else ''}_s{seed}"
    classify(test_c, str(d), centroids=str(fit_dir / "classes.h5"), overwrite=True, crf=crf)
    return miou(d)


def oracle(test_c: str) -> float:
    """Upper bound of the concepts: each test concept labelled with its majority ground-truth class."""
    from PIL import Image

    from stages.concepts import ConceptStore

    conf = np.zeros((11, 11), np.int64)
    with ConceptStore(test_c) as st:
        for i in range(st.n_images):
            g = np.asarray(Image.open(GT / Path(st.names[i]).with_suffix(".png"))).astype(np.int64)
            lab = upsample_labels(st.concept_map(i), g.shape)
            valid = g < 11
            pred = np.zeros_like(g)
            for c in np.unique(lab):
                sel = (lab == c) & valid
                if sel.any():
                    pred[lab == c] = np.bincount(g[sel], minlength=11).argmax()
            conf += np.bincount(g[valid] * 11 + pred[valid], minlength=121).reshape(11, 11)
    tp = np.diag(conf)
    iou = tp / np.maximum(conf.sum(0) + conf.sum(1) - tp, 1)
    return float(iou[conf.sum(1) > 0].mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--variants", default="a,b,c")
    ap.add_argument("--k", type=int, default=5, help="prototypes / per-image k-means concepts")
    ap.add_argument("--steps", default="auto", help="fit-acg --steps: 'auto' (acseg's default) or N")
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--max-tokens", type=int, default=TrainConfig.max_tokens)
    ap.add_argument("--delta", default="plain")
    ap.add_argument(
        "--converge-tol",
        type=float,
        default=TrainConfig.converge_tol,
        help="--steps auto: stop when the modularity rose by less than this fraction over a window",
    )
    ap.add_argument("--bg", action="store_true", help="background split in classify")
    ap.add_argument("--fit-seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--center", action=argparse.BooleanOptionalAction, default=ACGConfig.center)
    ap.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=ACGConfig.whiten)
    ap.add_argument("--heads", type=int, default=0, help="ACG attention heads (0: acseg's default, one per 128 dims)")
    ap.add_argument("--bg-both", action="store_true", help="classify with and without the background split")
    ap.add_argument("--acg", help="(c) with this fitted checkpoint instead of fitting one")
    ap.add_argument("--resume-fit", action="store_true", help="(c) continue an interrupted fit from its resume state")
    ap.add_argument("--precision", default="auto", help="conceptualize --precision for (c)")
    ap.add_argument("--weighting", default="pixels", help="classify --weighting for (b) and (c)")
    ap.add_argument(
        "--halves",
        action="store_true",
        help="also score the even- and odd-numbered test images apart (choose on one, check on the other)",
    )
    ap.add_argument("--crf", action="store_true", help="refine every variant's test label maps with the dense CRF")
    ap.add_argument("--gt", required=True, help="the CamVid test label maps (SegNet layout: CamVid/testannot)")
    a = ap.parse_args()
    set_gt(Path(a.gt))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.halves:
        make_halves(out)
    rows = []

    def report(name, vals, extra=None):
        m = np.array([v[0] for v in vals]) * 100
        row = {
            "variant": name,
            "miou_mean": round(float(m.mean()), 2),
            "miou_std": round(float(m.std()), 2),
            "seeds": len(vals),
            "pixel_acc": round(float(np.mean([v[1] for v in vals]) * 100), 2),
            **(extra or {}),
        }
        for j, half in enumerate(HALVES):
            h = np.array([v[2 + j] for v in vals]) * 100
            row[f"miou_{half}"] = f"{h.mean():.2f} +- {h.std():.2f}"
        rows.append(row)
        print(json.dumps(row), flush=True)

    seeds = range(a.seeds)
    variants = set(a.variants.split(","))
    crf_tag = " crf" if a.crf else ""
    prepare = None
    if variants & {"aw", "bw"}:  # the baselines on the tokens as the --acg checkpoint sees them
        if not a.acg:
            sys.exit("variants aw and bw need --acg: the checkpoint whose centring and whitening they apply")
        prepare = load_checkpoint(a.acg).model.eval().prepare
    if "a" in variants:
        report(
            "a: dataset k-means on tokens K=11" + crf_tag,
            [variant_a(a.train, a.test, out, s, crf=a.crf) for s in seeds],
        )
    if "aw" in variants:
        with torch.no_grad():
            vals = [variant_a(a.train, a.test, out, s, crf=a.crf, prepare=prepare, tag="aw") for s in seeds]
        report(f"aw: dataset k-means on tokens K=11, prepared as {Path(a.acg).name} prepares them{crf_tag}", vals)
    for tag in [v for v in ("b", "bw") if v in variants]:
        with prepared_reads(prepare) if tag == "bw" else nullcontext():
            trc = conceptualize(a.train, str(out / f"{tag}_train.h5"), method="kmeans", k=a.k, overwrite=True).path
            tec = conceptualize(a.test, str(out / f"{tag}_test.h5"), method="kmeans", k=a.k, overwrite=True)
        vals = [concepts_and_classify(trc, tec.path, out, tag, s, 11, a.bg, a.weighting, a.crf) for s in seeds]
        tokens = f" on tokens prepared as {Path(a.acg).name} prepares them" if tag == "bw" else ""
        report(
            f"{tag}: per-image k-means k={a.k}{tokens} + classify weighting={a.weighting}{crf_tag}",
            vals,
            {"concepts_per_image": round(tec.mean_concepts, 2), "oracle": round(100 * oracle(tec.path), 1)},
        )
    if "c" in variants:
        t0 = time.time()
        if a.acg:
            ck, modularity, steps_run = Path(a.acg), None, None
        else:
            ck = out / f"c{a.tag}.pt"
            res = fit_acg(
                a.train,
                str(ck),
                acg=ACGConfig(num_prototypes=a.k, center=a.center, num_heads=a.heads, whiten=a.whiten),
                train=TrainConfig(
                    steps=None if a.steps == "auto" else int(a.steps),
                    batch_size=a.batch_size,
                    lr=a.lr,
                    max_tokens=a.max_tokens,
                    delta=a.delta,
                    seed=a.fit_seed,
                    converge_tol=a.converge_tol,
                ),
                overwrite=True,
                resume=a.resume_fit,
            )
            modularity = round(res.final_modularity, 4)
            steps_run = res.steps
        fit_s = time.time() - t0
        trc = conceptualize(
            a.train, str(out / f"c{a.tag}_train.h5"), acg=str(ck), overwrite=True, precision=a.precision
        ).path
        tec = conceptualize(a.test, str(out / f"c{a.tag}_test.h5"), acg=str(ck), overwrite=True, precision=a.precision)
        orc = round(100 * oracle(tec.path), 1)
        for bg in [False, True] if a.bg_both else [a.bg]:
            vals = [
                concepts_and_classify(trc, tec.path, out, f"c{a.tag}", s, 11, bg, a.weighting, a.crf) for s in seeds
            ]
            fitted = (
                f"acg={ck.name}"
                if a.acg
                else f"k={a.k} steps={a.steps} tol={a.converge_tol} fit_seed={a.fit_seed} batch={a.batch_size} "
                f"lr={a.lr} tokens<={a.max_tokens} delta={a.delta} center={a.center} whiten={a.whiten} "
                f"heads={a.heads or 'auto'}"
            )
            report(
                f"c: ACSeg {fitted} bg={bg} precision={a.precision} weighting={a.weighting}{crf_tag} {a.tag}",
                vals,
                {
                    "concepts_per_image": round(tec.mean_concepts, 2),
                    "oracle": orc,
                    "final_modularity": modularity,
                    "fit_seconds": round(fit_s),
                    "fit_steps_run": steps_run,
                },
            )
    print()
    print("| variant | mIoU | pixel acc | concepts/img | oracle |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['miou_mean']:.1f} +- {r['miou_std']:.1f} | {r['pixel_acc']:.1f} | "
            f"{r.get('concepts_per_image', '-')} | {r.get('oracle', '-')} |"
        )


if __name__ == "__main__":
    main()
