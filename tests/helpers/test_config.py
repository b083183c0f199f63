"""Config merging: defaults <- YAML (with base) <- dotted overrides."""
import pytest
import yaml

from helpers.config import ConfigError, load_config, parse_override, save_resolved


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


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "none.yaml")
