"""The revisited Oxford/Paris metrics (mAP and mP@k under Easy / Medium / Hard, a class folder's one protocol with
recall@k), bit for bit as revisitop computes them, and the GLDv2 challenges' mAP@100 and GAP. A ranking matrix
``ranks`` is revisitop's (n_db, n_queries): column ``i`` lists database indices, most similar first, for query ``i``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.errors import InvalidValueError, shorten

logger = logging.getLogger(__name__)

PROTOCOLS = ("easy", "medium", "hard")
#: A class folder's one protocol: a gallery image of the query's class is positive, one listed as junk ignored.
#: Its ground truth (datasets.folder.ClassFolder.ground_truth: positives 'easy', none 'hard') is revisitop's
#: Medium protocol's (positives easy + hard, junk ignored), so it reads a ranking given per protocol (CVNet's
#: paper mode) at 'medium'.
CLASS_PROTOCOLS = ("class",)
SAME_AS = {"class": "medium"}


def compute_ap(ranks: Sequence[int] | np.ndarray, nres: int) -> float:
    """Average precision by the trapezoidal rule (revisitop's ``compute_ap``).

    ``ranks``: sorted 0-based positions (n_found,) of the positives in the ranking *after junk removal*;
    ``nres``: number of positives of the query (recall step 1/nres). Positives absent from a truncated ranking
    simply contribute nothing. For the j-th positive (0-based) at position r the trapezoid between recall
    j/nres and (j+1)/nres has heights precision_0 = j/r (1 when r == 0) and precision_1 = (j+1)/(r+1).
    """
    if nres <= 0:
        raise InvalidValueError(f"nres must be positive, got {nres}")
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if r.size == 0:
        return 0.0
    j = np.arange(r.size, dtype=np.float64)
    precision_0 = np.divide(j, r, out=np.ones_like(r), where=r != 0)
    precision_1 = (j + 1.0) / (r + 1.0)
    terms = (precision_0 + precision_1) * (1.0 / nres) / 2.0
    # cumsum accumulates left to right like revisitop's loop (np.sum's pairwise order could differ in the ulp)
    return float(np.cumsum(terms)[-1])


def _as_index_array(x) -> np.ndarray:
    a = np.asarray(x if x is not None else [])
    return a.reshape(-1).astype(np.int64, copy=False) if a.size else np.empty(0, dtype=np.int64)


def positives_after_junk(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions (n_found,) of the positives in one query's ``ranking`` once junk images are dropped.

    Each positive's position decreases by the number of junk images ranked strictly before it.
    """
    pos = np.flatnonzero(np.isin(ranking, ok))
    if junk.size == 0 or pos.size == 0:
        return pos
    junk_pos = np.flatnonzero(np.isin(ranking, junk))
    return pos - np.searchsorted(junk_pos, pos, side="left")


def precision_at_k(pos_1based: np.ndarray, kappas: Sequence[int]) -> np.ndarray:
    """revisitop's precision@k for one query: ``kq = min(max(pos), k)``, ``(pos <= kq).sum() / kq``.

    ``pos_1based``: 1-based positions (n_found,) of the positives after junk removal. Note the quirk kept from
    revisitop: when the last positive sits before k, the denominator is that position, not k. A query whose
    positives are all missing from a truncated ranking scores 0 (revisitop would raise there).
    """
    out = np.zeros(len(kappas), dtype=np.float64)
    if pos_1based.size == 0:
        return out
    last = int(pos_1based.max())
    for j, k in enumerate(kappas):
        kq = min(last, int(k))
        out[j] = (pos_1based <= kq).sum() / kq
    return out


def compute_map(
    ranks: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int] = ()
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP and mP@k of a ranking under one protocol (revisitop's ``compute_map``).

    ``ranks``: (n_db, n_queries) database indices, column i is query i's ranking (may be truncated to the
    top rows); ``gnd``: one dict per query with 'ok' (positives) and optionally 'junk'.
    Returns ``(map, aps (n_queries,), pr (len(kappas),), prs (n_queries, len(kappas)))``. Queries without
    positives get NaN in ``aps`` and ``prs`` and are left out of ``map`` and ``pr``.

    Semantics follow revisitop's (Radenovic et al., "Revisiting Oxford and Paris", CVPR 2018) to the last bit: AP
    is the trapezoidal area under the precision-recall curve (:func:`compute_ap`), junk images are removed from the
    ranking before positions are counted (:func:`positives_after_junk`), and the accumulations run in the same
    order, so the floats agree exactly.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise InvalidValueError(f"ranks must be (n_db, n_queries), got shape {ranks.shape}")
    nq = len(gnd)
    if ranks.shape[1] != nq:
        raise InvalidValueError(
            f"ranks has {ranks.shape[1]} columns but gnd has {nq} queries; "
            "ranks must be (n_db, n_queries) (transpose a (n_queries, n_db) matrix)"
        )
    kappas = [int(k) for k in kappas]
    if any(k < 1 for k in kappas):
        raise InvalidValueError(f"kappas must be >= 1, got {kappas}")

    aps = np.zeros(nq, dtype=np.float64)
    prs = np.zeros((nq, len(kappas)), dtype=np.float64)
    empty = np.zeros(nq, dtype=bool)
    for i in range(nq):
        ok = _as_index_array(gnd[i]["ok"])
        if ok.size == 0:
            empty[i] = True
            aps[i] = np.nan
            prs[i, :] = np.nan
            continue
        junk = _as_index_array(gnd[i].get("junk"))
        pos = positives_after_junk(ranks[:, i], ok, junk)
        aps[i] = compute_ap(pos, ok.size)
        prs[i, :] = precision_at_k(pos + 1, kappas)

    n_valid = int((~empty).sum())
    if n_valid == 0:
        logger.warning("compute_map: no query has a positive; mAP and mP@k are undefined (NaN)")
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    # sequential accumulation over queries, as revisitop sums them
    mean_ap = float(np.cumsum(aps[~empty])[-1]) / n_valid
    pr = np.cumsum(prs[~empty], axis=0)[-1] / n_valid if len(kappas) else np.zeros(0)
    return mean_ap, aps, pr, prs


def build_protocols(gnd: Sequence[Mapping]) -> dict[str, list[dict]]:
    """Per-query ground truth for the three revisited protocols from the raw 'easy'/'hard'/'junk' lists.

    easy: ok = easy, junk = junk + hard; medium: ok = easy + hard, junk = junk;
    hard: ok = hard, junk = junk + easy.
    """
    out: dict[str, list[dict]] = {p: [] for p in PROTOCOLS}
    for i, g in enumerate(gnd):
        missing = [key for key in ("easy", "hard", "junk") if key not in g]
        if missing:
            raise KeyError(f"ground-truth entry {i} lacks {missing}; expected keys 'easy', 'hard', 'junk'")
        easy, hard, junk = (_as_index_array(g[key]) for key in ("easy", "hard", "junk"))
        out["easy"].append({"ok": easy, "junk": np.concatenate([junk, hard])})
        out["medium"].append({"ok": np.concatenate([easy, hard]), "junk": junk})
        out["hard"].append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


def protocol_ground_truth(gnd: Sequence[Mapping], protocols: Sequence[str] = PROTOCOLS) -> dict[str, list[dict]]:
    """Per-query ground truth ('ok', 'junk') of each of ``protocols`` (revisited ones, or :data:`CLASS_PROTOCOLS`)
    from the raw 'easy' / 'hard' / 'junk' lists (:func:`build_protocols`)."""
    built = build_protocols(gnd)
    return {p: built[SAME_AS.get(p, p)] for p in protocols}


def protocol_ranking(ranks: np.ndarray | Mapping[str, np.ndarray], protocol: str) -> np.ndarray:
    """The ranking (n_db, nq) protocol ``protocol`` reads: ``ranks`` itself, or its entry when it is given per
    revisited protocol (a class folder's protocol reads 'medium')."""
    if not isinstance(ranks, Mapping):
        return ranks
    key = SAME_AS.get(protocol, protocol)
    if key not in ranks:
        raise KeyError(f"ranks given per protocol lacks {key!r}; expected keys {list(PROTOCOLS)}")
    return ranks[key]


def compute_recall(ranks: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Recall@k of a ranking under one protocol: the fraction of queries with a positive among their first k
    results once junk is dropped (as for their AP). Returns (mean (len(kappas),), per query (nq, len(kappas))); a
    query without positives has a NaN row and is left out of the mean."""
    ranks = np.asarray(ranks)
    recalls = np.full((len(gnd), len(kappas)), np.nan)
    for i, g in enumerate(gnd):
        ok = _as_index_array(g["ok"])
        if ok.size:
            pos = positives_after_junk(ranks[:, i], ok, _as_index_array(g.get("junk")))
            first = int(pos.min()) + 1 if pos.size else math.inf
            recalls[i] = [float(first <= int(k)) for k in kappas]
    valid = ~np.isnan(recalls[:, 0]) if len(kappas) else np.zeros(len(gnd), dtype=bool)
    mean = recalls[valid].mean(axis=0) if valid.any() else np.full(len(kappas), np.nan)
    return mean, recalls


def evaluate_revisited(
    ranks: np.ndarray | Mapping[str, np.ndarray], gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10), *,
    protocols: Sequence[str] = PROTOCOLS, recall: bool = False,
) -> dict[str, dict]:
    """mAP and mP@k for Easy, Medium and Hard, or for the given ``protocols`` (:data:`CLASS_PROTOCOLS`), and with
    ``recall`` recall@k (:func:`compute_recall`); fractions in [0, 1], not percentages.

    ``ranks``: one (n_db, n_queries) ranking matrix shared by the protocols, or a mapping
    {'easy', 'medium', 'hard'} -> ranking matrix (the paper's re-ranking mode produces one per protocol).
    Returns ``{protocol: {'mAP': float, 'mP@k': {k: float}, 'aps': (n_queries,),
    'prs': (n_queries, len(kappas))}}`` (and ``'recall@k': {k: float}``).
    """
    truth = protocol_ground_truth(gnd, protocols)
    if isinstance(ranks, Mapping):
        missing = [p for p in PROTOCOLS if p not in ranks]
        if missing:
            raise KeyError(f"ranks given per protocol lacks {missing}; expected keys {list(PROTOCOLS)}")
    kappas = [int(k) for k in kappas]
    results: dict[str, dict] = {}
    for p in protocols:
        mean_ap, aps, pr, prs = compute_map(protocol_ranking(ranks, p), truth[p], kappas)
        results[p] = {
            "mAP": mean_ap,
            "mP@k": {k: float(v) for k, v in zip(kappas, pr)},
            "aps": aps,
            "prs": prs,
        }
        if recall:
            results[p]["recall@k"] = {k: float(v) for k, v in
                                      zip(kappas, compute_recall(protocol_ranking(ranks, p), truth[p], kappas)[0])}
    return results


#: Recall levels of the precision-recall curves in the report (0, 0.05, ..., 1).
PR_RECALL_LEVELS = np.linspace(0.0, 1.0, 21)


def precision_recall(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One query's precision-recall points, one per positive found: (recall (n_found,), precision (n_found,)),
    junk removed from the ranking (n_db,) first as for its AP; empty for a query without positives."""
    ok, junk = _as_index_array(ok), _as_index_array(junk)
    if ok.size == 0:
        return np.zeros(0), np.zeros(0)
    pos = positives_after_junk(np.asarray(ranking), ok, junk)
    found = np.arange(1, pos.size + 1, dtype=np.float64)
    return found / ok.size, found / (pos + 1.0)


def interpolated_precision(recall: np.ndarray, precision: np.ndarray,
                           levels: np.ndarray = PR_RECALL_LEVELS) -> np.ndarray:
    """Interpolated precision (len(levels),): at each recall level the best precision at that recall or
    beyond (0 where the ranking never reaches it)."""
    out = np.zeros(len(levels), dtype=np.float64)
    for j, level in enumerate(levels):
        reached = precision[recall >= level - 1e-12]
        out[j] = reached.max() if reached.size else 0.0
    return out


def mean_precision_recall(ranks: np.ndarray, gnd: Sequence[Mapping],
                          levels: np.ndarray = PR_RECALL_LEVELS) -> np.ndarray:
    """The mean over queries with positives of :func:`interpolated_precision` (len(levels),) for a ranking
    (n_db, nq) under one protocol's ``gnd`` ('ok', 'junk'; :func:`build_protocols`); NaN without such queries."""
    curves = [interpolated_precision(*precision_recall(np.asarray(ranks)[:, i], g["ok"], g.get("junk")), levels)
              for i, g in enumerate(gnd) if _as_index_array(g["ok"]).size]
    return np.mean(curves, axis=0) if curves else np.full(len(levels), np.nan)


def _percent(value: float) -> float | None:
    # a protocol without any query that has positives has no mAP: null in JSON rather than NaN
    return None if math.isnan(value) else 100 * value


def metrics_percent(results: Mapping[str, Mapping]) -> dict[str, Any]:
    """:func:`evaluate_revisited`'s output in percent for a report: ``{"mAP": {protocol: %}, "mP@k": {protocol:
    {"k": %}}, "n_queries": {protocol: queries with positives}}`` (and ``"recall@k"`` like ``"mP@k"`` when it was
    computed), over the protocols evaluated; a protocol without such queries gets None."""
    out = {
        "mAP": {p: _percent(r["mAP"]) for p, r in results.items()},
        "mP@k": {p: {str(k): _percent(v) for k, v in r["mP@k"].items()} for p, r in results.items()},
        "n_queries": {p: int(np.sum(~np.isnan(r["aps"]))) for p, r in results.items()},
    }
    if all("recall@k" in r for r in results.values()) and results:
        out["recall@k"] = {p: {str(k): _percent(v) for k, v in r["recall@k"].items()} for p, r in results.items()}
    return out


def format_percent(value: float | None) -> str:
    """A percentage as printed in the tables: two decimals, ``n/a`` for None."""
    return "n/a" if value is None else f"{value:.2f}"


# --------------------------------------------------------------------------------------------------------------
# GLDv2 retrieval and recognition metrics (the challenge metrics published with DELF)
# --------------------------------------------------------------------------------------------------------------


def gldv2_mean_average_precision(predictions: Mapping[str, Sequence[str]],
                                 retrieval_solution: Mapping[str, Sequence[str]],
                                 max_predictions: int = 100) -> float:
    """The GLDv2 retrieval challenge's mAP@``max_predictions``.

    ``predictions``: test id -> ranked index ids; ``retrieval_solution``: test id -> ground-truth index ids.
    Per predicted test image, AP over its first ``max_predictions`` ids, a repeated id counting once (at its first
    position), divided by min(#ground truth, max_predictions); the sum is divided by the number of test images in
    the solution, so an unpredicted test image counts as AP 0. A predicted id not in the solution is an error,
    and so is a test image whose solution is empty (the challenge's code cannot score it: malformed input).
    """
    unknown = [key for key in predictions if key not in retrieval_solution]
    if unknown:
        raise InvalidValueError(f"test image {shorten(unknown[0])} is not part of the retrieval solution "
                                f"({len(unknown)} such predictions)")
    if not retrieval_solution:
        raise InvalidValueError("the retrieval solution is empty")
    empty = [key for key, truth in retrieval_solution.items() if not len(truth)]
    if empty:
        raise InvalidValueError(f"test image {shorten(empty[0])} has an empty retrieval solution (no relevant index "
                                f"image; {len(empty)} such test images): the metric cannot score it, drop it from the "
                                "solution (the challenge lists such images as Ignored)")
    total = 0.0
    for key, ranked in predictions.items():
        truth = set(retrieval_solution[key])
        seen: set[str] = set()
        hits, ap = 0, 0.0
        for position, index_id in enumerate(list(ranked)[:max_predictions]):
            if index_id in seen:
                continue
            seen.add(index_id)
            if index_id in truth:
                hits += 1
                ap += hits / (position + 1)
        total += ap / min(len(truth), max_predictions)
    return total / len(retrieval_solution)


def gldv2_global_average_precision(predictions: Mapping[str, Mapping[str, Any]],
                                   recognition_solution: Mapping[str, Sequence[Any]],
                                   ignore_non_gt_test_images: bool = False) -> float:
    """The GLDv2 recognition challenge's Global Average Precision (micro-AP).

    ``predictions``: test id -> {"class": landmark id, "score": confidence}; ``recognition_solution``: test id ->
    landmark ids (empty for non-landmark images). All predictions are sorted by score (descending; ties by test id,
    then class, ascending) and GAP = sum over correct predictions of precision at their rank, divided by the number
    of test images with ground truth. With ``ignore_non_gt_test_images``, predictions for images without ground
    truth are skipped (the challenge keeps them, penalising confident non-landmark predictions).
    """
    positives = sum(1 for truth in recognition_solution.values() if truth)
    if positives == 0:
        raise InvalidValueError("the recognition solution has no test image with ground truth")
    unknown = [key for key in predictions if key not in recognition_solution]
    if unknown:
        raise InvalidValueError(f"test image {unknown[0]!r} is not part of the recognition solution")
    ordered = sorted(predictions.items(), key=lambda item: (item[0], item[1]["class"]))
    ordered.sort(key=lambda item: item[1]["score"], reverse=True)
    gap, total, correct = 0.0, 0, 0
    for key, prediction in ordered:
        truth = recognition_solution[key]
        if ignore_non_gt_test_images and not truth:
            continue
        total += 1
        if prediction["class"] in truth:
            correct += 1
            gap += correct / total
    return gap / positives
