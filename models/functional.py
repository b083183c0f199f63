"""Pure tensor maths of CVNet and SuperGlobal: no parameters, no state.

Each paper equation lives here once; the ``nn.Module`` wrappers in :mod:`models.layers` only own weights.
Shapes use B = batch, C = channels, (H, W) = spatial size, (hq, wq) / (hk, wk) = query / key map size.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from common.errors import InvalidValueError

# re-exported: the post-processing maths is read as one family, under models.functional
from .k_reciprocal import k_reciprocal_distance, k_reciprocal_shortlist, pairwise_squared_distances  # noqa: F401

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
# Exact search: the one blockwise top-k by inner product (as faiss's contrib.exhaustive_search.knn_ground_truth)
# --------------------------------------------------------------------------------------------------------------

_FEW_QUERIES = 8  # fewer queries than this are scored (rows, nq): BLAS runs them best as matrix-vector products


def topk_merge(values: Sequence[Tensor], indices: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The running merge of a top-k scan: candidate lists, (nq, *) values and their (nq, *) indices, concatenated
    and cut to the ``k`` largest (``torch.topk``: best first) when they hold more than ``k``, else left in order."""
    d, i = torch.cat(list(values), dim=1), torch.cat(list(indices), dim=1)
    if d.shape[1] > k:
        d, at = d.topk(k, dim=1)
        i = i.gather(1, at)
    return d, i


def blockwise_topk(
    xq: Tensor,
    xb: Tensor | Sequence[Tensor],
    k: int,
    *,
    block: int = 1 << 16,
    gemm_rows: int | None = None,
    rows_first: bool | None = None,
    query_block: int | None = None,
    progress: Callable[[list], Iterable] | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products of queries ``xq`` (nq, d) with the database ``xb`` (nb, d), or with the
    concatenation of a list of parts (never built): ``(D, I)``, each (nq, min(k, nb)), best first; I int64.

    ``block`` database rows are scored at a time and their top-k merged into the running (D, I)
    (:func:`topk_merge`), so no more than (nq, block) scores exist at once; blocks restart at each part. Scores
    are in xq's dtype (float32 at least): other storage (float16) is converted ``gemm_rows`` rows at a time (None:
    the whole block) into one reused buffer, each conversion multiplied while in cache. ``rows_first`` scores a
    block as ``rows @ xq.T`` (rows, nq) rather than ``xq @ rows.T`` (None: for fewer than 8 queries); the two
    can round differently in the last bit. ``query_block`` queries are scanned together (None: all);
    ``progress`` wraps the list of blocks scanned (e.g. in a tqdm bar). Parts held elsewhere than ``xq`` (a
    database in host memory, queries on a GPU) are copied to xq's device ``gemm_rows`` rows at a time: never whole.

    k >= nb is the full ranking: nothing is cut, and the final sort is stable, so ties come in index order.
    Below that, ties at the k-th place go as ``torch.topk`` takes them.
    """
    parts = list(xb) if isinstance(xb, (list, tuple)) else [xb]
    if xq.dim() != 2 or any(p.dim() != 2 or p.shape[1] != xq.shape[1] for p in parts):
        raise InvalidValueError(f"need (nq, d) queries and (nb, d) database rows, got {tuple(xq.shape)} and "
                                f"{[tuple(p.shape) for p in parts]}")
    nq, nb = xq.shape[0], sum(p.shape[0] for p in parts)
    if query_block is not None and nq > query_block:
        found = [blockwise_topk(xq[s : s + query_block], parts, k, block=block, gemm_rows=gemm_rows,
                                rows_first=rows_first, progress=progress) for s in range(0, nq, query_block)]
        return torch.cat([d for d, _ in found]), torch.cat([i for _, i in found])
    dtype, kk = torch.promote_types(xq.dtype, torch.float32), max(0, min(k, nb))
    if nq == 0 or kk == 0:
        return xq.new_zeros(nq, kk, dtype=dtype), torch.zeros(nq, kk, dtype=torch.int64, device=xq.device)
    xq = xq.to(dtype)
    few = nq < _FEW_QUERIES if rows_first is None else rows_first
    rows_max = min(block, max(p.shape[0] for p in parts))
    sub = rows_max if gemm_rows is None else max(1, min(gemm_rows, rows_max))
    scores = torch.empty((rows_max, nq) if few else (nq, rows_max), dtype=dtype, device=xq.device)
    convert = None  # allocated once: fresh large allocations cost page faults
    blocks, first_row = [], 0  # (part, the part's first row in the concatenation, the block's start in the part)
    for p in parts:
        blocks += [(p, first_row, start) for start in range(0, p.shape[0], block)]
        first_row += p.shape[0]
    values, indices, held = [], [], 0
    for part, first_row, start in progress(blocks) if progress is not None else blocks:
        rows = min(block, part.shape[0] - start)
        for s0 in range(0, rows, sub):
            x = part[start + s0 : start + min(s0 + sub, rows)]
            if x.device != xq.device:
                x = x.to(xq.device, non_blocking=True)
            if x.dtype != dtype:
                if convert is None:
                    convert = torch.empty(sub, x.shape[1], dtype=dtype, device=x.device)
                x = convert[: x.shape[0]].copy_(x)
            if few:
                torch.mm(x, xq.T, out=scores[s0 : s0 + x.shape[0]])
            else:
                torch.mm(xq, x.T, out=scores[:, s0 : s0 + x.shape[0]])
        if kk >= rows:  # every row is a candidate: copied out of the reused buffer, in index order
            v = (scores[:rows].T if few else scores[:, :rows]).clone(memory_format=torch.contiguous_format)
            i = torch.arange(first_row + start, first_row + start + rows, device=v.device).expand(nq, rows)
        elif few:
            v, i = scores[:rows].topk(kk, dim=0)
            v, i = v.T, i.T + (first_row + start)
        else:
            v, i = scores[:, :rows].topk(kk, dim=1)
            i = i + (first_row + start)
        values.append(v)
        indices.append(i)
        held += rows if kk >= rows else kk
        if held > kk:
            d, i = topk_merge(values, indices, kk)
            values, indices, held = [d], [i], kk
    d, order = torch.cat(values, dim=1).sort(dim=1, descending=True, stable=True)
    return d, torch.cat(indices, dim=1).gather(1, order)


# --------------------------------------------------------------------------------------------------------------
# The field's standard post-processing of global descriptors: alpha-QE, alpha-DBA (Radenovic et al., TPAMI 2019),
# learned PCA whitening (Radenovic et al.); k-reciprocal re-ranking (Zhong et al., CVPR 2017) in models.k_reciprocal
# --------------------------------------------------------------------------------------------------------------


def _self_top_neighbours(X: Tensor, k: int, *, block: int = 256) -> tuple[Tensor, Tensor]:
    """(similarities (n, k), indices (n, k)) of each row's ``k`` largest inner products with the *other* rows of
    ``X`` (n, d), best first. Each block of ``block`` rows is multiplied only with itself and the rows after it
    (about half the products of X X^T): its rows take their candidates from that product's rows, the later rows
    from its columns, each merged into running top-k lists by :func:`topk_merge`. Memory O(block x n)."""
    n = X.shape[0]
    k = min(k, n - 1)
    best_v = X.new_full((n, k), float("-inf"))
    best_i = torch.zeros(n, k, dtype=torch.long, device=X.device)
    if k <= 0:
        return best_v, best_i
    for start in range(0, n, block):
        b = min(block, n - start)
        sim = X[start : start + b] @ X[start:].T  # (b, n - start)
        sim[:, :b].fill_diagonal_(float("-inf"))
        v, i = sim.topk(min(k, n - start), dim=1)
        own = slice(start, start + b)
        best_v[own], best_i[own] = topk_merge([best_v[own], v], [best_i[own], i + start], k)
        if start + b < n:  # the rows after the block: their products with it, read down the columns
            v, i = sim[:, b:].topk(min(k, b), dim=0)
            later = slice(start + b, n)
            best_v[later], best_i[later] = topk_merge([best_v[later], v.T], [best_i[later], i.T + start], k)
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
    sims, idx = blockwise_topk(Q, X, k, rows_first=False, query_block=chunk)
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
