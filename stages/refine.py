"""Stage ``refine``: a light head on the frozen patch features, trained on the label maps classify wrote, relabels
every patch (docs/method.md, section 7).

classify labels whole concepts, so its maps inherit the concepts' blocky patch boundaries and every error of
a concept. refine trains a head (a linear layer, or a one-hidden-layer MLP) on the L2-normalised tokens of the
feature store against those patch labels, with cross-entropy, then labels each patch by a blend of the
head's class probabilities and classify's label (``keep`` of the latter), and upsamples the blended
probabilities bilinearly to the image, so boundaries fall between patches where the probabilities cross.

Fitted on one set of images, the head is written beside the label maps (``head.pt``) and applies to other
images of the same features with ``head=``: ``classify --centroids`` labels them, refine relabels them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import validate as v
from .classify import CLASSES_FILE
from .config import HeadConfig, PAMRParams
from .crf import CRFParams, refine_probs, require_crf
from .digests import weights_sha256
from .errors import AcsegError
from .features import FeatureStore
from .images import check_photos, output_paths
from .labelfolder import (
    ClassMapRows,
    LabelMapStore,
    draw_previews,
    label_maps_schema,
    match_to_gt,
    prepare_label_folder,
)
from .output import (
    acquire_output_lock,
    check_apart,
    check_files_into,
    is_regular,
    release_output_lock,
    replace_folder,
    write_atomic,
)
from .pamr import refine_probs as pamr_probs
from .pamr import work_size
from .render import read_photo, save_label_png, upsample_argmax
from .store import StoreWriter, is_write_error

HEAD_FILE = "head.pt"
REFINED_FILE = "refined.h5"
HEAD_FORMAT = "acseg-head-1"
PAMR_NEEDS = "refine's PAMR"  # the step that reads the photos, as errors name it
PROVENANCE_KEYS = ("backbone", "weights_sha256", "dim", "feature", "layer")


def create_head(cfg: HeadConfig, dim: int, n_classes: int) -> torch.nn.Module:
    if cfg.kind == "linear":
        return torch.nn.Linear(dim, n_classes)
    return torch.nn.Sequential(
        torch.nn.Linear(dim, cfg.hidden), torch.nn.ReLU(), torch.nn.Linear(cfg.hidden, n_classes)
    )


def unit(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Tokens as the head sees them: float32, L2-normalised rows."""
    return F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=-1)


def _lr_at(step: int, cfg: HeadConfig) -> float:
    """Linear warm-up over the first 10% of the steps, then cosine decay to zero."""
    warm = max(1, cfg.steps // 10)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))


def fit_head(
    tokens: torch.Tensor, labels: np.ndarray, n_classes: int, cfg: HeadConfig, progress: Callable | None = None
) -> torch.nn.Module:
    """tokens (N, d), L2-normalised as the head sees them (``unit``), and their class ids (N,) -> a head trained
    with cross-entropy by AdamW (decoupled weight decay), ``cfg.steps`` batches drawn without replacement, warm-up
    then cosine learning rate.

    The update is written out here: torch.optim imports torch._dynamo on first use, 2-4 s of a command
    that otherwise takes a few."""
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # the head's initial weights, without touching the process's RNG
        torch.manual_seed(cfg.seed)
        net = create_head(cfg, tokens.shape[1], n_classes)
    params = list(net.parameters())
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    x = tokens
    y = torch.as_tensor(labels, dtype=torch.int64)
    bs = min(cfg.batch_size, len(x))
    batch = torch.empty((bs, x.shape[1]), dtype=x.dtype)  # one buffer: a fresh batch each step costs its page faults
    perm, at = torch.randperm(len(x), generator=g), 0
    for step in range(cfg.steps):
        if at + bs > len(x):
            perm, at = torch.randperm(len(x), generator=g), 0
        idx = perm[at : at + bs]
        at += bs
        loss = F.cross_entropy(net(torch.index_select(x, 0, idx, out=batch)), y[idx])
        grads = torch.autograd.grad(loss, params)
        lr, t = _lr_at(step, cfg), step + 1
        with torch.no_grad():
            for p, gr, a1, a2 in zip(params, grads, m1, m2):
                a1.mul_(b1).add_(gr, alpha=1 - b1)
                a2.mul_(b2).addcmul_(gr, gr, value=1 - b2)
                p.mul_(1 - lr * cfg.weight_decay)
                denom = (a2 / (1 - b2**t)).sqrt_().add_(eps)
                p.addcdiv_(a1, denom, value=-lr / (1 - b1**t))
        if progress:
            progress(step + 1, cfg.steps)
    return net.eval()


def blend(probs: torch.Tensor, class_map: np.ndarray, keep: float) -> torch.Tensor:
    """(K, h, w) head probabilities and classify's (h, w) ids -> keep * one-hot + (1 - keep) * probabilities."""
    if keep == 0:
        return probs
    onehot = F.one_hot(torch.as_tensor(class_map, dtype=torch.int64), probs.shape[0]).permute(2, 0, 1).float()
    return keep * onehot + (1.0 - keep) * probs


# ---------------------------------------------------------------------------------------------
# The head file
# ---------------------------------------------------------------------------------------------


def save_head(path: Path, net: torch.nn.Module, cfg: HeadConfig, n_classes: int, dim: int, provenance: dict) -> None:
    state = {k: t.detach().cpu().clone() for k, t in net.state_dict().items()}
    obj = {
        "format": HEAD_FORMAT,
        "config": json.dumps(asdict(cfg), sort_keys=True),
        "n_classes": int(n_classes),
        "dim": int(dim),
        "provenance": json.dumps({k: provenance.get(k) for k in PROVENANCE_KEYS}, sort_keys=True),
        "state_dict": state,
        "weights_sha256": weights_sha256(state),
    }
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


@dataclass
class Head:
    net: torch.nn.Module
    cfg: HeadConfig
    n_classes: int
    dim: int
    provenance: dict
    weights_sha256: str


def load_head(path: str | os.PathLike) -> Head:
    """A head file written by refine, checked whole; loading never runs code (``weights_only``)."""
    p = Path(path)
    if not p.is_file() or not is_regular(p):
        raise AcsegError(f"head {path} does not exist or is not a file", "pass the head.pt that refine wrote")
    bad = AcsegError(f"{path} is not a refine head", "pass the head.pt that 'acseg refine' wrote")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:
        raise bad from None
    if not isinstance(obj, dict) or obj.get("format") != HEAD_FORMAT:
        raise bad
    try:
        cfg = HeadConfig(**json.loads(obj["config"]))
        cfg.check()
        n_classes, dim = int(obj["n_classes"]), int(obj["dim"])
        provenance = json.loads(obj["provenance"])
        if not isinstance(provenance, dict) or n_classes < 1 or dim < 1:
            raise ValueError
        net = create_head(cfg, dim, n_classes)
        net.load_state_dict(obj["state_dict"])
    except Exception:
        raise AcsegError(f"{path} is a damaged refine head", "re-run refine to fit it again") from None
    if not all(torch.isfinite(t).all() for t in net.state_dict().values()):
        raise AcsegError(f"{path}: the head's weights hold NaN or Inf", "re-run refine to fit it again")
    return Head(net.eval(), cfg, n_classes, dim, provenance, str(obj.get("weights_sha256", "")))


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


@dataclass
class RefineResult:
    path: str
    n_images: int
    n_classes: int
    head_file: str
    fitted: bool
    changed: float  # share of patches whose label refine changed
    score: dict | None = None  # with match_gt: the score of the maps before they were rewritten in its ids


def labels_file(path: str | os.PathLike) -> Path:
    """A classify or refine output folder (or the store in it) -> its store of patch labels."""
    p = Path(path)
    if p.is_dir():
        for name in (CLASSES_FILE, REFINED_FILE):
            if (p / name).is_file():
                return p / name
        raise AcsegError(
            f"{path} holds neither {CLASSES_FILE} nor {REFINED_FILE}", "pass the folder classify or refine wrote"
        )
    return p


def _pairs(labels: LabelMapStore, feats: FeatureStore) -> list[int]:
    """For each labelled image, its index in the feature store (same name, same grid), or a clear error."""
    where = {n: i for i, n in enumerate(feats.names)}
    idx = []
    for i, n in enumerate(labels.names):
        j = where.get(n)
        if j is None:
            raise AcsegError(
                f"the labels name image {n!r}, which {feats.path.name} does not hold",
                "pass the feature store the labelled concepts were made from",
            )
        if tuple(feats.grid[j]) != tuple(labels.grid[i]):
            raise AcsegError(
                f"image {n!r} has a {tuple(labels.grid[i])} patch grid in the labels but {tuple(feats.grid[j])} in "
                f"{feats.path.name}",
                "pass the feature store the labelled concepts were made from",
            )
        idx.append(j)
    return idx


def _check_provenance(what: str, have: dict, feats: FeatureStore) -> None:
    fp = feats.provenance()
    for key in PROVENANCE_KEYS:
        if have.get(key) != fp.get(key):
            raise AcsegError(
                f"{what} comes from features with {key}={have.get(key)} but {feats.path.name} has {key}={fp.get(key)}",
                "refine with the feature store of the same backbone and settings",
            )


def _sample(labels: LabelMapStore, feats: FeatureStore, idx: list[int], max_tokens: int, seed: int):
    """The fit's tokens (unit rows) and labels: every token when there are at most ``max_tokens``, else the same
    share of each image's at random. Returns (tokens, labels, whole): whole when every token was kept, in
    image order, so that the relabelling reuses them instead of reading the store again. The tokens are
    written into one array and normalised in place (each copy of them costs a second on a VM whose page
    faults are slow)."""
    sizes = [int(np.prod(labels.grid[i])) for i in range(labels.n_images)]
    share = min(1.0, max_tokens / max(sum(sizes), 1))
    counts = sizes if share == 1.0 else [max(1, int(round(share * n))) for n in sizes]
    x = torch.empty((sum(counts), feats.dim), dtype=torch.float32)
    y = np.empty(sum(counts), np.int64)
    rng = np.random.default_rng(seed)
    at = 0
    for start in range(0, len(idx), 64):
        part = idx[start : start + 64]
        for i, t in zip(range(start, start + len(part)), feats.read_many(part)):
            lab = labels.class_map(i).ravel()
            if share < 1.0:
                pick = np.sort(rng.choice(len(lab), counts[i], replace=False))
                t, lab = t[pick], lab[pick]
            x[at : at + counts[i]] = torch.from_numpy(np.asarray(t, np.float32))
            y[at : at + counts[i]] = lab
            at += counts[i]
    x.div_(x.norm(dim=-1, keepdim=True).clamp_min(1e-12))  # unit(): F.normalize's arithmetic, in place
    return x, y, share == 1.0


def refine(
    labels: str,
    features: str,
    outdir: str,
    *,
    head: str | None = None,
    config: HeadConfig | None = None,
    keep: float = 0.3,
    match_gt: str | None = None,
    dataset: str | None = None,
    ignore_index: tuple = (),
    preview: str | None = None,
    crf: bool = False,
    crf_params: CRFParams | None = None,
    pamr: PAMRParams | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> RefineResult:
    """Relabel the images of ``labels`` (a classify or refine output) with a head on ``features``: fitted on
    them, or the fitted ``head`` applied."""
    cfg = config or HeadConfig()
    cfg.check()
    v.number("--keep", keep, min=0.0, max=1.0)
    for i in ignore_index:
        v.integer("--ignore-index", i, min=0, max=65535, hint="pass a label id 0..65535")
    if crf_params is not None:
        v.integer("--crf-iterations", crf_params.iterations, min=0)
    pamr = PAMRParams() if pamr is None else pamr
    v.integer("--pamr", pamr.iterations, min=0, max=1000, hint="pass the iterations of PAMR, 0 to upsample bilinearly")
    if crf:
        require_crf()
        crf_params = crf_params or CRFParams()
    edges = "crf" if crf else "pamr" if pamr.iterations > 0 else None
    lab = LabelMapStore.open_any(labels_file(labels))
    feats = None
    out = Path(outdir).absolute()
    lock = tmp = None
    try:
        feats = FeatureStore(features)
        n_classes = lab.n_classes
        prov = lab.attr_json("features_provenance", {})
        _check_provenance(lab.path.name, prov, feats)
        idx = _pairs(lab, feats)
        if edges:
            check_photos(lab.sources, "--crf" if crf else PAMR_NEEDS, "drop --crf" if crf else "pass --pamr 0")
        fitted = head is None
        whole = False
        if fitted:
            x, y, whole = _sample(lab, feats, idx, cfg.max_tokens, cfg.seed)
            net = fit_head(
                x, y, n_classes, cfg, progress=(lambda s, n: progress(s, n + lab.n_images)) if progress else None
            )
            del y
            if not whole:
                del x
            head_prov = feats.provenance()
        else:
            h = load_head(head)
            _check_provenance(Path(head).name, h.provenance, feats)
            if h.n_classes != n_classes or h.dim != feats.dim:
                raise AcsegError(
                    f"{Path(head).name} labels {h.n_classes} classes of {h.dim}-d features, but the labels have "
                    f"{n_classes} classes and the features {feats.dim} dimensions",
                    "apply a head fitted on labels of the same classify run's classes",
                )
            net, cfg, head_prov, head_sha = h.net, h.cfg, h.provenance, h.weights_sha256
        inputs = [labels, lab.path, features, head, match_gt]
        lock = acquire_output_lock(out)
        side = (HEAD_FILE,) if fitted else ()
        tmp = prepare_label_folder(
            out, overwrite, inputs, lab.sources, stage="refine", store_file=REFINED_FILE, side_files=side
        )
        map_paths = output_paths(tmp, lab.names, ".png")
        preview_paths = output_paths(Path(preview), lab.names, ".png") if preview else []
        if preview:
            check_files_into(Path(preview), preview_paths, overwrite, inputs=inputs, photos=lab.sources)
            check_apart(Path(preview), [out], folder=True, option="--preview")
        params = {
            "n_classes": n_classes,
            "keep": keep,
            "head": asdict(cfg),
            "fitted": fitted,
            "applied_head": None if fitted else {"path": str(Path(head).absolute()), "weights_sha256": head_sha},
            "labels": str(lab.path),
            "crf": crf_params.to_dict() if crf else None,
            "pamr": pamr.to_dict() if edges == "pamr" else None,
        }
        attrs = {
            "params": params,
            "backbone": feats.backbone,
            "parent": feats.identity,
            "features_provenance": feats.provenance(),
        }
        changed = total = at = 0
        with StoreWriter(tmp / REFINED_FILE, label_maps_schema("refined"), attrs) as w, torch.no_grad():
            rows = ClassMapRows(w, lab)
            for i, j in enumerate(idx):
                gh, gw = (int(s) for s in lab.grid[i])
                before = lab.class_map(i)
                if fitted and whole:
                    tok, at = x[at : at + gh * gw], at + gh * gw
                else:
                    tok = unit(feats.tokens(j))
                probs = torch.softmax(net(tok), dim=-1).T.reshape(n_classes, gh, gw)
                probs = blend(probs, before, keep)
                after = probs.argmax(0).numpy()
                changed += int((after != before).sum())
                total += after.size
                size = tuple(int(s) for s in lab.image_size[i])
                if edges == "crf":
                    save_label_png(map_paths[i], refine_probs(read_photo(lab.sources[i], size), probs, crf_params))
                elif edges == "pamr":
                    photo = read_photo(
                        lab.sources[i], work_size(size, pamr.short_side), PAMR_NEEDS, "pass --pamr 0", draft=True
                    )
                    save_label_png(map_paths[i], pamr_probs(photo, probs, size, pamr))
                else:
                    save_label_png(map_paths[i], upsample_argmax(probs, size))
                rows.add(after)
                if progress:
                    progress((cfg.steps if fitted else 0) + i + 1, (cfg.steps if fitted else 0) + lab.n_images)
            rows.flush()
        if fitted:
            save_head(tmp / HEAD_FILE, net, cfg, n_classes, feats.dim, head_prov)
        score_res = None
        if match_gt:
            score_res = match_to_gt(tmp, match_gt, dataset, map_paths, n_classes, tuple(ignore_index))
        if preview:
            draw_previews(preview_paths, lab, map_paths, match_gt, dataset, score_res)
        replace_folder(tmp, out)
        tmp = None
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and is_write_error(e):
            raise AcsegError(
                f"writing the label maps into {out.name} failed ({e.strerror or e})",
                "check free disk space and permissions; the previous output, if any, is untouched",
            ) from None
        raise
    finally:
        lab.close()
        if feats is not None:
            feats.close()
        if lock is not None:
            release_output_lock(out, lock)
    head_file = str(out / HEAD_FILE) if fitted else str(Path(head).absolute())
    return RefineResult(str(out), len(idx), n_classes, head_file, fitted, changed / max(total, 1), score_res)
