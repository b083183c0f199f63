"""Two evaluation runs compared query by query, from their ``results.json`` (torch-free).

    print(compare_runs("runs/eval/A", "runs/eval/B"))   # python eval.py --compare runs/eval/A runs/eval/B

Per dataset, method and protocol (the dataset's own: revisited Easy / Medium / Hard, a class folder's one): the mAP of
each run and its difference, then every query whose AP differs, sorted from the largest gain (B over A) to the
largest loss.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import InvalidValueError


class CompareError(InvalidValueError):
    """Two runs that cannot be compared query by query (the message says why)."""


def load_run(run: str | os.PathLike) -> dict[str, Any]:
    """The ``results.json`` of a run directory (or the file itself), which must hold per-query results."""
    path = Path(run)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise CompareError(f"{run}: no results.json (is it an eval.py run directory?)")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path}: not valid JSON ({exc})") from exc
    if not payload.get("per_query"):
        raise CompareError(f"{path} has no per-query results (written before eval.py recorded them); "
                           "re-run that evaluation to compare it query by query")
    return payload


def _matching_datasets(a: Mapping[str, Any], b: Mapping[str, Any], names: tuple[str, str]) -> list[str]:
    da, db = a["per_query"]["datasets"], b["per_query"]["datasets"]
    common = [label for label in da if label in db]
    if not common:
        raise CompareError(f"the runs are on different datasets: {names[0]} has {sorted(da)}, "
                           f"{names[1]} has {sorted(db)}")
    for label in common:
        if da[label]["queries"] != db[label]["queries"]:
            raise CompareError(f"dataset {label}: the runs have different queries ({len(da[label]['queries'])} "
                               f"vs {len(db[label]['queries'])}, or other images): not the same dataset")
    return common


def _fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}"


def compare_payloads(a: Mapping[str, Any], b: Mapping[str, Any], *, names: tuple[str, str] = ("A", "B"),
                     tolerance: float = 1e-9) -> str:
    """The per-query comparison of two ``results.json`` payloads as text (see the module docstring)."""
    datasets = _matching_datasets(a, b, names)
    lines = [f"A: {names[0]}  (weights: {a.get('weights', '?')})",
             f"B: {names[1]}  (weights: {b.get('weights', '?')})",
             "AP and mAP in percent; d = B - A; queries without a positive under a protocol are left out."]
    for label in sorted(set(a["per_query"]["datasets"]) ^ set(b["per_query"]["datasets"])):
        lines.append(f"note: dataset {label} is in one run only; skipped")
    for label in datasets:
        qa, qb = a["per_query"]["datasets"][label], b["per_query"]["datasets"][label]
        methods = [m for m in qa["methods"] if m in qb["methods"]]
        for m in sorted(set(qa["methods"]) ^ set(qb["methods"])):
            lines.append(f"note: {label}: method {m} is in one run only; skipped")
        for method in methods:
            for p in [p for p in qa["methods"][method]["ap"] if p in qb["methods"][method]["ap"]]:
                map_a, map_b = (run["results"][label][method]["mAP"][p] for run in (a, b))
                head = f"{label} {method} {p}: mAP A {_fmt(map_a).strip()}  B {_fmt(map_b).strip()}"
                if map_a is not None and map_b is not None:
                    head += f"  d {map_b - map_a:+.2f}"
                aps_a, aps_b = qa["methods"][method]["ap"][p], qb["methods"][method]["ap"][p]
                diffs = [(y - x, i, x, y) for i, (x, y) in enumerate(zip(aps_a, aps_b))
                         if x is not None and y is not None and abs(y - x) > tolerance]
                same = sum(1 for x, y in zip(aps_a, aps_b) if x is not None and y is not None) - len(diffs)
                lines += ["", head, f"  {len(diffs)} queries changed, {same} unchanged"]
                if diffs:
                    width = max(len(qa["queries"][i]) for _, i, _, _ in diffs)
                    lines.append(f"  {'#':>4}  {'query':<{width}}  {'A':>6}  {'B':>6}  {'d':>7}")
                    for d, i, x, y in sorted(diffs, key=lambda t: (-t[0], t[1])):
                        lines.append(f"  {i:>4}  {qa['queries'][i]:<{width}}  {_fmt(x)}  {_fmt(y)}  {d:+7.2f}")
    return "\n".join(lines)


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike) -> str:
    """:func:`compare_payloads` of two run directories (or their ``results.json`` files)."""
    return compare_payloads(load_run(run_a), load_run(run_b), names=(os.fspath(run_a), os.fspath(run_b)))
