"""The compiled loops of PAMR (``pamr.affinities`` and ``pamr.propagate``; numba, imported on first use).

The arithmetic of the torch reference in ``pamr``, organised for the cache and for vector instructions: the
photo and the probabilities are padded once (replicate), then each row of the result is summed over its
neighbours' rows, contiguous slices that the compiler vectorises, while that row stays in the first-level cache.
Rows are split into blocks that run in parallel. float32 throughout, as the reference; sums run in another order,
so results differ from it by float rounding (tests bound it)."""

from __future__ import annotations

import math

import numba
import numpy as np

BLOCKS = 16  # row blocks handed to the threads


@numba.njit(cache=True, nogil=True)
def _pad_rows(x, pad, out, r0, r1):
    """Rows r0..r1 (of all channels' padded rows, channel-major) of ``x`` (c, h, w) padded by ``pad`` on every
    side into ``out`` (c, h + 2 pad, w + 2 pad), edges repeated (torch's replicate padding)."""
    _, h, w = x.shape
    hp = h + 2 * pad
    for r in range(r0, r1):
        ch, yy = r // hp, r % hp
        src = x[ch, min(max(yy - pad, 0), h - 1)]
        dst = out[ch, yy]
        dst[:pad] = src[0]
        dst[pad : pad + w] = src
        dst[pad + w :] = src[w - 1]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _exp(t, bits):
    """t[:] = exp(t), for t <= 0, in loops the compiler vectorises (math.exp is a call per element without
    Intel's SVML, most of the affinities' time): 2^n exp(r) with n = round(t / ln 2), r = t - n ln 2 (ln 2 in
    two parts), exp(r) by its Taylor polynomial of degree 7 (|r| <= ln 2 / 2), 2^n from its exponent bits:
    relative error under 3e-7, about 5 float32 ulps (at most 2.97e-7 over 40 million sampled values). t below
    -87 (where float32 leaves the normal numbers) counts as -87: 1.6e-38 for 0 or about 1e-38 too much; the
    softmax's largest term is 1."""
    for x in range(t.shape[0]):
        v = max(t[x], np.float32(-87.0))
        n = np.floor(v * np.float32(1.4426950408889634) + np.float32(0.5))
        r = v - n * np.float32(0.693145751953125) - n * np.float32(1.428606765330187e-06)
        p = np.float32(1.0 / 5040)
        p = p * r + np.float32(1.0 / 720)
        p = p * r + np.float32(1.0 / 120)
        p = p * r + np.float32(1.0 / 24)
        p = p * r + np.float32(1.0 / 6)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        t[x] = p * r + np.float32(1.0)
        bits[x] = (np.int32(n) + np.int32(127)) << 23
    scale = bits.view(np.float32)
    for x in range(t.shape[0]):
        t[x] *= scale[x]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _affinity_rows(imgp, offs, sigma, pad, out, y0, y1):
    c = imgp.shape[0]
    n, _, w = out.shape
    d = np.empty((n, c, w), np.float32)  # each neighbour's colour difference to the pixel
    inv = np.empty((c, w), np.float32)  # sums of d, then 1 / (sigma x spread)
    sq = np.empty((c, w), np.float32)  # sums of d^2
    top = np.empty(w, np.float32)
    total = np.empty(w, np.float32)
    bits = np.empty(w, np.int32)  # _exp's scratch
    for y in range(y0, y1):
        inv[:] = 0.0
        sq[:] = 0.0
        for k in range(n):
            yy, base = y + pad + offs[k, 0], pad + offs[k, 1]
            for ch in range(c):
                src = imgp[ch, yy, base : base + w]
                ctr = imgp[ch, y + pad, pad : pad + w]
                dk, s1, s2 = d[k, ch], inv[ch], sq[ch]
                for x in range(w):
                    v = src[x] - ctr[x]
                    dk[x] = v
                    s1[x] += v
                    s2[x] += v * v
        for ch in range(c):
            s1, s2 = inv[ch], sq[ch]
            for x in range(w):
                # the unbiased variance over the pixel and its n neighbours (its own difference is 0)
                var = (s2[x] - s1[x] * s1[x] / (n + 1)) / n
                s1[x] = np.float32(1.0) / (math.sqrt(max(var, np.float32(0.0))) * sigma + np.float32(1e-8))
        top[:] = -np.inf
        for k in range(n):
            o = out[k, y]
            o[:] = 0.0
            for ch in range(c):
                dk, s1 = d[k, ch], inv[ch]
                for x in range(w):
                    o[x] += abs(dk[x]) * s1[x]
            for x in range(w):
                o[x] *= np.float32(-1.0 / c)
                top[x] = max(top[x], o[x])
        total[:] = 0.0
        for k in range(n):  # softmax over the neighbours
            o = out[k, y]
            for x in range(w):
                o[x] -= top[x]
            _exp(o, bits)
            for x in range(w):
                total[x] += o[x]
        for x in range(w):
            total[x] = np.float32(1.0) / total[x]
        for k in range(n):
            o = out[k, y]
            for x in range(w):
                o[x] *= total[x]


@numba.njit(parallel=True, cache=True, nogil=True)
def affinities(img, offs, sigma, pad):
    """img (3, h, w) float32, offs (n, 2) int64 (dy, dx), |dy|, |dx| <= pad -> (n, h, w) float32 weights
    (a softmax over the n neighbours)."""
    c, h, w = img.shape
    imgp = np.empty((c, h + 2 * pad, w + 2 * pad), np.float32)
    _pad_rows(img, pad, imgp, 0, c * (h + 2 * pad))
    out = np.empty((offs.shape[0], h, w), np.float32)
    for b in numba.prange(BLOCKS):
        _affinity_rows(imgp, offs, np.float32(sigma), pad, out, b * h // BLOCKS, (b + 1) * h // BLOCKS)
    return out


@numba.njit(cache=True, nogil=True, fastmath=True)
def _propagate_rows(padded, aff, offs, pad, out, y0, y1):
    m, _, w = out.shape
    acc = np.empty((m, w), np.float32)
    for y in range(y0, y1):
        acc[:] = 0.0
        for k in range(offs.shape[0]):
            yy, base = y + pad + offs[k, 0], pad + offs[k, 1]
            a = aff[k, y]
            for c in range(m):
                src = padded[c, yy, base : base + w]
                row = acc[c]
                for x in range(w):
                    row[x] += a[x] * src[x]
        out[:, y, :] = acc


@numba.njit(parallel=True, cache=True, nogil=True)
def propagate(probs, aff, offs, pad, iterations):
    """probs (m, h, w) float32 -> the same after ``iterations`` steps of out[y, x] = sum_k aff[k, y, x] *
    probs[y + dy_k, x + dx_k], coordinates clamped to the photo."""
    m, h, w = probs.shape
    out = probs.copy()
    padded = np.empty((m, h + 2 * pad, w + 2 * pad), np.float32)
    rows = m * (h + 2 * pad)
    for _ in range(iterations):
        for b in numba.prange(BLOCKS):
            _pad_rows(out, pad, padded, b * rows // BLOCKS, (b + 1) * rows // BLOCKS)
        for b in numba.prange(BLOCKS):
            _propagate_rows(padded, aff, offs, pad, out, b * h // BLOCKS, (b + 1) * h // BLOCKS)
    return out


@numba.njit(cache=True, nogil=True)
def _source(n_out, n_in):
    """torch's bilinear source positions (align_corners=False): for each output index, the two input indices
    and their weights."""
    lo = np.empty(n_out, np.int64)
    hi = np.empty(n_out, np.int64)
    w1 = np.empty(n_out, np.float32)
    scale = np.float32(n_in / n_out)
    for i in range(n_out):
        s = max(scale * (np.float32(i) + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
        i0 = min(int(math.floor(s)), n_in - 1)
        lo[i], hi[i] = i0, min(i0 + 1, n_in - 1)
        w1[i] = min(max(s - np.float32(i0), np.float32(0.0)), np.float32(1.0))
    return lo, hi, w1


@numba.njit(cache=True, nogil=True)
def _labels_rows(probs, lab, r0, r1):
    """lab[y] = the first argmax over the classes of probs[:, y], rows r0..r1."""
    m = probs.shape[0]
    for y in range(r0, r1):
        best = probs[0, y].copy()
        row = lab[y]
        row[:] = 0
        for c in range(1, m):
            p = probs[c, y]
            for x in range(best.shape[0]):
                if p[x] > best[x]:
                    best[x] = p[x]
                    row[x] = c


@numba.njit(cache=True, nogil=True, fastmath=True)
def _argmax_rows(probs, lab, ylo, yhi, wy, xlo, xhi, wx, out, r0, r1):
    """Rows r0..r1 of the upsampled argmax. Where the four source pixels share their argmax c, so does every
    bilinear mean of them (each class's value is the same convex combination, and rounding is monotone), so
    only the pixels between differently labelled ones are interpolated, class by class."""
    m = probs.shape[0]
    W = out.shape[1]
    for Y in range(r0, r1):
        y0, y1 = ylo[Y], yhi[Y]
        b = wy[Y]
        a = np.float32(1.0) - b
        o = out[Y]
        for X in range(W):
            x0, x1 = xlo[X], xhi[X]
            c = lab[y0, x0]
            if lab[y0, x1] == c and lab[y1, x0] == c and lab[y1, x1] == c:
                o[X] = c
                continue
            e = wx[X]
            f = np.float32(1.0) - e
            best, arg = np.float32(-np.inf), 0
            for k in range(m):
                v = (probs[k, y0, x0] * f + probs[k, y0, x1] * e) * a + (
                    probs[k, y1, x0] * f + probs[k, y1, x1] * e
                ) * b
                if v > best:  # the first maximum wins ties, as torch's argmax
                    best, arg = v, k
            o[X] = arg


@numba.njit(parallel=True, cache=True, nogil=True)
def upsample_argmax(probs, H, W):
    """probs (m, h, w) float32 -> (H, W) int64: the argmax over m of the bilinear interpolation to (H, W), as
    ``render.upsample_argmax`` without the (m, H, W) interpolated array."""
    _, h, w = probs.shape
    ylo, yhi, wy = _source(H, h)
    xlo, xhi, wx = _source(W, w)
    lab = np.empty((h, w), np.int64)
    for b in numba.prange(BLOCKS):
        _labels_rows(probs, lab, b * h // BLOCKS, (b + 1) * h // BLOCKS)
    out = np.empty((H, W), np.int64)
    for b in numba.prange(BLOCKS):
        _argmax_rows(probs, lab, ylo, yhi, wy, xlo, xhi, wx, out, b * H // BLOCKS, (b + 1) * H // BLOCKS)
    return out


@numba.njit(cache=True, nogil=True, fastmath=True)
def _resize_rows(probs, ylo, yhi, wy, xlo, xhi, wx, out, r0, r1):
    """Rows r0..r1 (of all classes' output rows, class-major) of the bilinear interpolation, in torch's order
    of operations: (p00 (1 - ex) + p01 ex) (1 - ey) + (p10 (1 - ex) + p11 ex) ey."""
    H, W = out.shape[1], out.shape[2]
    for r in range(r0, r1):
        k, Y = r // H, r % H
        b = wy[Y]
        a = np.float32(1.0) - b
        top, bot, o = probs[k, ylo[Y]], probs[k, yhi[Y]], out[k, Y]
        for X in range(W):
            x0, x1 = xlo[X], xhi[X]
            e = wx[X]
            f = np.float32(1.0) - e
            o[X] = (top[x0] * f + top[x1] * e) * a + (bot[x0] * f + bot[x1] * e) * b


@numba.njit(parallel=True, cache=True, nogil=True)
def resize(probs, H, W):
    """probs (m, h, w) float32 -> (m, H, W) float32, bilinear with torch's ``F.interpolate(mode="bilinear",
    align_corners=False)`` source positions and weights (tests bound the difference to float rounding)."""
    m, h, w = probs.shape
    ylo, yhi, wy = _source(H, h)
    xlo, xhi, wx = _source(W, w)
    out = np.empty((m, H, W), np.float32)
    rows = m * H
    for b in numba.prange(BLOCKS):
        _resize_rows(probs, ylo, yhi, wy, xlo, xhi, wx, out, b * rows // BLOCKS, (b + 1) * rows // BLOCKS)
    return out


def set_threads(threads):
    """Run the parallel loops on at most ``threads`` threads (and at most numba's own limit)."""
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def refine(img, probs, offs, sigma, pad, iterations, size, threads):
    """``pamr.refine_probs``'s arithmetic: the affinities of img (3, h, w), ``iterations`` propagation steps of
    probs (m, h, w), then the argmax of their bilinear upsampling to ``size`` (H, W); on at most ``threads``
    threads (``pamr.threads``)."""
    set_threads(threads)
    out = propagate(probs, affinities(img, offs, sigma, pad), offs, pad, iterations)
    return upsample_argmax(out, int(size[0]), int(size[1]))
