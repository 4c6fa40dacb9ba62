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
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import validate as v
from .config import HeadConfig, PAMRParams
from .crf import CRFParams, refine_probs, require_crf
from .digests import arrays_sha256
from .errors import AcsegError
from .features import FeatureStore
from .images import check_photos, output_paths
from .labelfolder import (
    CLASSES_FILE,
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
    check_output,
    is_regular,
    release_output_lock,
    replace_folder,
    write_atomic,
)
from .pamr import refine_probs as pamr_probs
from .pamr import work_size
from .render import read_photo, save_label_png
from .store import StoreWriter, is_write_error

HEAD_FILE = "head.npz"
LEGACY_HEAD_FILE = "head.pt"  # what refine wrote before its head left torch: still read, and replaced by --overwrite
REFINED_FILE = "refined.h5"
HEAD_FORMAT = "acseg-head-2"
LEGACY_HEAD_FORMAT = "acseg-head-1"  # a torch file
PAMR_NEEDS = "refine's PAMR"  # the step that reads the photos, as errors name it
PROVENANCE_KEYS = ("backbone", "weights_sha256", "dim", "feature", "layer")


# ---------------------------------------------------------------------------------------------
# The head: numpy arithmetic, so that refine runs without importing torch (2 s of a command that takes a few)
# ---------------------------------------------------------------------------------------------


@dataclass
class HeadNet:
    """The head's weights, float32, under torch's names (those of the files written before): 'linear' is
    ``weight`` (K, d) and ``bias`` (K,); 'mlp' is ``0.weight`` (hidden, d), ``0.bias``, then a ReLU, then
    ``2.weight`` (K, hidden), ``2.bias``."""

    kind: str
    weights: dict

    def forward(self, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """x (N, d) unit rows -> (the MLP's hidden activations (N, hidden), None for 'linear'; (N, K) logits)."""
        w = self.weights
        if self.kind == "linear":
            return None, x @ w["weight"].T + w["bias"]
        h = np.maximum(x @ w["0.weight"].T + w["0.bias"], np.float32(0.0))
        return h, h @ w["2.weight"].T + w["2.bias"]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """x (N, d) unit rows -> (N, K) logits."""
        return self.forward(x)[1]

    def probs(self, x: np.ndarray) -> np.ndarray:
        """x (N, d) unit rows -> (N, K) class probabilities (softmax of the logits)."""
        return softmax(self.logits(x))


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, in place on ``z``."""
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def unit(x: np.ndarray) -> np.ndarray:
    """Tokens as the head sees them: float32 rows divided by their L2 norm (at least 1e-12), in place when
    ``x`` is already a float32 array of our own."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    x /= np.maximum(norms, np.float32(1e-12))[:, None]
    return x


def head_layers(cfg: HeadConfig, dim: int, n_classes: int) -> list[tuple[str, int, int]]:
    """The head's layers in order: (name prefix of their weights, fan_out, fan_in)."""
    if cfg.kind == "linear":
        return [("", n_classes, dim)]
    return [("0.", cfg.hidden, dim), ("2.", n_classes, cfg.hidden)]


def create_head(cfg: HeadConfig, dim: int, n_classes: int, rng: np.random.Generator) -> HeadNet:
    """A head with torch's default initialisation of a linear layer: weights and biases uniform in +-1 /
    sqrt(fan_in)."""
    weights = {}
    for name, fan_out, fan_in in head_layers(cfg, dim, n_classes):
        bound = 1.0 / math.sqrt(fan_in)
        weights[f"{name}weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
        weights[f"{name}bias"] = rng.uniform(-bound, bound, fan_out).astype(np.float32)
    return HeadNet(cfg.kind, weights)


def _lr_at(step: int, cfg: HeadConfig) -> float:
    """Linear warm-up over the first 10% of the steps, then cosine decay to zero."""
    warm = max(1, cfg.steps // 10)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))


def _gradients(net: HeadNet, x: np.ndarray, y: np.ndarray) -> dict:
    """The gradients of the mean cross-entropy of ``net`` on the batch x (B, d), y (B,)."""
    hidden, logits = net.forward(x)
    dz = softmax(logits)
    dz[np.arange(len(y)), y] -= np.float32(1.0)  # d loss / d logits: probabilities less the one-hot targets
    dz /= np.float32(len(y))
    if hidden is None:
        return {"weight": dz.T @ x, "bias": dz.sum(axis=0)}
    grads = {"2.weight": dz.T @ hidden, "2.bias": dz.sum(axis=0)}
    dh = dz @ net.weights["2.weight"]
    dh *= hidden > 0  # the ReLU's gradient
    grads["0.weight"] = dh.T @ x
    grads["0.bias"] = dh.sum(axis=0)
    return grads


def fit_head(
    tokens: np.ndarray, labels: np.ndarray, n_classes: int, cfg: HeadConfig, progress: Callable | None = None
) -> HeadNet:
    """tokens (N, d) float32, L2-normalised as the head sees them (``unit``), and their class ids (N,) -> a head
    trained with cross-entropy by AdamW (decoupled weight decay; torch's update, written out), ``cfg.steps``
    batches drawn without replacement, warm-up then cosine learning rate. Its own random generator (seeded
    by ``cfg.seed``) draws the initial weights and the batches."""
    rng = np.random.default_rng(cfg.seed)
    net = create_head(cfg, tokens.shape[1], n_classes, rng)
    m1 = {k: np.zeros_like(a) for k, a in net.weights.items()}
    m2 = {k: np.zeros_like(a) for k, a in net.weights.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    x = tokens
    y = np.asarray(labels, dtype=np.int64)
    bs = min(cfg.batch_size, len(x))
    batch = np.empty((bs, x.shape[1]), dtype=np.float32)  # one buffer: a fresh batch each step costs page faults
    perm, at = rng.permutation(len(x)), 0
    for step in range(cfg.steps):
        if at + bs > len(x):
            perm, at = rng.permutation(len(x)), 0
        idx = perm[at : at + bs]
        at += bs
        grads = _gradients(net, np.take(x, idx, axis=0, out=batch), y[idx])
        lr, t = _lr_at(step, cfg), step + 1
        for k, p in net.weights.items():
            g, a1, a2 = grads[k], m1[k], m2[k]
            a1 *= b1
            a1 += (1 - b1) * g
            a2 *= b2
            a2 += (1 - b2) * (g * g)
            p *= 1 - lr * cfg.weight_decay
            denom = np.sqrt(a2 / (1 - b2**t))
            denom += eps
            p -= (lr / (1 - b1**t)) * (a1 / denom)
        if progress:
            progress(step + 1, cfg.steps)
    return net


def blend(probs: np.ndarray, class_map: np.ndarray, keep: float) -> np.ndarray:
    """(K, h, w) head probabilities and classify's (h, w) ids -> keep * one-hot + (1 - keep) * probabilities."""
    if keep == 0:
        return probs
    onehot = np.eye(probs.shape[0], dtype=np.float32)[np.asarray(class_map, dtype=np.int64)].transpose(2, 0, 1)
    return np.float32(keep) * onehot + np.float32(1.0 - keep) * probs


# ---------------------------------------------------------------------------------------------
# The head file: a numpy archive (.npz, read without pickles), or the torch file of earlier versions
# ---------------------------------------------------------------------------------------------


def save_head(path: Path, net: HeadNet, cfg: HeadConfig, n_classes: int, dim: int, provenance: dict) -> None:
    arrays = {
        "format": np.array(HEAD_FORMAT),
        "config": np.array(json.dumps(asdict(cfg), sort_keys=True)),
        "n_classes": np.array(int(n_classes), np.int64),
        "dim": np.array(int(dim), np.int64),
        "provenance": np.array(json.dumps({k: provenance.get(k) for k in PROVENANCE_KEYS}, sort_keys=True)),
        "weights_sha256": np.array(arrays_sha256(net.weights)),
        **{f"state/{k}": a for k, a in net.weights.items()},
    }

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    write_atomic(path, write)


@dataclass
class Head:
    net: HeadNet
    cfg: HeadConfig
    n_classes: int
    dim: int
    provenance: dict
    weights_sha256: str


def _read_npz(p: Path) -> dict | None:
    """The head archive's entries, or None for a file that is not one (a torch file of earlier versions)."""
    try:
        with np.load(p, allow_pickle=False) as z:
            if "format" not in z.files:
                return None
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError):
        return None


def _read_legacy(p: Path) -> dict | None:
    """A head.pt of earlier versions (a torch file; loading never runs code, ``weights_only``) as the archive's
    entries, or None."""
    try:
        with zipfile.ZipFile(p) as z:
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                return None
        import torch

        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(obj, dict) or obj.get("format") != LEGACY_HEAD_FORMAT:
        return None
    entries = {k: obj.get(k) for k in ("format", "config", "n_classes", "dim", "provenance", "weights_sha256")}
    try:
        for k, t in obj["state_dict"].items():
            entries[f"state/{k}"] = t.detach().to(dtype=torch.float32).numpy()
    except Exception:
        return None
    return entries


def load_head(path: str | os.PathLike) -> Head:
    """A head file written by refine (``head.npz``, or the ``head.pt`` of earlier versions), checked whole."""
    p = Path(path)
    if not p.is_file() or not is_regular(p):
        raise AcsegError(f"head {path} does not exist or is not a file", f"pass the {HEAD_FILE} that refine wrote")
    bad = AcsegError(f"{path} is not a refine head", f"pass the {HEAD_FILE} that 'acseg refine' wrote")
    entries = _read_npz(p)
    if entries is None:
        entries = _read_legacy(p)
    if entries is None or str(entries.get("format")) not in (HEAD_FORMAT, LEGACY_HEAD_FORMAT):
        raise bad
    try:
        cfg = HeadConfig(**json.loads(str(entries["config"])))
        cfg.check()
        n_classes, dim = int(entries["n_classes"]), int(entries["dim"])
        provenance = json.loads(str(entries["provenance"]))
        if not isinstance(provenance, dict) or n_classes < 1 or dim < 1:
            raise ValueError
        want = {}
        for name, fan_out, fan_in in head_layers(cfg, dim, n_classes):
            want[f"{name}weight"], want[f"{name}bias"] = (fan_out, fan_in), (fan_out,)
        if {k for k in entries if k.startswith("state/")} != {f"state/{k}" for k in want}:
            raise ValueError
        weights = {k: np.asarray(entries[f"state/{k}"]) for k in want}
        if any(weights[k].shape != shape or weights[k].dtype != np.float32 for k, shape in want.items()):
            raise ValueError
    except Exception:
        raise AcsegError(f"{path} is a damaged refine head", "re-run refine to fit it again") from None
    if not all(np.isfinite(a).all() for a in weights.values()):
        raise AcsegError(f"{path}: the head's weights hold NaN or Inf", "re-run refine to fit it again")
    sha = str(entries.get("weights_sha256") or "")
    return Head(HeadNet(cfg.kind, weights), cfg, n_classes, dim, provenance, sha)


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


def _one_blas_thread():
    """numpy's BLAS on one thread for the relabelling (restored after): its products there are small (1,344
    tokens x 384 x K a photo), and OpenBLAS's idle threads spin after each, taking the cores from PAMR's
    compiled loops (refine fitted on 123 CamVid photos and applied to 117, from the shell: 7.3-8.2 s with one
    thread, 12.8-15.2 s without it)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


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
    x = np.empty((sum(counts), feats.dim), dtype=np.float32)
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
            x[at : at + counts[i]] = t
            y[at : at + counts[i]] = lab
            at += counts[i]
    unit(x)  # in place
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
        check_output(out, overwrite, folder=True)  # before the fit, as prepare_label_folder after it
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
        side = (HEAD_FILE, LEGACY_HEAD_FILE) if fitted else ()
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
        with StoreWriter(tmp / REFINED_FILE, label_maps_schema("refined"), attrs) as w, _one_blas_thread():
            rows = ClassMapRows(w, lab)
            for i, j in enumerate(idx):
                gh, gw = (int(s) for s in lab.grid[i])
                before = lab.class_map(i)
                if fitted and whole:
                    tok, at = x[at : at + gh * gw], at + gh * gw
                else:
                    tok = unit(feats.tokens(j))
                probs = net.probs(tok).T.reshape(n_classes, gh, gw)
                probs = blend(probs, before, keep)
                after = probs.argmax(0)
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
                    save_label_png(map_paths[i], pamr_probs(None, probs, size, pamr))  # 0 iterations: upsampling
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
