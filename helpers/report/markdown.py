"""The Markdown of an evaluation report: the papers' table layout with their figures beside ours, per-dataset
metric tables, and the per-query AP table. A dataset is reported under its own protocols (the keys of its
results: revisited Easy / Medium / Hard, or a class folder's one, with recall@k)."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from helpers.evaluation.metrics import PROTOCOLS, format_percent
from helpers.report.titles import (
    dataset_title,
    format_paper,
    method_title,
    paper_figure,
    payload_titles,
    protocol_letter,
)

logger = logging.getLogger(__name__)


def markdown_tables(*, results: Mapping[str, Mapping[str, Any]], methods: Sequence[str], depth: int, mode: str,
                    paper_rows: Mapping[str, Any], show_paper: bool, kappas: Sequence[int],
                    titles: Mapping[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """The papers' layout (rows = methods, columns = dataset x {Medium, Hard} mAP, the paper's figure in
    brackets; a class folder's one mAP), then per dataset the full E/M/H mAP and mP@k (a class folder's mAP,
    recall@k and mP@k). ``methods``: the rows in order (post-processed rows included, titled by ``titles``).
    Returns (markdown, paper figures used)."""
    labels = list(results)
    used: dict[str, Any] = {}
    titles = dict(titles or {})
    titles.update({m: method_title(m, depth=depth, mode=mode) for m in methods if m not in titles})
    columns = {lb: _summary_columns(results[lb][methods[0]]["mAP"]) for lb in labels}
    head = ["Method"] + [f"{dataset_title(lb)} {c}" for lb in labels for _, c in columns[lb]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells = [titles[method]]
        for lb in labels:
            for p, _ in columns[lb]:
                ours = format_percent(results[lb][method]["mAP"][p])
                fig = paper_figure(paper_rows, method=method, depth=depth, label=lb, protocol=p) if show_paper \
                    else None
                if fig is not None:
                    used.setdefault(lb, {}).setdefault(method, {})[p] = fig
                    ours += f" [{format_paper(fig)}]"
                cells.append(ours)
        lines.append("| " + " | ".join(cells) + " |")
    revisited = all(list(results[lb][methods[0]]["mAP"]) == list(PROTOCOLS) for lb in labels)
    out = [("### mAP (%), Medium and Hard" if revisited else "### mAP (%)")
           + (" — [paper], * = figure not yet confirmed against the paper" if used else ""), "", *lines]
    for lb in labels:
        if list(results[lb][methods[0]]["mAP"]) != list(PROTOCOLS):
            out += ["", *_protocol_table(lb, results[lb], methods, titles=titles, kappas=kappas)]
            continue
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


def _summary_columns(per_protocol: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(protocol, column) of a dataset in the papers' layout: Medium and Hard; a class folder's "mAP"."""
    if list(per_protocol) == list(PROTOCOLS):
        return [("medium", "M"), ("hard", "H")]
    return [(p, f"mAP {protocol_letter(p)}".strip()) for p in per_protocol]


def _protocol_table(label: str, per_method: Mapping[str, Any], methods: Sequence[str], *, titles: Mapping[str, str],
                    kappas: Sequence[int]) -> list[str]:
    """A dataset's table under protocols other than revisited E/M/H (a class folder's): mAP, recall@k (when
    computed) and mP@k per protocol."""
    first = per_method[methods[0]]
    protocols = list(first["mAP"])
    recall = "recall@k" in first
    head = ["Method", *(f"mAP {protocol_letter(p)}".strip() for p in protocols)]
    if recall:
        head += [f"R@{k} {protocol_letter(p)}".strip() for p in protocols for k in kappas]
    head += [f"mP@{k} {protocol_letter(p)}".strip() for p in protocols for k in kappas]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        r = per_method[method]
        cells = [titles[method], *(format_percent(r["mAP"][p]) for p in protocols)]
        if recall:
            cells += [format_percent(r["recall@k"][p][str(k)]) for p in protocols for k in kappas]
        cells += [format_percent(r["mP@k"][p][str(k)]) for p in protocols for k in kappas]
        rows.append("| " + " | ".join(cells) + " |")
    counts = ", ".join(f"{protocol_letter(p)} {n}".strip() for p, n in first["n_queries"].items())
    what = "mAP, recall@k and mP@k" if recall else "mAP and mP@k"
    return [f"### {label}: {what} (%) — queries with positives: {counts}", "", *rows]


def banner(lines: Sequence[str]) -> str:
    """Lines framed by rows of ``!`` so that they are not missed in a log."""
    bar = "!" * 100
    return "\n".join([bar, *[f"!! {ln}" for ln in lines], bar])


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def per_query_markdown(per_query: Mapping[str, Any], methods: Sequence[str], *, titles: Mapping[str, str]) -> str:
    """Per dataset and row, a table of each query's AP (%) under Easy / Medium / Hard (a class folder's one
    protocol) and, for a re-ranking method or a post-processed row, its change from the global ranking it
    re-ordered."""
    out = ["## Per-query AP (%)", "",
           "AP change (dAP) = AP after re-ranking - AP of the global ranking it re-ordered; n/a: the query has no "
           "positive under that protocol. Top results, scores and precision-recall curves: report.html."]
    for label, ds in per_query["datasets"].items():
        for method in methods:
            m = ds["methods"][method]
            protocols = list(m["ap"])
            title = titles[method]
            head = ["#", "query", *(f"AP {protocol_letter(p)}".strip() for p in protocols)]
            if m["before"] is not None:
                title += f" (before: {titles[m['before']['method']]})"
                head += [f"dAP {protocol_letter(p)}".strip() for p in protocols]
            out += ["", f"### {label}: {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for i, name in enumerate(ds["queries"]):
                cells = [str(i), name, *(format_percent(m["ap"][p][i]) for p in protocols)]
                if m["ap_change"] is not None:
                    cells += [_signed(m["ap_change"][p][i]) for p in protocols]
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
