"""The project's shape: imports point one way (cli -> workflows -> engines), no module
imports itself back through others, modules stay small, and nothing depends on files
outside the repository."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("areal_cli", "engines", "workflows", "launchers")
# Packages that are libraries under the command line: none of them may import it.
BELOW_THE_CLI = ("engines", "workflows", "launchers")
MAX_MODULE_LINES = 400


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c` imports a.b, and a.b.c when c is a module.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        out.update(name for name in names if name in known)
    return out


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module that
    imports itself (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle_and_passes_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_project_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_nothing_below_the_cli_imports_it():
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if module.split(".")[0] in BELOW_THE_CLI
        for target in targets
        if target.split(".")[0] == "areal_cli"
    )
    assert offenders == []


def test_the_import_walk_sees_lazy_imports():
    graph = import_graph()
    # areal_cli.main imports the trainer inside a function, so that `areal --help` stays fast.
    assert "workflows.training.trainer" in graph["areal_cli.main"]


def test_no_source_module_is_over_400_lines():
    long = {
        str(path.relative_to(REPO)): n
        for path in list(module_files().values()) + sorted((REPO / "benchmarks").rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_tracked_file_outside_docs_depends_on_the_folder_beside_the_repository():
    # The folder beside our checkouts exists in development and CI, never on a user's machine.
    beside = "../" + "shared"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    naming = []
    for name in tracked:
        if name.startswith("docs/"):
            continue
        try:
            text = (REPO / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        if beside in text:
            naming.append(name)
    assert naming == []


def test_workflows_public_names_load_lazily():
    """`import workflows` loads no torch; every name of its `__all__` then resolves."""
    code = (
        "import sys, workflows\n"
        "assert not any(m.startswith('torch') for m in sys.modules), 'import workflows loaded torch'\n"
        "missing = [n for n in workflows.__all__ if getattr(workflows, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
