"""The house rules, read from the source with `ast`: no import cycle between modules, no
import of another module's private names, one implementation of every built-in per
interpreter, and every cache declared (and bounded) in attndsl/caches.py."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

from attndsl import caches
from attndsl.analysis import formulas, intervals
from attndsl.codegen import emit
from attndsl.lang.builtins import BUILTINS
from attndsl.semantics import evaluate

ROOT = Path(__file__).resolve().parent.parent
# the package as installed: attndsl/ is attndsl, codegen/ is attndsl.codegen
PACKAGES = {"attndsl": ROOT / "attndsl", "attndsl.codegen": ROOT / "codegen"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, base in PACKAGES.items():
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, tuple[str, ...], int]]:
    """(imported module, names taken from it, line) for every import anywhere in a module,
    function-level ones included."""
    tree = ast.parse(MODULES[name].read_text())
    pkg = name if _is_package(name) else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, tuple(a.name for a in node.names), node.lineno))
    return out


def _resolve(mod: str, names: tuple[str, ...]) -> list[str]:
    """The project modules an import statement depends on: `from pkg import sub` depends on
    the submodule, `from pkg import name` on the package's own module. (Python runs every
    parent package's __init__ first; that is how packages work, not a dependency.)"""
    if mod not in MODULES:
        return []
    if not names:
        return [mod]
    subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
    return subs + ([mod] if len(subs) < len(names) else [])


def import_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(MODULES)
    for name in MODULES:
        for mod, names, _ in _imports(name):
            for target in _resolve(mod, names):
                if target != name:
                    g.add_edge(name, target)
    return g


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles)


def test_no_private_names_imported_from_other_modules():
    bad = []
    for name in MODULES:
        for mod, names, line in _imports(name):
            if mod.split(".")[0] != "attndsl":
                continue
            for n in names:
                private = n.startswith("_") and not n.startswith("__")
                if private and f"{mod}.{n}" not in MODULES:
                    bad.append(f"{MODULES[name].relative_to(ROOT)}:{line}: {n} from {mod}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("table", [evaluate.BUILTIN_IMPLS, intervals.BUILTIN_IMPLS,
                                   emit.BUILTIN_IMPLS, formulas.BUILTIN_IMPLS],
                         ids=["evaluate", "intervals", "emit", "formulas"])
def test_every_builtin_in_every_interpreter_table(table):
    missing, extra = sorted(set(BUILTINS) - set(table)), sorted(set(table) - set(BUILTINS))
    assert not missing and not extra, f"missing: {missing}, extra: {extra}"


def test_every_cache_is_declared_in_caches():
    """No module but caches.py builds an LRU, and nothing keeps an unbounded functools cache."""
    for name, path in MODULES.items():
        text = path.read_text()
        if name == "attndsl.caches":
            continue
        assert "LRU(" not in text, f"{name} declares a cache outside attndsl/caches.py"
        assert "@cache\n" not in text and "@functools.cache\n" not in text, name
        assert "lru_cache(maxsize=None" not in text, name
    assert all(c.maxsize > 0 for c in caches.CACHES)
    assert len({c.name for c in caches.CACHES}) == len(caches.CACHES)
