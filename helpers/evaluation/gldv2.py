"""The GLDv2 retrieval test (Weyand et al., CVPR 2020) as eval.py runs it (``data.datasets=[gldv2-retrieval-test]``):
the global ranking, optionally SuperGlobal re-ranking, and the challenge's mAP@100 on the Public and Private queries
(docs/evaluation.md, GLDv2 retrieval test).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from helpers.builders import GLOBAL_KINDS
from helpers.config import ConfigError
from helpers.evaluation.data import Descriptors, rank_descriptors
from helpers.evaluation.metrics import gldv2_mean_average_precision
from helpers.evaluation.models import load_models, needed_models, scales_for
from helpers.evaluation.rerank import run_superglobal_rerank
from helpers.evaluation.run import extract_descriptors, extraction_settings

log = logging.getLogger(__name__)

GLDV2_TEST = "gldv2-retrieval-test"
MAX_PREDICTIONS = 100
# CVNet re-ranking of 100 candidates per query (~1,100 x 100 pairs) is not run here: a config asking for it is refused
SUPPORTED_METHODS = ("cvnet_global", "superglobal", "superglobal_rerank")


def predictions_from_ranks(ranks: np.ndarray, query_ids: list[str], index_ids: list[str],
                           k: int = MAX_PREDICTIONS) -> dict[str, list[str]]:
    """{test id: its top-``k`` index ids} from a ranking matrix (n_index, n_queries)."""
    top = ranks[:k]
    return {q: [index_ids[j] for j in top[:, i].tolist()] for i, q in enumerate(query_ids)}


def score_predictions(predictions: Mapping[str, list[str]], solution: Any) -> dict[str, float]:
    """mAP@100 (percent) on the Public and Private queries of a retrieval solution."""
    out = {}
    for subset in ("public", "private"):
        truth = getattr(solution, subset)
        if truth:
            mine = {q: predictions[q] for q in truth if q in predictions}
            out[subset] = 100 * gldv2_mean_average_precision(mine, truth, max_predictions=MAX_PREDICTIONS)
    return out


def run_gldv2_evaluation(cfg: Mapping[str, Any], *, env: Any) -> dict[str, Any]:
    """Evaluate the configured methods on the GLDv2 retrieval test; returns {"results": {method: {"public",
    "private"}}, "weights", "weights_sha256", "n_queries", "n_index"}. The stages are the revisited run's
    (helpers.evaluation.run): models, one extraction per (split, model), the global ranking, SuperGlobal
    re-ranking.

    The test images are the Public and Private queries of ``retrieval_solution_v2.1.csv``, ranked against the
    index images by the global descriptors (CVNet-Global, SuperGlobal), optionally re-ranked by SuperGlobal, and
    scored with the challenge's mAP@100 (:func:`helpers.evaluation.gldv2_mean_average_precision`) on the Public and
    Private subsets separately, as the challenge and the SuperGlobal paper report them. Layout under
    ``<data.root>/gldv2``: :class:`datasets.gldv2.GLDv2RetrievalTest`.
    """
    from datasets.gldv2 import GLDv2RetrievalTest

    methods = list(cfg["methods"])
    unsupported = [m for m in methods if m not in SUPPORTED_METHODS]
    if unsupported:
        raise ConfigError(f"methods {unsupported} are not run on {GLDV2_TEST}; use some of {list(SUPPORTED_METHODS)}")
    data_cfg, model_cfg = cfg["data"], cfg["model"]
    root = os.path.join(os.fspath(data_cfg["root"]), "gldv2")
    needed = needed_models(methods)
    models = load_models(needed=needed, model_cfg=model_cfg, seed=int(cfg.get("seed", 0)), device=env.device)
    extract_kw = extraction_settings(cfg, env)
    results: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for kind in sorted(needed & set(GLOBAL_KINDS)):
        sets = {split: GLDv2RetrievalTest(root, split, convention=models.models[kind].input_convention,
                                          scales=scales_for(kind, model_cfg), min_side=data_cfg.get("min_side"))
                for split in ("test", "index")}
        vectors = {split: extract_descriptors(models, kind, ds, label=f"{GLDV2_TEST}-{split}-{kind}",
                                              extract_kw=extract_kw) for split, ds in sets.items()}
        if not env.is_main:
            continue
        ranked = rank_descriptors(Descriptors(query=vectors["test"], db=vectors["index"]), device=env.device)
        test, index = sets["test"], sets["index"]
        counts = {"n_queries": len(test), "n_index": len(index)}
        if kind in methods:
            results[kind] = score_predictions(predictions_from_ranks(ranked.ranks, test.ids, index.ids),
                                              test.solution)
        if kind == "superglobal" and "superglobal_rerank" in methods:
            reranked, _ = run_superglobal_rerank(ranked, cfg["rerank"]["superglobal"], device=env.device)
            results["superglobal_rerank"] = score_predictions(predictions_from_ranks(reranked, test.ids, index.ids),
                                                              test.solution)
    return {"dataset": GLDV2_TEST, "results": results, "weights": models.plan.description,
            "weights_sha256": models.sha256, "warnings": list(models.plan.warnings), **counts}


def gldv2_table(outcome: Mapping[str, Any], *, depth: int) -> str:
    """The Markdown table of a GLDv2 run: mAP@100 on the Public and Private queries."""
    titles = {"cvnet_global": "CVNet-Global", "superglobal": "SuperGlobal", "superglobal_rerank":
              "SuperGlobal + re-ranking"}
    lines = [f"### {GLDV2_TEST}: mAP@100 (%) — {outcome.get('n_queries', '?')} queries, "
             f"{outcome.get('n_index', '?')} index images", "", "| Method | Public | Private |", "|---|---|---|"]
    for method, r in outcome["results"].items():
        cells = [f"{r[s]:.2f}" if s in r else "n/a" for s in ("public", "private")]
        lines.append(f"| {titles[method]} R{depth} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def write_gldv2_report(*, cfg: Mapping[str, Any], outcome: Mapping[str, Any], run_dir: Any,
                       start: float | None = None) -> str:
    """Write results.json and results.md of a GLDv2 run into ``run_dir``; returns the printable text."""
    import json
    import time
    from pathlib import Path

    from common.io import atomic_write

    table = gldv2_table(outcome, depth=int(cfg["model"]["depth"]))
    text = "\n".join([*(f"WARNING: {w}" for w in outcome.get("warnings", [])), f"weights: {outcome['weights']}",
                      "", table])
    elapsed = None if start is None else round(time.perf_counter() - start, 1)
    payload = {**outcome, "total_s": elapsed, "unit": "percent", "metric": "mAP@100", "table_markdown": table,
               "config": dict(cfg)}
    run_dir = Path(run_dir)
    atomic_write(run_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2) + "\n"))
    atomic_write(run_dir / "results.md", lambda tmp: Path(tmp).write_text(text + "\n"))
    return text + f"\n\nresults: {run_dir / 'results.json'}"
