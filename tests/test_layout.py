"""The tree is the architecture: the package graph has no cycles, the training script is run and never
imported, nothing edits sys.path, and `domainclip --help` imports nothing heavy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("finetune", "data_tools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported(path: Path, *, top_level_only: bool) -> set[str]:
    """The project modules `path` imports (a `from a.b import c` counts `a.b.c` when that is a module)."""
    modules = package_modules()
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level imports", "imports inside functions too"])
def test_the_package_graph_has_no_cycles(top_level_only):
    """No cycle even through the lazy imports that keep start-up fast: a deferred import is still a dependency."""
    graph = {name: imported(path, top_level_only=top_level_only) - {name} for name, path in package_modules().items()}
    assert len(graph) > 40  # the walk found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_training_script_is_run_not_imported():
    importers = [
        name
        for name, path in package_modules().items()
        if name != "finetune.train" and "finetune.train" in imported(path, top_level_only=False)
    ]
    # `domainclip train` runs it in-process, `domainclip study shots` runs it once per cell; nothing uses it as a library
    assert importers == ["finetune.cli.study", "finetune.cli.train"]


def test_no_code_edits_sys_path():
    files = [
        *(ROOT / "finetune").rglob("*.py"),
        *(ROOT / "data_tools").rglob("*.py"),
        *(ROOT / "scripts").glob("*.py"),
        *(ROOT / "tests").rglob("*.py"),
    ]
    offenders = [str(p.relative_to(ROOT)) for p in files if "sys.path.insert" in p.read_text() and p.name != "test_layout.py"]
    assert offenders == []


def test_help_imports_nothing_heavy():
    code = (
        "import sys\nfrom finetune.cli.main import build_parser\nbuild_parser()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'faiss', 'peft', 'accelerate', 'datasets', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_tests_mirror_the_package_layout():
    """tests/finetune/models/ tests finetune/models/, and so on: a test folder names a package folder."""
    folders = [d for package in PACKAGES for d in (ROOT / "tests" / package).rglob("*") if d.is_dir() and d.name != "__pycache__"]
    assert len(folders) >= 7
    unmatched = [str(d.relative_to(ROOT)) for d in folders if not (ROOT / d.relative_to(ROOT / "tests")).is_dir()]
    assert unmatched == []
