"""Stage ``score``: mIoU and pixel accuracy of label maps against ground truth, by the field's protocols.

One confusion matrix (prediction id x class) over all valid pixels of the set, accumulated with one
bincount per image, then matched: ``hungarian`` (one-to-one, dataset level), ``majority`` (many-to-one)
or ``per-image`` (matching per image; not comparable with the dataset-level numbers).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from pathlib import Path

import numpy as np
from PIL import Image

from . import validate as v
from .config import PROTOCOLS, RESIZES
from .datasets import IGNORE, INVALID, get_dataset, plain_lut
from .errors import AcsegError
from .output import write_atomic

log = logging.getLogger("acseg.score")
LABEL_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I", "1")


# ---------------------------------------------------------------------------------------------
# Matching and metrics on a confusion matrix (rows: prediction ids, columns: classes)
# ---------------------------------------------------------------------------------------------


def match_hungarian(conf: np.ndarray) -> dict[int, int]:
    """One-to-one prediction id -> class maximising matched pixels.

    Only ids that hold pixels take part, and rows are put in a canonical order (by their counts) before
    solving, so that renaming the prediction ids cannot change which of several optimal matchings is found.
    """
    from scipy.optimize import (
        linear_sum_assignment,  # here: scipy.optimize costs every command 0.3 s to import
    )

    used = np.flatnonzero(conf.sum(1) > 0)
    if len(used) == 0:
        return {}
    sub = conf[used]
    order = np.lexsort(sub.T[::-1])
    rows, cols = linear_sum_assignment(sub[order], maximize=True)
    return {int(used[order[r]]): int(c) for r, c in zip(rows, cols)}


def match_majority(conf: np.ndarray) -> dict[int, int]:
    """Each prediction id to the class it overlaps most (ids with no valid pixel are left out)."""
    return {int(p): int(np.argmax(conf[p])) for p in range(conf.shape[0]) if conf[p].sum() > 0}


def matched_confusion(conf: np.ndarray, mapping: dict[int, int], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(K x K matrix [true class, predicted class], per-class pixels held by unmatched prediction ids)."""
    m = np.zeros((n_classes, n_classes), np.int64)
    unmatched = np.zeros(n_classes, np.int64)
    for p in range(conf.shape[0]):
        c = mapping.get(p)
        if c is None:
            unmatched += conf[p, :n_classes]
        else:
            m[:, c] += conf[p, :n_classes]
    return m, unmatched


def metrics(m: np.ndarray, unmatched: np.ndarray) -> dict:
    """mIoU over classes present in the ground truth, pixel accuracy over all valid pixels."""
    tp = np.diag(m).astype(np.float64)
    gt = m.sum(1) + unmatched
    pred = m.sum(0)
    union = gt + pred - tp
    present = gt > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    total = gt.sum()
    return {
        "miou": float(np.nanmean(iou)) if present.any() else 0.0,
        "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
        "class_pixel_share": [float(g / total) if total else 0.0 for g in gt],
    }


def confusion(pred: np.ndarray, gt_classes: np.ndarray, n_pred: int, n_classes: int) -> np.ndarray:
    """Confusion (n_pred x n_classes) of one image; gt_classes < 0 are ignored.

    One bincount over all pixels: ignored pixels go to an extra column that is dropped (no masking copies).
    """
    g = np.where(gt_classes < 0, n_classes, gt_classes)
    code = pred.astype(np.int64).ravel() * (n_classes + 1) + g.ravel()
    return np.bincount(code, minlength=n_pred * (n_classes + 1)).reshape(n_pred, n_classes + 1)[:, :n_classes]


# ---------------------------------------------------------------------------------------------
# Reading label maps
# ---------------------------------------------------------------------------------------------


def read_label_map(path: str, what: str) -> np.ndarray:
    """A PNG of ids, read as indices (never converted to RGB)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in LABEL_MODES:
                raise _LabelError(
                    f"{what} {path} is a {mode} image, not a label map; label maps hold one id per pixel "
                    "(8-bit L or P, or 16-bit): write ids, not colours"
                )
            a = np.array(im)
    except _LabelError:
        raise
    except Exception as e:
        raise _LabelError(f"cannot read {what} {path} ({type(e).__name__}: {e}); replace the file") from None
    if a.ndim != 2:
        raise _LabelError(f"{what} {path} has {a.ndim} dimensions, not one id per pixel; write single-channel ids")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.dtype not in (np.uint8, np.uint16) and (a.min() < 0 or a.max() >= 65536):
        raise _LabelError(f"{what} {path} has ids outside 0..65535; write ids as 8- or 16-bit PNG")
    return a


class _LabelError(Exception):
    pass


def _collect(folder: Path, suffix: str) -> dict[str, Path]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() != ".png" or not p.is_file():
            continue
        rel = p.relative_to(folder).with_suffix("").as_posix()
        if suffix and rel.endswith(suffix):
            rel = rel[: -len(suffix)]
        elif suffix:
            continue
        out[rel] = p
    return out


def pair_files(
    pred_dir: str, gt_dir: str, pred_suffix: str = "", gt_suffix: str = "", allow_missing: bool = False
) -> tuple[list[tuple[str, str, str]], dict]:
    """Pairs (key, pred path, gt path) by relative path and stem; never by sorted order."""
    pd, gd = Path(pred_dir), Path(gt_dir)
    for d, what in ((pd, "prediction"), (gd, "ground-truth")):
        if not d.exists():
            raise AcsegError(f"{what} folder {d} does not exist", "check the path")
        if not d.is_dir():
            raise AcsegError(f"{what} path {d} is not a folder", "pass a folder of label-map PNGs")
    preds, gts = _collect(pd, pred_suffix), _collect(gd, gt_suffix)
    if not gts:
        raise AcsegError(
            f"no ground-truth PNGs in {gd}" + (f" ending in {gt_suffix}" if gt_suffix else ""),
            "check the folder and --gt-suffix",
        )
    if not preds:
        raise AcsegError(
            f"no prediction PNGs in {pd}" + (f" ending in {pred_suffix}" if pred_suffix else ""),
            "check the folder and --pred-suffix",
        )
    common = sorted(set(preds) & set(gts))
    missing = sorted(set(gts) - set(preds))
    extra = sorted(set(preds) - set(gts))
    counts = {"paired": len(common), "missing_predictions": len(missing), "extra_predictions": len(extra)}
    if (missing or extra) and not allow_missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} ground-truth files lack a prediction (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} predictions lack ground truth (e.g. {', '.join(extra[:3])})")
        raise AcsegError("; ".join(parts), "pair names by stem (see --pred-suffix/--gt-suffix) or pass --allow-missing")
    if not common:
        raise AcsegError("no prediction matches a ground-truth file by name", "check the folders and suffixes")
    return [(k, str(preds[k]), str(gts[k])) for k in common], counts


# ---------------------------------------------------------------------------------------------
# The streaming scorer
# ---------------------------------------------------------------------------------------------

_W: dict = {}


def _init_worker(lut, resize_pred, dataset, n_classes=None):
    _W.clear()
    _W.update(lut=lut, resize=resize_pred, dataset=dataset, n_classes=n_classes)


def _score_one(item):
    key, pp, gp = item
    try:
        pred = read_label_map(pp, "prediction")
        gt = read_label_map(gp, "ground truth")
        if pred.shape != gt.shape:
            if _W["resize"] != "nearest":
                return (
                    "error",
                    f"prediction {pp} is {pred.shape[1]}x{pred.shape[0]} but its ground truth is "
                    f"{gt.shape[1]}x{gt.shape[0]}; pass --resize-pred nearest to resize predictions",
                )
            im = Image.fromarray(pred.astype(np.int32), "I").resize((gt.shape[1], gt.shape[0]), Image.NEAREST)
            pred = np.asarray(im)
        if pred.dtype == np.uint8 and gt.dtype == np.uint8:
            return _score_8bit(key, gp, pred, gt)
        g = _W["lut"][gt]
        if g.min() == INVALID:
            bad = np.unique(gt[g == INVALID])[:5].tolist()
            return _invalid_ids(gp, bad)
        # only the ids that occur count: one pixel of id 12000 must not make a 12000 x 12000 matrix
        pred_ids, pred_c = _compact(pred)
        if _W["n_classes"]:
            cls_ids, g_c = np.arange(_W["n_classes"]), g
        else:
            cls_ids, g_c = _compact(g)
        c = confusion(pred_c, g_c, len(pred_ids), max(1, len(cls_ids)))
        c = c[:, : len(cls_ids)]  # an image whose pixels are all ignored has no class
        return ("ok", key, (pred_ids, cls_ids, c), int(c.sum()))
    except _LabelError as e:
        return ("error", str(e))


def _compact(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the ids >= 0 that occur in ``a``, in increasing order; ``a`` with each id replaced by its index among
    them, negative ids (ignored) by -1). One bincount: ids are below 65536 (read_label_map checks)."""
    shifted = a.astype(np.int64) + 1  # ignored (-1) -> 0
    seen = np.bincount(shifted.ravel(), minlength=1)
    seen[0] = 0
    present = np.flatnonzero(seen)
    index = np.full(len(seen), -1, np.int64)
    index[present] = np.arange(len(present))
    return present - 1, index[shifted]


def _invalid_ids(gp, bad) -> tuple:
    return (
        "error",
        f"ground truth {gp} has label ids {bad} that are not classes of {_W['dataset'] or 'this setup'}; "
        "choose the right --dataset or add --ignore-index",
    )


def _score_8bit(key, gp, pred, gt):
    """8-bit maps: one bincount over (prediction id, ground-truth id) pairs, then the id -> class mapping is
    applied to the small (prediction id x ground-truth id) histogram instead of to every pixel."""
    n_pred = int(pred.max()) + 1
    # rows: ground-truth id, columns: prediction id; a small histogram (256 x n_pred) stays in cache
    code = gt.astype(np.uint16) * np.uint16(n_pred) + pred
    h = np.bincount(code.ravel(), minlength=256 * n_pred).reshape(256, n_pred).T
    lut = _W["lut"][:256]
    seen = h.sum(0) > 0
    if (seen & (lut == INVALID)).any():
        bad = np.flatnonzero(seen & (lut == INVALID))[:5].tolist()
        return _invalid_ids(gp, bad)
    n_cls = _W["n_classes"] or max(1, int(lut[seen].max()) + 1)
    if "onehot8" not in _W:  # id -> class as a (256, classes) 0/1 matrix, once per process
        valid = lut >= 0
        onehot = np.zeros((256, int(lut[valid].max()) + 1 if valid.any() else 1))
        onehot[np.flatnonzero(valid), lut[valid]] = 1
        _W["onehot8"] = onehot
    oh = _W["onehot8"]
    c = np.rint(h.astype(np.float64) @ oh).astype(np.int64)  # counts < 2^53: exact
    if c.shape[1] < n_cls:
        c = np.pad(c, ((0, 0), (0, n_cls - c.shape[1])))
    c = c[:, :n_cls]
    cls_ids = np.arange(n_cls)
    if not _W["n_classes"]:  # without a preset, the classes are the ids that occur
        keep = np.zeros(n_cls, bool)
        keep[lut[seen & (lut >= 0)]] = True
        cls_ids, c = cls_ids[keep], c[:, keep]
    return ("ok", key, (np.arange(n_pred), cls_ids, c), int(c.sum()))


class _Confusion:
    """The set's confusion over the prediction ids and classes that occur (a sparse id space made dense)."""

    def __init__(self, classes: int | None):
        self.rows: dict[int, int] = {}
        self.cols: dict[int, int] = {i: i for i in range(classes or 0)}
        self.acc = np.zeros((0, len(self.cols)), np.int64)

    def index(self, ids, table: dict) -> np.ndarray:
        return np.array([table.setdefault(int(i), len(table)) for i in ids], np.int64)

    def add(self, pred_ids, cls_ids, c) -> tuple[np.ndarray, np.ndarray]:
        r, k = self.index(pred_ids, self.rows), self.index(cls_ids, self.cols)
        if len(self.rows) > self.acc.shape[0] or len(self.cols) > self.acc.shape[1]:
            self.acc = _add(np.zeros((len(self.rows), len(self.cols)), np.int64), self.acc)
        np.add.at(self.acc, (r[:, None], k[None, :]), c)
        return r, k

    def ordered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(prediction ids, class ids, their confusion, column permutation), both in increasing order."""
        pid = np.array(sorted(self.rows), np.int64)
        cid = np.array(sorted(self.cols), np.int64)
        rp = np.array([self.rows[i] for i in pid], np.int64)
        cp = np.array([self.cols[i] for i in cid], np.int64)
        acc = _add(np.zeros((len(pid), len(cid)), np.int64), self.acc)
        return pid, cid, acc[rp][:, cp], cp


def _add(acc: np.ndarray, c: np.ndarray) -> np.ndarray:
    if c.shape[0] > acc.shape[0] or c.shape[1] > acc.shape[1]:
        grown = np.zeros((max(acc.shape[0], c.shape[0]), max(acc.shape[1], c.shape[1])), np.int64)
        grown[: acc.shape[0], : acc.shape[1]] = acc
        acc = grown
    acc[: c.shape[0], : c.shape[1]] += c
    return acc


def score(
    pred_dir: str,
    gt_dir: str,
    *,
    dataset: str | None = None,
    ignore_index: tuple = (),
    protocol: str = "hungarian",
    pred_suffix: str = "",
    gt_suffix: str = "",
    allow_missing: bool = False,
    resize_pred: str | None = None,
    workers: int = 1,
    include_confusion: bool = True,
    progress=None,
) -> dict:
    """Score a folder of predicted label maps against a folder of ground truth. Returns the result dict."""
    v.choice("--protocol", protocol, PROTOCOLS)
    if resize_pred is not None:
        v.choice("--resize-pred", resize_pred, RESIZES)
    for i in ignore_index:
        v.integer("--ignore-index", i, min=0, max=65535, hint="pass a label id 0..65535")
    v.integer("--workers", workers, min=0, hint="pass 0 (one per core, at most 4) or a number of processes")
    preset = get_dataset(dataset) if dataset else None
    if preset:
        lut = preset.lut()
        for i in ignore_index:
            lut[i] = IGNORE
    else:
        lut = plain_lut(tuple(ignore_index))
    pairs, counts = pair_files(pred_dir, gt_dir, pred_suffix, gt_suffix, allow_missing)
    if workers <= 0:
        import os

        workers = min(4, os.cpu_count() or 1)
    if counts["missing_predictions"] or counts["extra_predictions"]:
        log.warning(
            "scoring %d pairs; %d ground-truth files without prediction and %d predictions without ground truth left "
            "out",
            counts["paired"],
            counts["missing_predictions"],
            counts["extra_predictions"],
        )
    acc = _Confusion(preset.n_classes if preset else None)
    pi: list = []  # per-image protocol: each image's matched [true, predicted] counts, by accumulator column
    n_pixels = 0
    n_img = 0
    if workers > 1 and len(pairs) > 8:
        ctx = mp.get_context("fork")
        pool = ctx.Pool(
            workers,
            initializer=_init_worker,
            initargs=(lut, resize_pred, dataset, preset.n_classes if preset else None),
        )
        results = pool.imap(_score_one, pairs, chunksize=8)
    else:
        pool = None
        _init_worker(lut, resize_pred, dataset, preset.n_classes if preset else None)
        results = map(_score_one, pairs)
    try:
        for r in results:
            if r[0] == "error":
                raise AcsegError(*r[1].rsplit("; ", 1))
            _, key, (pred_ids, cls_ids, c), nv = r
            _, cols = acc.add(pred_ids, cls_ids, c)
            n_pixels += nv
            n_img += 1
            if protocol == "per-image" and c.size:
                m_i, u_i = matched_confusion(c, match_hungarian(c), c.shape[1])
                pi.append((cols, m_i, u_i))
            if progress:
                progress(n_img, len(pairs))
    finally:
        if pool is not None:
            pool.terminate()
    pred_ids, cls_ids, conf, perm = acc.ordered()
    K = len(cls_ids)
    if n_pixels == 0:
        raise AcsegError(
            "every ground-truth pixel is ignored, so there is nothing to score",
            "check --dataset, --ignore-index and the ground-truth folder",
        )
    names = list(preset.class_names) if preset else [str(int(i)) for i in cls_ids]
    if protocol == "per-image":
        where = np.empty(len(perm), np.int64)
        where[perm] = np.arange(len(perm))  # accumulator column -> ordered column
        m = np.zeros((K, K), np.int64)
        u = np.zeros(K, np.int64)
        for cols, m_i, u_i in pi:
            j = where[cols]
            m[np.ix_(j, j)] += m_i
            u[j] += u_i
        mapping = {}
        log.warning(
            "per-image matching is a different protocol: its numbers are not comparable with dataset-level (hungarian) "
            "ones"
        )
    else:
        rows = match_hungarian(conf) if protocol == "hungarian" else match_majority(conf)
        m, u = matched_confusion(conf, rows, K)
        mapping = {int(pred_ids[r]): c for r, c in rows.items()}
    res = metrics(m, u)
    unmatched_ids = [int(p) for r, p in enumerate(pred_ids) if int(p) not in mapping and conf[r].sum() > 0]
    out = {
        **res,
        "class_names": names,
        "n_images": n_img,
        "n_pixels": int(n_pixels),
        "protocol": protocol,
        "dataset": dataset,
        "matching": {str(k): v for k, v in sorted(mapping.items())},
        "unmatched_pixels": int(u.sum()) if protocol != "per-image" else None,
        "unmatched_ids": unmatched_ids if protocol != "per-image" else [],
        "n_prediction_ids": int(len(pred_ids)),
        "prediction_ids": [int(p) for p in pred_ids],
        **counts,
    }
    if include_confusion:
        out["confusion"] = conf.tolist()
        out["matched_confusion"] = m.tolist()
    return out


def confusion_png(result: dict, path: str) -> str:
    """Draw the matched confusion matrix (rows: true class, normalised per row) as a PNG."""
    from PIL import ImageDraw

    m = np.asarray(result["matched_confusion"], np.float64)
    names = result["class_names"]
    K = m.shape[0]
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    cell, label_w = max(8, min(32, 640 // max(K, 1))), 130
    W, H = label_w + K * cell + 10, label_w + K * cell + 10
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    for i in range(K):
        d.text((4, label_w + i * cell + cell // 4), names[i][:18], fill="black")
        for j in range(K):
            v = int(255 * (1 - rows[i, j]))
            d.rectangle(
                [label_w + j * cell, label_w + i * cell, label_w + (j + 1) * cell - 1, label_w + (i + 1) * cell - 1],
                fill=(v, v, 255),
            )
    txt = Image.new("RGB", (label_w, K * cell), "white")
    dt = ImageDraw.Draw(txt)
    for j in range(K):
        dt.text((4, j * cell + cell // 4), names[j][:18], fill="black")
    img.paste(txt.rotate(90, expand=True), (label_w, 0))
    d.text((4, 4), "true \u2193 / predicted \u2192", fill="black")
    write_atomic(Path(path), lambda tmp: img.save(tmp, format="PNG"))
    return path
