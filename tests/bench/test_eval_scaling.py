"""bench.eval_scaling on a tiny built-in benchmark: its table names every stage the evaluation timed with the
medians and ratios of the runs' results.json, its figures are the evaluation's, and it finds a per-query
difference between two runs (never a timing: those are the machine's)."""
from __future__ import annotations

import copy
import json

import pytest

from bench.eval_scaling import TOTALS, differences, main, stage_rows


def test_stage_rows_take_medians_and_sum_the_extraction_and_reranking():
    ones = [{"extract a q": 2.0, "cvnet_rerank a": 4.0, "rank a": 1.0, "total": 9.0},
            {"extract a q": 4.0, "cvnet_rerank a": 6.0, "rank a": 1.0, "total": 13.0},
            {"extract a q": 3.0, "cvnet_rerank a": 5.0, "rank a": 1.0, "total": 11.0}]
    splits = [{"extract a q": 1.5, "whitening k": 1.0, "cvnet_rerank a": 2.5, "rank a": 1.0, "total": 7.0}]
    rows = {name: (a, b) for name, a, b in stage_rows(ones, splits)}
    assert rows["extract a q"] == (3.0, 1.5) and rows["whitening k"] == (0.0, 1.0)  # a stage one side lacks
    assert rows["extraction"] == (3.0, 2.5) and rows["CVNet re-ranking"] == (5.0, 2.5)
    assert rows["extraction + re-ranking"] == (8.0, 5.0) and rows["total"] == (11.0, 7.0)
    assert list(rows)[-4:] == [*TOTALS, "total"]


@pytest.mark.slow
def test_the_bench_reports_what_the_evaluation_timed_and_found(tmp_path, capsys):
    assert main(["--quick", "--work-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    one, split = (json.loads((tmp_path / "runs" / name / "results.json").read_text()) for name in ("one-0", "split-0"))
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]
    stages = {c[0]: c[1:] for c in cells if len(c) == 4}
    figures = {c[1]: c[2:] for c in cells if len(c) == 5 and c[0] == "synth_tiny"}
    for stage, seconds in one["timings_s"].items():  # every stage the evaluation timed, with its ratio
        assert stages[stage][2] == f"{split['timings_s'][stage] / seconds:.2f}", stage
    assert sum(k.startswith("extract ") for k in one["timings_s"]) == 2 and "cvnet_rerank synth_tiny" in stages
    assert figures == {row: [f"{r['mAP'][p]:.2f}" for p in ("easy", "medium", "hard")]  # the evaluation's figures
                       for row, r in one["results"]["synth_tiny"].items()}
    assert set(figures) == {"cvnet_global", "cvnet_rerank"}
    assert "identical under 2 ranks" in out and differences(one, split) == []
    assert "CPU time of all processes (user + sys, median): 1 rank " in out
    assert split["config"]["extraction"]["cache_dir"] != one["config"]["extraction"]["cache_dir"]  # both extracted
    changed = copy.deepcopy(split)
    changed["per_query"]["datasets"]["synth_tiny"]["methods"]["cvnet_rerank"]["ap"]["hard"][0] += 1e-12
    assert differences(one, changed) == ["synth_tiny cvnet_rerank: ap"]
