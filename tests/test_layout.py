"""The layout rules, checked on every run: one-way package imports, storage at the bottom, small modules.

Every import statement counts, also those inside functions (the app defers heavy imports that way).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_PRODUCT = {"tests", "bench", ".venv", "data", "docs", "runs"}  # docs/ holds a screenshot script, not product
MAX_LINES = 400


def product_files() -> list[Path]:
    files = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] in NOT_PRODUCT or parts[0].startswith("."):
            continue
        files.append(path)
    return files


def packages() -> set[str]:
    return {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name not in NOT_PRODUCT}


def top_of(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else path.stem  # app.py is the top-level module "app"


def imported_tops(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            tops.add(top_of(path))  # a relative import stays inside its own package
    return tops


def package_graph() -> dict[str, set[str]]:
    ours = packages() | {"app"}
    graph: dict[str, set[str]] = defaultdict(set)
    for path in product_files():
        src = top_of(path)
        graph[src] |= {t for t in imported_tops(path) if t in ours and t != src}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else path + [nxt]
            if state.get(nxt) is None and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if state.get(start) is None and (found := visit(start, [start])):
            return found
    return None


def test_the_checker_sees_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_checker_counts_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from training.runner import JobRunner\n    import ui.app\n")
    assert {"training", "ui"} <= imported_tops(module)


def test_no_cycle_between_top_level_packages():
    graph = package_graph()
    assert {"storage", "labeling", "training"} <= set(graph) | packages()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_storage_imports_no_other_project_package():
    assert package_graph().get("storage", set()) == set()


def test_imports_point_down_the_layers():
    """app -> ui -> labeling/training -> generation -> models; storage at the bottom (docs/ARCHITECTURE.md)."""
    allowed = {
        "app": {"ui", "labeling", "training", "generation", "models", "storage"},
        "ui": {"labeling", "training", "storage"},
        "labeling": {"generation", "models", "storage"},
        "training": {"models", "storage"},
        "generation": {"models"},
        "models": set(),
        "storage": set(),
    }
    graph = package_graph()
    for package, deps in graph.items():
        assert package in allowed, f"new top-level package {package}: add it to this table and to ARCHITECTURE.md"
        assert deps <= allowed[package], f"{package} imports {sorted(deps - allowed[package])}"


def test_no_product_module_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in product_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
