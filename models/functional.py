"""Pure tensor maths of CVNet and SuperGlobal: no parameters, no state.

Each paper equation lives here once; the ``nn.Module`` wrappers in :mod:`models.layers` only own weights.
Shapes use B = batch, C = channels, (H, W) = spatial size, (hq, wq) / (hk, wk) = query / key map size.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from common.errors import InvalidValueError

# --------------------------------------------------------------------------------------------------------------
# Global pooling (CVNet Sec. 3.1; SuperGlobal Sec. 3.1-3.3)
# --------------------------------------------------------------------------------------------------------------


def gem(x: Tensor, p: Tensor | float, eps: float = 1e-6) -> Tensor:
    """Generalized-mean pooling over all spatial positions.

    ``x``: (B, C, H, W) or (B, C, N) -> (B, C). ``(mean(clamp(x, eps)^p))^(1/p)``.
    CVNet uses a learnable ``p`` (eps 1e-6); SuperGlobal's GeM+ a fixed ``p = 4.6`` (eps 1e-8).
    """
    x = x.clamp(min=eps).pow(p)
    return x.flatten(2).mean(dim=-1).pow(1.0 / p)


def regional_gem(x: Tensor, p: float = 2.5, kernel_size: int = 5) -> Tensor:
    """SuperGlobal's Regional-GeM: ``0.5 * LPPool_p(ReflectionPad(x / (k^2)^(1/p))) + 0.5 * x``.

    ``x``: (B, C, H, W) non-negative (a post-ReLU map) -> same shape. The division by ``(k^2)^(1/p)``
    turns the LP-pool's power *sum* into a power *mean* over the k x k region.
    """
    pad = (kernel_size - 1) // 2
    scaled = x / (kernel_size**2) ** (1.0 / p)
    pooled = F.lp_pool2d(F.pad(scaled, (pad, pad, pad, pad), mode="reflect"), p, kernel_size, stride=1)
    return 0.5 * pooled + 0.5 * x


def scale_gem(descriptors: Sequence[Tensor] | Tensor, mode: str = "max") -> Tensor:
    """Aggregate per-scale descriptors, (S, B, D) or a list of S (B, D) -> (B, D).

    ``mode="max"``: SuperGlobal's Scale-GeM at p = infinity: L2-normalise each scale, element-wise max.
    ``mode="mean"``: plain average of the (unnormalised) per-scale descriptors (Scale-GeM switched off).
    The result is *not* normalised; callers L2-normalise the aggregate.
    """
    stacked = torch.stack(list(descriptors), 0) if not isinstance(descriptors, Tensor) else descriptors
    if mode == "max":
        return F.normalize(stacked, p=2, dim=-1).amax(dim=0)
    if mode == "mean":
        return stacked.mean(dim=0)
    raise InvalidValueError(f"scale_gem mode must be 'max' or 'mean', got {mode!r}")


def aggregate_scales(descriptors: Sequence[Tensor]) -> Tensor:
    """CVNet's multi-scale test descriptor: L2 each scale's (B, D) descriptor, average over scales, L2 -> (B, D).

    One scale passes through as its L2-normalised self.
    """
    if not descriptors:
        raise InvalidValueError("need at least one scale's descriptors")
    stacked = torch.stack([F.normalize(d, dim=-1) for d in descriptors])
    return F.normalize(stacked.mean(dim=0), dim=-1)


def relu_up(x: Tensor, alpha: float = 0.014) -> Tensor:
    """SuperGlobal's ReLU-up: ``max(x, alpha)`` in place of ``max(x, 0)``."""
    return x.clamp(min=alpha)


# --------------------------------------------------------------------------------------------------------------
# Cross-scale correlation (CVNet Sec. 3.2)
# --------------------------------------------------------------------------------------------------------------


def correlation_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """Spatial size of a feature map at correlation scale ``scale`` (an *area* ratio): round(h * sqrt(s)).

    Python's ``round`` (half to even) is what the release uses, e.g. 16.5 -> 16.
    """
    return round(h * math.sqrt(scale)), round(w * math.sqrt(scale))


def resize_featuremap(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with ``align_corners=True`` of a (B, C, H, W) map to ``size``."""
    return F.interpolate(x, size, mode="bilinear", align_corners=True)


def cosine_correlation(query: Tensor, key: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of every query position with every key position.

    ``query``: (B, C, hq, wq), ``key``: (B, C, hk, wk) -> (B, hq, wq, hk, wk).
    ``eps`` is added to the product of the norms, as in the release.
    """
    b, c, hq, wq = query.shape
    hk, wk = key.shape[-2:]
    q = query.reshape(b, c, hq * wq).transpose(1, 2)
    k = key.reshape(b, c, hk * wk)
    q_norm = q.norm(p=2, dim=2, keepdim=True)
    k_norm = k.norm(p=2, dim=1, keepdim=True)
    corr = torch.bmm(q, k) / (torch.bmm(q_norm, k_norm) + eps)
    return corr.view(b, hq, wq, hk, wk)


def interpolate_4d(x: Tensor, size: tuple[int, int, int, int]) -> Tensor:
    """Bilinear (align_corners=True) resize of a (B, h1, w1, h2, w2) tensor to (B, *size).

    Resizes the query dims first, then the key dims, as the release does.
    """
    b, h1, w1, h2, w2 = x.shape
    ha, wa, hb, wb = size
    x = x.reshape(b, h1, w1, h2 * w2).permute(0, 3, 1, 2)
    x = F.interpolate(x, (ha, wa), mode="bilinear", align_corners=True)
    x = x.reshape(b, h2, w2, ha * wa).permute(0, 3, 1, 2)
    x = F.interpolate(x, (hb, wb), mode="bilinear", align_corners=True)
    return x.reshape(b, ha, wa, hb, wb)


def cross_scale_correlation(
    query_feats: Sequence[Tensor], key_feats: Sequence[Tensor], size: tuple[int, int, int, int]
) -> Tensor:
    """CVNet's multi-scale correlation tensor.

    ``query_feats`` / ``key_feats``: one (B, C, h, w) map per correlation scale (already reduced by the
    per-scale 3x3 conv). Every (query scale, key scale) pair gives a 4D cosine correlation resized to ``size``
    = (hq, wq, hk, wk); stacked with the query scale outer -> (B, S*S, hq, wq, hk, wk), clamped at 0.
    """
    corrs = [
        interpolate_4d(cosine_correlation(q, k), size) for q in query_feats for k in key_feats
    ]
    return torch.stack(corrs, dim=1).clamp(min=0)


# --------------------------------------------------------------------------------------------------------------
# Center-pivot 4D convolution (CVNet Sec. 3.3, from HSNet)
# --------------------------------------------------------------------------------------------------------------


def center_pivot_conv4d(
    x: Tensor,
    query_weight: Tensor,
    query_bias: Tensor | None,
    key_weight: Tensor,
    key_bias: Tensor | None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
) -> Tensor:
    """Center-pivot 4D convolution: a 4D conv whose kernel is non-zero only where it crosses its centre.

    ``x``: (B, Cin, ha, wa, hb, wb) -> (B, Cout, ha', wa', hb', wb').
    Equals a 2D conv over the query dims (ha, wa) at every key position plus a 2D conv over the key dims at every
    query position. ``stride = (query_stride, key_stride)``; a stride on one pair is applied to the other pair
    by sub-sampling (positions 0, s, 2s, ...) so both terms have the same output size.
    """
    sq, sk = stride
    pq, pk = padding
    b, cin = x.shape[:2]

    xk = x[..., ::sk, ::sk] if sk > 1 else x
    _, _, ha, wa, hb, wb = xk.shape
    out_q = xk.permute(0, 4, 5, 1, 2, 3).reshape(b * hb * wb, cin, ha, wa)
    out_q = F.conv2d(out_q, query_weight, query_bias, stride=sq, padding=pq)
    cout, oha, owa = out_q.shape[-3:]
    out_q = out_q.view(b, hb, wb, cout, oha, owa).permute(0, 3, 4, 5, 1, 2)

    xq = x[:, :, ::sq, ::sq] if sq > 1 else x
    _, _, ha, wa, hb, wb = xq.shape
    out_k = xq.permute(0, 2, 3, 1, 4, 5).reshape(b * ha * wa, cin, hb, wb)
    out_k = F.conv2d(out_k, key_weight, key_bias, stride=sk, padding=pk)
    ohb, owb = out_k.shape[-2:]
    out_k = out_k.view(b, ha, wa, cout, ohb, owb).permute(0, 3, 1, 2, 4, 5)

    return out_q + out_k


# --------------------------------------------------------------------------------------------------------------
# Fast path of the correlation and the 4D network (same maths as above, other memory layouts)
#
# Bilinear interpolation is linear on each side of the correlation, so resizing the 4D cosine correlation of
# two maps equals correlating their L2-normalised maps after a 2D resize of each: one GEMM per side instead
# of F.interpolate over a huge 4D tensor. 4D tensors are kept "channels-last", (B, ha, wa, hb, wb, C), so every
# 2D conv of a center-pivot layer runs on a channels-last view (what oneDNN is fast at) without copies.
# --------------------------------------------------------------------------------------------------------------


def normalized_upsampled(feats: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
    """Per correlation scale: L2-normalise every position over channels, then resize bilinearly
    (``align_corners=True``) to ``size``.

    ``feats``: S maps (B, C, h_s, w_s) -> (B, S, H, W, C). Correlating two such tensors equals
    ``interpolate_4d(cosine_correlation(q, k))`` up to the release's ``eps`` on the norm product (a relative
    difference of ``eps / (|q| |k|)``). Query-independent for a database image, so it may be cached.
    """
    out = []
    for f in feats:
        f = F.normalize(f, p=2, dim=1)
        if tuple(f.shape[-2:]) != tuple(size):
            f = resize_featuremap(f, size)
        out.append(f.permute(0, 2, 3, 1))
    return torch.stack(out, dim=1)


def _clamped_copy(src: Tensor) -> Tensor:
    """``src.clamp(min=0)`` written contiguously in src's *logical* order: one pass that also does the permute."""
    return torch.clamp(src, min=0, out=torch.empty(src.shape, dtype=src.dtype, device=src.device))


def pivot_correlations(query: Tensor, key: Tensor, stride: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The two sub-sampled slices of the clamped cross-scale correlation that the first center-pivot conv reads.

    ``query``: (Bq, S, hq, wq, C) with Bq in {1, B}, ``key``: (B, S, hk, wk, C), both from
    :func:`normalized_upsampled`; ``stride = (query_stride, key_stride)`` of that conv. Returns
    ``by_key`` (B, hk', wk', hq, wq, S*S): the correlation at key positions ``::key_stride``, and
    ``by_query`` (B, hq', wq', hk, wk, S*S): at query positions ``::query_stride``; channel ``S*i + j`` pairs
    query scale i with key scale j, as :func:`cross_scale_correlation`. Together they hold everything the
    conv needs, so the full (B, S*S, hq, wq, hk, wk) tensor is never built.
    """
    sq, sk = stride
    bq, s, hq, wq, c = query.shape
    b, _, hk, wk, _ = key.shape
    if bq not in (1, b):
        raise InvalidValueError(f"query batch must be 1 or the key batch {b}, got {bq}")
    ks = key[:, :, ::sk, ::sk]
    hk2, wk2 = ks.shape[2:4]
    rows_k = ks.permute(0, 2, 3, 1, 4)  # (B, hk', wk', S_j, C)
    cols_q = query.reshape(bq, s * hq * wq, c)  # (Bq, S_i * hq * wq, C)
    qs = query[:, :, ::sq, ::sq]
    hq2, wq2 = qs.shape[2:4]
    rows_q = qs.permute(0, 2, 3, 1, 4)  # (Bq, hq', wq', S_i, C)
    cols_k = key.reshape(b, s * hk * wk, c)
    if bq == 1:
        # one GEMM each, all keys folded into the rows (or columns) of the shared query
        corr_k = rows_k.reshape(-1, c) @ cols_q[0].T
        corr_k = corr_k.view(b, hk2, wk2, s, s, hq, wq).permute(0, 1, 2, 5, 6, 4, 3)
        corr_q = rows_q.reshape(-1, c) @ cols_k.reshape(-1, c).T
        corr_q = corr_q.view(hq2, wq2, s, b, s, hk, wk).permute(3, 0, 1, 5, 6, 2, 4)
    else:
        corr_k = torch.bmm(rows_k.reshape(b, -1, c), cols_q.transpose(1, 2))
        corr_k = corr_k.view(b, hk2, wk2, s, s, hq, wq).permute(0, 1, 2, 5, 6, 4, 3)
        corr_q = torch.bmm(rows_q.reshape(b, -1, c), cols_k.transpose(1, 2))
        corr_q = corr_q.view(b, hq2, wq2, s, s, hk, wk).permute(0, 1, 2, 5, 6, 3, 4)
    by_key = _clamped_copy(corr_k).view(b, hk2, wk2, hq, wq, s * s)
    by_query = _clamped_copy(corr_q).view(b, hq2, wq2, hk, wk, s * s)
    return by_key, by_query


def _conv2d_channels_last(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
    """2D conv of (N, H, W, C) -> (N, H', W', Cout), through a channels-last view of the input."""
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, stride=stride, padding=padding)
    return y.permute(0, 2, 3, 1)


def center_pivot_conv4d_slices(
    by_key: Tensor,
    by_query: Tensor,
    query_weight: Tensor,
    query_bias: Tensor | None,
    key_weight: Tensor,
    key_bias: Tensor | None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
) -> Tensor:
    """Center-pivot 4D conv from the two slices it reads (see :func:`pivot_correlations`).

    ``by_key``: (B, hb', wb', ha, wa, Cin), the input at key positions ``::key_stride``; ``by_query``:
    (B, ha', wa', hb, wb, Cin) at query positions ``::query_stride`` -> (B, ha', wa', hb', wb', Cout),
    channels-last. Same result as :func:`center_pivot_conv4d` on the corresponding channels-first tensor.
    """
    sq, sk = stride
    pq, pk = padding
    b, hb2, wb2, ha, wa, cin = by_key.shape
    _, ha2, wa2, hb, wb, _ = by_query.shape
    out_q = _conv2d_channels_last(by_key.reshape(b * hb2 * wb2, ha, wa, cin), query_weight, query_bias, sq, pq)
    out_k = _conv2d_channels_last(by_query.reshape(b * ha2 * wa2, hb, wb, cin), key_weight, key_bias, sk, pk)
    oha, owa, cout = out_q.shape[1:]
    ohb, owb = out_k.shape[1:3]
    out = out_k.reshape(b, ha2, wa2, ohb, owb, cout)
    if not out.is_contiguous():
        out = out.contiguous()
    return out.add_(out_q.reshape(b, hb2, wb2, oha, owa, cout).permute(0, 3, 4, 1, 2, 5))


def center_pivot_conv4d_channels_last(
    x: Tensor,
    query_weight: Tensor,
    query_bias: Tensor | None,
    key_weight: Tensor,
    key_bias: Tensor | None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
) -> Tensor:
    """:func:`center_pivot_conv4d` on a channels-last tensor.

    ``x``: (B, ha, wa, hb, wb, Cin) -> (B, ha', wa', hb', wb', Cout).
    """
    sq, sk = stride
    by_key = x[:, :, :, ::sk, ::sk].permute(0, 3, 4, 1, 2, 5)
    by_query = x[:, ::sq, ::sq]
    return center_pivot_conv4d_slices(by_key, by_query, query_weight, query_bias, key_weight, key_bias,
                                      stride, padding)


def group_norm_channels_last_(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, *, relu: bool = False
) -> Tensor:
    """GroupNorm over all positions of a channels-last tensor (B, *positions, C), in place (then ReLU if ``relu``);
    returns the result (``x`` itself when contiguous).

    Two passes, as accurate as torch's channels-first kernel: per-channel means (a cascade sum over positions),
    centring by the group mean, per-channel sums of squares of the centred values. (torch's channels-last
    GroupNorm kernel measured ~4e-4 off the float64 result on a 9.4M-element tensor where this gives 5e-7.)
    Half-precision input is normalised in float32 (as autocast runs group_norm) and returned in float32.
    """
    b, c = x.shape[0], x.shape[-1]
    if c % num_groups:
        raise InvalidValueError(f"{c} channels do not split into {num_groups} groups")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # squares of half values overflow; the result is then a new tensor
    if not x.is_contiguous():
        x = x.contiguous()  # then the result is a new tensor, as any caller that uses the return value expects
    cg = c // num_groups
    flat = x.view(b, -1, c)
    n = flat.shape[1] * cg
    group_mean = flat.mean(dim=1).view(b, num_groups, cg).mean(dim=-1)  # (B, G)
    flat.sub_(group_mean.repeat_interleave(cg, dim=1).unsqueeze(1))
    group_var = (flat * flat).sum(dim=1).view(b, num_groups, cg).sum(dim=-1) / n
    scale = (group_var + eps).rsqrt().repeat_interleave(cg, dim=1)  # (B, C)
    if weight is not None:
        scale = scale * weight
    flat.mul_(scale.unsqueeze(1))
    if bias is not None:
        flat.add_(bias)
    return flat.relu_().view(x.shape) if relu else x


# --------------------------------------------------------------------------------------------------------------
# CVNet's final similarity (CVNet Sec. 3.5)
# --------------------------------------------------------------------------------------------------------------


def cvnet_score_mix(global_scores: Tensor, cvnet_scores: Tensor, weight: float = 0.5) -> Tensor:
    """The similarity CVNet re-ranks with: ``global cosine + weight * CVNet score`` (weight 0.5 in the release),
    element-wise over matching shapes; the result has ``global_scores``' dtype."""
    return global_scores + weight * cvnet_scores.to(global_scores.dtype)


# --------------------------------------------------------------------------------------------------------------
# SuperGlobal re-ranking (SuperGlobal Sec. 4)
# --------------------------------------------------------------------------------------------------------------


def refine_candidates(candidates: Tensor, k: int = 9, beta: float = 0.15) -> Tensor:
    """Database-side refinement among the top-M candidates of each query (SuperGlobal's "MDescAug").

    ``candidates``: (q, M, d) L2-normalised -> refined (q, M, d), not re-normalised.
    Each candidate becomes the weighted mean of its ``k + 1`` nearest candidates by inner product (itself
    included): weight 1 for the nearest (itself), ``beta * similarity`` for the other ``k``.
    """
    q, m, d = candidates.shape
    n_neigh = min(k + 1, m)
    # one product per query, as the release computes it: a split (symmetric) product would save a quarter of the
    # multiply-adds but rounds differently, and near-tied neighbours could then be picked differently
    sim = torch.bmm(candidates, candidates.transpose(1, 2))
    vals, idx = sim.topk(n_neigh, dim=-1)
    weights = vals * beta
    weights[..., 0] = 1.0
    # A weighted sum of k + 1 gathered rows per candidate, without materialising the (q, M, k+1, d) gather:
    # embedding_bag reads the rows in place (k + 1 multiply-adds per output value instead of M for a dense
    # (M x M) weight matrix times the candidates). Sum first, divide after, as the release does: the rounding,
    # hence the order of near-ties, stays the release's.
    rows = (idx + torch.arange(q, device=idx.device).view(q, 1, 1) * m).view(-1, n_neigh)
    summed = F.embedding_bag(rows, candidates.reshape(q * m, d), per_sample_weights=weights.reshape(-1, n_neigh),
                             mode="sum")
    return summed.view(q, m, d).div_(weights.sum(-1, keepdim=True))


def superglobal_rerank(
    queries: Tensor, candidates: Tensor, candidate_ids: Tensor, k: int = 9, beta: float = 0.15, *, block: int = 8
) -> tuple[Tensor, Tensor]:
    """SuperGlobal re-ranking of each query's top-M candidates, vectorised over queries.

    ``queries``: (q, d); ``candidates``: (q, M, d) L2-normalised; ``candidate_ids``: (q, M).
    Returns ``(scores (q, M), ids (q, M))`` best first, score = (s1 + s2) / 2 where
    s1 = query . refined candidate and s2 = expanded query . refined candidate; the expanded query is the
    element-wise max over the top ``k + 1`` refined candidates by s1 (the release's count, ``K + 1``; the
    query itself is not part of that max). Queries go ``block`` at a time so that the temporaries, (block, M, M)
    similarities and (block, M, d) refined vectors, stay small enough to be reused rather than re-allocated.
    """
    scores, order = [], []
    for start in range(0, queries.shape[0], block):
        xq = queries[start : start + block]
        refined = refine_candidates(candidates[start : start + block], k=k, beta=beta)
        s1 = torch.bmm(refined, xq.unsqueeze(-1)).squeeze(-1)
        top = s1.topk(min(k + 1, s1.shape[1]), dim=-1).indices
        expanded = torch.gather(refined, 1, top.unsqueeze(-1).expand(-1, -1, refined.shape[-1])).amax(dim=1)
        s2 = torch.bmm(refined, expanded.unsqueeze(-1)).squeeze(-1)
        s, o = ((s1 + s2) / 2).sort(dim=-1, descending=True)
        scores.append(s)
        order.append(o)
    order_t = torch.cat(order) if order else torch.empty(0, candidates.shape[1], dtype=torch.int64)
    scores_t = torch.cat(scores) if scores else torch.empty(0, candidates.shape[1], dtype=queries.dtype)
    return scores_t, torch.gather(candidate_ids, 1, order_t.to(candidate_ids.device))


# --------------------------------------------------------------------------------------------------------------
# The field's standard post-processing of global descriptors: alpha-QE, alpha-DBA (Radenovic et al., TPAMI 2019),
# learned PCA whitening (Radenovic et al.), k-reciprocal re-ranking (Zhong et al., CVPR 2017)
# --------------------------------------------------------------------------------------------------------------


def _top_neighbours(queries: Tensor, database: Tensor, k: int, *, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """(similarities (nq, k), indices (nq, k)) of each query's ``k`` largest inner products with ``database``,
    best first, ``chunk`` queries at a time so that at most (chunk, n) similarities exist at once."""
    k = min(k, database.shape[0])
    vals, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ database.T
        v, i = sim.topk(k, dim=1) if k > 0 else (sim[:, :0], sim[:, :0].long())
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def _self_top_neighbours(X: Tensor, k: int, *, block: int = 256) -> tuple[Tensor, Tensor]:
    """(similarities (n, k), indices (n, k)) of each row's ``k`` largest inner products with the *other* rows of
    ``X`` (n, d), best first. Each block of ``block`` rows is multiplied only with itself and the rows after it
    (about half the products of X X^T): its rows take their candidates from that product's rows, the later rows
    from its columns, merged into running top-k lists. Memory O(block x n)."""
    n = X.shape[0]
    k = min(k, n - 1)
    best_v = X.new_full((n, k), float("-inf"))
    best_i = torch.zeros(n, k, dtype=torch.long, device=X.device)
    if k <= 0:
        return best_v, best_i

    def merge(rows: slice, v: Tensor, i: Tensor) -> None:
        v, at = torch.cat([best_v[rows], v], dim=1).topk(k, dim=1)
        best_i[rows] = torch.cat([best_i[rows], i], dim=1).gather(1, at)
        best_v[rows] = v

    for start in range(0, n, block):
        b = min(block, n - start)
        sim = X[start : start + b] @ X[start:].T  # (b, n - start)
        sim[:, :b].fill_diagonal_(float("-inf"))
        v, i = sim.topk(min(k, n - start), dim=1)
        merge(slice(start, start + b), v, i + start)
        if start + b < n:  # the rows after the block: their products with it, read down the columns
            v, i = sim[:, b:].topk(min(k, b), dim=0)
            merge(slice(start + b, n), v.T, i.T + start)
    return best_v, best_i


def _alpha_weighted_sum(vectors: Tensor, sims: Tensor, neighbours: Tensor, alpha: float) -> Tensor:
    """L2(v + sum_i max(s_i, 0)^alpha * n_i) for (m, d) vectors, (m, k) similarities, (m, k, d) neighbours."""
    weights = sims.clamp(min=0).pow(alpha)
    return F.normalize(vectors + torch.einsum("mk,mkd->md", weights, neighbours), dim=-1)


def alpha_query_expansion(Q: Tensor, X: Tensor, k: int = 2, alpha: float = 3.0, *, chunk: int = 4096) -> Tensor:
    """alpha-weighted query expansion (alpha-QE): ``q' = L2(q + sum_{i=1..k} max(q . x_(i), 0)^alpha x_(i))``.

    ``Q``: (nq, d) queries, ``X``: (n, d) database, both L2-normalised; ``x_(i)`` are q's top-``k`` database
    vectors by inner product. ``alpha=0`` gives average query expansion (every neighbour weighs 1).
    Returns (nq, d) L2-normalised expanded queries; ``k=0`` returns the queries unchanged.
    """
    if k <= 0:
        return Q.clone()
    sims, idx = _top_neighbours(Q, X, k, chunk=chunk)
    return _alpha_weighted_sum(Q, sims, X[idx], alpha)


def database_side_augmentation(X: Tensor, k: int = 2, alpha: float = 3.0, *, chunk: int = 256) -> Tensor:
    """alpha-weighted database-side augmentation (alpha-DBA): each database vector becomes
    ``L2(x + sum_{i=1..k} max(x . x_(i), 0)^alpha x_(i))`` over its top-``k`` *other* database vectors.

    ``X``: (n, d) L2-normalised -> (n, d). Memory: (chunk, n) similarities at a time; time O(n^2 d / 2) (each
    pair's product once), so for a 1M database augment only the vectors a query can reach
    (:func:`database_side_augmentation_of`).
    """
    if k <= 0:
        return X.clone()
    sims, idx = _self_top_neighbours(X, k, block=chunk)
    return _alpha_weighted_sum(X, sims, X[idx], alpha)


def database_side_augmentation_of(vectors: Tensor, neighbour_sims: Tensor, neighbours: Tensor,
                                  alpha: float = 3.0) -> Tensor:
    """alpha-DBA of given database vectors (m, d) whose top-k other database vectors (m, k, d) and their
    similarities (m, k) were found by a search (the shortlist mode of DBA on large databases)."""
    return _alpha_weighted_sum(vectors, neighbour_sims, neighbours, alpha)


def learn_pca_whitening(X: Tensor, dim: int | None = None) -> dict[str, Tensor]:
    """Learned PCA whitening (Radenovic et al.): from (n, d) descriptors, the mean ``m`` (d,) and the projection
    ``P`` (d, dim) whose columns are the covariance's eigenvectors, largest eigenvalue first, each divided by the
    square root of its eigenvalue, so that ``(X - m) P`` has identity covariance.

    ``dim`` defaults to min(d, n - 1): directions beyond the centred data's rank have zero variance and cannot be
    whitened. Computed in float64; returned in ``X``'s dtype.
    """
    n, d = X.shape
    rank = min(d, n - 1)
    if rank < 1:
        raise InvalidValueError(f"PCA whitening needs at least 2 descriptors, got {n}")
    dim = rank if dim is None else int(dim)
    if not 1 <= dim <= rank:
        raise InvalidValueError(f"whitening dim must be in [1, {rank}] for {n} descriptors of dimension {d}, got {dim}")
    x = X.double()
    m = x.mean(dim=0)
    xc = x - m
    cov = xc.T @ xc / n
    cov = (cov + cov.T) / 2
    eigval, eigvec = torch.linalg.eigh(cov)
    order = eigval.argsort(descending=True)[:dim]
    P = eigvec[:, order] / eigval[order].clamp(min=torch.finfo(torch.float64).tiny).sqrt()
    return {"mean": m.to(X.dtype), "projection": P.to(X.dtype)}


def apply_whitening(x: Tensor, whitening: dict[str, Tensor], eps: float = 1e-6) -> Tensor:
    """``L2((x - m) P)`` for (n, d) descriptors and a :func:`learn_pca_whitening` result -> (n, dim)."""
    y = (x - whitening["mean"].to(x)) @ whitening["projection"].to(x)
    return y / (y.norm(dim=-1, keepdim=True) + eps)


def _reciprocal_lists(order: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k-reciprocal sets R(i, k) of every pool vector as (forward (n, m), member (n, m)): ``forward`` is i's
    top m = k + 1 neighbours (``order``'s first columns, i itself included), ``member[i, t]`` whether i is in
    the top k + 1 of ``forward[i, t]`` as well."""
    forward = order[:, : k + 1]
    backward = order[forward, : k + 1]  # (n, m, m): each forward neighbour's own top k + 1
    me = torch.arange(order.shape[0], device=order.device)[:, None, None]
    return forward, (backward == me).any(dim=-1)


def _expand_ranges(starts: Tensor, lengths: Tensor) -> Tensor:
    """The positions ``starts[0] .. starts[0] + lengths[0] - 1, starts[1] ..`` concatenated: the entries of
    several rows (or columns) of a compressed sparse matrix, in one gather."""
    first = (torch.cumsum(lengths, 0) - lengths).repeat_interleave(lengths)
    return starts.repeat_interleave(lengths) + torch.arange(first.numel(), device=starts.device) - first


def _coalesce_by_column(rows: Tensor, cols: Tensor, values: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Entries (rows, cols, values) of an (n, n) sparse matrix with duplicates summed, sorted by column then
    row: the column-major (CSC) order in which the Jaccard overlaps read V."""
    key, inverse = torch.unique(cols * n + rows, return_inverse=True)
    summed = torch.zeros(key.numel(), dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    return key % n, key // n, summed


def pairwise_squared_distances(feats: Tensor, block: int = 256) -> Tensor:
    """(n, n) squared Euclidean distances of (n, d) vectors ``feats``, exactly symmetric: each block of ``block``
    rows is multiplied only with itself and the rows after it, and mirrored (about half the products of a full
    Gram matrix). The pool distances of k-reciprocal re-ranking."""
    n = feats.shape[0]
    sq = (feats * feats).sum(dim=1)
    out = torch.empty(n, n, dtype=feats.dtype, device=feats.device)
    for i in range(0, n, block):
        b = min(block, n - i)
        # (sq_i + sq_j) - 2 g_ij rounds alike for (i, j) and (j, i)
        part = (feats[i : i + b] @ feats[i:].T).mul_(-2).add_(sq[i : i + b, None] + sq[None, i:]).clamp_(min=0)
        own = part[:, :b]
        own.copy_(own.triu() + own.triu(1).T)
        out[i : i + b, i:] = part
        out[i + b :, i : i + b] = part[:, b:].T
    return out


def _k_reciprocal_pool(feats: Tensor, num_queries: int, k1: int, k2: int, lambda_value: float) -> Tensor:
    """The k-reciprocal re-ranking of Zhong et al. over one pool of (n, d) vectors whose first ``num_queries``
    rows are the queries; returns their (num_queries, n - num_queries) final distances.

    The pool's squared Euclidean distances are normalised per column by the column's maximum (and transposed),
    neighbours are ranked on them; the k-reciprocal set R(i, k1) of every vector is expanded by the
    R(j, round(k1 / 2)) of its members j that share more than 2/3 of their set with R(i, k1); the encoding V(i)
    puts exp(-distance) weights, normalised to sum 1, on the expanded set; V(i) is averaged over i's k2 nearest
    (local query expansion); the Jaccard distance is 1 - sum min(V_q, V_j) / (2 - sum min(V_q, V_j)), and the
    result is (1 - lambda) * Jaccard + lambda * the normalised squared distance.

    Dense: the (n, n) distances (:func:`pairwise_squared_distances`, the one O(n^2 d) product) and an (n, n)
    boolean membership table. Sparse: ranks are each row's top max(k1 + 1, k2) (ties by index), the encodings V
    hold at most (k1 + 1)(round(k1 / 2) + 2) entries a row before the k2 average, and the Jaccard overlaps visit
    only the pool vectors that share an entry with a query's V, through V's columns (the authors' inverted index).
    """
    n = feats.shape[0]
    dist = pairwise_squared_distances(feats)
    # exactly symmetric, so each column's maximum (the authors' normaliser, before their transpose) is its row's
    dist.div_(dist.amax(dim=1, keepdim=True).clamp(min=torch.finfo(dist.dtype).tiny))
    half = int(round(k1 / 2))  # Python's and numpy's round agree: half to even
    depth = min(n, max(k1 + 1, half + 1, k2))
    # smallest first, ties by index as a stable argsort would order them
    near, cand = dist.topk(depth, dim=1, largest=False)
    by_index = cand.argsort(dim=1)
    near, cand = near.gather(1, by_index), cand.gather(1, by_index)
    order = cand.gather(1, near.argsort(dim=1, stable=True))

    r1, m1 = _reciprocal_lists(order, k1)
    rh, mh = _reciprocal_lists(order, half)
    cand_sets, cand_member = rh[r1], mh[r1]  # (n, a, b): R(c, k1 / 2) of each c in i's forward list
    in_r1 = torch.zeros(n, n, dtype=torch.bool, device=feats.device)  # [i, j]: j in R(i, k1)
    in_r1.scatter_(1, r1, m1)
    shared = (in_r1.gather(1, cand_sets.flatten(1)).view_as(cand_member) & cand_member).sum(dim=-1)
    accept = m1 & (shared > (2.0 / 3.0) * cand_member.sum(dim=-1))
    members = torch.cat([r1, cand_sets.flatten(1)], dim=1)
    valid = torch.cat([m1, (cand_member & accept[..., None]).flatten(1)], dim=1)
    members = torch.where(valid, members, n).sort(dim=1).values  # n: padding, sorted last
    keep = members < n
    keep[:, 1:] &= members[:, 1:] != members[:, :-1]  # each member once
    weights = torch.exp(-dist.gather(1, members.clamp(max=n - 1))) * keep
    weights = weights / weights.sum(dim=1, keepdim=True)

    # V row by row (CSR): each row's members in increasing order
    per_row = keep.sum(dim=1)
    row_start = torch.cumsum(per_row, 0) - per_row
    v_cols, v_vals = members[keep], weights[keep]
    rows = torch.arange(n, device=feats.device)
    if k2 != 1:  # local query expansion: V(i) <- mean of V over i's k2 nearest, gathered row range by row range
        nearest = order[:, : min(k2, n)]
        taken = per_row[nearest].flatten()
        pos = _expand_ranges(row_start[nearest].flatten(), taken)
        rows = rows.repeat_interleave(nearest.shape[1]).repeat_interleave(taken)
        v_cols, v_vals = v_cols[pos], v_vals[pos] / nearest.shape[1]
    else:
        rows = rows.repeat_interleave(per_row)
    vrows, cols, vals = _coalesce_by_column(rows, v_cols, v_vals, n)
    counts = torch.bincount(cols, minlength=n)
    starts = torch.cumsum(counts, 0) - counts

    q = vrows < num_queries  # the queries' entries: (query, column, value)
    q_rows, q_cols, q_vals = vrows[q], cols[q], vals[q]
    span = counts[q_cols]
    pos = _expand_ranges(starts[q_cols], span)  # every pool vector sharing a column with the query's entry
    overlap = torch.zeros(num_queries * n, dtype=dist.dtype, device=dist.device)
    overlap.index_add_(0, q_rows.repeat_interleave(span) * n + vrows[pos],
                       torch.minimum(q_vals.repeat_interleave(span), vals[pos]))
    overlap = overlap.view(num_queries, n)
    final = (1 - overlap / (2 - overlap)) * (1 - lambda_value) + dist[:num_queries] * lambda_value
    return final[:, num_queries:]


def k_reciprocal_distance(Q: Tensor, X: Tensor, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> Tensor:
    """k-reciprocal encoding re-ranking (Zhong et al., CVPR 2017) of queries ``Q`` (nq, d) against a database
    ``X`` (n, d): the final (nq, n) distance, smaller is better (sort ascending).

    Queries and database form one pool, as in the authors' function, so each call costs O((nq + n)^2 d) time
    and O((nq + n)^2) memory (5070 float32 vectors: about 100 MB of distances, 370 MB at the peak): for sets up
    to some ten thousand vectors; on larger databases use :func:`k_reciprocal_shortlist`.
    """
    if k1 < 1 or k2 < 1:
        raise InvalidValueError(f"k1 and k2 must be >= 1, got {k1}, {k2}")
    return _k_reciprocal_pool(torch.cat([Q, X]), Q.shape[0], k1, k2, lambda_value)


def k_reciprocal_shortlist(Q: Tensor, candidates: Tensor, k1: int = 20, k2: int = 6,
                           lambda_value: float = 0.3) -> Tensor:
    """k-reciprocal re-ranking restricted to each query's shortlist: ``Q`` (nq, d), ``candidates`` (nq, N, d)
    (each query's top-N database vectors) -> (nq, N) final distances over those candidates.

    Each query forms a pool with its own N candidates, so memory is bounded by O((N + 1)^2) whatever the
    database size (N = 1000: about 8 MB of float64 per matrix). It equals :func:`k_reciprocal_distance` on a
    database of those N vectors and one query.
    """
    if candidates.ndim != 3 or candidates.shape[0] != Q.shape[0]:
        raise InvalidValueError(f"candidates must be (nq, N, d) for {Q.shape[0]} queries, got "
                                f"{tuple(candidates.shape)}")
    return torch.cat([k_reciprocal_distance(Q[i : i + 1], candidates[i], k1, k2, lambda_value)
                      for i in range(Q.shape[0])]) if Q.shape[0] else candidates.new_zeros(0, candidates.shape[1])


# --------------------------------------------------------------------------------------------------------------
# Momentum (EMA) key encoder (CVNet Sec. 3.1, after MoCo)
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update_(key_state: dict[str, Tensor] | Sequence[Tensor], query_state: dict[str, Tensor] | Sequence[Tensor],
                momentum: float) -> None:
    """``key <- m * key + (1 - m) * query`` in place, tensor by tensor (parameters and float buffers such as BN
    statistics); integer buffers (BN's batch counter) are copied. The two states must list matching tensors."""
    keys = list(key_state.values()) if isinstance(key_state, dict) else list(key_state)
    queries = list(query_state.values()) if isinstance(query_state, dict) else list(query_state)
    for k, q in zip(keys, queries, strict=True):
        if k.dtype.is_floating_point:
            k.mul_(momentum).add_(q.detach(), alpha=1 - momentum)
        else:
            k.copy_(q)
