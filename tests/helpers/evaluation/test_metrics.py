"""revisitop metric semantics: hand-worked AP / mP@k, junk removal, empty queries, protocols, and a randomized
comparison with a loop-based re-implementation written from the definitions."""
import os
from pathlib import Path

import numpy as np
import pytest

from helpers.evaluation.metrics import (
    CLASS_PROTOCOLS,
    PR_RECALL_LEVELS,
    build_protocols,
    compute_ap,
    compute_map,
    compute_recall,
    evaluate_revisited,
    format_percent,
    interpolated_precision,
    mean_precision_recall,
    metrics_percent,
    precision_recall,
)


def test_ap_single_positive_first_place_is_one():
    assert compute_ap([0], 1) == 1.0


def test_ap_single_positive_second_place_is_a_quarter():
    # r = 1, j = 0: precision_0 = 0/1, precision_1 = 1/2 -> (0 + 1/2) / 2
    assert compute_ap([1], 1) == 0.25


def test_ap_two_positives_by_hand():
    # j=0 at r=0: (1 + 1)/2 * 1/2 = 1/2 ; j=1 at r=2: (1/2 + 2/3)/2 * 1/2 = 7/24 -> 19/24
    assert compute_ap([0, 2], 2) == pytest.approx(19 / 24, abs=1e-15)
    # a third positive that never shows up only lowers the recall step: each trapezoid is 2/3 as wide
    assert compute_ap([0, 2], 3) == pytest.approx((19 / 24) * 2 / 3, abs=1e-15)
    assert compute_ap([], 4) == 0.0
    with pytest.raises(ValueError):
        compute_ap([0], 0)


def _gnd(ok, junk=()):
    return {"ok": np.asarray(ok, dtype=np.int64), "junk": np.asarray(junk, dtype=np.int64)}


def test_junk_is_removed_before_positions_are_counted():
    # database of 4; the query's ranking: 3 (negative), 1 (junk), 0 (positive), 2 (negative)
    ranks = np.array([[3], [1], [0], [2]])
    m, aps, _, _ = compute_map(ranks, [_gnd([0], [1])])
    assert aps[0] == 0.25 and m == 0.25  # the positive moves from position 2 to 1
    m_nojunk, _, _, _ = compute_map(ranks, [_gnd([0])])
    assert m_nojunk == pytest.approx((0 / 2 + 1 / 3) / 2)  # positive at position 2 when the junk counts
    # junk ranked first: the positive becomes first
    m_first, _, _, _ = compute_map(np.array([[1], [0], [3], [2]]), [_gnd([0], [1])])
    assert m_first == 1.0


def test_query_without_positives_is_excluded_from_the_means():
    ranks = np.array([[0, 1, 2], [1, 0, 0], [2, 2, 1]])
    gnd = [_gnd([0]), _gnd([]), _gnd([1])]  # q0: first -> 1.0 ; q1: empty ; q2: positive at position 2
    m, aps, pr, prs = compute_map(ranks, gnd, kappas=[1, 3])
    ap2 = (0 / 2 + 1 / 3) / 2
    assert aps[0] == 1.0 and np.isnan(aps[1]) and aps[2] == pytest.approx(ap2)
    assert m == pytest.approx((1.0 + ap2) / 2)
    assert np.all(np.isnan(prs[1]))  # as revisitop: the empty query's precision row is NaN
    # q0: pos=[1] -> kq=min(1,k)=1 -> 1 ; q2: pos=[3] -> k=1: kq=1, 0/1 ; k=3: kq=3, 1/3
    np.testing.assert_allclose(prs[[0, 2]], [[1.0, 1.0], [0.0, 1 / 3]])
    np.testing.assert_allclose(pr, [(1.0 + 0.0) / 2, (1.0 + 1 / 3) / 2])


def test_precision_at_k_by_hand_keeps_revisitops_denominator():
    # positives at 1-based positions 1 and 3 among 6
    ranks = np.array([[5], [0], [4], [1], [3], [2]])
    _, _, pr, prs = compute_map(ranks, [_gnd([5, 4])], kappas=[1, 2, 5, 6])
    # k=1: kq=1 -> 1/1 ; k=2: kq=2 -> 1/2 ; k=5: kq=min(3,5)=3 -> 2/3 ; k=6: likewise 2/3
    np.testing.assert_allclose(prs[0], [1.0, 0.5, 2 / 3, 2 / 3])
    np.testing.assert_allclose(pr, prs[0])


def test_truncated_ranking_matches_full_when_positives_are_inside():
    rng = np.random.default_rng(1)
    ranks = np.stack([rng.permutation(50) for _ in range(3)], axis=1)
    gnd = [_gnd(ranks[[0, 3, 7], q], ranks[[2, 40], q]) for q in range(3)]
    full = compute_map(ranks, gnd, kappas=[1, 5])
    top = compute_map(ranks[:10], gnd, kappas=[1, 5])
    assert full[0] == top[0]
    np.testing.assert_array_equal(full[3], top[3])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="columns"):
        compute_map(np.zeros((5, 3), dtype=np.int64), [_gnd([0])] * 2)
    with pytest.raises(ValueError, match="n_db, n_queries"):
        compute_map(np.zeros(5, dtype=np.int64), [_gnd([0])])


def test_build_protocols():
    gnd = [{"easy": np.array([1, 2]), "hard": np.array([3]), "junk": np.array([4, 5]), "bbx": [0, 0, 1, 1]}]
    p = build_protocols(gnd)
    assert set(p) == {"easy", "medium", "hard"}
    assert sorted(p["easy"][0]["ok"]) == [1, 2] and sorted(p["easy"][0]["junk"]) == [3, 4, 5]
    assert sorted(p["medium"][0]["ok"]) == [1, 2, 3] and sorted(p["medium"][0]["junk"]) == [4, 5]
    assert sorted(p["hard"][0]["ok"]) == [3] and sorted(p["hard"][0]["junk"]) == [1, 2, 4, 5]
    with pytest.raises(KeyError, match="hard"):
        build_protocols([{"easy": [1], "junk": []}])


# --- an independent re-implementation from the definitions, loop by loop --------------------------------


def _reference_query(ranking, ok, junk, kappas):
    ok, junk = set(int(x) for x in ok), set(int(x) for x in junk)
    positions = []  # 0-based positions of positives in the ranking with junk skipped
    kept = 0
    for idx in ranking:
        if int(idx) in junk:
            continue
        if int(idx) in ok:
            positions.append(kept)
        kept += 1
    ap = 0.0
    for j, r in enumerate(positions):
        p0 = 1.0 if r == 0 else j / r
        p1 = (j + 1) / (r + 1)
        ap += (p0 + p1) * (1.0 / len(ok)) / 2.0
    prec = []
    for k in kappas:
        if not positions:
            prec.append(0.0)
            continue
        kq = min(positions[-1] + 1, k)
        prec.append(sum(1 for r in positions if r + 1 <= kq) / kq)
    return ap, prec


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_against_loop_reference(seed):
    rng = np.random.default_rng(seed)
    n_db, nq, kappas = 60, 7, [1, 5, 10]
    ranks = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)
    gnd = []
    for q in range(nq):
        ids = rng.permutation(n_db)
        n_ok = 0 if q == 3 else int(rng.integers(1, 12))
        n_junk = int(rng.integers(0, 8))
        gnd.append(_gnd(ids[:n_ok], ids[n_ok:n_ok + n_junk]))
    m, aps, pr, prs = compute_map(ranks, gnd, kappas)
    ref = [_reference_query(ranks[:, q], g["ok"], g["junk"], kappas) for q, g in enumerate(gnd)]
    valid = [q for q in range(nq) if len(gnd[q]["ok"])]
    for q in valid:
        assert aps[q] == pytest.approx(ref[q][0], rel=1e-12, abs=1e-15)
        np.testing.assert_allclose(prs[q], ref[q][1], rtol=1e-12)
    assert np.isnan(aps[3])
    assert m == pytest.approx(np.mean([ref[q][0] for q in valid]), rel=1e-12)
    np.testing.assert_allclose(pr, np.mean([ref[q][1] for q in valid], axis=0), rtol=1e-12)


def test_evaluate_revisited_single_and_per_protocol_rankings():
    rng = np.random.default_rng(5)
    n_db, nq = 40, 4
    gnd = []
    for _ in range(nq):
        ids = rng.permutation(n_db)
        gnd.append({"easy": ids[:3], "hard": ids[3:6], "junk": ids[6:8], "bbx": [0.0, 0.0, 5.0, 5.0]})
    mats = {p: np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)
            for p in ("easy", "medium", "hard")}
    protocols = build_protocols(gnd)

    single = evaluate_revisited(mats["medium"], gnd, kappas=(1, 5))
    for p in ("easy", "medium", "hard"):
        m, _, pr, _ = compute_map(mats["medium"], protocols[p], [1, 5])
        assert single[p]["mAP"] == m and single[p]["mP@k"] == {1: pr[0], 5: pr[1]}

    per = evaluate_revisited(mats, gnd, kappas=(1, 5))
    for p in ("easy", "medium", "hard"):
        m, aps, _, _ = compute_map(mats[p], protocols[p], [1, 5])
        assert per[p]["mAP"] == m
        np.testing.assert_array_equal(per[p]["aps"], aps)
    with pytest.raises(KeyError):
        evaluate_revisited({"easy": mats["easy"]}, gnd)


def test_metrics_in_percent_for_the_report():
    gnd = [{"easy": [0], "hard": [], "junk": []}, {"easy": [], "hard": [2], "junk": []}]
    ranks = np.array([[0, 1], [1, 2], [2, 0]])  # query 0: positive first; query 1: hard positive second (AP 1/4)
    out = metrics_percent(evaluate_revisited(ranks, gnd, kappas=(1, 2)))
    assert out["n_queries"] == {"easy": 1, "medium": 2, "hard": 1}
    assert out["mAP"]["easy"] == 100.0 and out["mAP"]["hard"] == 25.0 and out["mAP"]["medium"] == 62.5
    assert out["mP@k"]["hard"] == {"1": 0.0, "2": 50.0}
    # a protocol without a query that has positives: null, printed n/a
    none = metrics_percent(evaluate_revisited(ranks, [{"easy": [0], "hard": [], "junk": []}] * 2, kappas=(1,)))
    assert none["mAP"]["hard"] is None and none["n_queries"]["hard"] == 0
    assert format_percent(none["mAP"]["hard"]) == "n/a" and format_percent(12.345) == "12.35"


def test_recall_at_k_against_a_loop_with_junk_removed():
    rng = np.random.default_rng(3)
    n_db, nq, kappas = 30, 6, [1, 2, 5, 10]
    ranks = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)
    gnd = []
    for q in range(nq):
        ids = rng.permutation(n_db)
        gnd.append({"ok": ids[: 0 if q == 2 else 1 + q], "junk": ids[10:14]})
    gnd[0] = {"ok": [int(ranks[2, 0])], "junk": [int(ranks[0, 0]), int(ranks[1, 0])]}  # first after 2 junk: R@1
    mean, per_query = compute_recall(ranks, gnd, kappas)
    for q, g in enumerate(gnd):
        if not len(g["ok"]):
            assert np.isnan(per_query[q]).all()
            continue
        kept = [int(j) for j in ranks[:, q] if int(j) not in set(np.asarray(g["junk"]).tolist())]
        first = next(r for r, j in enumerate(kept, start=1) if j in set(np.asarray(g["ok"]).tolist()))
        assert per_query[q].tolist() == [float(first <= k) for k in kappas]
    assert per_query[0].tolist() == [1.0] * 4
    np.testing.assert_allclose(mean, np.nanmean(per_query, axis=0), rtol=1e-15)


def test_the_class_protocol_is_medium_with_recall_and_reads_a_per_protocol_ranking_at_medium():
    """A class folder's ground truth puts its positives in 'easy' and nothing in 'hard': its one protocol is
    revisitop's Medium, and a ranking given per protocol (CVNet's paper mode) is read at 'medium'."""
    rng = np.random.default_rng(9)
    n_db, nq = 25, 5
    gnd = [{"easy": rng.permutation(n_db)[:4], "hard": np.empty(0, np.int64), "junk": [q]} for q in range(nq)]
    mats = {p: np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1) for p in ("easy", "medium", "hard")}
    revisited = evaluate_revisited(mats, gnd, kappas=(1, 5))
    ours = evaluate_revisited(mats, gnd, kappas=(1, 5), protocols=CLASS_PROTOCOLS, recall=True)
    assert list(ours) == ["class"]
    assert ours["class"]["mAP"] == revisited["medium"]["mAP"] and ours["class"]["mP@k"] == revisited["medium"]["mP@k"]
    np.testing.assert_array_equal(ours["class"]["aps"], revisited["medium"]["aps"])
    recall = compute_recall(mats["medium"], build_protocols(gnd)["medium"], [1, 5])[0]
    assert ours["class"]["recall@k"] == {1: recall[0], 5: recall[1]}
    out = metrics_percent(ours)
    assert set(out) == {"mAP", "mP@k", "recall@k", "n_queries"} and out["n_queries"] == {"class": nq}
    assert out["recall@k"]["class"]["5"] == 100 * recall[1]
    assert "recall@k" not in metrics_percent(revisited) and "recall@k" not in revisited["medium"]


# --- metric regression fixture: revisitop's precomputed R-GeM features ----------------------------------

_EXPECTED = {"roxford5k": (84.81, 64.67, 38.47), "rparis6k": (92.12, 77.20, 56.32)}


def _find(root: Path, dataset: str, filename: str) -> Path | None:
    for folder in (root, root / "features", root / dataset, root / "datasets" / dataset):
        if (folder / filename).is_file():
            return folder / filename
    return None


@pytest.mark.parametrize("dataset", ["roxford5k", "rparis6k"])
def test_revisitop_regression_fixture(dataset):
    data = os.environ.get("REVISITOP_DATA")
    if not data:
        pytest.skip("set REVISITOP_DATA to a folder holding revisitop's gnd_<name>.pkl and "
                    "<name>_resnet_rsfm120k_gem.mat (python prepare_data.py download --root DATA "
                    "--datasets roxford5k rparis6k revisitop-features)")
    root = Path(data)
    mat = _find(root, dataset, f"{dataset}_resnet_rsfm120k_gem.mat")
    gnd_file = _find(root, dataset, f"gnd_{dataset}.pkl")
    if mat is None or gnd_file is None:
        pytest.skip(f"{dataset}_resnet_rsfm120k_gem.mat or gnd_{dataset}.pkl not found under {root}")
    from scipy.io import loadmat

    from datasets.revisited import load_ground_truth

    features = loadmat(str(mat))
    X, Q = features["X"], features["Q"]  # (d, n_db), (d, n_queries): descriptors are columns
    ranks = np.argsort(-(X.T @ Q), axis=0)  # (n_db, n_queries)
    gnd = load_ground_truth(gnd_file)["gnd"]
    res = evaluate_revisited(ranks, gnd, kappas=(1, 5, 10))
    got = tuple(round(100 * res[p]["mAP"], 2) for p in ("easy", "medium", "hard"))
    assert got == _EXPECTED[dataset]
    assert len(gnd) == 70 and ranks.shape[1] == 70


def test_precision_recall_points_by_hand_with_junk_removed():
    # ranking: pos, junk, neg, pos, neg, pos; after junk removal the positives sit at 0, 2, 4 of 4 positives
    recall, precision = precision_recall(np.array([10, 11, 12, 13, 14, 15]), np.array([10, 13, 15, 99]),
                                         np.array([11]))
    assert recall.tolist() == [0.25, 0.5, 0.75]
    assert precision == pytest.approx([1.0, 2 / 3, 3 / 5])
    assert precision_recall(np.array([1, 2]), np.array([], dtype=int), np.array([]))[0].size == 0


def test_interpolated_precision_takes_the_best_precision_at_or_beyond_each_recall():
    recall, precision = np.array([0.25, 0.5, 0.75]), np.array([0.5, 2 / 3, 0.6])
    levels = np.array([0.0, 0.25, 0.5, 0.6, 0.75, 1.0])
    assert interpolated_precision(recall, precision, levels) == pytest.approx([2 / 3, 2 / 3, 2 / 3, 0.6, 0.6, 0.0])


def test_mean_precision_recall_averages_queries_with_positives():
    ranks = np.array([[0, 1], [1, 0], [2, 2]])  # (n_db 3, nq 2)
    gnd = [{"ok": np.array([0]), "junk": np.array([], dtype=int)},
           {"ok": np.array([0]), "junk": np.array([], dtype=int)}]
    curve = mean_precision_recall(ranks, gnd)
    assert curve.shape == PR_RECALL_LEVELS.shape and curve == pytest.approx(np.full(21, 0.75))  # (1 + 1/2) / 2
    empty = [{"ok": np.array([], dtype=int)}] * 2
    assert np.isnan(mean_precision_recall(ranks, empty)).all()
    # the area under the interpolated curve is an upper bound of a query's AP
    rng = np.random.default_rng(0)
    ranking = rng.permutation(50)
    ok = rng.choice(50, 7, replace=False)
    r, p = precision_recall(ranking, ok, np.array([], dtype=int))
    ap = compute_map(ranking[:, None], [{"ok": ok}])[0]
    assert np.trapezoid(interpolated_precision(r, p, np.linspace(0, 1, 1001)), dx=1e-3) >= ap - 1e-3
