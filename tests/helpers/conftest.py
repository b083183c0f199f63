"""A toy evaluation outcome (3 queries, 9 database images, two methods; ``toy_post_run`` adds a post-processed
row; ``toy_folder_run`` is a class folder's, under its one protocol) built with the real ranking, re-ranking record
and per-query code, for the report tests without running a model."""
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from helpers.evaluation.data import EvalSets
from helpers.evaluation.detail import MethodDetail, global_detail, global_scores, lookup_scores, ranking_detail
from helpers.evaluation.metrics import evaluate_revisited, metrics_percent
from helpers.evaluation.models import WeightsPlan
from helpers.evaluation.run import EvalOutcome, Timer
from helpers.reranking import global_ranking

GND = [{"easy": [0, 1], "hard": [2], "junk": [3], "bbx": None},
       {"easy": [4], "hard": [], "junk": [], "bbx": None},
       {"easy": [], "hard": [], "junk": [5], "bbx": None}]  # no positive under any protocol


@dataclass
class ToySet:
    """A dataset in RevisitedDataset's shape: image_paths, read(i) -> uint8 BGR, len, gnd."""

    n: int
    prefix: str
    gnd: list = field(default_factory=lambda: GND)

    def __post_init__(self):
        self.image_paths = [f"/nowhere/{self.prefix}{i:03d}.jpg" for i in range(self.n)]

    def __len__(self):
        return self.n

    def read(self, i):
        img = np.full((48, 64, 3), 40 + 20 * i, np.uint8)
        img[8:40, 8 + 4 * i : 24 + 4 * i] = (0, 0, 255) if self.prefix == "q" else (255, 200, 0)
        return img


@dataclass
class Toy:
    outcome: EvalOutcome
    final: dict  # method -> its (n_db, nq) ranking
    gnd: list


@pytest.fixture
def toy_run():
    gen = torch.Generator().manual_seed(0)
    xq = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=1)
    xb = torch.nn.functional.normalize(torch.randn(9, 8, generator=gen), dim=1)
    _, ranks = global_ranking(xq, xb)
    reranked = ranks.copy()
    reranked[:4] = reranked[:4][::-1]  # a "re-ranking" that reverses each query's top 4
    rerank_scores = [{int(j): 1.0 - 0.1 * r for r, j in enumerate(reranked[:4, q])} for q in range(3)]
    ranked = {"cvnet_global": (ranks, xq, xb)}
    cache = {}
    results, details = {}, {}
    for method, final in (("cvnet_global", ranks), ("cvnet_rerank", reranked)):
        ev = evaluate_revisited(final, GND, [1, 5])
        results[method] = metrics_percent(ev)
        if method == "cvnet_global":
            details[("toy", method)] = MethodDetail(after=global_detail(
                method, ranked, GND, kappas=[1, 5], top=5, cache=cache, evaluation=ev))
        else:
            details[("toy", method)] = MethodDetail(
                after=ranking_detail(final, ev, GND, top=5, score_of=lookup_scores(rerank_scores), source="toy"),
                before=global_detail("cvnet_global", ranked, GND, kappas=[1, 5], top=5, cache=cache),
                base="cvnet_global")
    timer = Timer()
    timer.stages["build models"] = 0.5
    outcome = EvalOutcome(results={"toy": results}, rankings={}, plan=WeightsPlan(warnings=["weights: random"]),
                          timer=timer, sets={"toy": EvalSets(query=ToySet(3, "q"), db=ToySet(9, "db"))},
                          names=["toy"], builtin=True, distractors=None, details=details)
    return Toy(outcome=outcome, final={"cvnet_global": ranks, "cvnet_rerank": reranked}, gnd=GND)


@pytest.fixture
def toy_post_run(toy_run):
    """``toy_run`` with the row ``cvnet_global+dba`` (alpha-DBA k=2 over the toy database), reported right after
    CVNet-Global, and a weights file's sha256."""
    from helpers.evaluation.post import post_rows, row_order
    from helpers.postprocess import postprocess_ranking

    outcome = toy_run.outcome
    gen = torch.Generator().manual_seed(0)  # the toy descriptors again (the same draws as toy_run)
    xq = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=1)
    xb = torch.nn.functional.normalize(torch.randn(9, 8, generator=gen), dim=1)
    ranks = toy_run.final["cvnet_global"]
    post = {"rows": ["dba"], "aqe": {"k": 2, "alpha": 3.0}, "dba": {"k": 2, "alpha": 3.0},
            "kreciprocal": {"k1": 20, "k2": 6, "lambda": 0.3}, "shortlist": 1000, "full_limit": 20000}
    (row,) = post_rows(post, kinds=["cvnet_global"])
    final = postprocess_ranking(xq, xb, ranks, row.post)
    ev = evaluate_revisited(final, GND, [1, 5])
    outcome.results["toy"][row.key] = metrics_percent(ev)
    outcome.details[("toy", row.key)] = MethodDetail(
        after=ranking_detail(final, ev, GND, top=5, score_of=global_scores(xq, xb), source="cosine"),
        before=outcome.details[("toy", "cvnet_global")].after, base="cvnet_global")
    outcome.rows = row_order(["cvnet_global", "cvnet_rerank"], [row])
    outcome.post = {row.key: {"base": "cvnet_global", "steps": ["dba"], "applied": row.applied(),
                              "settings": row.settings()}}
    outcome.weights_sha256 = {"/w/last.pyth": "ab" * 32}
    toy_run.final[row.key] = final
    return toy_run


@pytest.fixture
def toy_folder_run(tmp_path):
    """The toy run's two methods on a class folder (tests/support/class_folder.py: 2 queries, 6 gallery images),
    scored as eval.py scores one: its one protocol ('class') with recall@k; labelled ``folder:<path>``."""
    from datasets.folder import ClassFolderSet
    from helpers.evaluation.data import dataset_protocols
    from tests.support.class_folder import make_class_folder

    root = make_class_folder(tmp_path / "shoes" / "test")
    label = f"folder:{root}"
    sets = EvalSets(query=ClassFolderSet(root, "query"), db=ClassFolderSet(root, "db"))
    protocols, recall = dataset_protocols(sets.query)
    gnd = sets.query.gnd
    gen = torch.Generator().manual_seed(1)
    xq = torch.nn.functional.normalize(torch.randn(2, 8, generator=gen), dim=1)
    xb = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=1)
    _, ranks = global_ranking(xq, xb)
    reranked = ranks.copy()
    reranked[:3] = reranked[:3][::-1]
    ranked, cache = {"cvnet_global": (ranks, xq, xb)}, {}
    kw = {"kappas": [1, 5], "top": 5, "cache": cache, "protocols": protocols}
    results, details = {}, {}
    for method, final in (("cvnet_global", ranks), ("cvnet_rerank", reranked)):
        ev = evaluate_revisited(final, gnd, [1, 5], protocols=protocols, recall=recall)
        results[method] = metrics_percent(ev)
        if method == "cvnet_global":
            details[(label, method)] = MethodDetail(after=global_detail(method, ranked, gnd, evaluation=ev, **kw))
        else:
            details[(label, method)] = MethodDetail(
                after=ranking_detail(final, ev, gnd, top=5, score_of=global_scores(xq, xb), source="toy"),
                before=global_detail("cvnet_global", ranked, gnd, **kw), base="cvnet_global")
    outcome = EvalOutcome(results={label: results}, rankings={}, plan=WeightsPlan(warnings=["weights: random"]),
                          timer=Timer(), sets={label: sets}, names=[label], builtin=False, distractors=None,
                          details=details)
    return Toy(outcome=outcome, final={"cvnet_global": ranks, "cvnet_rerank": reranked}, gnd=gnd)
