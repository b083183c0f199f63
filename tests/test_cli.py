"""cli: --print-config, one-line config errors with exit code 2, and no torch before parsing."""
import subprocess
import sys
from pathlib import Path

import yaml

from cli import config_arg_parser, config_from_args
from helpers.config import Rule, Schema

REPO = Path(__file__).resolve().parents[1]
SCHEMA = Schema(name="toy.py", defaults={"device": "auto", "train": {"steps": 10}},
                rules={"train.steps": Rule(min=1)})


def _parse(argv):
    return config_arg_parser(description="toy", schema=SCHEMA, default_config=None,
                             example="train.steps=3").parse_args(argv)


def test_checked_config_is_returned():
    assert config_from_args(_parse(["train.steps=3"]), SCHEMA, None) == {"device": "auto", "train": {"steps": 3}}


def test_print_config_prints_the_resolved_yaml_and_exits_zero(capsys):
    assert config_from_args(_parse(["--print-config", "train.steps=4"]), SCHEMA, None) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {"device": "auto", "train": {"steps": 4}}


def test_config_error_is_one_line_with_exit_code_two(capsys):
    assert config_from_args(_parse(["train.stepz=4"]), SCHEMA, None) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.stepz" in err and "train.steps" in err and "Traceback" not in err


def test_help_names_where_the_keys_are(capsys):
    parser = config_arg_parser(description="toy", schema=SCHEMA, default_config="configs/x.yaml", example="a=1")
    text = " ".join(parser.format_help().split())
    assert "helpers/schemas.py" in text and "--print-config" in text and "sections: train" in text


def test_cli_module_loads_without_torch():
    code = "import sys, cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_error_line_stays_one_short_line_whatever_the_message(capsys):
    """Issue 19.12: a 'one-line' error was 226 MB. The scripts print every ProjectError through one_line: line
    breaks flattened, at most 2,000 characters, the start and the end kept."""
    from cli import run_reporting_errors
    from common.errors import InvalidValueError

    def fails() -> int:
        raise InvalidValueError("what failed\n" + "x" * 10**6 + "\nwhat to do")

    assert run_reporting_errors(fails, name="toy.py") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) <= 2000 + len("toy.py: error: \n")
    assert err.startswith("toy.py: error: what failed x") and err.rstrip().endswith("x what to do")
    assert "characters cut" in err
