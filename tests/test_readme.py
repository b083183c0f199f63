"""The README and the pages under docs/ stay true: the fresh-machine lines CI runs exist; every script, module,
config, benchmark, file, test file and test they name is in the repository; every link resolves; and the
README's Layout section names every module of the library."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_PATH = ROOT / "README.md"
README = README_PATH.read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README_PATH, *DOCS]
#: The library the Layout section must name module by module (with the top-level scripts).
LIBRARY = ("common", "models", "datasets", "helpers", "bench")
#: Top-level folders whose paths the pages may name; a named path under one of them must exist.
TRACKED = ("common", "models", "datasets", "helpers", "bench", "tests", "configs", "docs")


def _line_after(marker: str) -> str:
    lines = README.splitlines()
    return lines[lines.index(marker) + 1]


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_quick_start_commands():
    main = _line_after("# install and run the built-in pipeline")
    tests = _line_after("# install and run the tests")
    for line in (main, tests):
        assert line.startswith("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && ")
    assert "train_backbone.py" in main and "train_rerank.py" in main and "eval.py" in main
    assert tests.endswith(".venv/bin/python -m pytest")


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_referenced_files_exist(page):
    text = page.read_text()
    missing = []
    for script in set(re.findall(r"python (\w+\.py)", text)):
        if not (ROOT / script).is_file():
            missing.append(script)
    for module in set(re.findall(r"python -m ((?:datasets|helpers|bench)\.\w+)", text)):
        if not (ROOT / (module.replace(".", "/") + ".py")).is_file():
            missing.append(module)
    # any path under a project folder (a file, a folder or a glob): configs/*.yaml, bench/*.py, tests/...py, ...
    pattern = rf"(?<![\w/.-])((?:{'|'.join(TRACKED)})/[\w/*.-]*)"
    for path in set(re.findall(pattern, text)):
        path = path.rstrip(".")
        if not any(ROOT.glob(path.rstrip("/"))):
            missing.append(path)
    assert not missing, f"{_page_id(page)} names what is not in the repository: {sorted(missing)}"


def _defined_names(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_named_tests_exist(page):
    missing = []
    for path, name in set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", page.read_text())):
        if not (ROOT / path).is_file() or name not in _defined_names(ROOT / path):
            missing.append(f"{path}::{name}")
    assert not missing, f"{_page_id(page)} names tests that do not exist: {sorted(missing)}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, seen, fenced = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            slug = _slug(line.lstrip("#"))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_links_resolve(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(target)
    assert not broken, f"{_page_id(page)} has broken links: {broken}"


def test_the_readme_links_every_docs_page_and_both_screenshots():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(README_PATH) if t.startswith("docs/")}
    expected = {p.resolve() for p in [*DOCS, ROOT / "docs" / "demo.png", ROOT / "docs" / "report.png"]}
    assert not expected - linked, f"not linked from README.md: {sorted(str(p) for p in expected - linked)}"


def _outside_parentheses(text: str) -> str:
    kept, depth = [], 0
    for ch in text:
        depth += ch == "("
        if depth == 0:
            kept.append(ch)
        depth -= ch == ")" and depth > 0
    return "".join(kept)


def _layout_tree() -> str:
    section = README.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```")[1]


def _named_in_layout(tree: str) -> tuple[set[str], set[str]]:
    """(folders, modules) the Layout tree names. A line at column 0 opens a block: its first word is a folder
    (``helpers/evaluation/``) or, for any other word, the top level. The indented lines under it name that folder's
    modules, each followed by its phrase in parentheses (text in parentheses names nothing)."""
    blocks: list[tuple[str, list[str]]] = []
    for line in tree.splitlines():
        if line.strip() and not line[0].isspace():
            head = line.split()[0]
            blocks.append((head if head.endswith("/") else "", []))
        elif line.strip():
            blocks[-1][1].append(line)
    folders, modules = set(), set()
    for folder, lines in blocks:
        folders.add(folder)
        names = re.findall(r"(?<![\w.])(\w+\.py)\b", _outside_parentheses(" ".join(lines)))
        modules |= {folder + name for name in names}
    return folders - {""}, modules


def test_layout_section_names_every_module():
    folders, modules = _named_in_layout(_layout_tree())
    library = [p for package in LIBRARY for p in (ROOT / package).rglob("*.py")] + list(ROOT.glob("*.py"))
    expected = {str(p.relative_to(ROOT)) for p in library if p.name != "__init__.py"}
    expected_folders = {str(Path(m).parent) + "/" for m in expected if "/" in m}
    assert not expected - modules, f"README's Layout does not name: {sorted(expected - modules)}"
    assert not expected_folders - folders, f"README's Layout has no block for: {sorted(expected_folders - folders)}"
    stale = sorted(m for m in modules if not (ROOT / m).is_file()) + sorted(f for f in folders
                                                                            if not (ROOT / f).is_dir())
    assert not stale, f"README's Layout names what is not there: {stale}"
