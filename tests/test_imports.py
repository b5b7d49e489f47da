"""The package's import graph points one way (GUIDE §1): no module imports, even lazily inside a function, one that
imports it back, and the config imports no other medvqa module."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medvqa"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the medvqa modules it imports anywhere in its source (module level or inside functions)."""
    modules = _modules()

    def owner(name: str) -> str | None:  # 'medvqa.data.records.SCHEMA' -> 'medvqa.data.records'
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.startswith("medvqa")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("medvqa"):
                deps |= {owner(f"{node.module}.{a.name}") for a in node.names}
        graph[name] = deps - {None, name, "medvqa"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_checker_sees_lazy_imports_and_cycles():
    graph = import_graph()
    assert "medvqa.infer" in graph["medvqa.evaluate"]  # imported inside a function only
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_config_imports_no_other_medvqa_module():
    assert import_graph()["medvqa.config"] == set()
