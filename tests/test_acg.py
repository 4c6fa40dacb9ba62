"""The ACG model and the modularity loss, against independent references."""

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.acg import FOLD_CHUNK, PrototypeCrossAttention, create_acg
from stages.config import ACGConfig
from stages.modularity import (
    assignment,
    hard_assignment,
    modularity_loss,
    modularity_matrix,
    nearest_direction,
    soft_modularity,
)


def naive_soft_modularity(x, s, keep_diagonal=True, delta="plain", tau=0.1):
    """docs/method.md section 4 written out with the full (B, N, N, k) tensor."""
    xn = F.normalize(x, dim=-1)
    a = (xn @ xn.transpose(1, 2)).clamp_min(0)
    if not keep_diagonal:
        a = a - torch.diag_embed(torch.diagonal(a, dim1=1, dim2=2))
    k = a.sum(-1)
    two_m = k.sum(-1)
    w = a - k[:, :, None] * k[:, None, :] / two_m[:, None, None]
    sb = s.clamp_min(0)
    prod = sb[:, :, None, :] * sb[:, None, :, :]
    d = prod.amax(-1) if delta == "plain" else torch.tanh(prod / tau).amax(-1)
    return (w * d).sum((1, 2)) / two_m


def nx_modularity(x: np.ndarray, labels: np.ndarray, keep_diagonal: bool) -> float:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    a = np.maximum(xn @ xn.T, 0)
    g = nx.Graph()
    n = len(x)
    g.add_nodes_from(range(n))
    for i in range(n):
        for j in range(i, n):
            if i == j:
                if keep_diagonal and a[i, i] > 0:
                    g.add_edge(i, i, weight=a[i, i] / 2)  # networkx counts a self-loop twice in the degree
            elif a[i, j] > 0:
                g.add_edge(i, j, weight=a[i, j])
    comms = [set(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)]
    return nx.community.modularity(g, comms, weight="weight")


@pytest.mark.parametrize("keep_diagonal", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_hot_soft_modularity_equals_networkx(seed, keep_diagonal):
    rng = np.random.default_rng(seed)
    n, k = 40, 4
    x = rng.normal(size=(n, 8)) + rng.normal(size=(1, 8)) * 0.5
    labels = rng.integers(0, k, n)
    s = F.one_hot(torch.from_numpy(labels), k).double()[None]
    q = soft_modularity(torch.from_numpy(x)[None], s, keep_diagonal=keep_diagonal)
    assert q.item() == pytest.approx(nx_modularity(x, labels, keep_diagonal), abs=1e-9)


@pytest.mark.parametrize("delta", ["plain", "tanh"])
def test_fused_loss_matches_naive_formula_and_gradient(delta):
    torch.manual_seed(0)
    x = torch.randn(2, 30, 6, dtype=torch.double)
    s = torch.randn(2, 30, 4, dtype=torch.double, requires_grad=True)
    q = soft_modularity(x, s, delta=delta)
    ref = naive_soft_modularity(x, s, delta=delta)
    assert torch.allclose(q, ref, atol=1e-10)
    (g,) = torch.autograd.grad(q.sum(), s)
    (gref,) = torch.autograd.grad(ref.sum(), s)
    assert torch.allclose(g, gref, atol=1e-8)
    wn = modularity_matrix(x)
    assert torch.autograd.gradcheck(lambda t: soft_modularity(x, t, wn=wn, delta=delta), (s,))


@pytest.mark.parametrize("delta", ["plain", "tanh"])
@pytest.mark.parametrize("block", [1, 7, 29, 30])
def test_each_row_block_with_its_mirror_images_gives_the_whole_square(delta, block):
    """The loss takes each row block against the columns from its first row on, and stands the columns beyond
    the block for their mirror images: for every block size (the last one ragged, or a single block), the
    value and the gradient are those of the naive formula over the whole square."""
    from stages.modularity import _SoftModularity

    torch.manual_seed(3)
    x = torch.randn(2, 30, 6, dtype=torch.double)
    s = torch.rand(2, 30, 4, dtype=torch.double, requires_grad=True)
    wn = modularity_matrix(x)
    q = _SoftModularity.apply(wn, s, None if delta == "plain" else 0.1, block)
    ref = naive_soft_modularity(x, s, delta=delta)
    assert torch.allclose(q, ref, atol=1e-12)
    (g,) = torch.autograd.grad(q.sum(), s)
    (gref,) = torch.autograd.grad(ref.sum(), s)
    assert torch.allclose(g, gref, atol=1e-10)


def test_padding_mask_equals_unpadded_images():
    torch.manual_seed(1)
    a, b = torch.randn(1, 20, 5), torch.randn(1, 12, 5)
    sa, sb = torch.randn(1, 20, 3), torch.randn(1, 12, 3)
    x = torch.zeros(2, 20, 5)
    s = torch.zeros(2, 20, 3)
    x[0], s[0] = a[0], sa[0]
    x[1, :12], s[1, :12] = b[0], sb[0]
    x[1, 12:] = torch.randn(8, 5)  # garbage in the padding must not count
    s[1, 12:] = 1.0
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0] = True
    mask[1, :12] = True
    q = soft_modularity(x, s, mask)
    assert q[0].item() == pytest.approx(soft_modularity(a, sa).item(), abs=1e-5)
    assert q[1].item() == pytest.approx(soft_modularity(b, sb).item(), abs=1e-5)


def test_loss_invariant_to_an_empty_prototype():
    torch.manual_seed(2)
    x = torch.randn(2, 25, 8)
    s = torch.randn(2, 25, 3)
    empty = torch.full((2, 25, 1), -0.5)  # negative cosine everywhere: receives nothing after max(0, .)
    l3, _ = modularity_loss(x, s)
    l4, _ = modularity_loss(x, torch.cat([s, empty], -1))
    assert l3.item() == pytest.approx(l4.item(), abs=1e-7)


def test_cross_attention_reformulation_is_exact():
    torch.manual_seed(3)
    att = PrototypeCrossAttention(24, 4).double()
    q = torch.randn(3, 5, 24, dtype=torch.double)
    mem = torch.randn(3, 50, 24, dtype=torch.double)
    mask = torch.ones(3, 50, dtype=torch.bool)
    mask[1, 30:] = False
    assert torch.allclose(att(q, mem, mask), att.forward_naive(q, mem, mask), atol=1e-10)


def test_whitening_inside_the_attention_is_exact():
    """A whitened model given centred tokens (centred_only) equals the same model given whitened tokens."""
    torch.manual_seed(5)
    acg = create_acg(dim=24, num_prototypes=4, depth=2, num_heads=2, whiten=True).double().eval()
    a = torch.randn(24, 24, dtype=torch.double)
    with torch.no_grad():
        acg.feature_center.copy_(torch.randn(24))
        acg.feature_whiten.copy_(a @ a.T / 24 + torch.eye(24, dtype=torch.double))  # any d x d map
    x = torch.randn(3, 40, 24, dtype=torch.double)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[2, 25:] = False
    with torch.no_grad():
        want = acg(acg.prepare(x), mask)
        got = acg(acg.prepare(x, whiten=False), mask, centred_only=True)
    assert torch.allclose(got, want, atol=1e-10)
    assert not torch.allclose(acg(acg.prepare(x, whiten=False), mask), want, atol=1e-3)  # the map matters


def test_nearest_direction_is_the_argmax_of_the_products_first_maximum_winning():
    """conceptualize's assignment: argmax_c x_i . d_c, as argmax over x @ d^T gives it, ties to the lower id."""
    torch.manual_seed(11)
    x, d = torch.randn(3, 50, 16), torch.randn(3, 4, 16)
    assert torch.equal(nearest_direction(x, d), (x @ d.transpose(1, 2)).argmax(-1))
    d[:, 2] = d[:, 0] = d[:, 1]  # three equal directions: the first of them wins wherever they lead
    want = (x @ d.transpose(1, 2)).argmax(-1)
    got = nearest_direction(x, d)
    assert torch.equal(got, want) and set(got.unique().tolist()) <= {0, 3} and (got == 0).any()


@pytest.mark.parametrize("whiten", [True, False])
def test_infer_matches_prepare_forward_and_cosine_assignment(whiten):
    """``infer`` (conceptualize's one call) gives the concepts and the argmax of cos(prepared token, concept)
    of the explicit path, and leaves the centred tokens in the caller's buffer when asked."""
    torch.manual_seed(6)
    acg = create_acg(dim=24, num_prototypes=4, depth=2, num_heads=2, whiten=whiten).double().eval()
    a = torch.randn(24, 24, dtype=torch.double)
    with torch.no_grad():
        acg.feature_center.copy_(torch.randn(24))
        if whiten:
            acg.feature_whiten.copy_(a @ a.T / 24 + torch.eye(24, dtype=torch.double))
    x = torch.randn(3, 40, 24, dtype=torch.double)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 33:] = False
    with torch.no_grad():
        z = acg.prepare(x)
        want = acg(z, mask)
        want_assign = assignment(z, want).argmax(-1)
        buf = x.clone()
        xc, got, directions = acg.infer(buf, mask, inplace=True)
    assert xc.data_ptr() == buf.data_ptr()
    assert torch.allclose(xc, x - acg.feature_center)
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.equal(nearest_direction(xc, directions), want_assign)


def test_folded_inference_follows_the_weights_and_chunks():
    """``infer`` runs on folded weights (query, key, whitening, value and output maps merged), the token
    products a few images at a time: it equals the plain forward over several chunks with padding in a later
    one, and after any change to the weights or the whitening (the folds are cached, not stale)."""
    torch.manual_seed(8)
    acg = create_acg(dim=24, num_prototypes=4, depth=2, num_heads=2, whiten=True).double().eval()
    a = torch.randn(24, 24, dtype=torch.double)
    with torch.no_grad():
        acg.feature_center.copy_(torch.randn(24))
        acg.feature_whiten.copy_(a @ a.T / 24 + torch.eye(24, dtype=torch.double))
    n = 2 * FOLD_CHUNK + 1
    x = torch.randn(n, 40, 24, dtype=torch.double)
    mask = torch.ones(n, 40, dtype=torch.bool)
    mask[FOLD_CHUNK + 1, 17:] = False
    mask[n - 1, 30:] = False

    def check():
        with torch.no_grad():
            want = acg(acg.prepare(x), mask)
            got = acg.infer(x.clone(), mask)[1]
        assert torch.allclose(got, want, atol=1e-10)
        return got

    first = check()
    with torch.no_grad():
        acg.layers[0].cross.q.weight.add_(0.3)
    second = check()
    with torch.no_grad():
        acg.feature_whiten.mul_(1.7)
    third = check()
    acg.load_state_dict(create_acg(dim=24, num_prototypes=4, depth=2, num_heads=2, whiten=True).double().state_dict())
    check()
    assert not torch.allclose(first, second, atol=1e-3) and not torch.allclose(second, third, atol=1e-3)


def test_folded_bf16_inference_is_as_accurate_as_the_plain_forward():
    """In bfloat16 the folded weights (rounded once, after merging) lose nothing against the plain bf16
    forward: both stay as close to the float64 concepts."""
    torch.manual_seed(9)
    ref = create_acg(dim=64, num_prototypes=5, depth=3, num_heads=2, whiten=True).double().eval()
    with torch.no_grad():
        ref.feature_center.copy_(torch.randn(64))
        ref.feature_whiten.copy_(torch.eye(64, dtype=torch.double) * 2 + 0.05 * torch.randn(64, 64, dtype=torch.double))
    low = create_acg(dim=64, num_prototypes=5, depth=3, num_heads=2, whiten=True).eval()
    low.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    low.cast_(torch.bfloat16)
    x = torch.randn(6, 50, 64, dtype=torch.double)
    with torch.no_grad():
        want = ref.infer(x.clone())[1]
        folded = low.infer(x.float())[1].double()
        plain = low(low.prepare(x.float(), whiten=False).bfloat16(), centred_only=True).double()
    err_folded, err_plain = (folded - want).abs().max(), (plain - want).abs().max()
    assert err_folded < 1.5 * err_plain and err_plain < 0.1


def test_gradients_reach_only_the_acg_and_prototype_permutation_permutes_concepts():
    torch.manual_seed(4)
    acg = create_acg(dim=16, num_prototypes=4, depth=2, num_heads=2).eval()
    x = torch.randn(2, 30, 16, requires_grad=False)
    c = acg(x)
    assert c.shape == (2, 4, 16)
    loss, _ = modularity_loss(x, assignment(x, c))
    loss.backward()
    assert x.grad is None
    assert acg.prototypes.grad is not None and acg.prototypes.grad.abs().sum() > 0
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        acg2 = create_acg(dim=16, num_prototypes=4, depth=2, num_heads=2).eval()
        acg2.load_state_dict(acg.state_dict())
        acg2.prototypes.copy_(acg.prototypes[perm])
        assert torch.allclose(acg2(x), acg(x)[:, perm], atol=1e-5)


def test_hard_assignment_reports_active_prototypes():
    s = torch.tensor([[[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.7, 0.2]]])
    a, active = hard_assignment(s)
    assert a.tolist() == [[0, 0, 1]]
    assert active.tolist() == [[True, True, False]]


def test_config_round_trip():
    cfg = ACGConfig(dim=32, num_prototypes=7)
    assert ACGConfig.from_dict(__import__("json").loads(cfg.to_json())) == cfg
