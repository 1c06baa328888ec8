"""The rule algebra, written once: a pattern's direct mask is the union of its `attend`
rules, intersected with every `within` rule, minus every `exclude` rule; a rule inside
`on heads lo..hi` applies to those heads only (a `within` leaves the other heads alone).

Each interpreter supplies a Domain for its values: bool tensors (semantics/masks.py),
(may-true, may-false) pairs (analysis/blocks.py), generated code (codegen/emit.py).
"""

from __future__ import annotations

from typing import Protocol


class Domain(Protocol):
    def false(self): ...

    def union(self, a, b): ...

    def intersect(self, a, b): ...

    def minus(self, a, b): ...

    def in_heads(self, lo: int, hi: int): ...

    def not_in_heads(self, lo: int, hi: int): ...


def combine(rules, evaluate, dom: Domain):
    """The direct mask from (owner, RuleStmt, head range | None) items; `evaluate(owner,
    rule)` gives one rule's value in the domain."""
    attend = within = exclude = None
    for owner, rule, hr in rules:
        val = evaluate(owner, rule)
        if hr is not None:
            if rule.kind == "within":
                val = dom.union(val, dom.not_in_heads(*hr))
            else:
                val = dom.intersect(val, dom.in_heads(*hr))
        if rule.kind == "attend":
            attend = val if attend is None else dom.union(attend, val)
        elif rule.kind == "within":
            within = val if within is None else dom.intersect(within, val)
        else:
            exclude = val if exclude is None else dom.union(exclude, val)
    out = dom.false() if attend is None else attend
    if within is not None:
        out = dom.intersect(out, within)
    if exclude is not None:
        out = dom.minus(out, exclude)
    return out
