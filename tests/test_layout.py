"""The shape of the code base: no import cycles, short files, a package that imports nothing heavy until used."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"fastsoftmax": ROOT / "fastsoftmax", "fastsoftmax.kernels": ROOT / "kernels"}


def _modules() -> dict:
    """Module name -> path, for every module of the package (``kernels/`` as ``fastsoftmax.kernels``)."""
    found = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if prefix == "fastsoftmax" and (ROOT / "kernels") in path.parents:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _module_level_imports(name: str, path: Path, known: set) -> set:
    """The package's modules that ``name`` imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                stem = node.module
            targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
        for t in targets:
            if t in known and t != name:
                out.add(t)
    return out


def find_cycle(graph: dict):
    """A list of modules that import each other in a circle, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            found = visit(name, [name])
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _module_level_imports(name, path, set(modules)) for name, path in modules.items()}
    # a package's __init__ may import its own submodules (re-exports); those edges are not layering
    graph = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}
    assert find_cycle(graph) is None, "import cycle: " + " -> ".join(find_cycle(graph))
    assert graph["fastsoftmax.ops.softmax"] >= {"fastsoftmax.ops.layout"}  # the graph is really read


def test_every_file_is_under_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) >= 500}
    assert not long, f"files of 500 lines or more: {long}"


def test_kernels_and_backends_never_import_torch():
    for name, path in _modules().items():
        if name.startswith("fastsoftmax.kernels") or name == "fastsoftmax.backends.cpu":
            assert "import torch" not in path.read_text(), name


def test_package_and_cli_import_no_torch_or_numba():
    code = "import sys, fastsoftmax, fastsoftmax.apps.cli; print(sorted(m for m in ('torch', 'numba') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
