"""k-reciprocal encoding re-ranking (Zhong et al., CVPR 2017): the pool distances, the k-reciprocal sets and their
Jaccard distance. Pure tensor maths; :mod:`models.functional` re-exports the public names."""
from __future__ import annotations

import torch
from torch import Tensor

from common.errors import InvalidValueError


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
