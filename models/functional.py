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
    raise ValueError(f"scale_gem mode must be 'max' or 'mean', got {mode!r}")


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
# SuperGlobal re-ranking (SuperGlobal Sec. 4)
# --------------------------------------------------------------------------------------------------------------


def refine_candidates(candidates: Tensor, k: int = 9, beta: float = 0.15) -> Tensor:
    """Database-side refinement among the top-M candidates of each query (SuperGlobal's "MDescAug").

    ``candidates``: (q, M, d) L2-normalised -> refined (q, M, d), not re-normalised.
    Each candidate becomes the weighted mean of its ``k + 1`` nearest candidates by inner product (itself
    included): weight 1 for the nearest (itself), ``beta * similarity`` for the other ``k``.
    """
    m = candidates.shape[1]
    n_neigh = min(k + 1, m)
    sim = torch.bmm(candidates, candidates.transpose(1, 2))
    vals, idx = sim.topk(n_neigh, dim=-1)
    weights = vals * beta
    weights[..., 0] = 1.0
    # A sparse (M x M) weight matrix turns the gather of (q, M, k+1, d) neighbours into one batched matmul.
    dense = torch.zeros_like(sim).scatter_(-1, idx, weights)
    return torch.bmm(dense, candidates) / weights.sum(-1, keepdim=True)


def superglobal_rerank(
    queries: Tensor, candidates: Tensor, candidate_ids: Tensor, k: int = 9, beta: float = 0.15
) -> tuple[Tensor, Tensor]:
    """SuperGlobal re-ranking of each query's top-M candidates, vectorised over queries.

    ``queries``: (q, d); ``candidates``: (q, M, d) L2-normalised; ``candidate_ids``: (q, M).
    Returns ``(scores (q, M), ids (q, M))`` best first, score = (s1 + s2) / 2 where
    s1 = query . refined candidate and s2 = expanded query . refined candidate; the expanded query is the
    element-wise max over the top ``k + 1`` refined candidates by s1 (the release's count, ``K + 1``; the
    query itself is not part of that max).
    """
    refined = refine_candidates(candidates, k=k, beta=beta)
    s1 = torch.einsum("qd,qmd->qm", queries, refined)
    top = s1.topk(min(k + 1, s1.shape[1]), dim=-1).indices
    expanded = torch.gather(refined, 1, top.unsqueeze(-1).expand(-1, -1, refined.shape[-1])).amax(dim=1)
    s2 = torch.einsum("qd,qmd->qm", expanded, refined)
    scores, order = ((s1 + s2) / 2).sort(dim=-1, descending=True)
    return scores, torch.gather(candidate_ids, 1, order)
