"""eval.py on the GLDv2 retrieval test: predictions from a ranking, mAP@100 per Public/Private subset against the
metric computed by hand, and a whole run on a tiny fixture in the real layout."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers.evaluation.gldv2 import predictions_from_ranks, score_predictions

REPO = Path(__file__).resolve().parents[3]


class _Solution:
    def __init__(self, public, private):
        self.public, self.private, self.ignored = public, private, []


def test_predictions_and_scores_by_hand():
    ranks = np.array([[1, 0], [0, 2], [2, 1]])  # (n_index, n_queries)
    preds = predictions_from_ranks(ranks, ["qa", "qb"], ["i0", "i1", "i2"], k=2)
    assert preds == {"qa": ["i1", "i0"], "qb": ["i0", "i2"]}
    scores = score_predictions(preds, _Solution({"qa": ["i0"]}, {"qb": ["i1", "i2"]}))
    # qa: i0 at rank 2 -> AP 1/2; qb: i2 at rank 2 -> (1/2) / 2
    assert scores == pytest.approx({"public": 50.0, "private": 25.0})


def _layout(root: Path) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    index_ids = [f"{i:x}" * 16 for i in range(6)]
    index_ids = [s[:16] for s in index_ids]
    test_ids = [f"{'abcdef'[i]}" * 16 for i in range(3)]
    for split, ids in (("index", index_ids), ("test", test_ids)):
        (root / f"{split}.csv").write_text("id\n" + "\n".join(ids) + "\n")
        for image_id in ids:
            path = root / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), rng.integers(0, 256, (100, 120, 3), dtype=np.uint8))
    (root / "retrieval_solution_v2.1.csv").write_text(
        "id,images,Usage\n"
        f"{test_ids[0]},{index_ids[1]} {index_ids[2]},Public\n"
        f"{test_ids[1]},{index_ids[3]},Private\n"
        f"{test_ids[2]},None,Ignored\n")


@pytest.mark.slow
def test_eval_runs_the_gldv2_retrieval_test(tmp_path):
    _layout(tmp_path / "data" / "gldv2")
    args = [sys.executable, "eval.py", "--config", "configs/eval_revisited.yaml", f"data.root={tmp_path / 'data'}",
            "data.datasets=[gldv2-retrieval-test]", "methods=[superglobal, superglobal_rerank]", "model.weights=null",
            "device=cpu", "extraction.cache_dir=null", "extraction.num_workers=0", f"output_dir={tmp_path / 'runs'}",
            "name=g", "rerank.superglobal.M=4", "rerank.superglobal.K=2", "data.min_side=96"]
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gldv2-retrieval-test: mAP@100" in out.stdout
    results = json.loads((tmp_path / "runs" / "g" / "results.json").read_text())
    assert results["n_queries"] == 2 and results["n_index"] == 6  # the Ignored query is not scored
    for method in ("superglobal", "superglobal_rerank"):
        assert set(results["results"][method]) == {"public", "private"}
        assert all(0 <= v <= 100 for v in results["results"][method].values())
    bad = subprocess.run([*args[:-4], "methods=[cvnet_rerank]"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "not run on gldv2-retrieval-test" in bad.stderr
