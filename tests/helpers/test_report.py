"""The evaluation report: tables in the papers' layout, the papers' figures, comparability notes, banners, the run
directory and results.json."""
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from helpers.report import (
    NOT_COMPARABLE,
    banner,
    comparability_notes,
    dataset_title,
    format_paper,
    load_paper_results,
    markdown_tables,
    method_title,
    new_run_dir,
    paper_figure,
    write_json,
    write_report,
)
from helpers.schemas import EVAL

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "configs" / "paper_results.yaml"


def _fake_results(value):
    return {"mAP": {p: value for p in ("easy", "medium", "hard")},
            "mP@k": {p: {"1": 100.0, "5": 80.0, "10": 70.0} for p in ("easy", "medium", "hard")},
            "n_queries": {"easy": 68, "medium": 70, "hard": 70}}


def test_titles():
    assert dataset_title("roxford5k") == "ROxf" and dataset_title("rparis6k+1m") == "RPar+1M"
    assert dataset_title("synth+1m") == "synth+1M"
    assert method_title("cvnet_rerank", depth=50, mode="paper") == "CVNet-Global + CVNet-Rerank R50 (paper mode)"
    assert method_title("superglobal", depth=101, mode="paper") == "SuperGlobal R101"


def test_table_prints_paper_figures_marking_unconfirmed():
    rows = load_paper_results(PAPER)
    results = {"roxford5k": {"superglobal_rerank": _fake_results(80.04)},
               "rparis6k+1m": {"superglobal_rerank": _fake_results(71.0)}}
    table, used = markdown_tables(results=results, methods=["superglobal_rerank"], depth=101, mode="paper",
                                  paper_rows=rows, show_paper=True, kappas=[1, 5, 10])
    assert "| Method | ROxf M | ROxf H | RPar+1M M | RPar+1M H |" in table
    assert "| SuperGlobal + re-ranking R101 | 80.04 [90.9*] | 80.04 [80.2] | 71.00 [84.9*] | 71.00 [71.4*] |" in table
    assert used["roxford5k"]["superglobal_rerank"]["hard"]["confirmed"] is True
    table, used = markdown_tables(results=results, methods=["superglobal_rerank"], depth=101, mode="paper",
                                  paper_rows=rows, show_paper=False, kappas=[1, 5, 10])
    assert "[" not in table.split("\n\n")[1] and used == {}


def test_table_shows_missing_figures_as_na_and_counts_queries():
    r = _fake_results(50.0)
    r["mAP"]["easy"] = None
    table, _ = markdown_tables(results={"synth": {"cvnet_global": r}}, methods=["cvnet_global"], depth=50,
                               mode="clean", paper_rows={}, show_paper=False, kappas=[1, 5, 10])
    assert "| CVNet-Global R50 | n/a | 50.00 | 50.00 | 100.00 | 80.00 | 70.00 | 100.00 | 80.00 | 70.00 |" in table
    assert "queries with positives: E 68, M 70, H 70" in table


def test_paper_results_file():
    rows = load_paper_results(PAPER)
    assert len(rows) == 8
    confirmed = [(rid, ds, p) for rid, row in rows.items() for ds, figs in row["mAP"].items()
                 for p, fig in figs.items() if fig["confirmed"]]
    assert sorted(confirmed) == [("superglobal_rerank_r101", "roxford5k", "hard"),
                                 ("superglobal_rerank_r101", "rparis6k", "hard")]
    for row in rows.values():
        assert row["source"]["paper"] and row["source"]["table"]
        assert set(row["mAP"]) == {"roxford5k", "roxford5k+1m", "rparis6k", "rparis6k+1m"}
    disputed = rows["cvnet_global_r50"]["mAP"]["rparis6k+1m"]["hard"]
    assert disputed["value"] == 60.2 and "58.1" in disputed["note"]
    fig = paper_figure(rows, method="cvnet_rerank", depth=50, label="roxford5k", protocol="hard")
    assert fig["value"] == 75.6 and format_paper(fig) == "75.6*"
    assert paper_figure(rows, method="cvnet_rerank", depth=50, label="synth", protocol="hard") is None
    assert format_paper(None) == ""
    # a relative path is found from the repository too; a missing file means no figures
    assert load_paper_results("configs/paper_results.yaml") == rows
    assert load_paper_results(REPO / "nope.yaml") == {} and load_paper_results(None) == {}


def _cfg(**changes):
    cfg = json.loads(json.dumps(EVAL.defaults))
    cfg["methods"] = ["cvnet_rerank", "superglobal"]
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg


def test_comparability_notes():
    official = SimpleNamespace(source="official", warnings=[], description="w.pyth")
    assert comparability_notes(_cfg(), official, True) == (False, [NOT_COMPARABLE])
    show, notes = comparability_notes(_cfg(), SimpleNamespace(source="builtin"), False)
    assert not show and "official weights" in notes[0]
    show, notes = comparability_notes(_cfg(**{"rerank.cvnet.mode": "paper"}), official, False)
    assert show and notes == []
    show, notes = comparability_notes(_cfg(**{"model.superglobal.rgem": False,
                                              "model.superglobal.antialias": False}), official, False)
    assert show and len(notes) == 3 and "'clean' mode" in notes[0] and "rgem" in notes[1] and "antialias" in notes[2]


def test_banner():
    text = banner(["one", "two"])
    lines = text.splitlines()
    assert lines[0] == lines[-1] == "!" * 100 and lines[1:3] == ["!! one", "!! two"]


def test_run_dir_named_or_timestamped(tmp_path):
    named = new_run_dir(tmp_path, "x")
    assert named == tmp_path / "x" and named.is_dir() and new_run_dir(tmp_path, "x") == named  # a name is re-used
    first, second = new_run_dir(tmp_path, None), new_run_dir(tmp_path, None)
    assert first != second and first.is_dir() and second.is_dir()  # timestamps never overwrite


def test_json_takes_numpy_scalars_and_paths(tmp_path):
    write_json(tmp_path / "r.json", {"a": np.float32(0.5), "b": np.int64(3), "c": Path("/x")})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 0.5, "b": 3, "c": "/x"}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_write_report_without_grids(tmp_path):
    from helpers.eval_pipeline import EvalOutcome, Timer, WeightsPlan

    plan = WeightsPlan(warnings=["weights: random"])
    timer = Timer()
    timer.stages["build models"] = 1.25
    outcome = EvalOutcome(results={"synth": {"cvnet_rerank": _fake_results(40.0), "superglobal": _fake_results(60.0)}},
                          rankings={}, plan=plan, timer=timer, data={}, names=["synth"], builtin=True,
                          distractors=None)
    cfg = _cfg(**{"viz.num_queries": 0})
    text = write_report(cfg=cfg, outcome=outcome, run_dir=tmp_path, start=time.perf_counter() - 2.0)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["warnings"] == ["weights: random", NOT_COMPARABLE] and res["comparable_with_papers"] is False
    assert res["results"] == outcome.results and res["grids"] == [] and res["config"] == cfg
    assert res["timings_s"]["build models"] == 1.25 and res["timings_s"]["total"] >= 2.0
    assert text.startswith(banner(res["warnings"])) and text.endswith(banner(res["warnings"]))
    assert res["table_markdown"] in text and "| build models | 1.2 |" in text
    assert "| CVNet-Global + CVNet-Rerank R50 (clean mode) | 40.00 | 40.00 |" in text
