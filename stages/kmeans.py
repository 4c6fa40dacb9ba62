"""k-means in torch: k-means++ seeding, Lloyd iterations, several restarts, batched over images.

Used for the per-image k-means baseline (``conceptualize --method kmeans``), the dataset-level k-means of
``classify`` and the prototype initialisation of ``fit-acg``. Deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np
import torch


def _sqnorm(x: torch.Tensor) -> torch.Tensor:
    """(..., n, d) -> (..., n, 1): the points' squared norms, computed once per k-means rather than at every
    distance evaluation (a pass over all tokens and a temporary of their size each time)."""
    return (x * x).sum(-1, keepdim=True)


def _sqdist(x: torch.Tensor, c: torch.Tensor, xx: torch.Tensor | None = None) -> torch.Tensor:
    # (..., n, d), (..., k, d) -> (..., n, k); xx = _sqnorm(x) when the caller has it
    xx = _sqnorm(x) if xx is None else xx
    # 2 (x c^T), not (2 x) c^T: the same numbers (a power of two scales exactly), without a copy of x
    return (xx - (x @ c.transpose(-2, -1)).mul_(2) + (c * c).sum(-1).unsqueeze(-2)).clamp_min_(0)


def _sqdist_kn(x: torch.Tensor, c: torch.Tensor, xx_t: torch.Tensor) -> torch.Tensor:
    """``_sqdist`` for a few centroids per point set: (..., n, d), (..., k, d) -> (..., n, k), computed as
    (..., k, n), c x^T, and made contiguous for the argmin (xx_t: ``_sqnorm(x)`` transposed, (..., 1, n)).
    With k = 5 per image, x c^T has 5 output columns, a shape the BLAS runs badly. With one point set and
    more centroids (classify's k-means) x c^T is the faster one."""
    d = (c @ x.transpose(-2, -1)).mul_(-2).add_(xx_t).add_((c * c).sum(-1, keepdim=True)).clamp_min_(0)
    return d.transpose(-2, -1).contiguous()


def nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Each point's nearest centroid (squared Euclidean): (n, d), (k, d) -> (n,). classify labels concepts
    with it, in fit and apply alike."""
    d = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]
    return d.argmin(1)


def kmeans_pp(
    x: torch.Tensor,
    k: int,
    gen: torch.Generator,
    w: torch.Tensor | None = None,
    xx: torch.Tensor | None = None,
    trials: int = 1,
) -> torch.Tensor:
    """k-means++ seeding of one point set (n, d) -> (k, d), optionally with sample weights (xx: _sqnorm(x)).
    ``gen`` is a CPU generator: the draws are made on the CPU wherever ``x`` lives (same numbers).

    ``trials`` > 1: greedy k-means++ (Arthur and Vassilvitskii; scikit-learn's seeding): each new centroid is
    the best of that many draws, the one that lowers the summed squared distance most."""
    n = x.shape[0]
    xx = _sqnorm(x) if xx is None else xx
    idx = [
        int(torch.randint(n, (1,), generator=gen))
        if w is None
        else int(torch.multinomial((w / w.sum()).cpu(), 1, generator=gen))
    ]
    d2 = _sqdist(x, x[idx], xx).squeeze(-1)
    for _ in range(1, k):
        pw = d2 if w is None else d2 * w
        total = pw.sum()
        if total > 0 and trials > 1:
            cand = torch.multinomial((pw / total).cpu(), trials, replacement=True, generator=gen).to(x.device)
            new = torch.minimum(d2[None], _sqdist(x, x[cand], xx).T)  # (trials, n)
            cost = new.sum(1) if w is None else new @ w
            best = int(cost.argmin())
            j, d2 = int(cand[best]), new[best]
        else:
            if total <= 0:
                j = int(torch.randint(n, (1,), generator=gen))
            else:
                j = int(torch.multinomial((pw / total).cpu(), 1, generator=gen))
            d2 = torch.minimum(d2, _sqdist(x, x[j : j + 1], xx).squeeze(-1))
        idx.append(j)
    return x[idx].clone()


def kmeans(
    x: torch.Tensor | np.ndarray,
    k: int,
    *,
    n_init: int = 3,
    iters: int = 50,
    seed: int = 0,
    tol: float = 1e-6,
    weights: np.ndarray | None = None,
    trials: int = 1,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means on (n, d) points, optionally weighted. Returns (centroids (k, d), labels (n,), inertia).
    ``trials``: draws per centroid in the seeding (``kmeans_pp``; 1: plain k-means++)."""
    x = torch.as_tensor(np.asarray(x, np.float32))
    n = x.shape[0]
    w = torch.ones(n) if weights is None else torch.as_tensor(np.asarray(weights, np.float32))
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    xx = _sqnorm(x)
    xw = x if weights is None else x * w[:, None]  # the weighted points, once
    best = None
    for _ in range(max(1, n_init)):
        c = kmeans_pp(x, k, gen, None if weights is None else w, xx, trials)
        prev = None
        for _ in range(iters):
            d = _sqdist(x, c, xx)
            lab = d.argmin(1)
            inertia = float((d.gather(1, lab[:, None]).squeeze(1) * w).sum())
            sums = torch.zeros_like(c).index_add_(0, lab, xw)
            cnt = torch.zeros(k).index_add_(0, lab, w)
            empty = cnt == 0
            c = torch.where(empty[:, None], c, sums / cnt.clamp_min(1)[:, None])
            if empty.any():  # re-seed an empty cluster at the farthest point
                far = d.gather(1, lab[:, None]).squeeze(1).argsort(descending=True)
                for e, j in zip(torch.nonzero(empty).flatten().tolist(), far.tolist()):
                    c[e] = x[j]
            if prev is not None and abs(prev - inertia) <= tol * max(1.0, abs(prev)):
                break
            prev = inertia
        d = _sqdist(x, c, xx)
        lab = d.argmin(1)
        inertia = float((d.gather(1, lab[:, None]).squeeze(1) * w).sum())
        if best is None or inertia < best[2]:
            best = (c.numpy().copy(), lab.numpy().copy(), inertia)
    return best


def batched_kmeans(
    x: torch.Tensor, mask: torch.Tensor, k: int, *, iters: int = 30, seed: int = 0, work: dict | None = None
):
    """Independent k-means per image on padded (B, N, d) tokens; returns (centroids (B,k,d), labels (B,N)).

    One restart, k-means++ seeding per image; padded tokens take no part; each image iterates until its own
    centroids settle (torch.allclose with atol 1e-6), at most ``iters`` times. ``work``: a dict the caller
    keeps across calls, holding the memory the images still iterating are gathered into (fresh memory for
    each batch costs more in page faults than the gather itself).
    """
    B = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    xx = _sqnorm(x)
    cents = []
    whole = mask.all(1).tolist()  # an image without padding is seeded on views, not on a copy of its tokens
    for b in range(B):
        xb, xxb = (x[b], xx[b]) if whole[b] else (x[b][mask[b]], xx[b][mask[b]])
        c = kmeans_pp(xb, min(k, xb.shape[0]), gen, xx=xxb)
        if c.shape[0] < k:
            c = torch.cat([c, c[:1].expand(k - c.shape[0], -1)], 0)
        cents.append(c)
    c = torch.stack(cents)
    # Lloyd iterations; an image stops when its own centroids stop moving (on CamVid after 4 to 26
    # iterations, 12 on average). Settled images are dropped from the batch in bulk, once a quarter of
    # it has settled, so the gathers stay few; until then they ride along and are not written again.
    live = torch.arange(B, device=x.device)
    xx_t = xx.transpose(-2, -1)
    xl, xxl, ml, cl = x, xx_t, mask.float()[..., None], c.clone()
    settled = torch.zeros(B, dtype=torch.bool, device=x.device)
    for _ in range(iters):
        lab = _sqdist_kn(xl, cl, xxl).argmin(-1)
        oh = torch.nn.functional.one_hot(lab, k).float() * ml
        cnt = oh.sum(1)
        new = (oh.transpose(1, 2) @ xl) / cnt.clamp_min(1)[..., None]
        new = torch.where((cnt > 0)[..., None], new, cl)
        # torch.allclose(new, cl, atol=1e-6), per image
        still = ((new - cl).abs() <= 1e-6 + 1e-5 * cl.abs()).flatten(1).all(1)
        fresh = ~settled
        c[live[fresh]] = new[fresh]
        settled |= still
        if settled.all():
            break
        if settled.sum() * 4 >= len(live):
            keep = (~settled).nonzero().squeeze(1)
            xl = _gather_rows(xl, keep, x, work)
            live, xxl, ml, new, settled = live[keep], xxl[keep], ml[keep], new[keep], settled[keep]
        cl = new
    lab = _sqdist_kn(x, c, xx_t).argmin(-1)
    return c, lab


def _gather_rows(xl: torch.Tensor, keep: torch.Tensor, x: torch.Tensor, work: dict | None) -> torch.Tensor:
    """``xl[keep]`` for ascending ``keep``: the first time (``xl`` is the caller's ``x``) into memory kept in
    ``work``, later in place, each row moving only forward."""
    n = len(keep)
    if xl is x:
        buf = None if work is None else work.get("kmeans_rows")
        if buf is None or buf.numel() < n * x[0].numel() or buf.dtype != x.dtype or buf.device != x.device:
            buf = torch.empty(x.shape[0] * x[0].numel(), dtype=x.dtype, device=x.device)
            if work is not None:
                work["kmeans_rows"] = buf
        return torch.index_select(x, 0, keep, out=buf[: n * x[0].numel()].view(n, *x.shape[1:]))
    for i, j in enumerate(keep.tolist()):
        if i != j:
            xl[i].copy_(xl[j])
    return xl[:n]
