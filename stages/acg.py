"""The Adaptive Concept Generator (ACG) (docs/method.md, sections 2-3); its loss is in ``modularity``.

In the manner of timm: a config dataclass, the module, and ``create_acg``.

Cross-attention from k prototypes to N pixel tokens is computed without projecting the tokens: for head
h, ``q_h (X W_k,h + b_k,h)^T = (q_h W_k,h) X^T + const`` (the key bias is constant over keys and drops out
of the softmax) and ``softmax(.) (X W_v,h + b_v,h) = (softmax(.) X) W_v,h + b_v,h``. That costs
O(k·H·N·d) instead of O(N·d²) per layer, and is exact. At inference the whitening and the scale are merged
into the per-head key and value weights (``PrototypeCrossAttention.fold``), so the prototype side is four
products of d² multiply-adds per prototype.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ACGConfig

FOLD_CHUNK = 4  # images per pair of token products in the folded cross-attention: their tokens stay in cache


class PrototypeCrossAttention(nn.Module):
    """Multi-head attention with few queries over many keys, never projecting the keys/values."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        query: torch.Tensor,
        mem: torch.Tensor,
        mask: torch.Tensor | None = None,
        mem_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``mem_map`` (d, d): attend to ``mem @ mem_map`` without forming it, by moving the map to the k·H
        query rows and the k·H context rows (exact)."""
        B, K, D = query.shape
        H, hd = self.num_heads, self.head_dim
        q = self.q(query).view(B, K, H, hd)
        # queries moved into token space: (B, k*H, d); the key bias is constant over keys and drops out
        qk = torch.einsum("bkhe,hed->bkhd", q, self.k.weight.view(H, hd, D)).reshape(B, K * H, D) * hd**-0.5
        if mem_map is not None:
            qk = qk @ mem_map.T  # q . (x M) = (q M^T) . x
        scores = torch.bmm(qk, mem.transpose(1, 2))  # (B, k*H, N): the only product with N rows besides ctx
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        ctx = torch.bmm(scores.softmax(dim=-1), mem)  # attention-weighted tokens per head, (B, k*H, d)
        if mem_map is not None:
            ctx = ctx @ mem_map  # sum_i p_i (x_i M) = (sum_i p_i x_i) M
        ctx = ctx.view(B, K, H, D)
        out = torch.einsum("bkhd,hed->bkhe", ctx, self.v.weight.view(H, hd, D)) + self.v.bias.view(H, hd)
        return self.proj(out.reshape(B, K, D))

    def fold(self, mem_map: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        """The layer's inference weights with the whitening and the scale merged in (computed in ``dtype`` for
        float64 and bfloat16, whose products accumulate in float32, else in float32):
        ``(Wq^T, b_q, K, V, Wo^T, c)`` such that ``forward_folded(query, mem, mask, fold) = forward(query, mem,
        mask, mem_map)``. Per head h the queries in token space are ``(p Wq^T + b_q)_h K_h`` with
        ``K_h = W_k,h M^T / sqrt(hd)`` (hd x d), and the output is ``(concat_h ctx_h V_h) Wo^T + c`` with
        ``V_h = (W_v,h M^T)^T`` (d x hd) and ``c = b_v Wo^T + b_o``. Four products with the k·H rows per layer,
        2·d² multiply-adds per prototype on each side, and no whitening product at all. (Merging the query and
        key maps into one d x H·d matrix would cost H·d² per prototype instead of 2·d².)"""
        D, H, hd = self.dim, self.num_heads, self.head_dim
        wide = dtype if dtype in (torch.float64, torch.bfloat16) else torch.float32
        f = lambda t: t.detach().to(wide)
        wk = f(self.k.weight).view(H, hd, D) * hd**-0.5
        wv = f(self.v.weight).view(H, hd, D)
        if mem_map is not None:
            mt = f(mem_map).T
            wk, wv = wk @ mt, wv @ mt  # (q W_k,h) M^T and (ctx_h M) W_v,h^T = ctx_h (W_v,h M^T)^T
        c_vec = f(self.v.bias) @ f(self.proj.weight).T + f(self.proj.bias)
        parts = (f(self.q.weight).T, f(self.q.bias), wk, wv.transpose(1, 2), f(self.proj.weight).T, c_vec)
        return tuple(t.to(dtype).contiguous() for t in parts)

    def forward_folded(self, query: torch.Tensor, mem: torch.Tensor, mask: torch.Tensor | None, fold) -> torch.Tensor:
        """``forward``, computed with the weights from ``fold`` (inference only: no gradient reaches the layer)."""
        B, K, D = query.shape
        H, hd = self.num_heads, self.head_dim
        wq_t, bq, wk, wv_t, wo_t, c_vec = fold
        q = torch.addmm(bq, query.reshape(B * K, D), wq_t).view(B * K, H, hd).transpose(0, 1)  # (H, B*K, hd)
        # queries in token space, rows h*k + c of each image: (B, H*k, d)
        qk = torch.bmm(q, wk).view(H, B, K, D).transpose(0, 1).reshape(B, H * K, D)
        ctx = torch.empty_like(qk)
        chunk = B if mem.is_cuda else FOLD_CHUNK  # on a CPU, both products of a few images while they are in cache
        for s in range(0, B, chunk):
            e = min(B, s + chunk)
            scores = torch.bmm(qk[s:e], mem[s:e].transpose(1, 2))
            if mask is not None:
                scores = scores.masked_fill_(~mask[s:e, None, :], float("-inf"))
            torch.bmm(scores.softmax(dim=-1), mem[s:e], out=ctx[s:e])
        ctx = ctx.view(B, H, K, D).transpose(0, 1).reshape(H, B * K, D)
        v = torch.bmm(ctx, wv_t).transpose(0, 1).reshape(B * K, D)  # per head (B*k, hd), heads side by side
        return torch.addmm(c_vec, v, wo_t).view(B, K, D)

    def forward_naive(self, query, mem, mask=None):
        """Textbook multi-head attention with projected keys and values (the reference in tests)."""
        B, K, D = query.shape
        N = mem.shape[1]
        H, hd = self.num_heads, self.head_dim
        q = self.q(query).view(B, K, H, hd).transpose(1, 2)
        k = self.k(mem).view(B, N, H, hd).transpose(1, 2)
        v = self.v(mem).view(B, N, H, hd).transpose(1, 2)
        s = q @ k.transpose(-2, -1) * hd**-0.5
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        o = s.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, K, D))


class ACGLayer(nn.Module):
    """Cross-attention to the pixels, self-attention among prototypes, FFN; residual + LayerNorm each."""

    def __init__(self, cfg: ACGConfig):
        super().__init__()
        d = cfg.dim
        self.cross = PrototypeCrossAttention(d, cfg.heads)
        self.self_attn = nn.MultiheadAttention(d, cfg.heads, dropout=cfg.dropout, batch_first=True)
        hidden = int(d * cfg.mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, q, mem, mask, mem_map=None, fold=None):
        cross = self.cross(q, mem, mask, mem_map) if fold is None else self.cross.forward_folded(q, mem, mask, fold)
        q = self.norm1(q + self.drop(cross))
        own = self.self_attn(q, q, q, need_weights=False)[0] if fold is None else self._self_attention(q)
        q = self.norm2(q + self.drop(own))
        return self.norm3(q + self.drop(self.ffn(q)))

    def _self_attention(self, q: torch.Tensor) -> torch.Tensor:
        """``self_attn(q, q, q)`` at inference, in three batched products instead of nn.MultiheadAttention's
        general path, whose checks and reshapes cost more than the arithmetic for a handful of prototypes."""
        B, K, D = q.shape
        H = self.self_attn.num_heads
        hd = D // H
        qkv = F.linear(q, self.self_attn.in_proj_weight, self.self_attn.in_proj_bias)
        qkv = qkv.view(B, K, 3, H, hd).permute(2, 0, 3, 1, 4).reshape(3, B * H, K, hd)
        att = torch.bmm(qkv[0], qkv[1].transpose(1, 2)).mul_(hd**-0.5).softmax(dim=-1)
        out = torch.bmm(att, qkv[2]).view(B, H, K, hd).transpose(1, 2).reshape(B, K, D)
        return self.self_attn.out_proj(out)


class AdaptiveConceptGenerator(nn.Module):
    """k learnable prototypes, refined against one image's tokens into k image-specific concepts."""

    def __init__(self, cfg: ACGConfig):
        super().__init__()
        self.cfg = cfg
        # load_checkpoint builds the model on the meta device, where only shapes matter; torch.randn and
        # torch.eye there run Python decompositions that import torch._dynamo and sympy (1.2-1.5 s per process)
        on_meta = torch.empty(0).device.type == "meta"
        shape = (cfg.num_prototypes, cfg.dim)
        self.prototypes = nn.Parameter(torch.empty(shape) if on_meta else torch.randn(shape))
        self.layers = nn.ModuleList([ACGLayer(cfg) for _ in range(cfg.depth)])
        self.head = nn.Linear(cfg.dim, cfg.dim)
        self.register_buffer("feature_center", torch.zeros(cfg.dim))
        if cfg.whiten:  # only whitened models carry the matrix, so earlier checkpoints load unchanged
            eye = torch.zeros(cfg.dim, cfg.dim)
            eye.diagonal().fill_(1.0)
            self.register_buffer("feature_whiten", eye)

    def prepare(self, tokens: torch.Tensor, inplace: bool = False, whiten: bool = True) -> torch.Tensor:
        """Tokens as the ACG, the graph and the assignment see them: centred when cfg.center, whitened when
        cfg.whiten (and ``whiten``). ``inplace`` may reuse ``tokens``' memory for the centring."""
        if not (self.cfg.center or self.cfg.whiten):
            return tokens
        x = tokens.sub_(self.feature_center) if inplace else tokens - self.feature_center
        return x @ self.feature_whiten if self.cfg.whiten and whiten else x

    def cast_(self, dtype: torch.dtype) -> "AdaptiveConceptGenerator":
        """Run the generator in ``dtype`` (forward casts the tokens to it); ``prepare`` keeps its float32
        centring and whitening, so tokens are rounded only after they are centred."""
        self.layers.to(dtype)
        self.head.to(dtype)
        self.prototypes.data = self.prototypes.data.to(dtype)
        return self

    def _fold_key(self, dtype: torch.dtype) -> tuple:
        # in-place updates (optimizer steps, load_state_dict) bump a tensor's _version, .to() makes new tensors;
        # tensors made under inference_mode keep no version (and cannot change outside it)
        ts = [p for layer in self.layers for p in layer.cross.parameters()]  # what the folds are made of
        ts += [self.feature_whiten] if self.cfg.whiten else []
        return (dtype, *((t.data_ptr(), -1 if t.is_inference() else t._version) for t in ts))

    def _compute_folds(self, dtype: torch.dtype) -> list:
        mem_map = self.feature_whiten if self.cfg.whiten else None
        return [layer.cross.fold(mem_map, dtype) for layer in self.layers]

    def folds(self, dtype: torch.dtype) -> list:
        """Per layer, the cross-attention's folded inference weights in ``dtype`` (``PrototypeCrossAttention.fold``)
        with the whitening inside: computed once and kept until a weight changes."""
        key = self._fold_key(dtype)
        cached = getattr(self, "_folds", None)
        if cached is None or cached[0] != key:
            cached = self._folds = (key, self._compute_folds(dtype))
        return cached[1]

    def infer(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        inplace: bool = False,
        low: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference in one call, as conceptualize runs it: ``tokens`` (B, N, d) float32 as stored ->
        ``(x, concepts, directions)``: x the centred float32 tokens (``tokens``' memory when ``inplace``),
        the concepts (B, k, d) in float32 (float64 for a float64 model), and directions (B, k, d) with
        argmax_c cos(prepare(tokens)_i, concepts_c) = argmax_c x_i . directions_c (``nearest_direction``).

        Whitened models never whiten the N tokens: the whitening is folded into the attention and into the
        directions (exact). The generator runs in its dtype (``cast_``); ``low`` is an optional buffer of that
        dtype and the tokens' shape to hold the rounded copy (reused between batches by the caller)."""
        x = self.prepare(tokens, inplace=inplace, whiten=False)
        dtype = self.prototypes.dtype
        if dtype == x.dtype:
            xl = x
        elif low is not None:
            xl = low.copy_(x)
        else:
            xl = x.to(dtype)
        concepts = self(xl, mask, centred_only=True, folded=True)
        concepts = concepts if concepts.dtype == torch.float64 else concepts.float()
        # cos(z_i, c) has the same argmax as z_i . c/|c|; with z_i = x_i W, z_i . c = x_i . (c W^T)
        directions = F.normalize(concepts, dim=-1)
        if self.cfg.whiten:
            directions = directions @ self.feature_whiten.T
        return x, concepts, directions

    def forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        centred_only: bool = False,
        folded: bool = False,
    ) -> torch.Tensor:
        """tokens (B, N, d) as ``prepare`` returns them, mask (B, N) True where valid -> concepts (B, k, d) in
        the generator's dtype. ``centred_only``: the tokens are centred but not whitened; a whitened model then
        applies its whitening inside the attention (exact, and k·H·d² instead of N·d² per image).
        ``folded`` (inference only, with ``centred_only``): the cross-attention runs on its folded weights."""
        B = tokens.shape[0]
        tokens = tokens.to(self.prototypes.dtype)
        if mask is not None and bool(mask.all()):
            mask = None  # nothing padded: skip the masking work
        if folded and not centred_only and self.cfg.whiten:
            raise ValueError("folded weights carry the whitening: give centred tokens (centred_only=True)")
        mem_map = self.feature_whiten.to(tokens.dtype) if centred_only and self.cfg.whiten and not folded else None
        folds = self.folds(tokens.dtype) if folded else [None] * len(self.layers)
        q = self.prototypes.unsqueeze(0).expand(B, -1, -1)
        for layer, fold in zip(self.layers, folds):
            q = layer(q, tokens, mask, mem_map, fold)
        return self.head(q)


def create_acg(dim: int = 384, num_prototypes: int = 5, **kw) -> AdaptiveConceptGenerator:
    return AdaptiveConceptGenerator(ACGConfig(dim=dim, num_prototypes=num_prototypes, **kw))
