"""Stage ``fit-acg``: train the Adaptive Concept Generator on a feature store with the modularity loss.

Batches are drawn at random. A store whose tokens fit in memory is held there (float16, on the fitting
device) and each batch is gathered from it; a larger store is read batch by batch, never whole.
Checkpoints are torch files of tensors and plain values, loaded with ``weights_only=True`` so that loading
never runs code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .acg import AdaptiveConceptGenerator, assignment, hard_assignment, modularity_loss
from .config import ACGConfig, TrainConfig
from .errors import AcsegError, UsageError
from .features import FeatureStore
from .humanize import duration
from .output import (
    acquire_output_lock,
    atomic_open,
    check_apart,
    check_output,
    is_regular,
    release_output_lock,
    write_atomic,
)
from .validate import device as validate_device

log = logging.getLogger("acseg.fit")
CHECKPOINT_FORMAT = "acseg-acg-1"


@dataclass
class FitResult:
    path: str
    steps: int
    final_loss: float
    final_modularity: float
    log_path: str
    plot_path: str
    resumed_from: int = 0
    history: list = field(default_factory=list)
    stop_reason: str = ""


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def weights_sha256(state_dict: dict) -> str:
    """sha256 of a state dict: per tensor in name order, its name, dtype, shape and bytes (as stored)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(-1).view(torch.uint8).numpy() if v.numel() else b"")
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike, model: AdaptiveConceptGenerator, provenance: dict, train: dict, extra: dict | None = None
) -> None:
    """Atomic write of weights + config + provenance (+ resume state in ``extra``). The weights' hash is
    recorded in the file, so that readers name the model without hashing 58 MB on every load."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {
        "format": CHECKPOINT_FORMAT,
        "config": model.cfg.to_json(),
        "provenance": json.dumps(provenance, sort_keys=True),
        "train": json.dumps(train, sort_keys=True),
        "state_dict": state,
        "weights_sha256": weights_sha256(state),
    }
    if extra:
        obj.update(extra)
    try:
        write_atomic(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as e:  # torch reports a short write as RuntimeError ("unexpected pos")
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the file could not be written whole"
        raise AcsegError(
            f"writing {path.name} failed ({reason})",
            "check free disk space and permissions; the previous file, if any, is untouched",
        ) from None


def _load_raw(path: str | os.PathLike, mmap: bool = False) -> dict:
    p = Path(path)
    if not p.is_file():
        raise AcsegError(f"checkpoint {path} does not exist", "check the path, or run 'acseg fit-acg' first")
    try:
        # weights_only refuses anything that would run code; mmap maps the tensors instead of copying them
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        kind = (
            "is not a loadable acseg checkpoint"
            if "pickle" in type(e).__name__.lower() or "Unpickl" in str(e)
            else "cannot be read"
        )
        raise AcsegError(
            f"checkpoint {path} {kind} ({type(e).__name__}); nothing in it was executed",
            "pass a checkpoint written by 'acseg fit-acg'",
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise AcsegError(f"{path} is not an acseg ACG checkpoint", "pass a checkpoint written by 'acseg fit-acg'")
    return obj


@dataclass
class LoadedACG:
    model: AdaptiveConceptGenerator
    provenance: dict
    train: dict
    raw: dict

    @property
    def weights_sha256(self) -> str:
        """The weights' hash recorded when the checkpoint was written (``weights_sha256``), or, for a
        checkpoint written before acseg recorded it, computed from the loaded weights."""
        rec = self.raw.get("weights_sha256")
        if isinstance(rec, str) and len(rec) == 64 and all(c in "0123456789abcdef" for c in rec):
            return rec
        return weights_sha256(self.raw["state_dict"])


def _json_object(obj: dict, key: str, default: str | None = None) -> dict:
    """A JSON-object field of a checkpoint, refused in one line when it is missing or of another type."""
    raw = obj.get(key, default)
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise AcsegError(
            f"the checkpoint's {key!r} is not a JSON object", "pass a checkpoint written by 'acseg fit-acg'"
        )
    return value


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> LoadedACG:
    """``mmap``: map the weights from the file (for inference; copy-on-write, so the file is never changed)."""
    obj = _load_raw(path, mmap)
    try:
        cfg = ACGConfig.from_dict(_json_object(obj, "config"))
        if cfg.num_heads == 0:  # written before checkpoints recorded the number, when "auto" meant one per 64 dims
            cfg.num_heads = max(1, cfg.dim // 64) if cfg.dim % 64 == 0 else 1
        prov = _json_object(obj, "provenance")
        train = _json_object(obj, "train", "{}")
        sd = obj.get("state_dict")
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise AcsegError(
                f"checkpoint {path} holds no weights table", "pass a checkpoint written by 'acseg fit-acg'"
            )
        for k, v in sd.items():
            if v.dtype != torch.float32:
                raise AcsegError(
                    f"checkpoint {path} holds {k} as {str(v.dtype).replace('torch.', '')}, not float32",
                    "pass a checkpoint written by 'acseg fit-acg'",
                )
            if not bool(torch.isfinite(v).all()):
                raise AcsegError(
                    f"checkpoint {path} holds NaN or infinite values in {k} (a fit that diverged?)",
                    "re-run 'acseg fit-acg', e.g. with a lower --lr",
                )
        with torch.device("meta"):  # no random initialisation of weights about to be replaced
            model = AdaptiveConceptGenerator(cfg)
        model.load_state_dict(obj["state_dict"], strict=True, assign=True)
    except AcsegError:
        raise
    except Exception as e:
        raise AcsegError(
            f"checkpoint {path} does not match the ACG architecture ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]})",
            "re-run 'acseg fit-acg' with this acseg version",
        ) from None
    return LoadedACG(model.eval(), prov, train, obj)


def check_compatible(ckpt_prov: dict, store_prov: dict, ckpt_name: str, store_name: str) -> None:
    """A model trained on one backbone/feature kind/dim must not be applied to another."""
    for key in ("backbone", "weights_sha256", "dim", "feature", "layer"):
        a, b = ckpt_prov.get(key), store_prov.get(key)
        if a != b:
            raise AcsegError(
                f"{ckpt_name} was trained on {key}={a} but {store_name} has {key}={b}",
                "use a checkpoint fitted on features of the same backbone and settings, or re-run fit-acg",
            )


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def batch_indices(n_images: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The images of one step: a pure function of (seed, step), so a resumed run sees the same batches."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(n_images, size=min(batch_size, n_images), replace=False)


def collate(token_list: list[np.ndarray]):
    """Pad a list of (n_i, d) arrays into (B, N, d) plus a (B, N) validity mask."""
    n = max(len(t) for t in token_list)
    d = token_list[0].shape[1]
    x = np.zeros((len(token_list), n, d), np.float32)
    mask = np.zeros((len(token_list), n), bool)
    for i, t in enumerate(token_list):
        x[i, : len(t)] = t
        mask[i, : len(t)] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


def token_subsample(n_tokens: int, cfg: TrainConfig, step: int, image: int) -> np.ndarray | None:
    """The sorted token indices an image contributes at ``step`` when it has more than ``cfg.max_tokens``
    (None: all of them). Keyed by (seed, step, image), so it does not depend on how the batch is split or
    where the tokens are read from."""
    if not cfg.max_tokens or n_tokens <= cfg.max_tokens:
        return None
    rng = np.random.default_rng([cfg.seed, step, 1, int(image)])
    return np.sort(rng.choice(n_tokens, cfg.max_tokens, replace=False))


def _read_batch(store: FeatureStore, cfg: TrainConfig, step: int, rank: int = 0, world: int = 1):
    """This rank's share of the global batch of ``step`` (all of it in one process), read from the file."""
    idx = batch_indices(store.n_images, cfg.batch_size, cfg.seed, step)[rank::world]
    toks = []
    for t, i in zip(store.read_many(idx), idx):
        sel = token_subsample(len(t), cfg, step, i)
        toks.append(t if sel is None else t[sel])
    return collate(toks)


class ResidentTokens:
    """Every token of a store in one float16 tensor on the fitting device, read once; each step's batch is
    then gathered there, which costs a fraction of reading and converting the batch from the file (a read
    that, on a GPU, could take longer than the step itself).
    ``batch`` gives exactly what ``_read_batch`` gives (the same images, the same token subsample, the same
    float32 values, zeros where the mask is False), on the device."""

    def __init__(self, store: FeatureStore, device: str, images_per_read: int = 256):
        self.offsets = store.offsets
        self.n_images = store.n_images
        self.device = device
        self._buffers: dict[int, torch.Tensor] = {}
        self.tokens = torch.empty((int(store.offsets[-1]), store.dim), dtype=torch.float16, device=device)
        for s in range(0, store.n_images, images_per_read):
            e = min(store.n_images, s + images_per_read)
            a, b = int(store.offsets[s]), int(store.offsets[e])
            self.tokens[a:b].copy_(torch.from_numpy(store.stored_rows(s, e, dtype=np.float16)))

    @staticmethod
    def nbytes(store: FeatureStore) -> int:
        return int(store.offsets[-1]) * store.dim * 2

    def batch(self, cfg: TrainConfig, step: int, rank: int = 0, world: int = 1):
        idx = batch_indices(self.n_images, cfg.batch_size, cfg.seed, step)[rank::world]
        rows = []
        for i in idx:
            a, n = int(self.offsets[i]), int(self.offsets[i + 1] - self.offsets[i])
            sel = token_subsample(n, cfg, step, i)
            rows.append(a + (np.arange(n) if sel is None else sel))
        n = max(len(r) for r in rows)
        index = np.zeros((len(rows), n), np.int64)
        mask = np.zeros((len(rows), n), bool)
        for j, r in enumerate(rows):
            index[j, : len(r)] = r
            mask[j, : len(r)] = True
        index, mask = torch.from_numpy(index).to(self.device), torch.from_numpy(mask).to(self.device)
        rows = self.tokens.index_select(0, index.view(-1))
        shape = (*index.shape, self.tokens.shape[1])
        if self.tokens.device.type != "cpu":  # CUDA (or another accelerator): its allocator keeps the memory
            x = rows.float().view(shape)
        else:
            # two float32 batches kept in turn: the prefetched batch of step s + 1 must not overwrite the one
            # step s is using, and step s - 1's is done. A fresh float32 batch per step would cost more in
            # page faults than the gather and the conversion together.
            buf = self._buffers.get(step % 2)
            if buf is None or buf.numel() < rows.numel():
                buf = self._buffers[step % 2] = torch.empty(rows.numel())
            x = buf[: rows.numel()].view(shape)
            x.view(rows.shape).copy_(rows)
        if not bool(mask.all()):
            x.masked_fill_(~mask[..., None], 0.0)
        return x, mask


def preload_budget(device: str, processes: int = 1) -> int:
    """Bytes of float16 tokens ``fit_acg`` holds in memory by default: a quarter of the GPU's free memory on
    CUDA (one process per GPU); on the CPU, where streaming costs little, 1 GiB or a quarter of the available
    memory if less, shared by the ``processes`` of this machine (each holds its own copy)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free // 4
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 4 << 30
    return min(1 << 30, avail // 4) // max(1, processes)


class Schedule:
    """The learning rate of each step and when to stop.

    A fixed schedule (``cfg.steps`` an integer): linear warm-up, then cosine decay to zero at ``cfg.steps``.
    ``--steps auto`` (``cfg.steps`` None): linear warm-up, then the peak rate; every ``converge_window`` steps
    the mean modularity of the last window is compared with the window before; when it rose by less than the
    fraction ``converge_tol`` of it, the rate falls linearly to zero over ``cooldown_fraction`` of the steps
    done, and the fit stops there. The cool-down also starts early enough to end at ``max_steps``.
    ``observe`` must see every step's modularity, averaged over the global batch so that every process of a
    distributed fit decides alike (it keeps the last two windows); ``state``/``load_state`` carry the decision
    across a resume."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.q: list[float] = []
        self.decay_from: int | None = None
        self.decay_len = 0
        self.reason = ""

    def lr(self, step: int) -> float:
        c, w = self.cfg, self.cfg.warmup_steps
        if step < w:
            return c.lr * (step + 1) / w
        if not c.auto:
            t = (step - w) / max(1, c.steps - w)
            return c.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if self.decay_from is None or step < self.decay_from:
            return c.lr
        return c.lr * max(0.0, 1 - (step - self.decay_from + 1) / (self.decay_len + 1))

    def _cooldown(self, done: int, reason: str) -> None:
        c = self.cfg
        self.decay_from = done
        self.decay_len = max(0, min(c.max_steps - done, round(c.cooldown_fraction * done)))
        self.reason = reason

    def observe(self, step: int, modularity: float) -> bool:
        """Record step ``step``'s modularity; True when the fit ends after this step."""
        c = self.cfg
        done = step + 1
        if not c.auto:
            if done >= c.steps and not self.reason:
                self.reason = f"ran the fixed schedule of {c.steps} steps"
            return done >= c.steps
        if self.decay_from is None:
            win, w = c.converge_window, c.warmup_steps
            self.q = (self.q + [float(modularity)])[-2 * win :]  # the two windows compared, no more
            if done >= w + 2 * win and (done - w) % win == 0 and len(self.q) >= 2 * win:
                last, prev = float(np.mean(self.q[-win:])), float(np.mean(self.q[-2 * win : -win]))
                if last - prev < c.converge_tol * abs(prev):
                    self._cooldown(
                        done,
                        f"converged: the mean modularity of steps {done - win + 1}-{done} ({last:.4f}) was not "
                        f"{100 * c.converge_tol:g}% above that of the {win} steps before ({prev:.4f})",
                    )
            if self.decay_from is None and done + round(c.cooldown_fraction * done) >= c.max_steps:
                self._cooldown(done, f"reached the cap of {c.max_steps} steps before converging")
        return done >= min(c.max_steps, self.decay_from + self.decay_len) if self.decay_from is not None else False

    def state(self) -> dict:
        return {"q": self.q, "decay_from": self.decay_from, "decay_len": self.decay_len, "reason": self.reason}

    def load_state(self, st: dict) -> None:
        self.q = [float(v) for v in st.get("q", [])]
        self.decay_from = st.get("decay_from")
        self.decay_len = int(st.get("decay_len", 0))
        self.reason = str(st.get("reason", ""))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def mean_token(store: FeatureStore, chunk: int = 256, dist: "Dist | None" = None) -> np.ndarray:
    """The mean token of the whole store, read in chunks (under torchrun each rank reads every W-th chunk)."""
    total = np.zeros(store.dim, np.float64)
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    for j, s in enumerate(range(0, store.n_images, chunk)):
        if j % world != rank:
            continue
        for t in store.read_range(s, min(store.n_images, s + chunk)):
            total += t.sum(0)
    if dist:
        total = dist.sum(total)
    return (total / max(1, store.offsets[-1])).astype(np.float32)


def whitening(store: FeatureStore, center: np.ndarray, seed: int, images: int = 256, shrink: float = 1.0) -> np.ndarray:
    """Regularised ZCA whitening of the centred tokens from the covariance of a seeded sample of images (the
    same on every rank): W = V diag(1 / sqrt(l + shrink * mean(l))) V^T. Directions well above the mean
    variance come out with unit variance; directions far below it (noise) are lifted by at most
    sqrt(1 + l_max / mean(l)) relative to them, not up to the signal's level. (With the regulariser at 1e-3 of
    the largest eigenvalue, signal in 5 of 32 directions drowned: 19 of 40 planted images kept their concept
    count; with the mean eigenvalue 40 of 40, and CamVid mIoU 16.7 against 16.2.)"""
    rng = np.random.default_rng([seed, 11])
    idx = np.sort(rng.choice(store.n_images, size=min(store.n_images, images), replace=False))
    cov = np.zeros((store.dim, store.dim), np.float64)
    count = 0
    for s in range(0, len(idx), 32):
        x = np.concatenate(store.read_many(idx[s : s + 32])) - center
        cov += (x.T @ x).astype(np.float64)
        count += len(x)
    cov /= max(1, count)
    lam, vec = np.linalg.eigh(cov)
    lam = np.maximum(lam, 0)
    w = (vec / np.sqrt(lam + shrink * lam.mean() + 1e-12)) @ vec.T
    return w.astype(np.float32)


@dataclass
class Dist:
    """This process's place under ``torchrun`` (gloo on CPU, NCCL on GPU)."""

    rank: int
    world: int
    local_rank: int

    def sum(self, a: np.ndarray) -> np.ndarray:
        import torch.distributed as td

        t = torch.from_numpy(np.ascontiguousarray(a, np.float64))
        if td.get_backend() == "nccl":
            t = t.cuda()
        td.all_reduce(t)
        return t.cpu().numpy()

    def barrier(self) -> None:
        import torch.distributed as td

        td.barrier()


def setup_distributed(device: str | None) -> tuple[Dist | None, str]:
    """Join torchrun's process group when started under it (WORLD_SIZE > 1); returns (dist, device)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None, device
    import torch.distributed as td

    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda")
    if use_cuda:
        per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1)), torch.cuda.device_count()
        if per_node > gpus:  # every rank sees the same numbers, so all stop here alike
            raise UsageError(
                f"torchrun started {per_node} processes on this machine but it has {gpus} GPU"
                f"{'' if gpus == 1 else 's'} (one process per GPU)",
                f"pass --nproc-per-node {gpus}, or --device cpu to train on the CPU with gloo",
            )
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not td.is_initialized():
        td.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(td.get_rank(), td.get_world_size(), local), device


def init_prototypes(model: AdaptiveConceptGenerator, store: FeatureStore, seed: int, sample: int = 4096) -> None:
    """Seed the prototypes with k-means centroids of a token sample (scaled like the random init), and start
    the output head as the identity, so every prototype begins on a distinct part of feature space."""
    from .kmeans import kmeans

    rng = np.random.default_rng([seed, 7])
    idx = rng.choice(store.n_images, size=min(store.n_images, 64), replace=False)
    toks = np.concatenate(store.read_many(idx)) - model.feature_center.numpy()
    toks = toks[rng.choice(len(toks), size=min(len(toks), sample), replace=False)]
    toks = toks / np.maximum(np.linalg.norm(toks, axis=1, keepdims=True), 1e-8)
    c, _, _ = kmeans(toks, model.cfg.num_prototypes, n_init=2, iters=30, seed=seed)
    c = c - c.mean(1, keepdims=True)
    c = c / np.maximum(c.std(1, keepdims=True), 1e-8)
    with torch.no_grad():
        k = min(len(c), model.cfg.num_prototypes)
        model.prototypes[:k] = torch.from_numpy(c[:k])
        model.head.weight.copy_(torch.eye(model.cfg.dim))
        model.head.bias.zero_()


def resume_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.resume")


def side_paths(out: Path) -> tuple[Path, Path]:
    """The log and loss curve written beside a checkpoint: ``acg.pt`` -> ``acg.log.jsonl``, ``acg.loss.png``;
    a name without ``.pt`` keeps its whole name (``acg.v1`` -> ``acg.v1.log.jsonl``), so two outputs never
    share them."""
    base = out.name[:-3] if out.name.endswith(".pt") and len(out.name) > 3 else out.name
    return out.with_name(base + ".log.jsonl"), out.with_name(base + ".loss.png")


def _resume(rp: Path, train: TrainConfig, cfg: ACGConfig, prov: dict, world: int, opt) -> tuple[LoadedACG | None, str]:
    """The resume state ``rp`` if it can continue this fit, with its optimizer state loaded into ``opt`` (the
    last step, so nothing is changed when it cannot): (state, "") or (None, why not). Its tensors are mapped,
    not read, so a state that claims a huge tensor costs nothing before it is refused."""
    if not is_regular(rp):
        return None, "is not a regular file"
    try:
        state = load_checkpoint(rp, mmap=True)
    except AcsegError:
        return None, "cannot be read"
    raw = state.raw
    if not (
        state.train.get("config") == asdict(train)
        and state.model.cfg == cfg
        and state.provenance.get("store", {}).get("content_sha256") == prov["store"]["content_sha256"]
        and raw.get("world", 1) == world
    ):
        return None, "was made with other settings"
    if not (
        isinstance(raw.get("optimizer"), dict)
        and isinstance(raw.get("step"), int)
        and isinstance(raw.get("torch_rng"), torch.Tensor)
        and raw["torch_rng"].dtype == torch.uint8
        and isinstance(raw.get("history", "[]"), str)
        and isinstance(raw.get("schedule", "{}"), str)
    ):
        return None, "lacks part of the optimizer, step or random state"
    try:
        json.loads(raw.get("history", "[]"))
        json.loads(raw.get("schedule", "{}"))
        opt.load_state_dict(raw["optimizer"])  # checks the groups and sizes before it changes anything
    except Exception:
        return None, "holds an optimizer or history that does not fit"
    return state, ""


def fit_acg(
    features: str,
    output: str,
    *,
    acg: ACGConfig | None = None,
    train: TrainConfig | None = None,
    device: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    preload: bool | None = None,
    announce: int = logging.INFO,
) -> FitResult:
    """Train an ACG on the store ``features``; write the checkpoint, a JSON-lines log and a loss plot.

    ``announce``: the logging level of the line that estimates the fit's time after its first steps.
    ``preload``: hold every token on the device and gather each batch there (True), or read each batch from
    the file (False); None chooses by ``preload_budget``. The two give the same batches."""
    train = (train or TrainConfig()).validate()
    (acg or ACGConfig()).validate()
    device = validate_device(device)
    out = Path(output).absolute()
    check_output(out, overwrite)
    check_apart(out, [features])
    store = FeatureStore(features)
    cfg = acg or ACGConfig()
    cfg = ACGConfig(**{**asdict(cfg), "dim": store.dim})
    cfg = ACGConfig(**{**asdict(cfg), "num_heads": cfg.heads})  # the checkpoint records the number, not "auto"
    if cfg.dim % cfg.heads:
        raise UsageError(f"feature dim {cfg.dim} is not divisible by --heads {cfg.heads}", "choose another --heads")
    prov = {**store.provenance(), "store": store.identity}
    dist, device = setup_distributed(device)
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    if min(train.batch_size, store.n_images) < world:
        raise UsageError(
            f"a batch of {min(train.batch_size, store.n_images)} images cannot be shared by {world} processes",
            "raise --batch-size or start fewer processes",
        )
    log_path, plot_path = side_paths(out)
    for side in (log_path, plot_path):
        check_output(side, overwrite)
        check_apart(side, [features])
    if dist and rank == 0:
        log.info(
            "fit-acg on %d processes (%s): global batch %d",
            world,
            "nccl" if device.startswith("cuda") else "gloo",
            min(train.batch_size, store.n_images),
        )

    lock_fd = acquire_output_lock(out) if rank == 0 else None  # rank 0 alone writes
    try:
        torch.manual_seed(train.seed)
        core = AdaptiveConceptGenerator(cfg)
        if cfg.center or cfg.whiten:
            core.feature_center.copy_(torch.from_numpy(mean_token(store, dist=dist)))
        if cfg.whiten:
            core.feature_whiten.copy_(torch.from_numpy(whitening(store, core.feature_center.numpy(), train.seed)))
        if train.proto_init == "kmeans":
            init_prototypes(core, store, train.seed)
        core = core.to(device)
        model = core
        if dist:
            from torch.nn.parallel import DistributedDataParallel

            # static graph: the key biases get no gradient by design (constant over keys, they drop out of the
            # exact low-rank attention), every step the same
            model = DistributedDataParallel(
                core, device_ids=[dist.local_rank] if device.startswith("cuda") else None, static_graph=True
            )
        opt = torch.optim.AdamW(core.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        start = 0
        history: list[dict] = []
        sched = Schedule(train)
        rp = resume_path(out)
        if resume and os.path.lexists(rp):
            state, why = _resume(rp, train, cfg, prov, world, opt)
            if state is not None:
                core.load_state_dict(state.model.state_dict())
                start = int(state.raw["step"])
                history = json.loads(state.raw.get("history", "[]"))
                sched.load_state(json.loads(state.raw.get("schedule", "{}")))
                torch.set_rng_state(state.raw["torch_rng"])
                log.info("resuming %s at step %d", out.name, start)
            else:
                log.warning("the resume state %s %s; starting afresh", rp.name, why)
        model.train()
        if preload is None:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if dist else 1  # torchrun's ranks on this machine
            preload = ResidentTokens.nbytes(store) <= preload_budget(device, local)
        if preload:
            resident = ResidentTokens(store, device)
            read = lambda step: resident.batch(train, step, rank, world)  # noqa: E731
        else:
            read = lambda step: _read_batch(store, train, step, rank, world)  # noqa: E731
        log.debug("fit-acg: batches %s", "gathered from the tokens in memory" if preload else "read from the file")
        pool = ThreadPoolExecutor(1)
        limit = train.step_limit
        nxt = pool.submit(read, start) if start < limit else None
        t0 = time.monotonic()
        last = {"loss": float("nan"), "modularity": float("nan")}
        n_global = min(train.batch_size, store.n_images)
        step, stop, t_first = start - 1, start >= limit, t0
        if rank == 0:
            log.info("fit-acg: %s of %d images, warm-up %d", train.describe(), n_global, train.warmup_steps)
        while not stop:
            step += 1
            x, mask = nxt.result()
            # prefetched speculatively: under --steps auto the fit may stop before step + 1 is needed
            nxt = pool.submit(read, step + 1) if step + 1 < limit else None
            x, mask = core.prepare(x.to(device)), mask.to(device)
            lr = sched.lr(step)
            for g in opt.param_groups:
                g["lr"] = lr
            concepts = model(x, mask)
            s = assignment(x, concepts)
            loss, q = modularity_loss(x, s, mask, keep_diagonal=train.keep_diagonal, delta=train.delta, tau=train.tau)
            if dist:  # this rank's images' share of the global mean (DDP averages gradients over the W ranks)
                loss = loss * (len(q) * world / n_global)
            if not torch.isfinite(loss):
                raise AcsegError(f"the loss became {loss.item()} at step {step}", "lower --lr or check the features")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            q_sum = float(q.sum().item())
            if dist:
                q_sum = float(dist.sum(np.array([q_sum]))[0])
            last = {"loss": -q_sum / n_global, "modularity": q_sum / n_global}
            stop = sched.observe(step, last["modularity"]) or step + 1 >= limit
            logging_step = step % train.log_every == 0 or stop
            if logging_step:
                with torch.no_grad():
                    _, active = hard_assignment(s, mask)
                active_sum = float(active.sum(1).float().sum().item())
                if dist:
                    active_sum = float(dist.sum(np.array([active_sum]))[0])
                rec = {
                    "step": step,
                    **last,
                    "active_concepts": active_sum / n_global,
                    "lr": lr,
                    "seconds": round(time.monotonic() - t0, 3),
                }
                if stop:  # the last line of the log says where and why the fit stopped
                    rec["stop_reason"] = sched.reason or f"stopped at step {step + 1}"
                history.append(rec)
            if rank == 0 and step == start + 2 and not stop:  # the first step pays for start-up; time two more
                per_step = (time.monotonic() - t_first) / 2
                left = (limit - step - 1) * per_step
                msg = (
                    f"fit-acg: about {per_step:.2f} s per step here, so {duration(left)} for the remaining "
                    f"{limit - step - 1} steps"
                    if not train.auto
                    else f"fit-acg: about {per_step:.2f} s per step here; until converged, typically a few hundred "
                    f"steps ({duration(300 * per_step)} for 300), at most {duration(left)} (the cap of {limit})"
                )
                log.log(announce, msg)
            if step == start:
                t_first = time.monotonic()
            if progress and rank == 0:
                phase = (
                    "" if not train.auto else " (until converged)" if sched.decay_from is None else " (cooling down)"
                )
                total = limit if sched.decay_from is None else min(limit, sched.decay_from + sched.decay_len)
                progress(step + 1, total, f"loss {last['loss']:.4f} Q {last['modularity']:.4f}{phase}")
            if rank == 0 and train.checkpoint_every and (step + 1) % train.checkpoint_every == 0 and not stop:
                save_checkpoint(
                    rp,
                    core,
                    prov,
                    {"config": asdict(train)},
                    extra={
                        "optimizer": opt.state_dict(),
                        "step": step + 1,
                        "history": json.dumps(history),
                        "torch_rng": torch.get_rng_state(),
                        "world": world,
                        "schedule": json.dumps(sched.state()),
                    },
                )
        pool.shutdown()
        core.eval()
        steps_done = step + 1
        reason = sched.reason or f"stopped at step {steps_done}"
        if rank == 0:
            log.info("fit-acg stopped after %d steps: %s", steps_done, reason)
            save_checkpoint(
                out,
                core,
                prov,
                {
                    "config": asdict(train),
                    "final": last,
                    "steps": steps_done,
                    "stop_reason": reason,
                    "processes": world,
                },
            )
            try:
                _write_log(log_path, history)
                plot_loss(history, plot_path, title=f"fit-acg {out.name}: {steps_done} steps, loss {last['loss']:.4f}")
            except OSError as e:
                raise AcsegError(
                    f"{out.name} is written, but writing its log or loss curve failed ({e.strerror or e})",
                    "check free disk space; the checkpoint itself is complete",
                ) from None
            if rp.exists():
                rp.unlink()
        if dist:
            dist.barrier()
    finally:
        if lock_fd is not None:
            release_output_lock(out, lock_fd)
        store.close()
        if dist:
            import torch.distributed as td

            td.destroy_process_group()
    return FitResult(
        str(out), steps_done, last["loss"], last["modularity"], str(log_path), str(plot_path), start, history, reason
    )


def _write_log(path: Path, history: list[dict]) -> None:
    """One JSON object per logged step; the last one also has ``stop_reason``."""
    with atomic_open(path) as fh:
        for r in history:
            fh.write(json.dumps(r) + "\n")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def plot_loss(history: list[dict], path: Path, size=(720, 400), title: str = "") -> None:
    """The training loss (the negative soft modularity) against the step, with labelled axes and ticks,
    drawn with Pillow; the learning rate as a thin grey line on the same plot, scaled to its height."""
    from PIL import Image, ImageDraw

    from .render import label_font

    W, H = size
    left, right, top, bottom = 85, 20, 30, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = label_font(12)
    d.text((left, 8), title or "fit-acg training loss", fill="black", font=font)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.text(((left + W - right) // 2 - 15, H - 18), "step", fill="black", font=font)
    ylabel = Image.new("RGB", (120, 14), "white")
    ImageDraw.Draw(ylabel).text((0, 0), "loss (-modularity)", fill="black", font=font)
    img.paste(ylabel.rotate(90, expand=True), (2, (top + H - bottom) // 2 - 60))
    if len(history) >= 2:
        steps = np.array([r["step"] for r in history], float)
        loss = np.array([r["loss"] for r in history], float)
        lo, hi = float(loss.min()), float(loss.max())
        if not hi > lo:
            lo, hi = lo - 1e-3, hi + 1e-3
        margin = 0.05 * (hi - lo)
        lo, hi = lo - margin, hi + margin
        s0, s1 = float(steps[0]), max(float(steps[-1]), float(steps[0]) + 1)
        px = lambda v: left + (v - s0) / (s1 - s0) * (W - right - left)  # noqa: E731
        py = lambda v: top + (hi - v) / (hi - lo) * (H - bottom - top)  # noqa: E731
        for t in nice_ticks(s0, s1, 6):
            x = px(t)
            d.line([(x, H - bottom), (x, H - bottom + 4)], fill="black")
            d.text((x - 12, H - bottom + 6), f"{t:g}", fill="black", font=font)
        for t in nice_ticks(lo, hi, 5):
            y = py(t)
            d.line([(left - 4, y), (left, y)], fill="black")
            d.line([(left + 1, y), (W - right - 1, y)], fill=(235, 235, 235))
            label = f"{t:.3g}"
            d.text((left - 7 - d.textlength(label, font=font), y - 7), label, fill="black", font=font)
        lr = np.array([r.get("lr", 0.0) for r in history], float)
        if lr.max() > 0:
            ly = top + (1 - lr / lr.max()) * (H - bottom - top)
            d.line(list(zip(px(steps).tolist(), ly.tolist())), fill=(160, 160, 160), width=1)
            d.text((W - right - 170, 8), "grey: learning rate (scaled)", fill=(120, 120, 120), font=font)
        d.line(list(zip(px(steps).tolist(), py(loss).tolist())), fill=(200, 30, 30), width=2)
    write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))
