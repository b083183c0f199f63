"""The README's "Your own data" path, end to end on a class folder drawn here (no download): fine-tune with the
recipe on training/, evaluate test/ before and after (report, per-query results), the AMES export, few-shot
classification, index the gallery and query it. The fine-tuned model must beat the model it started from."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARCH = "timm:vit_tiny_patch16_224"


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args[0]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def _evaluate(folder: Path, out: Path, name: str, *extra: str) -> dict:
    _run("eval.py", f"data.datasets=[folder:{folder / 'test'}]", "methods=[timm_global]", f"model.timm.arch={ARCH}",
         f"output_dir={out}", f"name={name}", f"extraction.cache_dir={out / 'cache'}",
         "progress=false", "threads=2", *extra)
    return json.loads((out / name / "results.json").read_text())


@pytest.mark.slow
def test_your_own_data_path(tmp_path):
    folder, run = tmp_path / "my_photos", tmp_path / "runs" / "my_photos"
    _run("prepare_data.py", "synthetic", "--root", str(tmp_path / "data"), "--n-landmarks", "4",
         "--views-per-landmark", "5", "--n-distractors", "6", "--train-landmarks", "10",
         "--train-views-per-landmark", "8", "--image-size", "96", "64", "--class-folder", str(folder),
         "--no-progress")
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "test", "training"]

    _run("train_backbone.py", "--config", "configs/finetune_folder.yaml", f"data.root={folder / 'training'}",
         f"model.arch={ARCH}", "model.imagenet_weights=false", "data.image_size=64", "train.epochs=null",
         "train.steps=60", "train.batch_size=32", "optim.lr=1e-3", "train.num_workers=0", "train.threads=2",
         f"run.out_dir={run}", "--no-progress")
    weights = run / "last.pyth"
    assert weights.is_file()

    evals = tmp_path / "eval"
    before = _evaluate(folder, evals, "before", "model.timm.pooling=token")  # the architecture, random weights
    after = _evaluate(folder, evals, "after", f"model.timm.weights={weights}")
    (dataset,) = after["results"]
    map_before = before["results"][dataset]["timm_global"]["mAP"]["class"]
    map_after = after["results"][dataset]["timm_global"]["mAP"]["class"]
    assert map_after > map_before, (map_before, map_after)
    assert after["warnings"] == [] and "meaningless" in before["warnings"][0]
    assert set(after["results"][dataset]["timm_global"]["recall@k"]["class"]) == {"1", "5", "10"}
    assert (evals / "after" / "report.html").is_file() and (evals / "after" / "results.md").is_file()
    assert len(after["per_query"]["datasets"][dataset]["methods"]["timm_global"]["top_ids"]) == 4
    # the AMES / LoCoRe shortlists are SuperGlobal's (the official weights in a real run; random here)
    _run("eval.py", f"data.datasets=[folder:{folder / 'test'}]", "methods=[superglobal]", f"output_dir={evals}",
         "name=export", f"export.ames={tmp_path / 'ames'}", "post.rows=[]", "progress=false", "threads=2")
    assert any(p.suffix == ".pkl" for p in (tmp_path / "ames").rglob("*")), sorted((tmp_path / "ames").rglob("*"))

    out = _run("fewshot.py", "--folder", str(folder / "test" / "gallery"), "--model", ARCH, "--weights",
               str(weights), "--shots", "1", "--trials", "2", "--device", "cpu")
    assert f"weights: {weights}" in out.stdout

    index = tmp_path / "indexes" / "my_photos"
    _run("retrieve.py", "build", "--images", str(folder / "test" / "gallery"), "--index", str(index), "--model", ARCH,
         "--weights", str(weights), "--quiet")
    query = next((folder / "test" / "query").rglob("*.jpg"))
    out = _run("retrieve.py", "query", "--index", str(index), "--image", str(query), "--k", "3")
    assert out.stdout.count(str(folder / "test" / "gallery")) >= 3 or out.stdout.count("gallery") >= 3
