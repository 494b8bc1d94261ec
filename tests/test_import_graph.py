"""The library's modules import each other without cycles, and each imports on its own.

The oracle is the source itself, read with ast (not the import system, which hides a cycle
as long as the names happen to be defined in time). Two graphs: the load-time one (module
level, not under `if TYPE_CHECKING:`, not inside a function) must be acyclic; the call-time
one (also every import inside a function) must be acyclic too but for the few edges listed
in CALL_TIME_CYCLES, each with its reason. A lazy import keeps `--help` fast; it must not be
how two modules that need each other hide it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "runbook"
SKIP = ("runbook.drill.app",)  # the reference app: its own program, run inside containers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
           if not module_name(p).startswith(SKIP)}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _load_time_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _load_time_imports(node.body)
            found += _load_time_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody,
                          *(h.body for h in node.handlers)):
                found += _load_time_imports(block)
        elif isinstance(node, ast.With):
            found += _load_time_imports(node.body)
    return found


def _dynamic_imports(body: list[ast.stmt]) -> set[str]:
    """`__import__("runbook.x")` / `importlib.import_module("runbook.x")` run at load time."""
    found: set[str] = set()
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for call in ast.walk(node):
            if not (isinstance(call, ast.Call) and call.args
                    and isinstance(call.args[0], ast.Constant)
                    and isinstance(call.args[0].value, str)):
                continue
            func = call.func
            if (isinstance(func, ast.Name) and func.id == "__import__") or (
                    isinstance(func, ast.Attribute) and func.attr == "import_module"):
                found.add(call.args[0].value)
    return found


def _with_parents(name: str) -> set[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(MODULES)


def _every_import(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Every import that can run, at load time or when a function is called (not the ones
    under `if TYPE_CHECKING:`, which never run)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for other in node.orelse:
                visit(other)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for node in body:
        visit(node)
    return found


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> set[str]:
    """The library modules an import statement loads (with their parent packages)."""
    out: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            out |= _with_parents(alias.name)
        return out
    base = node.module or ""
    if node.level:
        anchor = package.split(".")
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join([*anchor, *([base] if base else [])])
    out |= _with_parents(base)
    for alias in node.names:
        if f"{base}.{alias.name}" in MODULES:
            out |= _with_parents(f"{base}.{alias.name}")
    return out


def edges(name: str, *, call_time: bool = False) -> set[str]:
    """The modules `name` imports when loaded, or (call_time) at any point it runs."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = _every_import(tree.body) if call_time else _load_time_imports(tree.body)
    out: set[str] = set()
    for node in found:
        out |= _targets(node, package)
    for dynamic in _dynamic_imports(tree.body):
        out |= _with_parents(dynamic)
    out.discard(name)
    # a package's own __init__ is loaded before its submodules: not an edge back
    return {m for m in out if not name.startswith(m + ".")}


# Call-time edges that close a cycle on purpose. Each must still exist (the test says when one
# goes, so the list only shrinks) and is the only way back along its cycle.
CALL_TIME_CYCLES: dict[tuple[str, str], str] = {}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_oracle_finds_a_cycle_and_accepts_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse('x = __import__("runbook.cli_docs").cli_docs\n')
    assert _dynamic_imports(tree.body) == {"runbook.cli_docs"}


def test_no_module_of_the_library_imports_itself_back_when_loaded() -> None:
    graph = {name: edges(name) for name in MODULES}
    assert graph["runbook.snapshot_restore"] >= {"runbook.plan", "runbook.snapshots.dump"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_call_time_reader_sees_function_imports_not_type_checking_ones() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from runbook import plan\n"
        "def f() -> None:\n    from runbook import cli\n"
        "    if TYPE_CHECKING:\n        from runbook import run\n")
    names = {n.names[0].name for n in _every_import(tree.body)
             if isinstance(n, ast.ImportFrom) and n.module == "runbook"}
    loaded = {n.names[0].name for n in _load_time_imports(tree.body)
              if isinstance(n, ast.ImportFrom) and n.module == "runbook"}
    assert names == {"cli"}
    assert loaded == set()


def test_no_cycle_even_at_call_time() -> None:
    """Imports inside functions count too: only the edges in CALL_TIME_CYCLES close a cycle."""
    graph = {name: edges(name, call_time=True) for name in MODULES}
    for (source, target), why in CALL_TIME_CYCLES.items():
        assert target in graph[source], (
            f"{source} no longer imports {target}: drop it from CALL_TIME_CYCLES ({why})")
        graph[source].discard(target)
    cycle = find_cycle(graph)
    assert cycle is None, "call-time import cycle: " + " -> ".join(cycle or [])


def test_command_modules_share_helpers_without_importing_the_cli() -> None:
    """cli.py mounts the sub-apps; they reach fail/run_action/require_yes through cli_common."""
    for name in ("runbook.cli_common", "runbook.cli_options", "runbook.cli_snapshot",
                 "runbook.cli_docs"):
        assert "runbook.cli" not in edges(name, call_time=True), name
    assert "runbook.cli_common" in edges("runbook.cli_snapshot")


def test_snapshots_and_reports_do_not_import_the_orchestrator() -> None:
    graph = {name: edges(name) for name in MODULES}
    orchestrator = {"runbook.plan", "runbook.run", "runbook.rollback", "runbook.deploy",
                    "runbook.switch", "runbook.cli"}
    for name, imported in graph.items():
        if name.startswith(("runbook.snapshots", "runbook.reports", "runbook.livedocs")):
            assert not imported & orchestrator, f"{name} imports {imported & orchestrator}"


def test_every_module_imports() -> None:
    """In a fresh interpreter, in sorted order, so the graph above is about importable code."""
    names = sorted(MODULES)
    code = f"import importlib\nfor n in {names!r}:\n    importlib.import_module(n)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
