"""Config merging (defaults <- YAML with base <- dotted overrides) and checking against a schema."""
import sys
from pathlib import Path

import pytest
import yaml

from helpers.config import ConfigError, Rule, Schema, load_config, parse_override, save_resolved

REPO = Path(__file__).resolve().parents[2]


def test_overrides_parse_yaml_scalars():
    assert parse_override("model.depth=101") == (["model", "depth"], 101)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("eval.ks=[1, 5, 10]") == (["eval", "ks"], [1, 5, 10])
    assert parse_override("data.root=/tmp/x y") == (["data", "root"], "/tmp/x y")
    with pytest.raises(ConfigError):
        parse_override("model.depth")
    with pytest.raises(ConfigError):
        parse_override("model..depth=3")


def test_defaults_file_base_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"depth": 50, "name": "cvnet"}, "seed": 1}))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "model": {"name": "superglobal"}}))
    cfg = load_config(tmp_path / "exp.yaml", ["model.depth=101", "data.root=/d"], defaults={"seed": 0, "out": "runs"})
    assert cfg == {"seed": 1, "out": "runs", "model": {"depth": 101, "name": "superglobal"}, "data": {"root": "/d"}}
    back = yaml.safe_load(save_resolved(cfg, tmp_path / "run").read_text())
    assert back == cfg


def test_override_into_a_value_fails():
    with pytest.raises(ConfigError, match="is a value"):
        load_config(None, ["seed.x=1"], defaults={"seed": 0})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(tmp_path / "bad.yaml")


SCHEMA = Schema(
    name="toy",
    defaults={"device": "auto", "seed": 0, "rate": 0.5, "flag": False, "out": None, "ks": [1, 5],
              "model": {"depth": 50, "kwargs": {}}, "rerank": {"M": 400, "mode": "clean"}},
    rules={"device": Rule(types=(str,), pattern=r"auto|cpu|cuda(:\d+)?", pattern_text="auto, cpu, cuda or cuda:N"),
           "seed": Rule(min=0), "rate": Rule(min=0.0, max=1.0), "ks": Rule(items=int, min=1),
           "model.depth": Rule(choices=(50, 101)), "rerank.M": Rule(min=1),
           "rerank.mode": Rule(choices=("clean", "paper"))},
    open_sections=("model.kwargs",),
)


@pytest.mark.parametrize("override,named,suggested", [
    ("devcie=cuda", "devcie", "device"),
    ("rerank.m=2", "rerank.m", "rerank.M"),
    ("model.detph=101", "model.detph", "model.depth"),
    ("rerank.mdoe=paper", "rerank.mdoe", "rerank.mode"),
])
def test_unknown_key_names_it_and_the_closest_valid_one(override, named, suggested):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], schema=SCHEMA)
    assert f"unknown config key {named!r}" in str(err.value)
    assert f"did you mean {suggested!r}" in str(err.value)


def test_unknown_key_without_a_close_match_suggests_nothing():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["zzzzzz=1"], schema=SCHEMA)
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize("override,accepts", [
    ("rerank.M=abc", "an integer >= 1"),
    ("rerank.M=0", "an integer >= 1"),
    ("rerank.M=2.5", "an integer >= 1"),
    ("rerank.M=true", "an integer >= 1"),
    ("rerank.mode=pape", "one of 'clean', 'paper'"),
    ("model.depth=34", "one of 50, 101"),
    ("rate=2", "a number in [0.0, 1.0]"),
    ("seed=null", "an integer >= 0"),
    ("ks=[1, x]", "a list of integers >= 1"),
    ("ks=[0, 5]", "a list of integers >= 1"),
    ("flag=1", "a boolean"),
    ("device=gpu", "auto, cpu, cuda or cuda:N"),
    ("model=3", "a section"),
])
def test_wrong_value_names_the_key_and_what_it_accepts(override, accepts):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], schema=SCHEMA)
    assert key in str(err.value) and accepts in str(err.value)


def test_valid_values_pass_and_null_defaults_take_anything():
    cfg = load_config(None, ["rate=1", "device=cuda:1", "out=/tmp/x", "model.kwargs.anything=3",
                             "ks=[1, 10]", "model.depth=101"], schema=SCHEMA)
    assert cfg["rate"] == 1 and cfg["model"] == {"depth": 101, "kwargs": {"anything": 3}}


def test_yaml_file_keys_are_checked_too(tmp_path):
    (tmp_path / "exp.yaml").write_text("rerank:\n  M: 10\n  k: 3\n")
    with pytest.raises(ConfigError, match="'rerank.k'.*did you mean 'rerank.M'"):
        load_config(tmp_path / "exp.yaml", schema=SCHEMA)


def _schema_for(path: Path):
    from helpers.schemas import EVAL, TRAIN_BACKBONE, TRAIN_RERANK

    name = path.name
    if name.startswith("builtin_rerank") or name.startswith("cvnet_rerank_r50_gldv2"):
        return TRAIN_RERANK
    if name.startswith("builtin_backbone") or name.endswith("_gldv2.yaml"):
        return TRAIN_BACKBONE
    return EVAL


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "paper_results.yaml"),
                         ids=lambda p: p.name)
def test_every_shipped_config_passes_its_schema(path):
    cfg = load_config(path, schema=_schema_for(path))
    assert cfg


def test_schema_module_imports_no_torch():
    import subprocess

    code = "import sys, helpers.schemas, cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
