"""The dependency rule between packages (docs: the layering in the README's "Layout") and no import cycles.

Every ``import`` in ``src/imagebind_llm`` (lazy ones inside functions too) is read with `ast`; a package may
only import the packages below it, and no module may reach itself through its imports.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "imagebind_llm"
LEAVES = {"llm", "encoders", "preprocess"}
ALLOWED = {  # package -> the packages of ours it may import (besides itself); hub is the bottom layer
    "hub": set(),
    **{leaf: {"hub"} for leaf in LEAVES},
    "model": {"hub", *LEAVES},
    "cache": {"hub", "encoders", "preprocess"},
    "engine": {"hub", "model", "cache", *LEAVES},
    "apps": {"hub", "engine", *LEAVES},
    **{top: {"hub", "engine", *LEAVES} for top in ("eval",)},
    "serve": {"hub", "engine", "apps", *LEAVES},  # the images endpoint serves apps.unclip
    "train": {"hub", "model", "cache", "eval", *LEAVES},  # eval: bind training reports zero-shot recall
    "world": {"hub"},
}
FRONT = {"__init__", "__main__", "cli"}  # the front door and the dispatcher may import everything


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = SRC.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The ``imagebind_llm.*`` modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path).split(".") if path.name == "__init__.py" else _module_name(path).split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("imagebind_llm"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *filter(None, [node.module])])
            if base.startswith("imagebind_llm"):  # `from pkg import submodule` depends on the submodule only
                found.update(f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names)
    return found


MODULES = {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    package = _package(module)
    if package in FRONT:
        return
    assert package in ALLOWED, f"{module}: package {package!r} has no place in the layering; add it to ALLOWED"
    bad = sorted(m for m in MODULES[module] if _package(m) not in ALLOWED[package] | {package})
    assert not bad, f"{module} imports {bad}, which {package!r} may not use (allowed: {sorted(ALLOWED[package])})"


def test_no_import_cycle():
    graph = {m: {i for i in imports if i in MODULES and i != m} for m, imports in MODULES.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in graph[module]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [module, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_rule_is_checked_on_real_imports():
    assert "imagebind_llm.model.factory" in MODULES["imagebind_llm.engine.engine"] or \
        "imagebind_llm.model.imagebind_llm" in MODULES["imagebind_llm.engine.engine"]
    assert {"imagebind_llm.hub"} <= MODULES["imagebind_llm.llm.kernels"]  # a relative-free leaf import is seen
