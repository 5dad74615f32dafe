"""The package's import layering, read from the source: every import (at module level, inside
functions and under ``TYPE_CHECKING``) goes down the pipeline's layers or stays in its own, and no
modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import prefixbatch

ROOT = Path(prefixbatch.__file__).parent

# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS: list[set[str]] = [
    # shared data types, errors and helpers every layer may use
    {"errors", "paths", "optional", "logs", "policy", "config"}
    | {"grammar_spec", "sampling_params", "outputs", "pooling", "scoring"},
    {"planning"},
    {"scheduling"},
    {"execution"},
    {"tokenizer", "batch_tokenizer", "chat", "loading"},
    {"detokenizer", "io"},
    {"engine"},
    {"llm", "distributed"},
    {"jobs"},
    {"server"},
    {"cli", "__init__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    """``prefixbatch.execution.models.decoder`` for .../execution/models/decoder.py."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(("prefixbatch", *parts))


def imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """The prefixbatch modules that ``module``'s ``source`` imports (a name imported from a
    package counts as its submodule where one exists)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("prefixbatch")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("prefixbatch"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return found - {module}


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {m: imports(p.read_text(), m, p.name == "__init__.py") for m, p in MODULES.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return LAYER_OF[top]


def test_every_module_has_a_layer():
    tops = {m.split(".")[1] for m in MODULES if m != "prefixbatch"}
    assert tops <= set(LAYER_OF), f"put {tops - set(LAYER_OF)} in a layer"


def test_nothing_imports_upward():
    upward = sorted(
        f"{m} imports {i}" for m, deps in GRAPH.items() for i in deps if layer(i) > layer(m)
    )
    assert not upward


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import circles found by a depth-first search (each as the modules around it)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                found.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_no_circular_imports():
    assert not circles(GRAPH)


def test_the_checks_catch_an_upward_import_and_a_circle():
    """The reader resolves relative imports as Python does, so the checks above can fail."""
    source = (
        "from ..engine import LLMEngine\n"
        "from .models import registry\n"
        "def f():\n    from prefixbatch.jobs import job\n"
    )
    deps = imports(source, "prefixbatch.execution.worker")
    assert deps == {
        "prefixbatch.engine",
        "prefixbatch.execution.models.registry",
        "prefixbatch.jobs.job",
    }
    assert layer("prefixbatch.engine") > layer("prefixbatch.execution.worker")
    assert imports("from .decoder import X", "prefixbatch.execution.models.llama") == {
        "prefixbatch.execution.models.decoder"
    }
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
