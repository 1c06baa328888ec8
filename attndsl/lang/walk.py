"""The one generic traversal of the IR: every pass that needs "all sub-expressions" uses it
instead of its own walk over `dataclasses.fields`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from attndsl.errors import Span
from attndsl.lang import ir

# Fields that point at another definition rather than holding a sub-tree: a called
# function's instantiated body, a constant's defining expression, a called or included
# pattern's typed IR. `links=True` follows them.
_LINKS = {(ir.Call, "body"), (ir.Call, "callee"), (ir.Name, "value"),
          (ir.PatternRef, "checked")}


def _is_node(x) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(
        x, type | ir.Type | Span | ir.CheckedPattern)


def _nodes(v) -> Iterator:
    if _is_node(v):
        yield v
    elif isinstance(v, tuple | list):
        for x in v:
            yield from _nodes(x)


def children(node, links: bool = False) -> Iterator:
    """The direct sub-nodes of an IR node, in field order."""
    for f in dataclasses.fields(node):
        if f.name in ("span", "ty"):
            continue
        if (type(node), f.name) in _LINKS:
            if not links:
                continue
            v = getattr(node, f.name)
            if isinstance(v, ir.CheckedPattern):
                continue  # another pattern: its own tree, not part of this one
            yield from _nodes(v)
            continue
        yield from _nodes(getattr(node, f.name))


def walk(node, links: bool = False, enter: Callable[[object], bool] | None = None
         ) -> Iterator:
    """Every node under `node` (itself first), depth first; `enter(x)` False skips x's
    sub-nodes."""
    stack = [node]
    while stack:
        x = stack.pop()
        yield x
        if enter is None or enter(x):
            stack.extend(reversed(list(children(x, links))))


def names(node, links: bool = False) -> Iterator[ir.Name]:
    """Every Name under `node`."""
    return (x for x in walk(node, links) if isinstance(x, ir.Name))
