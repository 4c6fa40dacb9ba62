"""fit-acg on the CPU: each image's token graph computed once per fit, and the modularity loss read from it.

The graph ``A_ij = max(0, cos(x_i, x_j))`` of an image's prepared tokens never changes while the ACG trains,
yet ``modularity.soft_modularity`` rebuilds it (an N x N x d product) for every image of every step.
``GraphCache`` keeps each image's graph over all its tokens, in one float32 pool, from the first step that
sees the image on, as far as ``graph_budget`` allows; a step that subsamples the image's tokens
(``--max-tokens``) reads the rows and columns of its sample, which is exactly the graph of the sample.
``graph_modularity`` is ``soft_modularity`` computed from those graphs by one compiled loop (numba) that
forms each image's degrees, the modularity weights, the loss and its gradient in one pass over the upper
triangle, never holding a (B, N, N) tensor. Same value and gradient as ``soft_modularity`` (float64 sums
instead of float32 ones; tests compare them). Without numba, fit-acg keeps ``soft_modularity``.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

_KERNEL = None


def kernel_available() -> bool:
    """Whether numba can be imported (the compiled loss); fit-acg falls back to ``soft_modularity`` if not."""
    try:
        _kernel()
    except ImportError:
        return False
    return True


def _kernel():
    """The compiled loop, built on first use (numba caches the machine code on disk, a few seconds once)."""
    global _KERNEL
    if _KERNEL is None:
        from ._graph_kernel import graph_modularity_kernel

        _KERNEL = graph_modularity_kernel
    return _KERNEL


def graph_budget(processes: int = 1) -> int:
    """Bytes of graphs a CPU fit keeps by default: 4 GiB, or a quarter of the available memory if less, shared
    by the ``processes`` of this machine (each keeps its own)."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 << 30
    return min(4 << 30, avail // 4) // max(1, processes)


def token_graph(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n, d) prepared tokens -> their (n, n) float32 graph max(0, cos), as ``modularity_matrix`` forms it
    (into ``out`` if given)."""
    with torch.no_grad():
        xn = F.normalize(x.float(), dim=-1)
        return torch.mm(xn, xn.T, out=out).clamp_min_(0)


class GraphCache:
    """Per image, the graph of all its prepared tokens, kept from its first use while ``budget`` bytes last.

    ``sizes``: the images' token counts. The pool is one float32 array of the total size of the graphs that can
    fit (allocated, not written: memory is taken as graphs arrive; torch's allocation, since numpy's asks the
    kernel for huge pages, whose compaction made filling it 3-10x slower on this project's VM). Images whose
    graph no longer fits are left to the step that needs them (``GraphBatch.add_uncached``)."""

    def __init__(self, sizes: np.ndarray, budget: int):
        self.sizes = np.asarray(sizes, np.int64)
        self.offset = np.full(len(self.sizes), -1, np.int64)
        need = int((self.sizes**2).sum())
        self.capacity = min(need, max(0, budget) // 4)
        self._pool = torch.empty(self.capacity, dtype=torch.float32)
        self.pool = self._pool.numpy()
        self.used = 0
        self.refused = 0

    def graph_offset(self, image: int, tokens: Callable[[], torch.Tensor]) -> int:
        """Where image ``image``'s graph starts in the pool (computed from ``tokens()``, its prepared tokens, on
        the first call), or -1 when it does not fit."""
        if self.offset[image] >= 0:
            return int(self.offset[image])
        n = int(self.sizes[image])
        if self.used + n * n > self.capacity:
            self.refused += 1
            return -1
        x = tokens()
        if x.shape[0] != n:
            raise ValueError(f"image {image} has {x.shape[0]} tokens, not {n}")
        token_graph(x, out=self._pool[self.used : self.used + n * n].view(n, n))
        self.offset[image] = self.used
        self.used += n * n
        return int(self.offset[image])


class GraphBatch:
    """The graphs of one step's images, in the order of the batch: from the cache or, for an image not kept
    there, computed from the batch's own (possibly subsampled) tokens."""

    def __init__(self, cache: GraphCache):
        self.cache = cache
        self.scratch: list[np.ndarray] = []
        self.source: list[int] = []  # 0: the cache's pool, 1: scratch
        self.offset: list[int] = []
        self.stride: list[int] = []
        self._rows: list[np.ndarray] = []

    def add_cached(self, offset: int, n_all: int, sel: np.ndarray | None):
        self.source.append(0)
        self.offset.append(offset)
        self.stride.append(n_all)
        self._rows.append(np.arange(n_all) if sel is None else np.asarray(sel, np.int64))

    def add_uncached(self, x: torch.Tensor):
        """An image whose graph is not cached: ``x`` its (n, d) prepared tokens as the batch holds them."""
        n = x.shape[0]
        self.source.append(1)
        self.offset.append(sum(a.size for a in self.scratch))
        self.stride.append(n)
        self.scratch.append(token_graph(x).numpy().reshape(-1))
        self._rows.append(np.arange(n))

    def arrays(self):
        n_rows = max(len(r) for r in self._rows)
        rows = np.zeros((len(self._rows), n_rows), np.int64)
        for b, r in enumerate(self._rows):
            rows[b, : len(r)] = r
        lengths = np.array([len(r) for r in self._rows], np.int64)
        scratch = np.concatenate(self.scratch) if self.scratch else np.zeros(1, np.float32)
        return (
            self.cache.pool if self.cache.pool.size else np.zeros(1, np.float32),
            scratch,
            np.array(self.source, np.int64),
            np.array(self.offset, np.int64),
            np.array(self.stride, np.int64),
            rows,
            lengths,
        )


class _GraphModularity(torch.autograd.Function):
    """Q_b = sum_ij Wn_ij f(max_c Sbar_ic Sbar_jc) from the cached graphs; its gradient formed in the same pass
    (``modularity._SoftModularity`` has the formulas)."""

    @staticmethod
    def forward(ctx, sbar, arrays, keep_diagonal, tau):
        s = sbar.detach().contiguous().numpy()
        grad = np.zeros_like(s)
        q = np.zeros(s.shape[0], np.float64)
        threads = max(1, torch.get_num_threads())
        _kernel()((*arrays, s, bool(keep_diagonal), 0.0 if tau is None else float(tau), q, grad), threads)
        ctx.save_for_backward(torch.from_numpy(grad))
        return torch.from_numpy(q).to(sbar.dtype)

    @staticmethod
    def backward(ctx, gq):
        (grad,) = ctx.saved_tensors
        return grad * gq[:, None, None], None, None, None


def graph_modularity(
    batch: GraphBatch,
    s: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    keep_diagonal: bool = True,
    delta: str = "plain",
    tau: float = 0.1,
) -> torch.Tensor:
    """Per-image soft modularity (B,) of assignment ``s`` (B, N, k) on the graphs of ``batch``: what
    ``soft_modularity(tokens, s, mask, ...)`` gives for the batch's tokens. Row b of ``s`` holds image b's
    tokens first, padding after them (as the batches of fit-acg)."""
    sbar = s.float().clamp_min(0)
    if mask is not None:
        sbar = sbar * mask[..., None]
    arrays = batch.arrays()
    if arrays[5].shape[1] > s.shape[1]:
        raise ValueError(f"the batch has {s.shape[1]} tokens per row, its graphs {arrays[5].shape[1]}")
    return _GraphModularity.apply(sbar, arrays, keep_diagonal, None if delta == "plain" else float(tau))
