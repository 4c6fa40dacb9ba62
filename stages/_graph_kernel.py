"""The compiled loop of ``graphs.graph_modularity`` (numba; imported only when a CPU fit uses it)."""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, nogil=True)
def _loop(pool, scratch, source, offset, stride, rows, lengths, s, keep_diagonal, tau, q, grad):
    """For each image b (in parallel): its graph's entries A[rows[b, i], rows[b, j]] (in ``pool`` or
    ``scratch`` from ``offset[b]``, row length ``stride[b]``), the degrees and 2m of that graph, then over the
    upper triangle j >= i: Wn_ij = (A_ij - k_i k_j / 2m) / 2m, m_ij = max_c s_ic s_jc at c*, Q += Wn f(m)
    (twice off the diagonal) and the gradient 2 Wn f'(m) s_jc* to (i, c*), 2 Wn f'(m) s_ic* to (j, c*)."""
    n_images, _, n_concepts = s.shape
    for b in numba.prange(n_images):
        base = pool if source[b] == 0 else scratch
        off, st, n = offset[b], stride[b], lengths[b]
        r = rows[b]
        deg = np.empty(n, np.float64)
        two_m = 0.0
        for i in range(n):
            row = off + r[i] * st
            acc = 0.0
            for j in range(n):
                if j != i or keep_diagonal:
                    acc += base[row + r[j]]
            deg[i] = acc
            two_m += acc
        two_m = max(two_m, 1e-12)
        total = 0.0
        for i in range(n):
            row = off + r[i] * st
            si = s[b, i]
            gi = grad[b, i]
            ki = deg[i] / two_m
            for j in range(i, n):
                sj = s[b, j]
                m = si[0] * sj[0]
                c = 0
                for cc in range(1, n_concepts):
                    p = si[cc] * sj[cc]
                    if p > m:
                        m = p
                        c = cc
                a = base[row + r[j]] if (j != i or keep_diagonal) else 0.0
                w = (a - ki * deg[j]) / two_m
                if tau > 0.0:
                    d = math.tanh(m / tau)
                    f = d
                    g = w * (1.0 - d * d) / tau
                else:
                    f = m
                    g = w
                if j == i:
                    total += w * f
                    gi[c] += 2.0 * g * si[c]
                else:
                    total += 2.0 * w * f
                    gi[c] += 2.0 * g * sj[c]
                    grad[b, j, c] += 2.0 * g * si[c]
        q[b] = total


def graph_modularity_kernel(args: tuple, threads: int) -> None:
    """``_loop(*args)`` on at most ``threads`` threads (torch's count: the two never run at once)."""
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    _loop(*args)
