"""eval.py end to end on a tiny generated benchmark, its report pieces, its configs, and the result grids."""
import importlib.util
import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers.config import load_config
from helpers.visualize import FRAME_COLORS, result_labels, save_result_grid

REPO = Path(__file__).resolve().parents[2]


def _load_eval():
    spec = importlib.util.spec_from_file_location("eval_script", REPO / "eval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


ev = _load_eval()

TINY_SYNTH = ("data.synthetic.config={n_landmarks: 3, views_per_landmark: 3, n_distractors: 3, "
              "image_size: [96, 64], train_landmarks: 1, train_views_per_landmark: 1}")


@pytest.fixture(autouse=True)
def _one_thread():
    # a 2-core machine shared with other test runs: OpenMP threads spinning against each other cost 10-100x
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(tmp_path, *overrides, config=None):
    argv = ([] if config is None else ["--config", str(config)]) + [
        f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}",
        f"extraction.cache_dir={tmp_path / 'cache'}", "model.builtin_checkpoints=null", "progress=false",
        "name=run", *overrides]
    return ev.main(ev.get_args_parser().parse_args(argv))


@pytest.mark.slow
def test_builtin_run_end_to_end(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    assert _run(tmp_path, TINY_SYNTH, "viz.num_queries=2", "viz.height=48") == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "run"
    # the table, in the papers' layout, and the loud warnings
    assert "| Method | synth M | synth H |" in out
    for title in ("CVNet-Global R50", "CVNet-Global + CVNet-Rerank R50 (clean mode)", "SuperGlobal R50",
                  "SuperGlobal + re-ranking R50"):
        assert f"| {title} |" in out
    assert "| Method | mAP E | mAP M | mAP H | mP@1 M | mP@5 M | mP@10 M | mP@1 H | mP@5 H | mP@10 H |" in out
    assert "random — numbers are meaningless" in out and "NOT comparable with the papers" in out
    assert "[" not in out.split("### mAP")[1].split("###")[1]  # no paper figures beside built-in numbers

    res = json.loads((run_dir / "results.json").read_text())
    assert res["weights"] == "random — numbers are meaningless"
    assert res["comparable_with_papers"] is False
    assert set(res["results"]) == {"synth"}
    for method in ("cvnet_global", "cvnet_rerank", "superglobal", "superglobal_rerank"):
        r = res["results"]["synth"][method]
        assert set(r["mAP"]) == {"easy", "medium", "hard"}
        assert set(r["mP@k"]["medium"]) == {"1", "5", "10"}
        assert all(0.0 <= v <= 100.0 for v in r["mAP"].values())
    assert res["table_markdown"] in out
    assert {"build models", "total"} <= set(res["timings_s"])
    assert (run_dir / "config.yaml").is_file()
    assert len(res["grids"]) == 4 * 2
    grid = cv2.imread(res["grids"][0])
    assert grid is not None and grid.shape[0] == 48

    # a second run: every descriptor from the cache, and the same numbers (seeded random weights)
    caplog.clear()
    assert _run(tmp_path, TINY_SYNTH, "viz.num_queries=0", "name=again") == 0
    hits = [r for r in caplog.records if "feature cache hit" in r.getMessage()]
    assert len(hits) == 4  # queries + database, for CVNet-Global and SuperGlobal
    again = json.loads((tmp_path / "runs" / "again" / "results.json").read_text())
    assert again["results"] == res["results"]


def test_missing_weights_is_a_clear_error(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    rc = _run(tmp_path, TINY_SYNTH, "methods=[cvnet_global]", f"model.weights={tmp_path / 'nope.pyth'}")
    assert rc == 2
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "nope.pyth" in message and "CVPR2022_CVNet_R50.pyth" in message


def test_unknown_method_is_rejected(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    assert _run(tmp_path, TINY_SYNTH, "methods=[cvnet_global, dino]") == 2
    assert "dino" in caplog.text


def test_weights_plan(tmp_path):
    rerank, backbone = tmp_path / "rerank.pyth", tmp_path / "backbone.pyth"
    builtin = {"rerank": str(rerank), "backbone": str(backbone)}
    plan = ev.plan_weights({"weights": None, "builtin_checkpoints": builtin})
    assert plan.source == "random" and plan.global_path is None and "meaningless" in plan.warnings[0]
    backbone.write_bytes(b"")
    plan = ev.plan_weights({"weights": None, "builtin_checkpoints": builtin})
    assert (plan.global_path, plan.rerank_path, plan.rerank_backbone_from_global) == (str(backbone), None, True)
    assert "random" in plan.warnings[0]
    rerank.write_bytes(b"")
    plan = ev.plan_weights({"weights": None, "builtin_checkpoints": builtin})
    assert (plan.global_path, plan.rerank_path, plan.source) == (str(rerank), str(rerank), "builtin")
    plan = ev.plan_weights({"weights": "w/CVPR2022_CVNet_R50.pyth", "builtin_checkpoints": builtin})
    assert plan.source == "official" and plan.rerank_path == "w/CVPR2022_CVNet_R50.pyth" and not plan.warnings


def _fake_results(value):
    r = {"mAP": {p: value for p in ("easy", "medium", "hard")},
         "mP@k": {p: {"1": 100.0, "5": 80.0, "10": 70.0} for p in ("easy", "medium", "hard")},
         "n_queries": {"easy": 68, "medium": 70, "hard": 70}}
    return r


def test_table_prints_paper_figures_marking_unconfirmed():
    rows = ev.load_paper_results(REPO / "configs" / "paper_results.yaml")
    results = {"roxford5k": {"superglobal_rerank": _fake_results(80.04)},
               "rparis6k+1m": {"superglobal_rerank": _fake_results(71.0)}}
    table, used = ev.markdown_tables(results=results, methods=["superglobal_rerank"], depth=101, mode="paper",
                                     paper_rows=rows, show_paper=True, kappas=[1, 5, 10])
    assert "| Method | ROxf M | ROxf H | RPar+1M M | RPar+1M H |" in table
    assert "| SuperGlobal + re-ranking R101 | 80.04 [90.9*] | 80.04 [80.2] | 71.00 [84.9*] | 71.00 [71.4*] |" in table
    assert used["roxford5k"]["superglobal_rerank"]["hard"]["confirmed"] is True
    table, used = ev.markdown_tables(results=results, methods=["superglobal_rerank"], depth=101, mode="paper",
                                     paper_rows=rows, show_paper=False, kappas=[1, 5, 10])
    assert "[" not in table.split("\n\n")[1] and used == {}


def test_paper_results_file():
    rows = ev.load_paper_results(REPO / "configs" / "paper_results.yaml")
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
    fig = ev.paper_figure(rows, method="cvnet_rerank", depth=50, label="roxford5k", protocol="hard")
    assert fig["value"] == 75.6 and ev.format_paper(fig) == "75.6*"


@pytest.mark.parametrize("name", ["cvnet_global_r50", "cvnet_global_r101", "cvnet_rerank_r50", "cvnet_rerank_r101",
                                  "superglobal_r50", "superglobal_r101", "superglobal_rerank_r50",
                                  "superglobal_rerank_r101"])
def test_paper_row_configs_resolve(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml", ["data.root=/data"], ev.DEFAULTS)
    method, depth = name.rsplit("_r", 1)
    assert method in cfg["methods"] and cfg["model"]["depth"] == int(depth)
    assert cfg["model"]["weights"].endswith(f"CVPR2022_CVNet_R{depth}.pyth")
    assert cfg["data"]["datasets"] == ["roxford5k", "rparis6k"] and cfg["data"]["root"] == "/data"
    assert cfg["rerank"]["cvnet"]["mode"] == "paper"
    rows = ev.load_paper_results(cfg["paper_results"])
    assert ev.paper_figure(rows, method=method, depth=int(depth), label="rparis6k", protocol="medium") is not None


def test_result_grid_frames_have_the_label_colours(tmp_path):
    query = np.full((40, 30, 3), 128, np.uint8)
    results = [np.full((20, 40, 3), v, np.uint8) for v in (50, 100, 150)]
    labels = ["positive", "negative", "junk"]
    path = save_result_grid(tmp_path / "g" / "q.png", query=query, results=results, labels=labels, height=40,
                            border=4, gap=5)
    grid = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert grid.shape[0] == 40 and grid.dtype == np.uint8
    # tiles: query 30 px wide at inner height 32 -> 24 + 8; results 40x20 -> 64 + 8; gaps 10 after the query, then 5
    starts = [0, 32 + 10, 32 + 10 + 72 + 5, 32 + 10 + 2 * (72 + 5)]
    assert grid.shape[1] == starts[-1] + 72
    for x0, label in zip(starts, ["query", *labels]):
        assert tuple(grid[1, x0 + 1]) == FRAME_COLORS[label]  # inside the top frame
        assert tuple(grid[20, x0 + 2]) == FRAME_COLORS[label]  # left frame, mid height
    assert tuple(grid[20, starts[1] + 20]) == (50, 50, 50)  # the first result's pixels inside its frame


def test_result_labels_use_the_medium_protocol():
    gnd = {"easy": [3], "hard": [7], "junk": [5]}
    assert result_labels(np.array([7, 5, 1, 3, 0]), gnd, top=4) == ["positive", "junk", "negative", "positive"]


def test_builtin_checkpoints_feed_the_models(tmp_path):
    from models import CVNetGlobal, CVNetRerank
    from models.checkpoint import official_state_dict

    torch.manual_seed(1)
    trained_global, trained_rerank = CVNetGlobal(50), CVNetRerank(50)
    backbone_path, full_path = tmp_path / "backbone.pyth", tmp_path / "rerank.pyth"
    torch.save({"model_state": official_state_dict(trained_global)}, backbone_path)
    full = {**official_state_dict(trained_global), **{k: v for k, v in official_state_dict(trained_rerank).items()
                                                      if k.startswith(("conv2ds.", "cv_learner."))}}
    torch.save({"model_state": full}, full_path)
    needed = {"cvnet_global", "cvnet_rerank"}
    model_cfg = {"depth": 50, "builtin_checkpoints": {"rerank": str(tmp_path / "absent.pyth"),
                                                      "backbone": str(backbone_path)}}

    # backbone only: global model and the re-ranker's ResNet stages from it, the re-ranking head random
    plan = ev.plan_weights(model_cfg)
    models = ev.build_models(needed=needed, model_cfg=model_cfg, plan=plan, seed=0, device=torch.device("cpu"))
    g, r = models["cvnet_global"].state_dict(), models["cvnet_rerank"].state_dict()
    torch.testing.assert_close(g["head.fc.weight"], trained_global.state_dict()["head.fc.weight"])
    torch.testing.assert_close(r["backbone.layer3.5.conv3.weight"], g["backbone.layer3.5.conv3.weight"])
    assert not torch.equal(r["conv2ds.0.weight"], trained_rerank.state_dict()["conv2ds.0.weight"])

    # the re-ranking checkpoint feeds every model, the re-ranking head included
    model_cfg["builtin_checkpoints"]["rerank"] = str(full_path)
    plan = ev.plan_weights(model_cfg)
    models = ev.build_models(needed=needed, model_cfg=model_cfg, plan=plan, seed=0, device=torch.device("cpu"))
    r = models["cvnet_rerank"].state_dict()
    torch.testing.assert_close(r["conv2ds.0.weight"], trained_rerank.state_dict()["conv2ds.0.weight"])
    torch.testing.assert_close(r["backbone.layer1.0.conv1.weight"],
                               trained_global.state_dict()["backbone.layer1.0.conv1.weight"])


@pytest.mark.slow
def test_distractors_are_appended_after_the_database(tmp_path, capsys):
    from datasets.synthetic import SyntheticConfig, build_synthetic

    config = SyntheticConfig(n_landmarks=2, views_per_landmark=3, n_distractors=2, image_size=(96, 64),
                             train_landmarks=1, train_views_per_landmark=1)
    synth = build_synthetic(tmp_path / "data", name="synth", config=config, progress=False)
    r1m = tmp_path / "data" / "revisitop1m"
    (r1m / "jpg" / "a").mkdir(parents=True)
    names = []
    for k, src in enumerate(sorted((synth / "jpg").iterdir())[:5]):  # re-used views as distractors
        names.append(f"a/d{k}.jpg")
        (r1m / "jpg" / names[-1]).write_bytes(src.read_bytes())
    (r1m / "revisitop1m.txt").write_text("\n".join(names) + "\n")

    assert _run(tmp_path, "data.synthetic.config=" + json.dumps(config.to_dict()), "data.distractors=revisitop1m",
                "methods=[cvnet_global, cvnet_rerank]", "extraction.shard_size=2", "viz.num_queries=1",
                "viz.height=40") == 0
    assert "| Method | synth M | synth H | synth+1M M | synth+1M H |" in capsys.readouterr().out
    res = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    plain, with_1m = res["results"]["synth"]["cvnet_global"], res["results"]["synth+1m"]["cvnet_global"]
    for p in ("easy", "medium", "hard"):  # distractors only add negatives: a global ranking cannot improve
        assert with_1m["mAP"][p] <= plain["mAP"][p] + 1e-9
    assert any("synth+1m_cvnet_rerank" in g for g in res["grids"])
    assert not list((tmp_path / "cache").glob("*.shards"))  # merged shards are cleaned up
