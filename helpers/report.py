"""The evaluation report: Markdown tables in the papers' layout (with the papers' figures beside ours when they are
comparable), warning banners, stage timings, ``results.json`` and the result grids of a run directory.

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
from helpers.evaluation import PROTOCOLS, format_percent
from helpers.visualize import save_query_grids

if TYPE_CHECKING:
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
}


def dataset_title(label: str) -> str:
    """``roxford5k+1m`` -> ``ROxf+1M``; names without a short form stay as they are."""
    base, plus = (label[:-3], "+1M") if label.endswith("+1m") else (label, "")
    return DATASET_SHORT.get(base, base) + plus


def method_title(method: str, *, depth: int, mode: str | None = None) -> str:
    title = f"{METHOD_TITLES[method]} R{depth}"
    return f"{title} ({mode} mode)" if method == "cvnet_rerank" and mode else title


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
    if builtin:
        return False, [NOT_COMPARABLE]
    if plan.source != "official":
        return False, ["Paper figures are printed only with the official weights (model.weights=...)."]
    if cfg["rerank"]["cvnet"]["mode"] != "paper" and "cvnet_rerank" in cfg["methods"]:
        notes.append("CVNet re-ranking ran in 'clean' mode (first 100 of the global ranking, no ground truth); "
                     "the paper's figures used the released protocol: rerank.cvnet.mode=paper.")
    sg = cfg["model"]["superglobal"]
    off = [k for k in ("gemp", "rgem", "sgem", "relup") if not sg.get(k, True)]
    if off and any(m.startswith("superglobal") for m in cfg["methods"]):
        notes.append(f"SuperGlobal ran with {', '.join(off)} switched off; the paper's rows use all four.")
    if not sg.get("antialias", True) and any(m.startswith("superglobal") for m in cfg["methods"]):
        notes.append("SuperGlobal's Scale-GeM resize ran with antialias=False (the release under the pinned "
                     "torchvision resizes with antialias=True).")
    return True, notes


# --------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------


def markdown_tables(*, results: Mapping[str, Mapping[str, Any]], methods: Sequence[str], depth: int, mode: str,
                    paper_rows: Mapping[str, Any], show_paper: bool, kappas: Sequence[int]
                    ) -> tuple[str, dict[str, Any]]:
    """The papers' layout (rows = methods, columns = dataset x {Medium, Hard} mAP, the paper's figure in
    brackets), then per dataset the full E/M/H mAP and mP@k. Returns (markdown, paper figures used)."""
    labels = list(results)
    used: dict[str, Any] = {}
    head = ["Method"] + [f"{dataset_title(lb)} {p}" for lb in labels for p in ("M", "H")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells = [method_title(method, depth=depth, mode=mode)]
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
            cells = [method_title(method, depth=depth, mode=mode)]
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


def save_result_grids(*, outcome: EvalOutcome, methods: Sequence[str], run_dir: Path, num_queries: int, top: int,
                      height: int) -> list[str]:
    """PNG grids of the first ``num_queries`` queries' top results, per (dataset, method), under ``run_dir/grids``."""
    grids: list[str] = []
    for label in outcome.results:
        qset, reader = outcome.query_set(label), outcome.db_reader(label)
        queries = list(range(min(num_queries, len(qset))))
        for method in methods:
            paths = save_query_grids(run_dir / "grids", prefix=f"{label}_{method}", query_dataset=qset,
                                     db_dataset=reader, ranks=outcome.rankings[(label, method)], gnd=qset.gnd,
                                     queries=queries, top=top, height=height)
            grids += [os.fspath(p) for p in paths]
    return grids


def write_report(*, cfg: Mapping[str, Any], outcome: EvalOutcome, run_dir: Path, start: float) -> str:
    """Print-ready text (banners, tables, timings); writes results.json and the result grids into ``run_dir``.
    ``start``: the run's ``time.perf_counter()`` at launch, for the total wall time."""
    plan, timer = outcome.plan, outcome.timer
    methods = list(cfg["methods"])
    show_paper, notes = comparability_notes(cfg, plan, outcome.builtin)

    grids: list[str] = []
    viz = cfg["viz"]
    if int(viz["num_queries"]) > 0:
        with timer.stage("result grids"):
            grids = save_result_grids(outcome=outcome, methods=methods, run_dir=run_dir,
                                      num_queries=int(viz["num_queries"]), top=int(viz["top"]),
                                      height=int(viz["height"]))

    table, used = markdown_tables(results=outcome.results, methods=methods, depth=int(cfg["model"]["depth"]),
                                  mode=cfg["rerank"]["cvnet"]["mode"],
                                  paper_rows=load_paper_results(cfg.get("paper_results")), show_paper=show_paper,
                                  kappas=[int(k) for k in cfg["eval"]["kappas"]])
    warn = list(plan.warnings) + ([NOT_COMPARABLE] if outcome.builtin else [])
    timings = dict(timer.stages)
    timings["total"] = time.perf_counter() - start
    payload = {
        "weights": plan.description,
        "weights_source": plan.source,
        "warnings": warn,
        "comparable_with_papers": show_paper,
        "notes": notes,
        "unit": "percent",
        "datasets": list(outcome.results),
        "methods": methods,
        "results": outcome.results,
        "paper": used,
        "table_markdown": table,
        "timings_s": timings,
        "grids": grids,
        "run_dir": os.fspath(run_dir),
        "config": cfg,
    }
    write_json(run_dir / "results.json", payload)

    parts = []
    if warn:
        parts += [banner(warn), ""]
    parts += [f"weights: {plan.description}", "", table]
    if notes:
        parts += ["", *[f"note: {n}" for n in notes]]
    parts += ["", "### wall time per stage (s)", "", "| stage | s |", "|---|---|"]
    parts += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    parts += ["", f"results: {run_dir / 'results.json'}"]
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
