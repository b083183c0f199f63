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


@pytest.mark.parametrize("override", ["rate=.nan", "rate=.inf", "rate=-.inf", "seed=.nan", "ks=[1, .inf]",
                                      "rerank.M=.inf", "out=.nan"])
def test_nan_and_inf_are_refused_naming_the_key(override):
    """Issue 19.7: NaN passed every float rule (``v < min`` is False for NaN) and inf every open bound: each
    score became nan. A null default ("out") takes any value, but not a number that is not finite."""
    key = override.split("=")[0]
    floats = key in ("rate", "out")  # an integer key refuses a float, NaN or not, as the wrong type
    with pytest.raises(ConfigError, match=rf"^{key}=.*{'not a finite number' if floats else 'wrong type'}"):
        load_config(None, [override], schema=SCHEMA)


def test_the_shipped_schemas_refuse_the_issues_nan_settings():
    from helpers.schemas import EVAL

    for override in ("rerank.superglobal.beta=.nan", "post.aqe.alpha=.inf", "rerank.cvnet.weight=.nan"):
        with pytest.raises(ConfigError, match=rf"^{override.split('=')[0]}=(nan|inf): not a finite number"):
            load_config(None, [override], schema=EVAL)


def test_an_alias_bomb_is_refused_in_one_short_line(tmp_path):
    """Issue 19.12: a 298-byte alias bomb gave a 'one-line' config error of 226 MB (the repr of the expanded
    value) and peaked at 714 MB. Aliases expanding past MAX_EXPANDED_NODES are refused when read."""
    levels = "abcdefgh"
    anchors = ["&a [x, x, x, x, x, x, x, x, x]"] + [f"&{l} [{', '.join([f'*{levels[i]}'] * 9)}]"
                                                  for i, l in enumerate(levels[1:])]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"seed: [{', '.join(anchors)}]\n")
    assert bomb.stat().st_size < 400
    with pytest.raises(ConfigError, match=r"bomb\.yaml is not valid YAML: its aliases expand to more than 100,000") \
            as caught:
        load_config(bomb, schema=SCHEMA)
    assert len(str(caught.value)) < 300
    with pytest.raises(ConfigError, match="aliases expand"):
        load_config(None, ["ks=[" + ", ".join(anchors) + "]"], schema=SCHEMA)
    (tmp_path / "fine.yaml").write_text("model: &m {depth: 101}\nrerank: {M: 3}\nks: &k [1, 2]\n")
    assert load_config(tmp_path / "fine.yaml", schema=SCHEMA)["ks"] == [1, 2]  # a few aliases stay fine


def test_a_key_given_twice_is_refused(tmp_path):
    """Issue 19.12: ``seed: 1`` then ``seed: 2`` was silently last-wins. A merge key (``<<:``) still overrides."""
    (tmp_path / "dup.yaml").write_text("seed: 1\nrerank:\n  M: 3\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"the key 'seed' is given twice \(lines 1 and 4\)"):
        load_config(tmp_path / "dup.yaml", schema=SCHEMA)
    (tmp_path / "nested.yaml").write_text("rerank: {M: 3, M: 4}\n")
    with pytest.raises(ConfigError, match="'M' is given twice"):
        load_config(tmp_path / "nested.yaml", schema=SCHEMA)
    (tmp_path / "merge.yaml").write_text("rerank: {<<: {M: 3, mode: paper}, M: 5}\n")
    assert load_config(tmp_path / "merge.yaml", schema=SCHEMA)["rerank"] == {"M": 5, "mode": "paper"}


def test_an_error_shows_a_huge_value_cut_short():
    """Every config error truncates the value it shows."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["seed=[" + ", ".join(["7"] * 10000) + "]"], schema=SCHEMA)
    assert "seed=[7, 7" in str(caught.value) and "(cut at 120 characters)" in str(caught.value)
    assert len(str(caught.value)) < 300


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
    if name.startswith(("builtin_backbone", "finetune_")) or name.endswith("_gldv2.yaml"):
        return TRAIN_BACKBONE
    return EVAL


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "paper_results.yaml"),
                         ids=lambda p: p.name)
def test_every_shipped_config_passes_its_schema(path):
    cfg = load_config(path, schema=_schema_for(path))
    assert cfg


def test_the_builtin_pipeline_fixes_its_thread_count():
    # torch's default is one thread per core, and 1 and 2 threads train different weights: the built-in run
    # (train_backbone.py, train_rerank.py, eval.py with no arguments) names one count, the same in all three
    from helpers.schemas import EVAL, TRAIN_BACKBONE, TRAIN_RERANK

    backbone = load_config(REPO / "configs" / "builtin_backbone.yaml", schema=TRAIN_BACKBONE)
    rerank = load_config(REPO / "configs" / "builtin_rerank.yaml", schema=TRAIN_RERANK)
    evaluation = load_config(REPO / "configs" / "eval_builtin.yaml", schema=EVAL)
    assert backbone["train"]["threads"] == rerank["train"]["threads"] == evaluation["threads"] == 2


def test_schema_module_imports_no_torch():
    import subprocess

    code = "import sys, helpers.schemas, cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_exponent_numbers_are_numbers_in_overrides_and_files(tmp_path):
    """1e-3 is a float as a user means it (PyYAML alone reads it as the string '1e-3', which the schema refused)."""
    from helpers.config import parse_override, read_yaml

    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], 0.001)
    assert parse_override("x=1.5e3")[1] == 1500.0 and parse_override("x=-2E+4")[1] == -20000.0
    assert parse_override("x=123")[1] == 123 and isinstance(parse_override("x=123")[1], int)
    assert parse_override("x=1e")[1] == "1e"
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 5e-5\n")
    assert read_yaml(tmp_path / "c.yaml") == {"optim": {"lr": 5e-05}}
