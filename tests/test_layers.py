"""The packages are layers that import one way (ARCHITECTURE.md, "Layers"), and no module imports itself back.

Read from the source (every import statement, the ones inside functions included: most imports here are lazy, so
importing a package in a fresh interpreter would see only a few of them):

    jpeglm.errors, .logs, .plots, .command   <-  pipeline  <-  trainer  <-  evaluation  <-  jpeglm.cli, devtools

A module may import its own layer and the layers to its left, never one to its right (one exception, ENTRY_POINTS);
and the graph of imports between modules has no cycle.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("jpeglm", "pipeline", "trainer", "evaluation")
BASE = {"jpeglm", "jpeglm.errors", "jpeglm.logs", "jpeglm.plots", "jpeglm.command"}  # what every layer may use
LAYERS = {"base": 0, "pipeline": 1, "trainer": 2, "evaluation": 3, "tools": 4}
# `python -m trainer.train` (what torchrun and the DeepSpeed launcher start) is `jpeglm train`: the same parser,
# messages and exit codes, so its main() calls the one CLI.
ENTRY_POINTS = {("trainer.train", "jpeglm.cli")}


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    top = module.split(".")[0]
    return "tools" if top == "jpeglm" else top


def project_modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the four packages."""
    out = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                    if parts[-1] == "__init__":
                        parts = parts[:-1]
                    out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports anywhere in its source}. `from a import b` counts as a.b when that
    is a module, else as a."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
        graph[name] = {_owner(t, modules) for t in targets if _owner(t, modules)} - {name}
    return graph


def _owner(target: str, modules: dict) -> str | None:
    """The project module `target` names (itself or its nearest enclosing module), or None if it is not ours."""
    parts = target.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def test_the_graph_sees_lazy_imports():
    """Guard the guard: imports inside functions and `from package import module` are edges."""
    graph = import_graph()
    assert "trainer.loading" in graph["evaluation.completion"]  # inside _setup
    assert "trainer.checkpoint" in graph["trainer.train"]  # `from trainer import checkpoint as ckpt`
    assert "pipeline.storage" in graph["pipeline.manifest"]


def test_layers_import_one_way():
    wrong = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                   if LAYERS[layer(b)] > LAYERS[layer(a)] and (a, b) not in ENTRY_POINTS)
    assert not wrong, "imports against the layers (ARCHITECTURE.md):\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = import_graph()
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
