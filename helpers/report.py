"""The evaluation report: Markdown tables in the papers' layout (with the papers' figures beside ours when they are
comparable), warning banners, stage timings, and the files of a run directory: ``results.json`` (aggregates and,
under ``per_query``, each query's APs and top results), ``results.md``, ``report.html`` (helpers.report_html)
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
import yaml

from common.io import atomic_write
from helpers.evaluation import PR_RECALL_LEVELS, PROTOCOLS, format_percent
from helpers.visualize import GROUND_TRUTH_LEGEND, Tile, save_ranking_grid

if TYPE_CHECKING:
    from helpers.eval_detail import RankingDetail
    from helpers.eval_pipeline import EvalOutcome, WeightsPlan

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
NOT_COMPARABLE = ("Built-in synthetic benchmark: these numbers are NOT comparable with the papers' tables "
                  "(revisited Oxford / Paris); they check that the pipeline runs and learns.")
DATASET_SHORT = {"roxford5k": "ROxf", "rparis6k": "RPar"}
METHOD_TITLES = {
    "cvnet_global": "CVNet-Global",
    "cvnet_rerank": "CVNet-Global + CVNet-Rerank",
    "superglobal": "SuperGlobal",
    "superglobal_rerank": "SuperGlobal + re-ranking",
    "timm_global": "timm global model",
}


def dataset_title(label: str) -> str:
    """``roxford5k+1m`` -> ``ROxf+1M``; names without a short form stay as they are."""
    base, plus = (label[:-3], "+1M") if label.endswith("+1m") else (label, "")
    return DATASET_SHORT.get(base, base) + plus


def method_title(method: str, *, depth: int, mode: str | None = None, arch: str | None = None) -> str:
    if method == "timm_global":  # not a ResNet of the releases: named by its architecture
        return f"{arch or 'timm'} (global)"
    title = f"{METHOD_TITLES[method]} R{depth}"
    return f"{title} ({mode} mode)" if method == "cvnet_rerank" and mode else title


def row_titles(rows: Sequence[str], post: Mapping[str, Mapping[str, Any]], *, depth: int, mode: str | None,
               arch: str | None = None) -> dict[str, str]:
    """Each reported row's title: a method's (:func:`method_title`), or for a post-processed row its global
    ranking's followed by what was applied, e.g. ``SuperGlobal R50 + α-DBA k=2 α=3 + α-QE k=2 α=3``. The global
    rankings are titled too, reported or not: a re-ranked row names the ranking it started from."""
    titles = {kind: method_title(kind, depth=depth, arch=arch) for kind in ("cvnet_global", "superglobal",
                                                                            "timm_global")}
    titles.update({row: (f"{titles[post[row]['base']]} + {post[row]['applied']}" if row in post
                         else method_title(row, depth=depth, mode=mode, arch=arch)) for row in rows})
    return titles


def payload_titles(payload: Mapping[str, Any]) -> dict[str, str]:
    """The row titles of a ``results.json`` payload (computed for one written before they were recorded)."""
    if payload.get("titles"):
        return dict(payload["titles"])
    cfg = payload["config"]
    return row_titles(payload["methods"], payload.get("post_rows") or {}, depth=int(cfg["model"]["depth"]),
                      mode=cfg["rerank"]["cvnet"]["mode"], arch=(cfg["model"].get("timm") or {}).get("arch"))


# --------------------------------------------------------------------------------------------------------------
# Paper figures
# --------------------------------------------------------------------------------------------------------------


def load_paper_results(path: str | os.PathLike | None) -> dict[str, Any]:
    """The rows of ``configs/paper_results.yaml`` (a relative path not found here is taken from the repository)."""
    if not path:
        return {}
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = REPO / path
    if not path.is_file():
        logger.warning("paper results file %s not found: no paper figures printed", path)
        return {}
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return data.get("rows", {})


def paper_figure(rows: Mapping[str, Any], *, method: str, depth: int, label: str, protocol: str
                 ) -> dict[str, Any] | None:
    """The paper's figure {'value', 'confirmed', 'source', 'note'?} for a (method, depth, dataset, protocol)."""
    for row in rows.values():
        if row.get("method") == method and int(row.get("depth", -1)) == depth:
            fig = (row.get("mAP", {}).get(label) or {}).get(protocol)
            if fig is None:
                return None
            out = {"value": float(fig["value"]), "confirmed": bool(fig.get("confirmed", False)),
                   "source": row.get("source")}
            if fig.get("note"):
                out["note"] = fig["note"]
            return out
    return None


def format_paper(fig: Mapping[str, Any] | None) -> str:
    """``75.6`` for a confirmed figure, ``75.6*`` for one not yet checked against the paper, "" for none."""
    if fig is None:
        return ""
    return f"{fig['value']:.1f}" + ("" if fig["confirmed"] else "*")


def comparability_notes(cfg: Mapping[str, Any], plan: WeightsPlan, builtin: bool) -> tuple[bool, list[str]]:
    """Whether paper figures are printed beside ours, and the notes on what differs from the papers' setup."""
    notes: list[str] = []
    if cfg["extraction"].get("flip"):
        notes.append("Every descriptor of this run averages the image's and its mirror image's (extraction.flip); "
                     "the papers' rows use no flip.")
    if builtin:
        return False, [NOT_COMPARABLE, *notes]
    if plan.source != "official":
        return False, notes + ["Paper figures are printed only with the official weights (model.weights=...)."]
    if cfg["rerank"]["cvnet"]["mode"] != "paper" and "cvnet_rerank" in cfg["methods"]:
        notes.append("CVNet re-ranking ran in 'clean' mode (first 100 of the global ranking, no ground truth); "
                     "the paper's figures used the released protocol: rerank.cvnet.mode=paper.")
    sg = cfg["model"]["superglobal"]
    off = [k for k in ("gemp", "rgem", "sgem", "relup") if not sg.get(k, True)]
    if off and any(m.startswith("superglobal") for m in cfg["methods"]):
        notes.append(f"SuperGlobal ran with {', '.join(off)} switched off; the paper's rows use all four.")
    if sg.get("antialias", True) and any(m.startswith("superglobal") for m in cfg["methods"]):
        notes.append("SuperGlobal's Scale-GeM resize ran with antialias=True; the release's 2023 code ran under "
                     "torchvision <= 0.16, which did not antialias tensors, so the published rows were most likely "
                     "computed with antialias=False (model.superglobal.antialias=false, as the paper-row configs).")
    return True, notes


# --------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------


def markdown_tables(*, results: Mapping[str, Mapping[str, Any]], methods: Sequence[str], depth: int, mode: str,
                    paper_rows: Mapping[str, Any], show_paper: bool, kappas: Sequence[int],
                    titles: Mapping[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """The papers' layout (rows = methods, columns = dataset x {Medium, Hard} mAP, the paper's figure in
    brackets), then per dataset the full E/M/H mAP and mP@k. ``methods``: the rows in order (post-processed rows
    included, titled by ``titles``). Returns (markdown, paper figures used)."""
    labels = list(results)
    used: dict[str, Any] = {}
    titles = dict(titles or {})
    titles.update({m: method_title(m, depth=depth, mode=mode) for m in methods if m not in titles})
    head = ["Method"] + [f"{dataset_title(lb)} {p}" for lb in labels for p in ("M", "H")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells = [titles[method]]
        for lb in labels:
            for p in ("medium", "hard"):
                ours = format_percent(results[lb][method]["mAP"][p])
                fig = paper_figure(paper_rows, method=method, depth=depth, label=lb, protocol=p) if show_paper \
                    else None
                if fig is not None:
                    used.setdefault(lb, {}).setdefault(method, {})[p] = fig
                    ours += f" [{format_paper(fig)}]"
                cells.append(ours)
        lines.append("| " + " | ".join(cells) + " |")
    out = ["### mAP (%), Medium and Hard" + (" — [paper], * = figure not yet confirmed against the paper"
                                             if used else ""), "", *lines]
    for lb in labels:
        head = (["Method", "mAP E", "mAP M", "mAP H"]
                + [f"mP@{k} {p}" for p in ("M", "H") for k in kappas])
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in methods:
            r = results[lb][method]
            cells = [titles[method]]
            cells += [format_percent(r["mAP"][p]) for p in PROTOCOLS]
            cells += [format_percent(r["mP@k"][p][str(k)]) for p in ("medium", "hard") for k in kappas]
            rows.append("| " + " | ".join(cells) + " |")
        nq = results[lb][methods[0]]["n_queries"]
        out += ["", f"### {lb}: mAP E/M/H and mP@k (%) — queries with positives: "
                    f"E {nq['easy']}, M {nq['medium']}, H {nq['hard']}", "", *rows]
    return "\n".join(out), used


def banner(lines: Sequence[str]) -> str:
    """Lines framed by rows of ``!`` so that they are not missed in a log."""
    bar = "!" * 100
    return "\n".join([bar, *[f"!! {ln}" for ln in lines], bar])


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
                ap = format_percent(m["ap"]["medium"][i])
                title = f"{label}  {titles[method]}  query {i}  AP(M) {ap}"
                path = save_ranking_grid(run_dir / "grids" / f"{label}_{method}_q{i:03d}.png", query=qset.read(i),
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
        "ap": {p: _percent_list(detail.aps[p]) for p in PROTOCOLS},
        "top_ids": detail.ids.tolist(),
        "scores": [[None if np.isnan(v) else float(v) for v in row] for row in detail.scores],
        "labels": detail.labels,
        "score_source": detail.score_source,
        "pr": {p: [None if np.isnan(v) else float(v) for v in detail.precision[p]] for p in PROTOCOLS},
    }


def ap_change(after: Sequence[float | None], before: Sequence[float | None]) -> list[float | None]:
    """Per query, ``after - before`` (None where either is None: a query without positives)."""
    return [None if a is None or b is None else a - b for a, b in zip(after, before)]


def per_query_payload(outcome: EvalOutcome, methods: Sequence[str], top: int) -> dict[str, Any]:
    """``results.json``'s ``per_query``: per dataset, the query names, the names of the database items listed,
    and per method the per-query AP (percent, None without positives) per protocol, each query's ``top`` ids
    (Medium ranking), scores (None where the engine gives none), labels and the mean precision-recall curve
    (``pr``: interpolated precision as a fraction at ``pr_recall_levels``); a re-ranking method adds the same for
    the global ranking it started from (``before``) and the per-query AP change (``ap_change``)."""
    datasets: dict[str, Any] = {}
    for label in outcome.results:
        qset, reader = outcome.query_set(label), outcome.db_reader(label)
        entry: dict[str, Any] = {"queries": [os.path.basename(p) for p in qset.image_paths], "methods": {}}
        listed: set[int] = set()
        for method in methods:
            detail = outcome.details[(label, method)]
            m = _ranking_payload(detail.after)
            m["before"], m["ap_change"] = None, None
            listed.update(detail.after.ids.reshape(-1).tolist())
            if detail.before is not None:
                m["before"] = {"method": detail.base, **_ranking_payload(detail.before)}
                m["ap_change"] = {p: ap_change(m["ap"][p], m["before"]["ap"][p]) for p in PROTOCOLS}
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
        from helpers.report_html import render_report

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


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def per_query_markdown(per_query: Mapping[str, Any], methods: Sequence[str], *, titles: Mapping[str, str]) -> str:
    """Per dataset and row, a table of each query's AP (%) under Easy / Medium / Hard and, for a re-ranking
    method or a post-processed row, its change from the global ranking it re-ordered."""
    out = ["## Per-query AP (%)", "",
           "AP change (dAP) = AP after re-ranking - AP of the global ranking it re-ordered; n/a: the query has no "
           "positive under that protocol. Top results, scores and precision-recall curves: report.html."]
    for label, ds in per_query["datasets"].items():
        for method in methods:
            m = ds["methods"][method]
            title = titles[method]
            head = ["#", "query", *(f"AP {p[0].upper()}" for p in PROTOCOLS)]
            if m["before"] is not None:
                title += f" (before: {titles[m['before']['method']]})"
                head += [f"dAP {p[0].upper()}" for p in PROTOCOLS]
            out += ["", f"### {label}: {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for i, name in enumerate(ds["queries"]):
                cells = [str(i), name, *(format_percent(m["ap"][p][i]) for p in PROTOCOLS)]
                if m["ap_change"] is not None:
                    cells += [_signed(m["ap_change"][p][i]) for p in PROTOCOLS]
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def results_markdown(payload: Mapping[str, Any]) -> str:
    """``results.md``: warnings, weights, the tables, notes, per-query APs and timings of a ``results.json``."""
    out = [f"# Evaluation results: {Path(payload['run_dir']).name}", ""]
    for w in payload["warnings"]:
        out += [f"> **Warning:** {w}", ""]
    out += [f"Weights: {payload['weights']}", ""]
    out += [f"Weights sha256: `{h}` {p}" for p, h in (payload.get("weights_sha256") or {}).items()]
    out += ["", payload["table_markdown"]]
    if payload["notes"]:
        out += ["", *[f"Note: {n}" for n in payload["notes"]]]
    if payload.get("post_rows"):
        out += ["", "Post-processed rows (each a copy of a global ranking, with the steps listed applied):"]
        out += [f"- `{key}`: {row['applied']}" for key, row in payload["post_rows"].items()]
    if payload.get("exports"):
        out += ["", *[f"Export for AMES / LoCoRe ({name}): {Path(e['files']['shortlist']).parent} — {e['shortlist']}"
                      for name, e in payload["exports"].items()]]
    if payload.get("per_query"):
        titles = payload_titles(payload)
        out += ["", per_query_markdown(payload["per_query"], payload["methods"], titles=titles)]
    out += ["", "## Wall time per stage (s)", "", "| stage | s |", "|---|---|"]
    out += [f"| {k} | {v:.1f} |" for k, v in payload["timings_s"].items()]
    return "\n".join(out) + "\n"


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
