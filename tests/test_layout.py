"""The house by job: imports flow one way (scripts -> helpers -> models / datasets -> common), no module imports
another that imports it back (function-level imports included), and no library file or function grows past what
a reader can hold."""
import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "models", "datasets", "helpers")
#: What each floor may import from the project (its own package always).
ALLOWED = {"common": set(), "models": {"common"}, "datasets": {"common"}, "helpers": {"common", "models", "datasets"}}
MAX_FILE_LINES = 700
MAX_FUNCTION_LINES = 120


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in the file (``from pkg import mod`` counts as ``pkg.mod``)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(path, known) - {name} for name, path in known.items()}


def test_imports_flow_down_the_floors():
    wrong = []
    for module, imported in _graph().items():
        floor = module.split(".")[0]
        for other in imported:
            if other.split(".")[0] not in ALLOWED[floor] | {floor}:
                wrong.append(f"{module} imports {other}")
    assert not wrong, "imports up a floor:\n" + "\n".join(sorted(wrong))


def test_no_import_circle():
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a circle of jobs
    edges = {m: {o for o in deps if not (m == o.rpartition(".")[0] or o == m.rpartition(".")[0])}
             for m, deps in graph.items()}
    state, stack, circles = defaultdict(int), [], []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for o in sorted(edges.get(m, ())):
            if state[o] == 1:
                circles.append(" -> ".join(stack[stack.index(o):] + [o]))
            elif state[o] == 0:
                visit(o)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if state[m] == 0:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize("package", PACKAGES)
def test_files_and_functions_a_reader_can_hold(package):
    long = []
    scripts = [p for p in ROOT.glob("*.py")] if package == "helpers" else []
    for path in [*(ROOT / package).rglob("*.py"), *scripts]:
        source = path.read_text()
        where = path.relative_to(ROOT)
        if path.parent != ROOT and len(source.splitlines()) > MAX_FILE_LINES:
            long.append(f"{where}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{where}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)
