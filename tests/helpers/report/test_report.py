"""The evaluation report: tables in the papers' layout, the papers' figures, comparability notes, banners, the run
directory and results.json."""
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from helpers.report.markdown import banner, markdown_tables
from helpers.report.titles import (
    NOT_COMPARABLE,
    ap_name,
    comparability_notes,
    dataset_title,
    format_paper,
    load_paper_results,
    method_title,
    paper_figure,
    payload_titles,
    row_titles,
)
from helpers.report.write import new_run_dir, write_json, write_report
from helpers.schemas import EVAL

REPO = Path(__file__).resolve().parents[3]
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
    post = {"superglobal+dba+aqe": {"base": "superglobal", "applied": "α-DBA k=2 α=3 + α-QE k=2 α=3"}}
    titles = row_titles(["superglobal_rerank", "superglobal+dba+aqe"], post, depth=50, mode="clean")
    assert titles["superglobal+dba+aqe"] == "SuperGlobal R50 + α-DBA k=2 α=3 + α-QE k=2 α=3"
    assert titles["superglobal_rerank"] == "SuperGlobal + re-ranking R50"
    assert titles["superglobal"] == "SuperGlobal R50"  # the ranking a row started from, reported or not
    # a results.json written before titles were recorded gets the same ones
    payload = {"methods": ["superglobal_rerank"], "config": _cfg()}
    assert payload_titles(payload)["superglobal_rerank"] == "SuperGlobal + re-ranking R50"


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
    # the paper-row settings: the released protocol, SuperGlobal's resize as the 2023 release ran it
    paper = {"rerank.cvnet.mode": "paper", "model.superglobal.antialias": False}
    show, notes = comparability_notes(_cfg(**paper), official, False)
    assert show and notes == []
    show, notes = comparability_notes(_cfg(**{"model.superglobal.rgem": False}), official, False)
    assert show and len(notes) == 3 and "'clean' mode" in notes[0] and "rgem" in notes[1]
    # antialias=True is what differs from the 2023 release (torchvision <= 0.16 did not antialias tensors)
    assert "antialias=True" in notes[2] and "torchvision <= 0.16" in notes[2] and "pinned" not in notes[2]
    show, notes = comparability_notes(_cfg(**{**paper, "model.superglobal.antialias": True}), official, False)
    assert len(notes) == 1 and "antialias=False" in notes[0]
    cfg = _cfg(**{**paper, "model.superglobal.antialias": True})
    cfg["methods"] = ["cvnet_rerank"]  # no SuperGlobal row: nothing to say about its resize
    assert comparability_notes(cfg, official, False) == (True, [])


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
    from helpers.evaluation.models import WeightsPlan
    from helpers.evaluation.run import EvalOutcome, Timer

    plan = WeightsPlan(warnings=["weights: random"])
    timer = Timer()
    timer.stages["build models"] = 1.25
    outcome = EvalOutcome(results={"synth": {"cvnet_rerank": _fake_results(40.0), "superglobal": _fake_results(60.0)}},
                          rankings={}, plan=plan, timer=timer, sets={}, names=["synth"], builtin=True,
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


# --------------------------------------------------------------------------------------------------------------
# Per-query results, results.md, report.html (the toy run of conftest.py)
# --------------------------------------------------------------------------------------------------------------


def _toy_cfg():
    cfg = _cfg(**{"viz.num_queries": 2, "viz.top": 5, "viz.height": 40, "eval.kappas": [1, 5]})
    cfg["methods"] = ["cvnet_global", "cvnet_rerank"]
    return cfg


def test_results_json_gains_per_query_aps_and_top_ids_matching_the_evaluation(tmp_path, toy_run):
    from helpers.evaluation.metrics import build_protocols, compute_map

    before = json.loads(json.dumps(toy_run.outcome.results))
    write_report(cfg=_toy_cfg(), outcome=toy_run.outcome, run_dir=tmp_path, start=time.perf_counter())
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["results"] == before  # the aggregates are untouched
    pq = res["per_query"]
    assert pq["top"] == 5 and pq["ranking_shown"] == "medium" and len(pq["pr_recall_levels"]) == 21
    ds = pq["datasets"]["toy"]
    assert ds["queries"] == ["q000.jpg", "q001.jpg", "q002.jpg"]
    protocols = build_protocols(toy_run.gnd)
    for method, ranking in toy_run.final.items():
        m = ds["methods"][method]
        for p in ("easy", "medium", "hard"):
            _, aps, _, _ = compute_map(ranking, protocols[p])
            assert m["ap"][p] == [None if np.isnan(a) else 100 * a for a in aps]
            valid = [a for a in m["ap"][p] if a is not None]
            assert np.isclose(np.mean(valid), res["results"]["toy"][method]["mAP"][p])
        assert m["top_ids"] == ranking[:5].T.tolist()
        assert all(ds["db_names"][str(j)] == f"db{j:03d}.jpg" for row in m["top_ids"] for j in row)
        assert m["labels"][0][:5] == ["positive" if j in (0, 1, 2) else "junk" if j == 3 else "negative"
                                      for j in m["top_ids"][0]]
    glob, rr = ds["methods"]["cvnet_global"], ds["methods"]["cvnet_rerank"]
    assert glob["before"] is None and glob["ap_change"] is None
    # global scores: the cosine of each listed pair, best first; re-ranking scores where the engine gave one
    assert all(a >= b for row in glob["scores"] for a, b in zip(row, row[1:]))
    assert rr["scores"][0][:4] == [1.0, 0.9, 0.8, 0.7][:4] and rr["scores"][0][4] is None
    assert rr["before"]["method"] == "cvnet_global" and rr["before"]["top_ids"] == glob["top_ids"]
    for p in ("easy", "medium", "hard"):
        assert rr["ap_change"][p] == [None if a is None else a - b
                                      for a, b in zip(rr["ap"][p], glob["ap"][p])]
    assert rr["ap"]["medium"][2] is None and rr["ap_change"]["medium"][2] is None  # no positives
    assert res["files"] == {"markdown": "results.md", "html": "report.html"}


def test_results_md_has_the_tables_and_per_query_aps(tmp_path, toy_run):
    text = write_report(cfg=_toy_cfg(), outcome=toy_run.outcome, run_dir=tmp_path, start=time.perf_counter())
    md = (tmp_path / "results.md").read_text()
    res = json.loads((tmp_path / "results.json").read_text())
    assert md.startswith(f"# Evaluation results: {tmp_path.name}\n")
    assert "> **Warning:** weights: random" in md and res["table_markdown"] in md
    assert "### toy: CVNet-Global R50\n\n| # | query | AP E | AP M | AP H |" in md
    assert ("### toy: CVNet-Global + CVNet-Rerank R50 (clean mode) (before: CVNet-Global R50)\n\n"
            "| # | query | AP E | AP M | AP H | dAP E | dAP M | dAP H |") in md
    m = res["per_query"]["datasets"]["toy"]["methods"]["cvnet_rerank"]
    cells = [f"{m['ap'][p][0]:.2f}" for p in ("easy", "medium", "hard")]
    cells += [f"{m['ap_change'][p][0]:+.2f}" for p in ("easy", "medium", "hard")]
    row = "| 0 | q000.jpg | " + " | ".join(cells) + " |"
    assert row in md
    assert "| 2 | q002.jpg | n/a | n/a | n/a | n/a | n/a | n/a |" in md
    assert "| build models | 0.5 |" in md
    assert str(tmp_path / "report.html") in text and str(tmp_path / "results.md") in text


def test_grids_carry_scores_names_and_a_legend(tmp_path, toy_run):
    import cv2

    write_report(cfg=_toy_cfg(), outcome=toy_run.outcome, run_dir=tmp_path, start=time.perf_counter())
    res = json.loads((tmp_path / "results.json").read_text())
    assert [Path(g).name for g in res["grids"]] == ["toy_cvnet_global_q000.png", "toy_cvnet_global_q001.png",
                                                    "toy_cvnet_rerank_q000.png", "toy_cvnet_rerank_q001.png"]
    grid = cv2.imread(res["grids"][0])
    assert grid.shape[0] > 40 + 20  # the 40-px thumbnails, their captions and the legend


def test_report_html_is_self_contained(tmp_path, toy_run):
    write_report(cfg=_toy_cfg(), outcome=toy_run.outcome, run_dir=tmp_path, start=time.perf_counter())
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for outside in ("http://", "https://", "<link", "@import", "url("):
        assert outside not in page
    assert page.count('src="data:image/jpeg;base64,') == page.count("<img ")
    # 2 tables of 3 queries; 3 cards with the query crop and the top 5 of 2 rankings each
    assert page.count('<table class="pq sortable"') == 2 and page.count('<article class="card"') == 3
    assert page.count('<li class="tile ') == 3 * 2 * 5
    assert page.count("<polyline") == 2 * 3  # a curve per method and protocol
    assert "\u0394AP Medium" in page and "weights: random" in page


def test_report_html_caps_the_query_cards(toy_run):
    from helpers.report.html import cards_per_dataset, render_report
    from helpers.report.write import OutcomeImages, per_query_payload

    payload = {"run_dir": "/x/run", "config": _toy_cfg(), "weights": "w", "warnings": [], "notes": [],
               "methods": ["cvnet_global", "cvnet_rerank"], "table_markdown": "| a | b |\n|---|---|\n| 1 | 2 |",
               "per_query": per_query_payload(toy_run.outcome, ["cvnet_global", "cvnet_rerank"], 5)}
    page = render_report(payload, images=OutcomeImages(toy_run.outcome), max_cards=1)
    assert page.count('<article class="card"') == 1 and "The first 1 of 3 queries" in page
    assert '<table class="summary"><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td>' in page
    # by default the cap is a budget of result thumbnails: 2 rankings x top 5 per card
    assert cards_per_dataset(payload, max_thumbnails=25) == 2 and cards_per_dataset(payload, max_thumbnails=5) == 1
    assert cards_per_dataset(payload) >= 3


def test_report_html_shows_the_global_ranking_a_lone_re_ranking_started_from(toy_run):
    from helpers.report.html import render_report
    from helpers.report.write import OutcomeImages, per_query_payload

    cfg = _toy_cfg()
    cfg["methods"] = ["cvnet_rerank"]
    payload = {"run_dir": "/x/run", "config": cfg, "weights": "w", "warnings": [], "notes": [],
               "methods": ["cvnet_rerank"], "table_markdown": "",
               "per_query": per_query_payload(toy_run.outcome, ["cvnet_rerank"], 5)}
    page = render_report(payload, images=OutcomeImages(toy_run.outcome))
    assert page.count('<div class="strip">') == 3 * 2  # per query: the global ranking, then its re-ranking
    assert page.count("CVNet-Global R50 (before re-ranking)") == 3 + 3 + 1  # cards, curves (E/M/H), legend
    assert page.count("<polyline") == 2 * 3 and page.count('<table class="pq sortable"') == 1


# --------------------------------------------------------------------------------------------------------------
# Comparing two runs
# --------------------------------------------------------------------------------------------------------------


def test_compare_prints_sorted_per_query_differences(tmp_path, toy_run):
    from helpers.report.compare import compare_runs

    write_report(cfg=_toy_cfg(), outcome=toy_run.outcome, run_dir=tmp_path / "a", start=time.perf_counter())
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads(json.dumps(res))
    m = b["per_query"]["datasets"]["toy"]["methods"]["cvnet_global"]
    m["ap"]["medium"][0] += 10.0
    m["ap"]["medium"][1] -= 5.0
    b["results"]["toy"]["cvnet_global"]["mAP"]["medium"] += 2.5
    (tmp_path / "b").mkdir()
    write_json(tmp_path / "b" / "results.json", b)
    text = compare_runs(tmp_path / "a", tmp_path / "b")
    block = text.split("toy cvnet_global medium:")[1].split("\n\n")[0]
    lines = block.splitlines()
    old = res["results"]["toy"]["cvnet_global"]["mAP"]["medium"]
    assert lines[0] == f" mAP A {old:.2f}  B {old + 2.5:.2f}  d +2.50"
    assert lines[1] == "  2 queries changed, 0 unchanged"
    was = res["per_query"]["datasets"]["toy"]["methods"]["cvnet_global"]["ap"]["medium"][0]
    assert lines[3].split() == ["0", "q000.jpg", f"{was:.2f}", f"{m['ap']['medium'][0]:.2f}", "+10.00"]
    assert lines[4].split()[:2] == ["1", "q001.jpg"] and lines[4].split()[-1] == "-5.00"
    assert "toy cvnet_rerank medium:" in text and "0 queries changed, 2 unchanged" in text


def test_compare_refuses_runs_it_cannot_compare(tmp_path, toy_run):
    from helpers.report.compare import CompareError, compare_runs

    write_report(cfg=_toy_cfg(), outcome=toy_run.outcome, run_dir=tmp_path / "a", start=time.perf_counter())
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    old = dict(res)
    del old["per_query"]
    write_json(tmp_path / "old" / "results.json", old)
    with pytest.raises(CompareError, match="no per-query results"):
        compare_runs(tmp_path / "a", tmp_path / "old")
    other = json.loads(json.dumps(res))
    other["per_query"]["datasets"] = {"roxford5k": other["per_query"]["datasets"]["toy"]}
    write_json(tmp_path / "other" / "results.json", other)
    with pytest.raises(CompareError, match="different datasets.*toy.*roxford5k"):
        compare_runs(tmp_path / "a", tmp_path / "other")
    with pytest.raises(CompareError, match="no results.json"):
        compare_runs(tmp_path / "a", tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------------------
# Post-processed rows and the weights' sha256
# --------------------------------------------------------------------------------------------------------------


def test_post_rows_are_reported_like_any_row(tmp_path, toy_post_run):
    outcome = toy_post_run.outcome
    text = write_report(cfg=_toy_cfg(), outcome=outcome, run_dir=tmp_path, start=time.perf_counter())
    res = json.loads((tmp_path / "results.json").read_text())
    title = "CVNet-Global R50 + α-DBA k=2 α=3"
    assert res["methods"] == ["cvnet_global", "cvnet_global+dba", "cvnet_rerank"]
    assert res["titles"]["cvnet_global+dba"] == title
    assert res["post_rows"]["cvnet_global+dba"]["settings"]["dba"] == {"k": 2, "alpha": 3.0}
    assert res["weights_sha256"] == {"/w/last.pyth": "ab" * 32} and f"weights sha256: {'ab' * 32}" in text
    # the printed table: the post row right after its global ranking, with its figures
    lines = res["table_markdown"].splitlines()
    at = [i for i, ln in enumerate(lines) if ln.startswith(f"| {title} |")]
    assert len(at) == 2 and all(lines[i - 1].startswith("| CVNet-Global R50 |") for i in at)
    r = res["results"]["toy"]["cvnet_global+dba"]
    assert lines[at[0]] == f"| {title} | {r['mAP']['medium']:.2f} | {r['mAP']['hard']:.2f} |"
    # per-query APs like any row, with the change from the ranking it post-processed
    m = res["per_query"]["datasets"]["toy"]["methods"]["cvnet_global+dba"]
    glob = res["per_query"]["datasets"]["toy"]["methods"]["cvnet_global"]
    assert m["top_ids"] == toy_post_run.final["cvnet_global+dba"][:5].T.tolist()
    assert m["before"]["method"] == "cvnet_global" and m["before"]["top_ids"] == glob["top_ids"]
    assert m["ap_change"]["medium"] == [None if a is None else a - b
                                        for a, b in zip(m["ap"]["medium"], glob["ap"]["medium"])]
    md = (tmp_path / "results.md").read_text()
    assert f"### toy: {title} (before: CVNet-Global R50)" in md and "- `cvnet_global+dba`: α-DBA k=2 α=3" in md
    assert f"Weights sha256: `{'ab' * 32}` /w/last.pyth" in md
    page = (tmp_path / "report.html").read_text()
    assert 'id="t-toy-cvnet_global+dba"' in page and f"{title}: per-query AP (%)" in page
    assert "AP after post-processing" in page and page.count("<polyline") == 3 * 3
    assert page.count('<li class="tile ') == 3 * 3 * 5  # a strip per row in each card
    # the grids stay one per method (report.html shows the post rows' top results)
    assert not any("dba" in g for g in res["grids"])


# --------------------------------------------------------------------------------------------------------------
# A class folder: one protocol, its classes, recall@k
# --------------------------------------------------------------------------------------------------------------


def test_a_class_folder_is_reported_under_its_one_protocol(tmp_path, toy_folder_run):
    outcome = toy_folder_run.outcome
    (label,) = outcome.results
    text = write_report(cfg=_toy_cfg(), outcome=outcome, run_dir=tmp_path / "run", start=time.perf_counter())
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    r = res["results"][label]["cvnet_global"]
    assert set(r) == {"mAP", "mP@k", "recall@k", "n_queries"} and list(r["mAP"]) == ["class"]
    # the tables: one mAP column in the papers' layout, then mAP, recall@k and mP@k
    assert dataset_title(label) == "shoes/test" and "### mAP (%)\n\n| Method | shoes/test mAP |" in text
    row = (f"| CVNet-Global R50 | {r['mAP']['class']:.2f} | {r['recall@k']['class']['1']:.2f} | "
           f"{r['recall@k']['class']['5']:.2f} | {r['mP@k']['class']['1']:.2f} | {r['mP@k']['class']['5']:.2f} |")
    assert "| Method | mAP | R@1 | R@5 | mP@1 | mP@5 |" in text and row in text
    assert f"### {label}: mAP, recall@k and mP@k (%) — queries with positives: 2" in text
    # per query: names with their class, the classes, APs that average to the mAP
    ds = res["per_query"]["datasets"][label]
    assert ds["queries"] == ["eiffel/q1.jpg", "louvre/nested/q2.png"] and ds["query_classes"] == ["eiffel", "louvre"]
    assert set(ds["db_names"].values()) <= {"eiffel/a.jpg", "eiffel/b.jpg", "eiffel/blurry.jpg", "loose.jpg",
                                            "louvre/c.jpg", "pisa/d.jpg"}
    m = ds["methods"]["cvnet_rerank"]
    assert list(m["ap"]) == list(m["ap_change"]) == list(m["pr"]) == ["class"]
    assert np.isclose(np.mean(m["ap"]["class"]), res["results"][label]["cvnet_rerank"]["mAP"]["class"])
    md = (tmp_path / "run" / "results.md").read_text()
    assert f"### {label}: CVNet-Global R50\n\n| # | query | AP |\n" in md
    assert "| # | query | AP | dAP |" in md and "| 1 | louvre/nested/q2.png | " in md
    # the page: one precision-recall panel, a class column, the folder's legend; no E/M/H anywhere
    page = (tmp_path / "run" / "report.html").read_text()
    assert page.count("<polyline") == 2 and page.count("<th>class</th>") == 2 and '<td class="cls">louvre</td>' in page
    assert "positive (the query's class)" in page and "junk.txt" in page
    for revisited in (">AP Easy<", "AP Medium", "Medium protocol", "easy or hard"):
        assert revisited not in page
    assert [Path(g).name for g in res["grids"]][:2] == ["folder-shoes-test_cvnet_global_q000.png",
                                                        "folder-shoes-test_cvnet_global_q001.png"]


def test_two_runs_on_a_class_folder_compare_under_its_protocol(tmp_path, toy_folder_run):
    from helpers.report.compare import compare_runs

    (label,) = toy_folder_run.outcome.results
    write_report(cfg=_toy_cfg(), outcome=toy_folder_run.outcome, run_dir=tmp_path / "a", start=time.perf_counter())
    b = json.loads((tmp_path / "a" / "results.json").read_text())
    b["per_query"]["datasets"][label]["methods"]["cvnet_global"]["ap"]["class"][1] += 7.0
    write_json(tmp_path / "b" / "results.json", b)
    text = compare_runs(tmp_path / "a", tmp_path / "b")
    assert f"{label} cvnet_global class: mAP A" in text and "easy" not in text
    block = text.split(f"{label} cvnet_global class:")[1].split("\n\n")[0].splitlines()
    assert block[1] == "  1 queries changed, 1 unchanged" and block[3].split()[:2] == ["1", "louvre/nested/q2.png"]


def test_a_grid_names_the_ap_of_its_protocol_and_a_class_folder_s_plainly():
    """A class folder has one protocol and no letter: its grids say "AP", never an empty "AP()"."""
    assert [ap_name(p) for p in ("easy", "medium", "hard", "class")] == ["AP(E)", "AP(M)", "AP(H)", "AP"]
