"""Built-in functions: one table shared by the type checker and the evaluator."""

from __future__ import annotations

from dataclasses import dataclass

# signature kinds: 'num' (int or float, result promoted), 'int', 'bool', 'float' (int accepted)


@dataclass(frozen=True, slots=True)
class Builtin:
    name: str
    min_args: int
    max_args: int | None  # None: any number
    arg_kind: str  # num|int|bool|float|any
    result: str  # 'same' (promoted kind of args), int, bool, float
    reduce: bool = False  # one tuple argument reduced to a scalar
    doc: str = ""


BUILTINS: dict[str, Builtin] = {b.name: b for b in [
    Builtin("abs", 1, 1, "num", "same", doc="absolute value"),
    Builtin("min", 1, None, "num", "same", doc="smallest argument, or of one tuple's items"),
    Builtin("max", 1, None, "num", "same", doc="largest argument, or of one tuple's items"),
    Builtin("clamp", 3, 3, "num", "same", doc="clamp(x, lo, hi) = min(max(x, lo), hi)"),
    Builtin("cdiv", 2, 2, "int", "int", doc="ceiling division"),
    Builtin("popcount", 1, 1, "int", "int", doc="number of set bits (x >= 0)"),
    Builtin("ilog2", 1, 1, "int", "int", doc="floor(log2(x)) for x >= 1"),
    Builtin("bit_length", 1, 1, "int", "int", doc="bits needed for |x| (Python's bit_length)"),
    Builtin("is_pow2", 1, 1, "int", "bool", doc="x is 1, 2, 4, 8, ..."),
    Builtin("all", 1, 1, "bool", "bool", reduce=True, doc="every item of a tuple is true"),
    Builtin("any", 1, 1, "bool", "bool", reduce=True, doc="some item of a tuple is true"),
    Builtin("sum", 1, 1, "num", "same", reduce=True, doc="sum of a tuple's items"),
    Builtin("prod", 1, 1, "num", "same", reduce=True, doc="product of a tuple's items"),
    Builtin("float", 1, 1, "num", "float", doc="conversion to float"),
    Builtin("floor", 1, 1, "num", "int", doc="largest integer <= x"),
    Builtin("sqrt", 1, 1, "float", "float", doc="square root (x >= 0)"),
    Builtin("exp", 1, 1, "float", "float", doc="e ** x"),
    Builtin("log", 1, 1, "float", "float", doc="natural logarithm (x > 0)"),
    Builtin("tanh", 1, 1, "float", "float", doc="hyperbolic tangent"),
]}

# Content-dependent predicates: evaluated from the q/k tensors of a call
# (semantics/dynamic.py). Per parameter: (kind, default): kind int|bool (a static parameter
# expression) or input (a run-time int array); default None: required; an 'input' default
# is false: absent.
DYNAMIC = {
    "chunk_topk": {"block": ("int", None), "chunk": ("int", None), "topk": ("int", None),
                   "starts": ("input", False), "shared": ("bool", False),
                   "budget": ("int", 0), "local": ("int", 0), "sinks": ("int", 0),
                   "norm": ("bool", True), "tail": ("int", 0)},
}
