"""The ACG's start from the data: the mean token, the whitening matrix and k-means seeds for the prototypes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .acg import AdaptiveConceptGenerator
from .features import FeatureStore

if TYPE_CHECKING:
    from .distributed import Dist


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
