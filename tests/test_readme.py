"""The README's commands stay true: the fresh-machine lines CI runs exist, and every script, module and config
they name is in the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _line_after(marker: str) -> str:
    lines = README.splitlines()
    return lines[lines.index(marker) + 1]


def test_quick_start_commands():
    main = _line_after("# install and run the built-in pipeline")
    tests = _line_after("# install and run the tests")
    for line in (main, tests):
        assert line.startswith("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && ")
    assert "train_backbone.py" in main and "train_rerank.py" in main and "eval.py" in main
    assert tests.endswith(".venv/bin/python -m pytest")


def test_referenced_files_exist():
    for script in set(re.findall(r"python (\w+\.py)", README)):
        assert (ROOT / script).is_file(), script
    for module in set(re.findall(r"python -m ((?:datasets|helpers|bench)\.\w+)", README)):
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    for config in set(re.findall(r"(configs/[\w./-]+\.yaml)", README)):
        assert (ROOT / config).is_file(), config
    for bench in set(re.findall(r"(bench/\w+\.py)", README)):
        assert (ROOT / bench).is_file(), bench
