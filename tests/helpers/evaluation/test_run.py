"""The evaluation run's pieces: the weights plan and its files' sha256, the models it builds (seeded random
weights independent of one another), the SuperGlobal re-ranking databases, the post-processed rows over +1M parts,
the AMES / LoCoRe export, and the stages of the run: the describe stage's units of work, which descriptors each
ranking reads, and the rank, post-process and score stages on toy descriptors."""
import hashlib
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.io import file_sha256
from helpers.config import ConfigError
from helpers.distributed import DistEnv
from helpers.evaluation.data import DescriptorKey, Descriptors, EvalSets, dataset_label, rank_descriptors
from helpers.evaluation.export import check_exports, export_ames
from helpers.evaluation.metrics import evaluate_revisited, metrics_percent
from helpers.evaluation.models import (
    SEED_OFFSETS,
    WeightsPlan,
    build_models,
    needed_models,
    plan_weights,
    scales_for,
    verify_weights,
)
from helpers.evaluation.post import PostRow, post_processing, rank_post_row, whiten
from helpers.evaluation.rerank import superglobal_database
from helpers.evaluation.run import (
    DescribeJob,
    EvalRun,
    RowRanking,
    Timer,
    describe_jobs,
    post_process,
    rank,
    score,
)
from helpers.postprocess import postprocess_ranking
from helpers.reranking import global_ranking, superglobal_rerank_ranking
from models import CheckpointError, CVNetGlobal, CVNetRerank, SuperGlobal, SuperGlobalRerank

CPU = torch.device("cpu")


def test_weights_plan(tmp_path):
    rerank, backbone = tmp_path / "rerank.pyth", tmp_path / "backbone.pyth"
    builtin = {"rerank": str(rerank), "backbone": str(backbone)}
    plan = plan_weights({"weights": None, "builtin_checkpoints": builtin})
    assert plan.source == "random" and plan.global_path is None and "meaningless" in plan.warnings[0]
    assert "rerank.pyth" in plan.warnings[0]  # says where it looked
    plan = plan_weights({"weights": None, "builtin_checkpoints": {"rerank": None, "backbone": None}})
    assert plan.source == "random" and "nowhere" in plan.warnings[0]
    backbone.write_bytes(b"")
    plan = plan_weights({"weights": None, "builtin_checkpoints": builtin})
    assert (plan.global_path, plan.rerank_path, plan.rerank_backbone_from_global) == (str(backbone), None, True)
    assert "random" in plan.warnings[0]
    rerank.write_bytes(b"")
    plan = plan_weights({"weights": None, "builtin_checkpoints": builtin})
    assert (plan.global_path, plan.rerank_path, plan.source) == (str(rerank), str(rerank), "builtin")
    plan = plan_weights({"weights": "w/CVPR2022_CVNet_R50.pyth", "builtin_checkpoints": builtin})
    assert plan.source == "official" and plan.rerank_path == "w/CVPR2022_CVNet_R50.pyth" and not plan.warnings


def test_a_timm_only_run_is_planned_from_its_own_weights(tmp_path):
    """The ResNet files do not concern a run of the timm model alone: no 'random' banner when model.timm.weights
    is given, one when it is not (even with built-in ResNet checkpoints on disk)."""
    backbone = tmp_path / "backbone.pyth"
    backbone.write_bytes(b"")
    cfg = {"weights": None, "builtin_checkpoints": {"backbone": str(backbone)}, "timm": {"weights": "ft/last.pyth"}}
    plan = plan_weights(cfg, {"timm_global"})
    assert (plan.source, plan.description, plan.warnings, plan.global_path) == ("timm", "ft/last.pyth", [], None)
    plan = plan_weights({**cfg, "timm": {"weights": None}}, {"timm_global"})
    assert plan.source == "random" and "model.timm.weights is unset" in plan.warnings[0]
    assert plan_weights(cfg, {"timm_global", "superglobal"}).global_path == str(backbone)


def test_needed_models():
    assert needed_models(["cvnet_global"]) == {"cvnet_global"}
    assert needed_models(["cvnet_rerank"]) == {"cvnet_global", "cvnet_rerank"}
    assert needed_models(["superglobal_rerank"]) == {"superglobal"}
    assert needed_models(["superglobal", "cvnet_rerank"]) == {"cvnet_global", "cvnet_rerank", "superglobal"}


def test_labels_and_scales():
    assert dataset_label("roxford5k", None) == "roxford5k" and dataset_label("roxford5k", "revisitop1m") == \
        "roxford5k+1m"
    cfg = {"cvnet_scales": [0.5, 1]}
    assert scales_for("cvnet_global", cfg) == (0.5, 1.0) and scales_for("superglobal", cfg) == (1.0,)
    assert scales_for("cvnet_global", {}) == (0.7071, 1.0, 1.4142)


def test_random_weights_are_seeded_per_model_and_leave_the_global_rng_alone():
    model_cfg = {"depth": 50, "superglobal": {"gemp": True, "rgem": True, "sgem": True, "relup": True,
                                              "scales": [0.7071, 1.0, 1.4142], "antialias": True}}
    plan = plan_weights({"weights": None, "builtin_checkpoints": {}})
    state = torch.random.get_rng_state()
    models = build_models(needed={"cvnet_global", "cvnet_rerank", "superglobal"}, model_cfg=model_cfg, plan=plan,
                          seed=2, device=CPU)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(not m.training for m in models.values())
    # the draws of the scheme the built-in figures were made with: torch.manual_seed(seed * 1000 + offset)
    for kind, cls in (("cvnet_global", CVNetGlobal), ("superglobal", SuperGlobal), ("cvnet_rerank", CVNetRerank)):
        torch.manual_seed(2 * 1000 + SEED_OFFSETS[kind])
        expected = cls(50).state_dict()
        got = models[kind].state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), kind
    # a model's weights do not depend on which others a run builds
    alone = build_models(needed={"cvnet_rerank"}, model_cfg=model_cfg, plan=plan, seed=2, device=CPU)
    assert torch.equal(alone["cvnet_rerank"].state_dict()["conv2ds.0.weight"],
                       models["cvnet_rerank"].state_dict()["conv2ds.0.weight"])
    assert models["superglobal"].scales == (0.7071, 1.0, 1.4142)


def test_builtin_checkpoints_feed_the_models(tmp_path):
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
    plan = plan_weights(model_cfg)
    models = build_models(needed=needed, model_cfg=model_cfg, plan=plan, seed=0, device=CPU)
    g, r = models["cvnet_global"].state_dict(), models["cvnet_rerank"].state_dict()
    torch.testing.assert_close(g["head.fc.weight"], trained_global.state_dict()["head.fc.weight"])
    torch.testing.assert_close(r["backbone.layer3.5.conv3.weight"], g["backbone.layer3.5.conv3.weight"])
    assert not torch.equal(r["conv2ds.0.weight"], trained_rerank.state_dict()["conv2ds.0.weight"])

    # the re-ranking checkpoint feeds every model, the re-ranking head included
    model_cfg["builtin_checkpoints"]["rerank"] = str(full_path)
    plan = plan_weights(model_cfg)
    models = build_models(needed=needed, model_cfg=model_cfg, plan=plan, seed=0, device=CPU)
    r = models["cvnet_rerank"].state_dict()
    torch.testing.assert_close(r["conv2ds.0.weight"], trained_rerank.state_dict()["conv2ds.0.weight"])
    torch.testing.assert_close(r["backbone.layer1.0.conv1.weight"],
                               trained_global.state_dict()["backbone.layer1.0.conv1.weight"])


@pytest.mark.parametrize("kind", ["tensor_db", "faiss"])
def test_superglobal_databases_give_the_ranking_of_the_plain_descriptors(kind):
    pytest.importorskip("faiss") if kind == "faiss" else None
    g = torch.Generator().manual_seed(0)
    xb = F.normalize(torch.randn(60, 16, generator=g), dim=1)
    xq = F.normalize(xb[:5] + 0.3 * torch.randn(5, 16, generator=g), dim=1)
    parts = [xb[:40], xb[40:]]  # as +1M passes them: database, then distractors
    _, ranks = global_ranking(xq, parts, device=CPU, with_similarities=False, rank_dtype=np.int32)
    reranker = SuperGlobalRerank(M=12, K=3, beta=0.15)
    plain = superglobal_rerank_ranking(query_vectors=xq, database=superglobal_database(parts, kind="tensor",
                                                                                       device=CPU),
                                       ranks=ranks, reranker=reranker)
    db = superglobal_database(parts, kind=kind, device=CPU)
    assert len(db) == 60
    indexed = superglobal_rerank_ranking(query_vectors=xq, database=db, ranks=ranks, reranker=reranker)
    np.testing.assert_array_equal(indexed[:12], plain[:12])
    assert not np.array_equal(plain[:12], ranks[:12])  # the re-ranking did move something


def test_weights_files_are_hashed_and_verified(tmp_path):
    path = tmp_path / "w.pyth"
    path.write_bytes(b"weights" * 1000)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path, block=100) == sha
    plan = WeightsPlan(str(path), str(path), source="official", description=str(path))
    assert verify_weights(plan, None) == {str(path): sha}  # one file, recorded once
    assert verify_weights(plan, sha.upper()) == {str(path): sha}
    wrong = "0" * 64
    with pytest.raises(CheckpointError) as err:
        verify_weights(plan, wrong)
    assert str(path) in str(err.value) and sha in str(err.value) and wrong in str(err.value)
    with pytest.raises(ConfigError, match="weights_sha256 is set, but this run uses no weights file"):
        verify_weights(WeightsPlan(), sha)
    assert verify_weights(WeightsPlan(), None) == {}
    # a missing file is left to the model builder, whose error says where the official files are
    assert verify_weights(WeightsPlan(str(tmp_path / "nope.pyth"), None), None) == {}


def _parts_setup(n_db=40, n_extra=60, nq=4, d=12):
    g = torch.Generator().manual_seed(3)
    xb = F.normalize(torch.randn(n_db + n_extra, d, generator=g), dim=1)
    xq = F.normalize(xb[:nq] + 0.2 * torch.randn(nq, d, generator=g), dim=1)
    return xq, xb, [xb[:n_db], xb[n_db:].half().float()]


def test_post_rows_over_database_parts_use_the_shortlist_mode():
    xq, xb, parts = _parts_setup()
    xb = torch.cat(parts)
    _, ranks = global_ranking(xq, parts, with_similarities=False, rank_dtype=np.int32)
    cfg = {"aqe": {"k": 2, "alpha": 3.0}, "dba": {"k": 2, "alpha": 3.0},
           "kreciprocal": {"k1": 6, "k2": 3, "lambda": 0.3}, "shortlist": 30, "full_limit": 10000}
    for steps in (("dba", "aqe"), ("kreciprocal",)):
        row = PostRow(base="superglobal", steps=steps, post=post_processing(steps, cfg))
        got = rank_post_row(row, (ranks, xq, parts))
        # the same as the concatenated database forced into shortlist mode (full_limit 0)
        forced = post_processing(steps, {**cfg, "full_limit": 0})
        expected = postprocess_ranking(xq, xb, ranks, forced)
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == ranks.dtype and not np.array_equal(got[:30], ranks[:30])
        np.testing.assert_array_equal(got[30:], ranks[30:])  # beyond the shortlist the order is kept
    # one tensor: the whole database, in full mode
    row = PostRow(base="superglobal", steps=("aqe",), post=post_processing(("aqe",), cfg))
    np.testing.assert_array_equal(rank_post_row(row, (ranks, xq, xb)), postprocess_ranking(xq, xb, ranks, row.post))
    whitening_only = PostRow(base="superglobal", steps=("whitening",), post=post_processing(("whitening",), cfg))
    assert rank_post_row(whitening_only, (ranks, xq, parts)) is ranks


def test_exports_need_their_rankings():
    cfg = {"methods": ["superglobal"], "export": {"ames": "out", "shortlist": 10, "reranked": False}}
    check_exports(cfg, {"superglobal"})
    check_exports({**cfg, "export": {"ames": None}}, {"cvnet_global"})
    with pytest.raises(ConfigError, match="add superglobal"):
        check_exports({**cfg, "methods": ["cvnet_global"]}, {"cvnet_global"})
    with pytest.raises(ConfigError, match="export.reranked=true.*add superglobal_rerank"):
        check_exports({**cfg, "export": {"ames": "out", "reranked": True}}, {"superglobal"})


def test_ames_export_holds_the_run_ranking(tmp_path):
    xq, xb, _ = _parts_setup(n_db=30, n_extra=0, nq=3)
    data_dir = tmp_path / "data" / "toy"
    (data_dir / "jpg").mkdir(parents=True)
    gnd = [{"junk": [1]}, {"junk": []}, {"junk": []}]
    with open(data_dir / "gnd_toy.pkl", "wb") as f:
        pickle.dump({"gnd": gnd}, f)
    q = SimpleNamespace(data_dir=str(data_dir), image_paths=[str(data_dir / "jpg" / f"q{i}.jpg") for i in range(3)],
                        gnd_path=str(data_dir / "gnd_toy.pkl"))
    db = SimpleNamespace(data_dir=str(data_dir), image_paths=[str(data_dir / "jpg" / f"d{i}.jpg") for i in range(30)])
    _, ranks = global_ranking(xq, xb, with_similarities=False, rank_dtype=np.int32)
    out = export_ames(tmp_path / "out", name="toy", query_set=q, db_set=db, xq=xq, xb=xb, ranks=ranks, m=8)
    assert out["m"] == 8 and "global ranking" in out["shortlist"]
    with open(out["files"]["shortlist"], "rb") as f:
        nn = pickle.load(f)
    assert nn.shape == (2, 3, 8) and nn.dtype == torch.float64
    np.testing.assert_array_equal(nn[1].long().numpy(), ranks[:8].T)
    torch.testing.assert_close(nn[0].float(), (xq @ xb.T).gather(1, nn[1].long()))
    assert (tmp_path / "out" / "toy" / "test_gallery.txt").read_text().splitlines()[:2] == ["jpg/d0.jpg",
                                                                                            "jpg/d1.jpg"]
    assert (tmp_path / "out" / "toy" / "gnd_toy.pkl").is_file()
    # the re-ranked export: the re-ranking's top min(m, M) with its scores
    final = ranks.copy()
    final[:5] = final[:5][::-1]
    scores = {(qi, int(j)): 1.0 - 0.1 * r for qi in range(3) for r, j in enumerate(final[:5, qi])}

    def score_of(ids):
        return np.array([[scores.get((qi, int(j)), np.nan) for j in row] for qi, row in enumerate(ids)])

    out = export_ames(tmp_path / "re", name="toy", query_set=q, db_set=db, xq=xq, xb=xb, ranks=ranks, m=8,
                      reranked=(final, score_of, 5))
    with open(out["files"]["shortlist"], "rb") as f:
        nn = pickle.load(f)
    assert out["m"] == 5 and nn.shape == (2, 3, 5)
    np.testing.assert_array_equal(nn[1].long().numpy(), final[:5].T)
    np.testing.assert_allclose(nn[0].numpy(), np.tile([1.0, 0.9, 0.8, 0.7, 0.6], (3, 1)), atol=1e-6)
    with pytest.raises(RuntimeError, match="no score"):
        export_ames(tmp_path / "re", name="toy", query_set=q, db_set=db, xq=xq, xb=xb, ranks=ranks, m=8,
                    reranked=(final, score_of, 8))


# --------------------------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------------------------


def test_describe_jobs_are_one_per_dataset_split_model_and_variant_with_the_distractors_once():
    jobs = describe_jobs(["a", "b"], ["cvnet_global", "superglobal"], distractors="revisitop1m",
                         flips={"cvnet_global": (False,), "superglobal": (False, True)})
    assert len(jobs) == len(set(jobs))
    assert jobs[:4] == [DescribeJob("a", "query", "cvnet_global", False), DescribeJob("a", "db", "cvnet_global", False),
                        DescribeJob("revisitop1m", "distractors", "cvnet_global", False),
                        DescribeJob("a", "query", "superglobal", False)]
    for name in ("a", "b"):
        for kind, flips in (("cvnet_global", (False,)), ("superglobal", (False, True))):
            for split in ("query", "db"):
                assert {j.flip for j in jobs if (j.dataset, j.split, j.kind) == (name, split, kind)} == set(flips)
    distractors = [j for j in jobs if j.split == "distractors"]
    assert [(j.kind, j.flip) for j in distractors] == [("cvnet_global", False), ("superglobal", False),
                                                       ("superglobal", True)]  # shared by both datasets
    assert len(jobs) == 2 * 2 * 3 + 3
    plain = describe_jobs(["a"], ["superglobal"], distractors=None, flips={"superglobal": (True,)})
    assert plain == [DescribeJob("a", "query", "superglobal", True), DescribeJob("a", "db", "superglobal", True)]


def _stage_run(rows, *, run_flip=False, distractors="revisitop1m"):
    cfg = {"data": {"root": "unused", "distractors": distractors, "min_side": None}, "extraction": {"flip": run_flip},
           "rerank": {"cvnet": {"weight": 0.5}}, "eval": {"kappas": [1, 5]}, "viz": {"top": 5}}
    gnd = [{"easy": [0, 1], "hard": [2], "junk": [3]}, {"easy": [4], "hard": [], "junk": []}]
    sets = {"toy": EvalSets(query=SimpleNamespace(gnd=gnd), db=None)}
    return EvalRun(cfg=cfg, env=DistEnv(), names=["toy"], builtin=False, sets=sets, methods=["superglobal"],
                   kinds=["superglobal"], rows=rows, models=None, extract_kw={})


def _row(steps):
    cfg = {"aqe": {"k": 2, "alpha": 3.0}, "dba": {"k": 2, "alpha": 3.0},
           "kreciprocal": {"k1": 6, "k2": 3, "lambda": 0.3}, "shortlist": 30, "full_limit": 10000}
    return PostRow(base="superglobal", steps=steps, post=post_processing(steps, cfg))


def test_the_run_settles_which_descriptors_each_ranking_reads():
    rows = [_row(("flip",)), _row(("aqe",))]
    run = _stage_run(rows)
    assert run.flips("superglobal") == (False, True)
    assert run.key("toy", "superglobal") == DescriptorKey("toy", "superglobal", False)
    assert run.key("toy", "superglobal", flip=True) == DescriptorKey("toy", "superglobal", True)
    assert [label.key for label in run.labels] == ["toy", "toy+1m"]
    flipped = _stage_run(rows, run_flip=True, distractors=None)  # extraction.flip: one variant, flipped
    assert flipped.flips("superglobal") == (True,)
    assert flipped.key("toy", "superglobal") == flipped.key("toy", "superglobal", flip=True)
    assert [label.key for label in flipped.labels] == ["toy"]
    assert _stage_run([_row(("aqe",))]).flips("superglobal") == (False,)


def test_rank_post_process_and_score_stages():
    g = torch.Generator().manual_seed(5)

    def unit(n):
        return F.normalize(torch.randn(n, 8, generator=g), dim=1)

    plain = Descriptors(query=unit(2), db=unit(30), distractors=unit(20))
    flipped = Descriptors(query=unit(2), db=unit(30), distractors=unit(20))
    descriptors = {DescriptorKey("toy", "superglobal", False): plain,
                   DescriptorKey("toy", "superglobal", True): flipped}
    projection = torch.linalg.qr(torch.randn(8, 6, generator=g))[0]
    whitening = {"mean": 0.1 * torch.randn(8, generator=g), "projection": projection}
    rows = [_row(("flip",)), _row(("whitening",)), _row(("flip", "whitening", "aqe")), _row(("aqe",))]
    run, timer, whitened = _stage_run(rows), Timer(), {}
    for label in run.labels:
        extra = label.extra is not None
        ranked = rank(run, descriptors, label, timer=timer)
        np.testing.assert_array_equal(ranked["superglobal"].ranks,
                                      rank_descriptors(plain, with_distractors=extra).ranks)
        done = {k: (v.query, v.db) for k, v in whitened.items()}
        post = post_process(run, descriptors, {"superglobal": (whitening, {})}, label, ranked, whitened=whitened,
                            timer=timer)
        assert [r.key for r in post] == [r.key for r in rows] and all(r.base == "superglobal" for r in post)
        by_key = {r.key: r.final for r in post}
        np.testing.assert_array_equal(by_key["superglobal+flip"],
                                      rank_descriptors(flipped, with_distractors=extra).ranks)
        white = Descriptors(*(whiten(x, whitening) for x in (plain.query, plain.db, plain.distractors)))
        np.testing.assert_array_equal(by_key["superglobal+whitening"],
                                      rank_descriptors(white, with_distractors=extra).ranks)
        np.testing.assert_array_equal(by_key["superglobal+aqe"], rank_post_row(rows[3], ranked["superglobal"]))
        assert set(whitened) == {DescriptorKey("toy", "superglobal", False), DescriptorKey("toy", "superglobal", True)}
        assert all((whitened[k].distractors is not None) == extra for k in whitened)
        for key, (q, b) in done.items():  # the +1M label whitens only the distractors
            assert whitened[key].query is q and whitened[key].db is b

        scores = score(run, label, [RowRanking("superglobal", ranked["superglobal"].ranks), *post], ranked,
                       timer=timer)
        gnd = run.sets["toy"].query.gnd
        for row in post:
            assert scores.results[label.key][row.key] == metrics_percent(evaluate_revisited(row.final, gnd, [1, 5]))
            detail = scores.details[(label.key, row.key)]
            assert detail.base == "superglobal"
            assert detail.before is scores.details[(label.key, "superglobal")].after  # the global ranking's detail
            np.testing.assert_array_equal(detail.after.ids, row.final[:5].T)
            np.testing.assert_array_equal(scores.rankings[(label.key, row.key)], row.final)
    assert {"rank superglobal toy", "rank superglobal toy+1m", "post superglobal+flip toy+1m"} <= set(timer.stages)
