"""eval.py end to end on a tiny generated benchmark, its command line (checked before torch is imported), its
error messages and the experiment configs; the post-processed rows, the AMES / LoCoRe export and the weights'
sha256 as a user meets them."""
import hashlib
import importlib.util
import json
import logging
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers.config import load_config
from helpers.report.titles import NOT_COMPARABLE, load_paper_results, paper_figure
from helpers.schemas import EVAL
from tests.support.ames_loader import read_ames_shortlist
from tests.support.launch import run_two_cpu_ranks

REPO = Path(__file__).resolve().parents[2]


def _load_eval():
    spec = importlib.util.spec_from_file_location("eval_script", REPO / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ev = _load_eval()

# 4 training images: the built-in config's whitening row learns on them (d = 3)
TINY_SYNTH = ("data.synthetic.config={n_landmarks: 3, views_per_landmark: 3, n_distractors: 3, "
              "image_size: [96, 64], train_landmarks: 2, train_views_per_landmark: 2}")
NO_CHECKPOINTS = ("model.builtin_checkpoints.rerank=null", "model.builtin_checkpoints.backbone=null")


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, *overrides, config=None):
    argv = ([] if config is None else ["--config", str(config)]) + [
        f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}",
        f"extraction.cache_dir={tmp_path / 'cache'}", *NO_CHECKPOINTS, "progress=false", "name=run", *overrides]
    return ev.main(ev.get_args_parser().parse_args(argv))


def _script(*argv):
    """eval.py in a fresh interpreter: (exit code, stdout, stderr, whether torch / numpy / models were imported,
    seconds)."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['eval.py', *{list(argv)!r}]\n"
            "try:\n    runpy.run_path('eval.py', run_name='__main__')\n    rc = 0\n"
            "except SystemExit as exc:\n    rc = exc.code or 0\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'models', 'cv2') if m in sys.modules)\n"
            "print('@@', rc, ','.join(heavy))\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    out, _, tail = proc.stdout.rpartition("@@ ")
    rc, _, heavy = tail.strip().partition(" ")
    return int(rc), out, proc.stderr, heavy, seconds


def test_unknown_key_fails_fast_naming_it_and_the_closest_key_without_torch():
    rc, out, err, heavy, seconds = _script("devcie=cuda")
    assert rc == 2 and heavy == ""
    assert "devcie" in err and "'device'" in err and len(err.strip().splitlines()) == 1
    assert seconds < 5
    # the same from the shell, as a user types it
    proc = subprocess.run([sys.executable, "eval.py", "devcie=cuda"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "devcie" in proc.stderr and "device" in proc.stderr


def test_bad_values_are_rejected_before_anything_runs():
    for override, key in (("rerank.cvnet.mode=pape", "rerank.cvnet.mode"), ("model.depth=34", "model.depth"),
                          ("methods=[cvnet_global, dino]", "methods"), ("device=gpu", "device")):
        rc, _, err, heavy, _ = _script(override)
        assert rc == 2 and heavy == "" and key in err, (override, err)


def test_help_lists_where_the_keys_are_without_torch():
    rc, out, _, heavy, seconds = _script("--help")
    assert rc == 0 and heavy == "" and seconds < 5  # < 2 s on an idle machine; shared CI cores are slower
    assert "helpers/schemas.py" in out and "--print-config" in out


def test_print_config_prints_the_resolved_config(tmp_path):
    rc, out, _, heavy, _ = _script("--print-config", "model.depth=101", "rerank.superglobal.M=200")
    assert rc == 0 and heavy == ""
    cfg = __import__("yaml").safe_load(out)
    assert cfg["model"]["depth"] == 101 and cfg["rerank"]["superglobal"]["M"] == 200
    assert cfg["data"]["synthetic"]["name"] == "synth"  # from configs/eval_builtin.yaml
    assert cfg == load_config(REPO / "configs" / "eval_builtin.yaml", ["model.depth=101", "rerank.superglobal.M=200"],
                              schema=EVAL)
    assert not (tmp_path / "runs").exists()


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
    # the built-in config's post-processed rows: each global ranking with each option, named by what it applied
    for base in ("CVNet-Global R50", "SuperGlobal R50"):
        for applied in ("α-QE k=2 α=3", "α-DBA k=2 α=3", "α-DBA k=2 α=3 + α-QE k=2 α=3",
                        "k-reciprocal k1=20 k2=6 λ=0.3", "learned whitening (d=3)"):
            assert out.count(f"| {base} + {applied} |") == 2
    assert "| Method | mAP E | mAP M | mAP H | mP@1 M | mP@5 M | mP@10 M | mP@1 H | mP@5 H | mP@10 H |" in out
    assert "random — numbers are meaningless" in out and "NOT comparable with the papers" in out
    assert "[" not in out.split("### mAP")[1].split("###")[1]  # no paper figures beside built-in numbers

    res = json.loads((run_dir / "results.json").read_text())
    assert res["weights"] == "random — numbers are meaningless" and res["weights_sha256"] == {}
    assert len(res["methods"]) == 4 + 2 * 6 and set(res["results"]["synth"]) == set(res["methods"])
    assert res["comparable_with_papers"] is False
    assert set(res["results"]) == {"synth"}
    for method in ("cvnet_global", "cvnet_rerank", "superglobal", "superglobal_rerank"):
        r = res["results"]["synth"][method]
        assert set(r["mAP"]) == {"easy", "medium", "hard"}
        assert set(r["mP@k"]["medium"]) == {"1", "5", "10"}
        assert all(0.0 <= v <= 100.0 for v in r["mAP"].values())
    assert res["table_markdown"] in out
    assert {"build models", "total"} <= set(res["timings_s"])
    assert load_config(run_dir / "config.yaml", schema=EVAL) == res["config"]
    assert len(res["grids"]) == 4 * 2
    grid = cv2.imread(res["grids"][0])
    assert grid is not None and grid.shape[0] > 48  # 48-px thumbnails, their captions and a legend

    # per-query results: the mean of the per-query APs is the mAP; each query's top 10 with scores
    pq = res["per_query"]["datasets"]["synth"]
    nq = len(pq["queries"])
    for method, r in res["results"]["synth"].items():  # the post-processed rows too
        m = pq["methods"][method]
        for p in ("easy", "medium", "hard"):
            valid = [a for a in m["ap"][p] if a is not None]
            assert len(valid) == r["n_queries"][p] and abs(sum(valid) / len(valid) - r["mAP"][p]) < 1e-9
        assert len(m["top_ids"]) == nq and all(len(row) == 10 for row in m["top_ids"])
        assert all(s is not None for row in m["scores"] for s in row)  # every shown item was scored
        assert (m["before"] is None) == (method in ("cvnet_global", "superglobal"))
    assert pq["methods"]["cvnet_rerank"]["before"]["top_ids"] == pq["methods"]["cvnet_global"]["top_ids"]
    md = (run_dir / "results.md").read_text()
    assert res["table_markdown"] in md and "### synth: SuperGlobal + re-ranking R50 (before: SuperGlobal R50)" in md
    page = (run_dir / "report.html").read_text()
    assert page.count('<li class="tile ') == nq * len(res["methods"]) * 10 and "https://" not in page
    assert f"{run_dir / 'report.html'}" in out

    # a second run: every descriptor from the cache, and the same numbers (seeded random weights)
    caplog.clear()
    assert _run(tmp_path, TINY_SYNTH, "viz.num_queries=0", "name=again") == 0
    hits = [r for r in caplog.records if "feature cache hit" in r.getMessage()]
    # queries + database, for CVNet-Global and SuperGlobal, plain and flip-averaged (the whitening: its saved file)
    assert len(hits) == 8
    again = json.loads((tmp_path / "runs" / "again" / "results.json").read_text())
    assert again["results"] == res["results"]

    # the two runs compared query by query: nothing changed
    assert ev.main(ev.get_args_parser().parse_args(["--compare", str(run_dir), str(tmp_path / "runs" / "again")])) == 0
    text = capsys.readouterr().out
    assert "synth cvnet_rerank hard: mAP A" in text and "d +0.00" in text
    assert text.count(" queries changed, ") == len(res["methods"]) * 3 and " 1 queries changed" not in text


@pytest.mark.slow
def test_post_rows_ames_export_and_weights_hash_end_to_end(tmp_path, capsys, caplog):
    from models import CVNetGlobal
    from models.checkpoint import official_state_dict

    caplog.set_level(logging.INFO)
    torch.manual_seed(5)
    weights = tmp_path / "backbone.pyth"  # a file in the official layout, as the built-in training run writes
    torch.save({"model_state": official_state_dict(CVNetGlobal(50))}, weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    common = (TINY_SYNTH, "methods=[superglobal, superglobal_rerank]", f"model.builtin_checkpoints.backbone={weights}",
              f"model.weights_sha256={sha}", "post.rows=[dba+aqe, whitening]", "viz.num_queries=0",
              "rerank.superglobal.M=6", "export.shortlist=8")
    assert _run(tmp_path, *common, f"export.ames={tmp_path / 'ames'}") == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert res["weights_sha256"] == {str(weights): sha} and f"weights sha256: {sha}" in out
    assert res["methods"] == ["superglobal", "superglobal+dba+aqe", "superglobal+whitening", "superglobal_rerank"]
    titles = {"superglobal+dba+aqe": "SuperGlobal R50 + α-DBA k=2 α=3 + α-QE k=2 α=3",
              "superglobal+whitening": "SuperGlobal R50 + learned whitening (d=3)"}
    md, page = (tmp_path / "runs" / "run" / "results.md").read_text(), (tmp_path / "runs" / "run" /
                                                                        "report.html").read_text()
    pq = res["per_query"]["datasets"]["synth"]
    for key, title in titles.items():
        assert res["titles"][key] == title and f"| {title} |" in out and f"### synth: {title}" in md
        assert f"{title}: per-query AP (%)" in page
        valid = [a for a in pq["methods"][key]["ap"]["medium"] if a is not None]
        assert abs(sum(valid) / len(valid) - res["results"]["synth"][key]["mAP"]["medium"]) < 1e-9
    # the whitening: learned on synth_train, saved beside the weights with their sha256
    white = res["post_rows"]["superglobal+whitening"]["settings"]["whitening"]
    assert white["file"] == f"{weights}.whiten-superglobal.pt" and white["n_images"] == 4 and white["dim"] == 3
    assert torch.load(white["file"], weights_only=True)["weights_sha256"] == sha
    assert res["post_rows"]["superglobal+dba+aqe"]["settings"]["aqe"] == {"k": 2, "alpha": 3.0}

    # the export, read as AMES reads it, holds the run's own SuperGlobal ranking and similarities
    folder = tmp_path / "ames" / "synth"
    gnd = pickle.loads((folder / "gnd_synth.pkl").read_bytes())["gnd"]
    cache_nn, sims, ids = read_ames_shortlist(folder, gnd)
    sg = pq["methods"]["superglobal"]
    nq = len(pq["queries"])
    assert cache_nn.shape == (2, nq, 8) and cache_nn.dtype == torch.float64
    assert cache_nn[1].long().tolist() == [row[:8] for row in sg["top_ids"]]
    np.testing.assert_allclose(cache_nn[0].numpy(), [row[:8] for row in sg["scores"]], atol=1e-6)
    for i in range(nq):  # junk to the end, the rest in the run's order
        kept = [j for j in sg["top_ids"][i][:8] if j not in gnd[i]["junk"]]
        assert ids[i, : len(kept)].tolist() == kept
    queries = (folder / "test_query.txt").read_text().splitlines()
    gallery = (folder / "test_gallery.txt").read_text().splitlines()
    assert queries == [f"jpg/{q}" for q in pq["queries"]]
    assert all(gallery[int(j)] == f"jpg/{name}" for j, name in pq["db_names"].items())
    xq = np.fromfile(folder / "superglobal_query_global.pt", dtype=np.float32).reshape(nq, -1)
    xb = np.fromfile(folder / "superglobal_gallery_global.pt", dtype=np.float32).reshape(len(gallery), -1)
    assert xq.shape[1] == 2048
    np.testing.assert_allclose(np.take_along_axis(xq @ xb.T, cache_nn[1].long().numpy(), 1), cache_nn[0].numpy(),
                               atol=1e-5)
    assert res["exports"]["synth"]["files"]["shortlist"] == str(folder / "nn_superglobal.pkl")

    # again, exporting the re-ranked top M: the whitening is reused, the figures are the same
    caplog.clear()
    assert _run(tmp_path, *common, "name=again", f"export.ames={tmp_path / 'ames2'}", "export.reranked=true") == 0
    assert any("reusing" in r.getMessage() and "whiten-superglobal.pt" in r.getMessage() for r in caplog.records)
    again = json.loads((tmp_path / "runs" / "again" / "results.json").read_text())
    assert again["results"] == res["results"]
    cache_nn, _, _ = read_ames_shortlist(tmp_path / "ames2" / "synth", gnd)
    rr = pq["methods"]["superglobal_rerank"]
    assert cache_nn.shape == (2, nq, 6) and again["exports"]["synth"]["m"] == 6
    assert cache_nn[1].long().tolist() == [row[:6] for row in rr["top_ids"]]
    np.testing.assert_allclose(cache_nn[0].numpy(), [row[:6] for row in rr["scores"]], atol=1e-6)

    # a weights file that is not the one expected: refused before any model is built
    capsys.readouterr()
    caplog.clear()
    wrong = "0123456789abcdef" * 4
    assert _run(tmp_path, *common, "name=wrong", f"model.weights_sha256={wrong}") == 2
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(weights) in err and sha in err and wrong in err
    assert not any("stage build models" in r.getMessage() for r in caplog.records)


def _payload(datasets, queries=("a.jpg", "b.jpg"), aps=(50.0, 20.0)):
    """A results.json with per-query results: one method, the same APs under every protocol."""
    protocols = ("easy", "medium", "hard")
    per_query = {"queries": list(queries), "methods": {"superglobal": {"ap": {p: list(aps) for p in protocols}}}}
    results = {"superglobal": {"mAP": dict.fromkeys(protocols, sum(aps) / len(aps))}}
    return {"weights": "w", "results": dict.fromkeys(datasets, results),
            "per_query": {"datasets": dict.fromkeys(datasets, per_query)}}


def test_compare_command_prints_per_query_differences_without_torch(tmp_path):
    for name, aps in (("a", (50.0, 20.0)), ("b", (40.0, 35.0))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_payload(["synth"], aps=aps)))
    rc, out, err, heavy, seconds = _script("--compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert rc == 0 and "torch" not in heavy and seconds < 10, err
    assert "synth superglobal medium: mAP A 35.00  B 37.50  d +2.50" in out
    rows = out.split("synth superglobal medium:")[1].split("\n\n")[0].splitlines()
    assert rows[1] == "  2 queries changed, 0 unchanged"
    assert rows[3].split() == ["1", "b.jpg", "20.00", "35.00", "+15.00"]  # the largest gain first
    assert rows[4].split() == ["0", "a.jpg", "50.00", "40.00", "-10.00"]


def test_compare_command_refuses_runs_it_cannot_compare(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(_payload(["synth"])))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps({"results": {}}))
    (tmp_path / "oxf").mkdir()
    (tmp_path / "oxf" / "results.json").write_text(json.dumps(_payload(["roxford5k"])))
    for other, words in (("old", "no per-query results"), ("oxf", "different datasets"),
                         ("nowhere", "no results.json")):
        rc, out, err, heavy, _ = _script("--compare", str(tmp_path / "a"), str(tmp_path / other))
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    rc, _, err, _, _ = _script("--compare", str(tmp_path / "a"), str(tmp_path / "a"), "model.depth=101")
    assert rc == 2 and "--compare takes two run directories" in err


def test_missing_weights_is_a_one_line_error(tmp_path, capsys):
    rc = _run(tmp_path, TINY_SYNTH, "methods=[cvnet_global]", f"model.weights={tmp_path / 'nope.pyth'}")
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: ") and "Traceback" not in err
    assert "nope.pyth" in err and "CVPR2022_CVNet_R50.pyth" in err


def test_unavailable_device_is_a_one_line_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert _run(tmp_path, TINY_SYNTH, "device=cuda") == 2
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: ") and "CUDA is not available" in err and len(err.splitlines()) == 1


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert _run(tmp_path, "data.synthetic.name=null", "data.datasets=[roxford5k]", "methods=[cvnet_global]") == 2
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: ") and "roxford5k" in err and "Traceback" not in err


def test_a_named_dataset_is_evaluated_never_replaced_by_the_builtin_one(tmp_path, capsys, monkeypatch):
    """With the default config (data.synthetic.name=synth), a dataset the user names is evaluated or the run stops
    with one line naming it and what to fetch; the built-in benchmark is never drawn in its place (issue 19,
    row 17)."""
    import datasets.synthetic

    def refuse(*args, **kwargs):
        raise AssertionError("the built-in benchmark was drawn in place of the named dataset")

    monkeypatch.setattr(datasets.synthetic, "build_synthetic", refuse)
    root = tmp_path / "data"
    for name, says in (("roxford5k", f"python prepare_data.py download --root {root} --datasets roxford5k"),
                       ("roxfrod5k", "roxford5k, rparis6k"),
                       ("gldv2-retrieval-test", "--datasets gldv2-retrieval-test")):
        assert _run(tmp_path, f"data.datasets=[{name}]", "methods=[superglobal]") == 2, name
        err = capsys.readouterr().err
        assert err.startswith("eval.py: error: ") and len(err.strip().splitlines()) == 1, err
        assert name in err and says in err, err
        assert not (tmp_path / "runs" / "run").exists()


@pytest.mark.slow
def test_a_named_dataset_in_the_revisited_layout_is_what_is_evaluated(tmp_path):
    from datasets.synthetic import SyntheticConfig, build_synthetic

    config = SyntheticConfig(n_landmarks=2, views_per_landmark=3, n_distractors=2, image_size=(96, 64),
                             train_landmarks=2, train_views_per_landmark=2)
    build_synthetic(tmp_path / "data", name="mine", config=config, progress=False)
    assert _run(tmp_path, "data.datasets=[mine]", "methods=[superglobal]", "post.rows=[aqe]",
                "viz.num_queries=0") == 0
    res = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert set(res["results"]) == {"mine"} and set(res["results"]["mine"]) == {"superglobal", "superglobal+aqe"}
    assert not (tmp_path / "data" / "synth").exists() and NOT_COMPARABLE not in res["warnings"]


@pytest.mark.parametrize("name", ["cvnet_global_r50", "cvnet_global_r101", "cvnet_rerank_r50", "cvnet_rerank_r101",
                                  "superglobal_r50", "superglobal_r101", "superglobal_rerank_r50",
                                  "superglobal_rerank_r101"])
def test_paper_row_configs_resolve(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml", ["data.root=/data"], schema=EVAL)
    method, depth = name.rsplit("_r", 1)
    assert method in cfg["methods"] and cfg["model"]["depth"] == int(depth)
    assert cfg["model"]["weights"].endswith(f"CVPR2022_CVNet_R{depth}.pyth")
    assert cfg["data"]["datasets"] == ["roxford5k", "rparis6k"] and cfg["data"]["root"] == "/data"
    assert cfg["data"]["synthetic"]["name"] is None  # not the built-in benchmark
    assert cfg["rerank"]["cvnet"]["mode"] == "paper"
    rows = load_paper_results(cfg["paper_results"])
    assert paper_figure(rows, method=method, depth=int(depth), label="rparis6k", protocol="medium") is not None


def test_builtin_config_resolves():
    cfg = load_config(REPO / "configs" / "eval_builtin.yaml", schema=EVAL)
    assert cfg["data"]["synthetic"]["name"] == "synth" and cfg["device"] == "cpu"
    assert cfg["model"]["builtin_checkpoints"] == {"rerank": "runs/builtin/rerank/last.pyth",
                                                   "backbone": "runs/builtin/backbone/last.pyth"}


@pytest.mark.slow
def test_distractors_are_appended_after_the_database(tmp_path, capsys):
    from datasets.synthetic import SyntheticConfig, build_synthetic

    config = SyntheticConfig(n_landmarks=2, views_per_landmark=3, n_distractors=2, image_size=(96, 64),
                             train_landmarks=2, train_views_per_landmark=2)
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
    # the built-in config's post-processed rows, over the database and distractors as parts (shortlist mode)
    for row in ("aqe", "dba", "dba+aqe", "kreciprocal", "whitening"):
        assert f"cvnet_global+{row}" in res["results"]["synth+1m"]
    assert any("synth+1m_cvnet_rerank" in g for g in res["grids"])
    assert not list((tmp_path / "cache").glob("*.shards"))  # merged shards are cleaned up


@pytest.mark.slow
def test_two_cpu_ranks_split_every_stage_and_give_one_process_results(tmp_path):
    """Under torchrun --nproc_per_node 2 (gloo) each extraction (queries, database, distractors, flip variants, the
    whitening's training images) and the CVNet re-ranking of each label are split over the ranks; the results equal
    one process's to the last bit: every row's figures, per-query APs, top-k ids and scores."""
    from datasets.synthetic import SyntheticConfig, build_synthetic

    config = SyntheticConfig(n_landmarks=2, views_per_landmark=3, n_distractors=2, image_size=(96, 64),
                             train_landmarks=2, train_views_per_landmark=2)
    synth = build_synthetic(tmp_path / "data", name="synth", config=config, progress=False)
    r1m = tmp_path / "data" / "revisitop1m"
    (r1m / "jpg").mkdir(parents=True)
    for k, src in enumerate(sorted((synth / "jpg").iterdir())[:5]):  # re-used views as distractors
        (r1m / "jpg" / f"d{k}.jpg").write_bytes(src.read_bytes())
    (r1m / "revisitop1m.txt").write_text("".join(f"d{k}.jpg\n" for k in range(5)))
    common = [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}", *NO_CHECKPOINTS,
              "data.synthetic.config=" + json.dumps(config.to_dict()), "data.distractors=revisitop1m",
              "methods=[cvnet_global, cvnet_rerank]", "post.rows=[flip, whitening]", "extraction.batch_size=2",
              "viz.num_queries=0", "threads=1", "progress=false"]
    one_cache, two_cache = f"extraction.cache_dir={tmp_path / 'c1'}", f"extraction.cache_dir={tmp_path / 'c2'}"
    assert ev.main(ev.get_args_parser().parse_args([*common, "name=one", one_cache])) == 0
    logs = run_two_cpu_ranks([sys.executable, str(REPO / "eval.py"), *common, "name=two", two_cache], timeout=600)
    one, two = (json.loads((tmp_path / "runs" / name / "results.json").read_text()) for name in ("one", "two"))
    assert set(one["results"]) == {"synth", "synth+1m"} and len(one["results"]["synth"]) == 4
    assert two["results"] == one["results"] and two["per_query"] == one["per_query"]
    # every extraction of more than one piece left some to rank 1: queries, database, distractors, their flip
    # variants and the training images; rank 0 had none to redo
    plans = re.findall(r"(\S+): (\d+) pieces of about \d+ images, (\d+) to extract; rank 0/2 takes (\d+) of them",
                       logs[0])
    assert {label for label, *_ in plans} >= {"synth-query-cvnet_global-r50", "synth-db-cvnet_global-r50",
                                              "synth-db-cvnet_global-r50-flip", "revisitop1m-cvnet_global-r50",
                                              "synth_train-cvnet_global-r50"}
    assert all(int(mine) < int(todo) for _, _, todo, mine in plans)
    assert all(int(todo) > 1 for label, _, todo, _ in plans if "-db-" in label or "revisitop1m" in label)
    assert "rank 0 extracts them" not in logs[0]
    # each label's CVNet re-ranking: rank 0 scored part of the pairs, rank 1 the rest
    scored = [tuple(map(int, m)) for m in re.findall(r"rank 0/2 scored (\d+) of the (\d+) pairs", logs[0])]
    assert len(scored) == 2 and all(0 < mine < total for mine, total in scored)


def test_flip_rows_equal_a_run_with_flip_descriptors(tmp_path):
    """A "flip" row is its global ranking over flip-averaged descriptors: the same figures as the main row of a
    run with extraction.flip=true, and flip+aqe the same as that run's aqe row."""
    common = (TINY_SYNTH, "methods=[superglobal]", "viz.num_queries=0")
    assert _run(tmp_path, *common, "post.rows=[flip, flip+aqe]") == 0
    rows = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert _run(tmp_path, *common, "post.rows=[aqe]", "extraction.flip=true", "name=flipped") == 0
    flipped = json.loads((tmp_path / "runs" / "flipped" / "results.json").read_text())
    r, f = rows["results"]["synth"], flipped["results"]["synth"]
    assert r["superglobal+flip"]["mAP"] == f["superglobal"]["mAP"]
    assert r["superglobal+flip+aqe"]["mAP"] == f["superglobal+aqe"]["mAP"]
    assert r["superglobal+flip"]["mAP"] != r["superglobal"]["mAP"]  # the mirror images do change the ranking
    assert rows["titles"]["superglobal+flip+aqe"] == "SuperGlobal R50 + flip TTA + α-QE k=2 α=3"
    assert any("extraction.flip" in n for n in flipped["notes"])


def test_any_timm_model_is_evaluated_with_post_rows(tmp_path):
    pytest.importorskip("timm")
    common = (TINY_SYNTH, "methods=[timm_global, superglobal]", "model.timm.arch=timm:resnet18",
              "model.timm.pooling=gem+", "post.rows=[aqe]", "viz.num_queries=0")
    assert _run(tmp_path, *common) == 0
    res = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert res["methods"] == ["timm_global", "timm_global+aqe", "superglobal", "superglobal+aqe"]
    assert res["titles"]["timm_global"] == "timm:resnet18 (global)"
    assert res["titles"]["timm_global+aqe"] == "timm:resnet18 (global) + α-QE k=2 α=3"
    assert 0 <= res["results"]["synth"]["timm_global"]["mAP"]["medium"] <= 100
    # the same random timm model twice: same figures (seeded, the global RNG untouched)
    assert _run(tmp_path, *common, "name=again") == 0
    again = json.loads((tmp_path / "runs" / "again" / "results.json").read_text())
    assert again["results"]["synth"]["timm_global"] == res["results"]["synth"]["timm_global"]


def test_timm_method_needs_an_architecture(tmp_path, capsys):
    assert _run(tmp_path, TINY_SYNTH, "methods=[timm_global]") == 2
    assert "model.timm.arch=timm:<name>" in capsys.readouterr().err


@pytest.mark.slow
def test_a_class_folder_is_evaluated_like_the_benchmark_it_holds(tmp_path, capsys):
    """The built-in landmarks written as a class folder (datasets.synthetic.class_folder) and evaluated in the same
    run as the benchmark itself: every method and post-processed row gives, under the folder's one protocol, the
    benchmark's Medium mAP (the same images, boxes, positives and junk; another database order), with recall@k
    beside it; the report, the AMES export and the comparison of two runs work on it."""
    from datasets.revisited import load_ground_truth
    from datasets.synthetic import SyntheticConfig
    from datasets.synthetic.class_folder import write_class_folder

    config = SyntheticConfig(n_landmarks=3, views_per_landmark=3, n_distractors=3, image_size=(96, 64),
                             train_landmarks=2, train_views_per_landmark=2)
    classes = write_class_folder(tmp_path / "classes", root=tmp_path / "data", config=config)
    label = f"folder:{classes / 'test'}"
    synth = "data.synthetic.config=" + json.dumps(config.to_dict())
    assert _run(tmp_path, synth, f"data.datasets=[synth, {label}]", "rerank.cvnet.mode=paper", "viz.num_queries=1",
                "viz.height=40", f"export.ames={tmp_path / 'ames'}") == 0
    out = capsys.readouterr().out
    assert "| Method | synth M | synth H | classes/test mAP |" in out
    assert "| Method | mAP | R@1 | R@5 | R@10 | mP@1 | mP@5 | mP@10 |" in out
    res = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert len(res["methods"]) == 4 + 2 * 6 and set(res["results"]) == {"synth", label}
    for row in res["methods"]:
        ours, theirs = res["results"][label][row], res["results"]["synth"][row]
        assert list(ours["mAP"]) == ["class"] and set(ours["recall@k"]["class"]) == {"1", "5", "10"}
        assert ours["recall@k"]["class"]["10"] >= ours["recall@k"]["class"]["1"]
        if "dba" in row:  # α-DBA sums database neighbours, in database order: float32 rounding may swap a near-tie
            assert abs(ours["mAP"]["class"] - theirs["mAP"]["medium"]) < 1.0, row
            continue
        assert abs(ours["mAP"]["class"] - theirs["mAP"]["medium"]) < 1e-9, row
        assert ours["mP@k"]["class"] == pytest.approx(theirs["mP@k"]["medium"], abs=1e-9)
    pq = res["per_query"]["datasets"][label]
    assert pq["query_classes"] == ["landmark_00", "landmark_01", "landmark_02"]
    assert pq["queries"][0] == "landmark_00/lm000_q0.jpg"
    assert any(g.endswith("folder-classes-test_cvnet_rerank_q000.png") for g in res["grids"])
    page = (tmp_path / "runs" / "run" / "report.html").read_text()
    assert '<td class="cls">landmark_02</td>' in page and "https://" not in page

    # the export, read as AMES reads it: the folder's ground truth in revisitop form, its own SuperGlobal ranking
    folder = tmp_path / "ames" / "folder-classes-test"
    gnd = load_ground_truth(folder / "gnd_folder-classes-test.pkl")["gnd"]
    cache_nn, _, _ = read_ames_shortlist(folder, gnd)
    assert cache_nn[1].long()[:, :10].tolist() == pq["methods"]["superglobal"]["top_ids"]  # all 12 exported
    assert (folder / "test_query.txt").read_text().splitlines()[0] == "query/landmark_00/lm000_q0.jpg"
    assert set(res["exports"]) == {"synth", label}

    # the folder alone: the whitening row learns on its training/ images; compared query by query with the first run
    assert _run(tmp_path, synth, f"data.datasets=[{label}]", "methods=[superglobal]", "post.rows=[whitening]",
                "viz.num_queries=0", "name=alone") == 0
    alone = json.loads((tmp_path / "runs" / "alone" / "results.json").read_text())
    white = alone["post_rows"]["superglobal+whitening"]["settings"]["whitening"]
    assert white["learned_on"] == str(classes / "training") and white["n_images"] == 4
    assert alone["results"][label]["superglobal"] == res["results"][label]["superglobal"]
    capsys.readouterr()
    assert ev.main(ev.get_args_parser().parse_args(["--compare", str(tmp_path / "runs" / "run"),
                                                    str(tmp_path / "runs" / "alone")])) == 0
    text = capsys.readouterr().out
    assert f"{label} superglobal class: mAP A" in text and "note: dataset synth is in one run only" in text
