"""fit-acg's batches: which images and tokens each step sees, read from the store or gathered from memory.

Batches are drawn at random, as a pure function of (seed, step), so a resumed or distributed fit sees the
same ones. A store whose tokens fit in memory is held there (float16, on the fitting device) and each batch
is gathered from it (``ResidentTokens``); a larger store is read batch by batch (``read_batch``), never whole.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .config import TrainConfig
from .features import FeatureStore


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


def read_batch(store: FeatureStore, cfg: TrainConfig, step: int, rank: int = 0, world: int = 1):
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
    ``batch`` gives exactly what ``read_batch`` gives (the same images, the same token subsample, the same
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

    def image(self, i: int) -> torch.Tensor:
        """All of image ``i``'s tokens, float32, as ``read_batch`` would give them."""
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])].float()

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
