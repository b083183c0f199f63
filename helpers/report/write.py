"""The evaluation report: Markdown tables in the papers' layout (with the papers' figures beside ours when they are
comparable), warning banners, stage timings, and the files of a run directory: ``results.json`` (aggregates and,
under ``per_query``, each query's APs and top results), ``results.md``, ``report.html`` (helpers.report.html)
and the result grids.

    run_dir = new_run_dir("runs/eval", None)
    print(write_report(cfg=cfg, outcome=run_evaluation(cfg), run_dir=run_dir, start=start))
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.io import atomic_write
from datasets.folder import ClassFolderSet
from helpers.evaluation.data import file_name, item_names
from helpers.evaluation.metrics import PR_RECALL_LEVELS, format_percent
from helpers.report.markdown import banner, markdown_tables, results_markdown
from helpers.report.titles import (
    NOT_COMPARABLE,
    ap_name,
    comparability_notes,
    load_paper_results,
    row_titles,
    shown_protocol,
)
from helpers.visualize import GROUND_TRUTH_LEGEND, Tile, save_ranking_grid

if TYPE_CHECKING:
    from helpers.evaluation.detail import RankingDetail
    from helpers.evaluation.run import EvalOutcome

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Paper figures
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------------------------


def new_run_dir(output_dir: str | os.PathLike, name: str | None) -> Path:
    """``<output_dir>/<name>`` (re-used), or ``<output_dir>/<timestamp>`` made unique with a ``-k`` suffix."""
    base = Path(output_dir) / (name or time.strftime("%Y%m%d-%H%M%S"))
    run_dir, k = base, 1
    while name is None and run_dir.exists():
        k += 1
        run_dir = base.with_name(f"{base.name}-{k}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_result_grids(*, per_query: Mapping[str, Any], outcome: EvalOutcome, methods: Sequence[str],
                      run_dir: Path, num_queries: int, height: int, titles: Mapping[str, str]) -> list[str]:
    """PNG grids (:func:`helpers.visualize.save_ranking_grid`) of the first ``num_queries`` queries' top results,
    per (dataset, method), under ``run_dir/grids``; ``per_query`` is :func:`per_query_payload`'s output."""
    grids: list[str] = []
    for label, ds in per_query["datasets"].items():
        qset, reader = outcome.query_set(label), outcome.db_reader(label)
        for method in methods:
            m = ds["methods"][method]
            for i in range(min(num_queries, len(ds["queries"]))):
                hits = [Tile(reader.read(j), label=lab, rank=r, score=score, name=ds["db_names"][str(j)])
                        for r, (j, lab, score) in enumerate(zip(m["top_ids"][i], m["labels"][i], m["scores"][i]),
                                                             start=1)]
                shown = shown_protocol(m["ap"])
                ap = format_percent(m["ap"][shown][i])
                title = f"{label}  {titles[method]}  query {i}  {ap_name(shown)} {ap}"
                path = save_ranking_grid(run_dir / "grids" / f"{file_name(label)}_{method}_q{i:03d}.png",
                                         query=qset.read(i),
                                         hits=hits, tile=height, query_name=ds["queries"][i], title=title,
                                         legend=GROUND_TRUTH_LEGEND)
                grids.append(os.fspath(path))
    logger.info("wrote %d result grids to %s", len(grids), run_dir / "grids")
    return grids


# --------------------------------------------------------------------------------------------------------------
# Per-query results
# --------------------------------------------------------------------------------------------------------------


def _percent_list(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else 100.0 * float(v) for v in values]


def _ranking_payload(detail: RankingDetail) -> dict[str, Any]:
    return {
        "ap": {p: _percent_list(aps) for p, aps in detail.aps.items()},
        "top_ids": detail.ids.tolist(),
        "scores": [[None if np.isnan(v) else float(v) for v in row] for row in detail.scores],
        "labels": detail.labels,
        "score_source": detail.score_source,
        "pr": {p: [None if np.isnan(v) else float(v) for v in curve] for p, curve in detail.precision.items()},
    }


def ap_change(after: Sequence[float | None], before: Sequence[float | None]) -> list[float | None]:
    """Per query, ``after - before`` (None where either is None: a query without positives)."""
    return [None if a is None or b is None else a - b for a, b in zip(after, before)]


def per_query_payload(outcome: EvalOutcome, methods: Sequence[str], top: int) -> dict[str, Any]:
    """``results.json``'s ``per_query``: per dataset, the query names, the names of the database items listed,
    and per method the per-query AP (percent, None without positives) per protocol, each query's ``top`` ids
    (Medium ranking), scores (None where the engine gives none), labels and the mean precision-recall curve
    (``pr``: interpolated precision as a fraction at ``pr_recall_levels``); a re-ranking method adds the same for
    the global ranking it started from (``before``) and the per-query AP change (``ap_change``). The protocols are
    the dataset's (the keys of ``ap``); a class folder's entry lists each query's class (``query_classes``) and
    names its images ``<class>/<file>``."""
    datasets: dict[str, Any] = {}
    for label in outcome.results:
        qset, reader = outcome.query_set(label), outcome.db_reader(label)
        entry: dict[str, Any] = {"queries": item_names(qset), "methods": {}}
        if isinstance(qset, ClassFolderSet):
            entry["query_classes"] = list(qset.labels)
        listed: set[int] = set()
        for method in methods:
            detail = outcome.details[(label, method)]
            m = _ranking_payload(detail.after)
            m["before"], m["ap_change"] = None, None
            listed.update(detail.after.ids.reshape(-1).tolist())
            if detail.before is not None:
                m["before"] = {"method": detail.base, **_ranking_payload(detail.before)}
                m["ap_change"] = {p: ap_change(m["ap"][p], m["before"]["ap"][p]) for p in m["ap"]}
                listed.update(detail.before.ids.reshape(-1).tolist())
            entry["methods"][method] = m
        entry["db_names"] = {str(j): reader.name(j) for j in sorted(listed)}
        datasets[label] = entry
    return {"top": top, "ap_unit": "percent", "ranking_shown": "medium", "pr_unit": "fraction",
            "pr_recall_levels": [float(r) for r in PR_RECALL_LEVELS], "datasets": datasets}


class OutcomeImages:
    """The images of a run for the HTML report: ``query(label, i)`` (the crop) and ``item(label, j)``, uint8 BGR."""

    def __init__(self, outcome: EvalOutcome) -> None:
        self.outcome = outcome

    def query(self, label: str, i: int) -> np.ndarray:
        return self.outcome.query_set(label).read(i)

    def item(self, label: str, j: int) -> np.ndarray:
        return self.outcome.db_reader(label).read(j)


def write_report(*, cfg: Mapping[str, Any], outcome: EvalOutcome, run_dir: Path, start: float) -> str:
    """Print-ready text (banners, tables, timings); writes results.json and the result grids into ``run_dir``.
    ``start``: the run's ``time.perf_counter()`` at launch, for the total wall time."""
    plan, timer = outcome.plan, outcome.timer
    methods = list(cfg["methods"])
    rows = list(outcome.rows) or methods  # the methods and the post-processed rows, in report order
    show_paper, notes = comparability_notes(cfg, plan, outcome.builtin)

    viz, depth, mode = cfg["viz"], int(cfg["model"]["depth"]), cfg["rerank"]["cvnet"]["mode"]
    titles = row_titles(rows, outcome.post, depth=depth, mode=mode, arch=(cfg["model"].get("timm") or {}).get("arch"))
    per_query = per_query_payload(outcome, rows, int(viz["top"])) if outcome.details else None
    grids: list[str] = []
    if int(viz["num_queries"]) > 0 and per_query is not None:
        with timer.stage("result grids"):  # the methods' rows; report.html shows every row's top results
            grids = save_result_grids(per_query=per_query, outcome=outcome, methods=methods, run_dir=run_dir,
                                      num_queries=int(viz["num_queries"]), height=int(viz["height"]),
                                      titles=titles)

    table, used = markdown_tables(results=outcome.results, methods=rows, depth=depth, mode=mode,
                                  paper_rows=load_paper_results(cfg.get("paper_results")), show_paper=show_paper,
                                  kappas=[int(k) for k in cfg["eval"]["kappas"]], titles=titles)
    warn = list(plan.warnings) + ([NOT_COMPARABLE] if outcome.builtin else [])
    timings = dict(timer.stages)
    timings["total"] = time.perf_counter() - start
    payload = {
        "weights": plan.description,
        "weights_source": plan.source,
        "weights_sha256": outcome.weights_sha256,
        "warnings": warn,
        "comparable_with_papers": show_paper,
        "notes": notes,
        "unit": "percent",
        "datasets": list(outcome.results),
        "methods": rows,
        "titles": titles,
        "post_rows": outcome.post,
        "results": outcome.results,
        "paper": used,
        "table_markdown": table,
        "timings_s": timings,
        "grids": grids,
        "run_dir": os.fspath(run_dir),
        "config": cfg,
        "per_query": per_query,
        "exports": outcome.exports,
        "files": {"markdown": "results.md", "html": "report.html" if per_query is not None else None},
    }
    if per_query is not None:
        from helpers.report.html import render_report

        with timer.stage("html report"):
            html = render_report(payload, images=OutcomeImages(outcome))
        atomic_write(run_dir / "report.html", lambda tmp: Path(tmp).write_text(html, encoding="utf-8"))
    write_json(run_dir / "results.json", payload)
    atomic_write(run_dir / "results.md", lambda tmp: Path(tmp).write_text(results_markdown(payload),
                                                                          encoding="utf-8"))

    parts = []
    if warn:
        parts += [banner(warn), ""]
    parts += [f"weights: {plan.description}"]
    parts += [f"weights sha256: {h}  {p}" for p, h in outcome.weights_sha256.items()]
    parts += ["", table]
    if notes:
        parts += ["", *[f"note: {n}" for n in notes]]
    parts += ["", "### wall time per stage (s)", "", "| stage | s |", "|---|---|"]
    parts += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    for export in outcome.exports.values():
        folder = Path(export["files"]["shortlist"]).parent
        parts += ["", f"export for AMES / LoCoRe: {folder} ({export['shortlist']})"]
    parts += ["", f"results: {run_dir / 'results.json'}, {run_dir / 'results.md'}"]
    if per_query is not None:
        parts += [f"report:  {run_dir / 'report.html'} (open it in a browser)"]
    if warn:
        parts += ["", banner(warn)]
    return "\n".join(parts)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Indented JSON (numpy scalars and paths converted), written atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, default=_json_default)
            f.write("\n")

    atomic_write(path, write)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
