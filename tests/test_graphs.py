"""fit-acg's cached graphs and compiled loss (stages.graphs) against soft_modularity, the reference."""

import numpy as np
import pytest
import torch

from stages.graphs import GraphBatch, GraphCache, graph_modularity, kernel_available
from stages.modularity import soft_modularity

pytestmark = pytest.mark.skipif(not kernel_available(), reason="numba is not installed")


def images(sizes, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, dim, generator=g)
    return [centres[torch.randint(0, 4, (n,), generator=g)] + 0.7 * torch.randn(n, dim, generator=g) for n in sizes]


def padded(rows, k=5, seed=1):
    """A batch as fit-acg collates it: tokens first, zeros after, a mask; and an assignment with garbage in the
    padding (it must not count) and negative entries (clamped)."""
    g = torch.Generator().manual_seed(seed)
    n = max(len(r) for r in rows)
    x = torch.zeros(len(rows), n, rows[0].shape[1])
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for b, r in enumerate(rows):
        x[b, : len(r)], mask[b, : len(r)] = r, True
    s = torch.randn(len(rows), n, k, generator=g)
    s[~mask] = 3.0
    return x, mask, s


def reference(x, mask, s, **kw):
    s = s.clone().requires_grad_(True)
    q = soft_modularity(x, s, mask, **kw)
    (grad,) = torch.autograd.grad((q * torch.arange(1.0, len(q) + 1)).sum(), s)
    return q.detach(), grad


def cached(batch, mask, s, **kw):
    s = s.clone().requires_grad_(True)
    q = graph_modularity(batch, s, mask, **kw)
    (grad,) = torch.autograd.grad((q * torch.arange(1.0, len(q) + 1)).sum(), s)
    return q.detach(), grad


@pytest.mark.parametrize("keep_diagonal", [True, False])
@pytest.mark.parametrize("delta", ["plain", "tanh"])
def test_cached_graphs_give_soft_modularity_and_its_gradient(keep_diagonal, delta):
    toks = images([30, 22, 30, 9])
    cache = GraphCache(np.array([len(t) for t in toks]), budget=1 << 30)
    sel = [None, np.array([0, 3, 4, 8, 9, 15, 21]), None, np.arange(1, 9)]  # two images subsampled
    rows = [t if i is None else t[i] for t, i in zip(toks, sel)]
    x, mask, s = padded(rows)
    batch = GraphBatch(cache)
    for b, t in enumerate(toks):
        batch.add_cached(cache.graph_offset(b, lambda t=t: t), len(t), sel[b])
    kw = dict(keep_diagonal=keep_diagonal, delta=delta, tau=0.2)
    q, grad = cached(batch, mask, s, **kw)
    q_ref, grad_ref = reference(x, mask, s, **kw)
    assert torch.allclose(q, q_ref, atol=1e-6), (q, q_ref)
    assert torch.allclose(grad, grad_ref, atol=1e-5 * grad_ref.abs().max().item())
    assert grad[~mask].abs().max() == 0  # no gradient into the padding


def test_images_beyond_the_budget_are_computed_per_step_and_give_the_same():
    toks = images([20, 25, 18], seed=3)
    sizes = np.array([len(t) for t in toks])
    cache = GraphCache(sizes, budget=4 * (20 * 20 + 25 * 25))  # room for the first two graphs only
    x, mask, s = padded(toks, seed=4)
    batch = GraphBatch(cache)
    calls = []
    for b, t in enumerate(toks):
        off = cache.graph_offset(b, lambda t=t, b=b: calls.append(b) or t)
        if off >= 0:
            batch.add_cached(off, len(t), None)
        else:
            batch.add_uncached(x[b, : len(t)])
    assert calls == [0, 1] and cache.refused == 1
    assert cache.graph_offset(1, lambda: pytest.fail("computed twice")) == 20 * 20  # kept: not computed again
    q, grad = cached(batch, mask, s)
    q_ref, grad_ref = reference(x, mask, s)
    assert torch.allclose(q, q_ref, atol=1e-6)
    assert torch.allclose(grad, grad_ref, atol=1e-5 * grad_ref.abs().max().item())


def test_a_graph_of_the_wrong_size_is_refused():
    cache = GraphCache(np.array([10]), budget=1 << 20)
    with pytest.raises(ValueError, match="has 9 tokens, not 10"):
        cache.graph_offset(0, lambda: torch.randn(9, 4))


@pytest.mark.parametrize("free_gib, expected_one", [(64, 4 << 30), (8, 2 << 30)])
def test_the_graph_budget_is_shared_by_the_machines_processes(monkeypatch, free_gib, expected_one):
    import os

    from stages.graphs import graph_budget

    pages = {"SC_AVPHYS_PAGES": free_gib << 18, "SC_PAGE_SIZE": 4096}  # free memory fixed, not this machine's
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    assert graph_budget() == expected_one  # 4 GiB, or a quarter of the free memory if less
    assert graph_budget(4) == expected_one // 4
