"""The package's layout holds its rules: no import cycles, the torch line drawn by files, no training code under the
pipelines or benchmarks, and no file too long to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "restoration"
MAX_LINES = 600


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in the file (inside functions too)."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from restoration import codec` imports the module restoration.codec; `from a.b import f` a.b
                found = [
                    f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                    for alias in node.names
                ]
            else:
                continue
            for target in found:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "restoration":
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "restoration.pipelines.restore" in graph["restoration.cli"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    package = tmp_path / "restoration"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from restoration.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from restoration import a\n")  # lazy imports count too
    graph = import_graph(package)
    assert graph["restoration.a"] == {"restoration.sub.b"}
    assert find_cycle(graph) == ["restoration.a", "restoration.sub.b", "restoration.a"]


def test_pipelines_and_benchmarks_take_nothing_from_training_code():
    graph = import_graph()
    leaks = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith(("restoration.pipelines", "restoration.bench"))
        for target in targets
        if target.startswith("restoration.train")
    }
    assert not leaks


def test_the_data_side_and_the_command_line_import_no_torch():
    """Ray Data's decode/encode/write tasks unpickle functions of these modules: importing them must not load torch
    (about 2 CPU s and hundreds of MB per worker process); nor may `restoration ingest --help`."""
    code = (
        "import sys\n"
        "import restoration.pipelines.restore, restoration.pipelines.synthesize, restoration.data, restoration.runs\n"
        "from restoration.cli import main\n"
        "try:\n"
        "    main(['ingest', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules)\n"
        "import restoration.inference\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] == ["False", "True"]  # and the model actors' module does load it


def test_no_file_is_too_long_to_read():
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}
