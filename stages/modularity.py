"""The assignment of tokens to concepts and the modularity loss (docs/method.md, section 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import DELTAS


def assignment(tokens: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """S_ic = cos(x_i, c_c): (B, N, d) x (B, k, d) -> (B, N, k). No softmax, no temperature."""
    return F.normalize(tokens, dim=-1) @ F.normalize(concepts, dim=-1).transpose(1, 2)


def nearest_direction(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """argmax_c x_i . directions_c: (B, N, d) x (B, k, d) -> (B, N), the first maximum winning as in argmax.
    The product is taken as directions x^T, (B, k, N): x directions^T has only k output columns, a shape
    the CPU's BLAS runs badly."""
    return torch.bmm(directions, x.transpose(1, 2)).transpose(1, 2).contiguous().argmax(-1)


def hard_assignment(s: torch.Tensor, mask: torch.Tensor | None = None):
    """argmax over concepts, and per image which prototypes received at least one pixel."""
    a = s.argmax(-1)
    onehot = F.one_hot(a, s.shape[-1]).bool()
    if mask is not None:
        onehot &= mask[..., None]
    return a, onehot.any(1)


def _atleast_f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def modularity_matrix(tokens: torch.Tensor, mask: torch.Tensor | None = None, keep_diagonal: bool = True):
    """W / 2m for the dense graph A_ij = max(0, cos(x_i, x_j)) of each image; no gradient."""
    with torch.no_grad():
        x = F.normalize(_atleast_f32(tokens), dim=-1)
        if mask is not None:
            x = x * mask[..., None]
        a = (x @ x.transpose(1, 2)).clamp_min_(0)
        if not keep_diagonal:
            a.diagonal(dim1=1, dim2=2).zero_()
        k = a.sum(-1)
        two_m = k.sum(-1).clamp_min(1e-12)
        w = a.sub_(k[:, :, None] * k[:, None, :] / two_m[:, None, None]).div_(two_m[:, None, None])
    return w


class _SoftModularity(torch.autograd.Function):
    """Q_b = sum_ij Wn_ij f(max_c Sbar_ic Sbar_jc), f the identity (plain) or tanh(./tau).

    Computed in row blocks, never materialising the (B, N, N, k) tensor, and with its gradient formed in the
    same pass: with c* = argmax_c Sbar_ic Sbar_jc, dQ/dSbar_ic = 2 sum_j Wn_ij f'(m_ij) Sbar_jc [c*_ij = c]
    (Wn and m are symmetric). Only the (B, N, k) gradient is kept for the backward pass.

    Since every term is symmetric in (i, j), a block of rows r0:r1 takes only the columns from r0 on: the
    columns of its own rows hold both (i, j) and (j, i), the columns beyond them stand for their mirror
    images too (counted twice, and their gradient reaches both i and j). Half the products of the full square.
    """

    @staticmethod
    def forward(ctx, wn, sbar, tau, block):
        B, N, K = sbar.shape
        need_grad = ctx.needs_input_grad[1]
        q = sbar.new_zeros(B)
        grad = sbar.new_zeros(B, N, K) if need_grad else None
        st = sbar.transpose(1, 2)  # (B, K, N)
        for r0 in range(0, N, block):
            r1 = min(N, r0 + block)
            r = r1 - r0
            p = sbar[:, r0:r1, None, :] * sbar[:, None, r0:, :]  # (B, r, N - r0, K)
            m, arg = p.max(-1)
            del p
            w = wn[:, r0:r1, r0:]
            if tau is None:
                f, g = m, w
            else:
                d = torch.tanh(m / tau)
                f, g = d, w * (1 - d * d) / tau
            wf = w * f
            q += wf[:, :, :r].sum((1, 2)) + 2 * wf[:, :, r:].sum((1, 2))
            if need_grad:
                h = g * torch.gather(st[:, :, r0:], 1, arg)  # Wn_ij f'(m_ij) Sbar_{j, c*_ij}, j >= r0
                grad[:, r0:r1].scatter_add_(2, arg, h)
                if r1 < N:  # the mirror images (j, i) of the columns beyond the block: Sbar_{i, c*_ij} to row j
                    arg_t = arg[:, :, r:].transpose(1, 2)
                    mirror = g[:, :, r:].transpose(1, 2) * torch.gather(st[:, :, r0:r1], 1, arg_t)
                    grad[:, r1:].scatter_add_(2, arg_t, mirror)
        if need_grad:
            ctx.save_for_backward(grad.mul_(2))
        return q

    @staticmethod
    def backward(ctx, gq):
        (grad,) = ctx.saved_tensors
        return None, grad * gq[:, None, None], None, None


def soft_modularity(
    tokens: torch.Tensor,
    s: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    keep_diagonal: bool = True,
    delta: str = "plain",
    tau: float = 0.1,
    wn: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image soft modularity Q (B,) of assignment ``s`` (B, N, k) on the tokens' cosine graph.

    For a one-hot ``s`` this is exactly the weighted Newman modularity of the partition.
    """
    if delta not in DELTAS:
        raise ValueError(f"delta must be 'plain' or 'tanh', not {delta!r}")
    if wn is None:
        wn = modularity_matrix(tokens, mask, keep_diagonal)
    sbar = _atleast_f32(s).clamp_min(0)
    wn = wn.to(sbar.dtype)
    if mask is not None:
        sbar = sbar * mask[..., None]
    N, K = sbar.shape[1], sbar.shape[2]
    # rows per block: ~8 MB of products on the CPU (cache-sized blocks); on a GPU ~128 MB, so that a step
    # launches a few blocks' kernels rather than dozens
    budget = (32 << 20) if sbar.is_cuda else (2 << 20)
    block = max(1, min(N, budget // max(1, sbar.shape[0] * N * K)))
    return _SoftModularity.apply(wn, sbar, None if delta == "plain" else float(tau), block)


def modularity_loss(tokens, s, mask=None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """L = -mean over images of the soft modularity; returns (loss, Q per image)."""
    q = soft_modularity(tokens, s, mask, **kw)
    return -q.mean(), q.detach()
