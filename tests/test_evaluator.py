"""Property tests: the .attn evaluator against Python's integer semantics.

Random expression trees are rendered to .attn source and evaluated three ways: by Python
directly (the oracle), by attndsl on parameter values (Python ints) and by attndsl on tensors
(every (q, k) pair of a small space at once).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attndsl
from attndsl.lang.checker import check_pattern
from attndsl.lang.loader import Loader
from attndsl.semantics.bind import bind
from attndsl.semantics.evaluate import Evaluator
from attndsl.semantics.masks import context

LIMIT = 1 << 62


class Overflow(Exception):
    pass


class Undefined(Exception):
    pass


def _chk(v):
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= LIMIT:
        raise Overflow
    return v


def py_eval(t, env):
    """The oracle: Python's own operators on Python ints."""
    kind = t[0]
    if kind == "lit":
        return t[1]
    if kind == "var":
        return env[t[1]]
    if kind == "bin":
        op, a, b = t[1], py_eval(t[2], env), py_eval(t[3], env)
        if op in ("//", "%") and b == 0:
            raise Undefined
        if op in ("<<", ">>") and b < 0:
            raise Undefined
        if op == "<<" and b >= 63:
            raise Undefined
        return _chk({"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                     "//": lambda: a // b, "%": lambda: a % b, "&": lambda: a & b,
                     "|": lambda: a | b, "^": lambda: a ^ b, "<<": lambda: a << b,
                     ">>": lambda: a >> b}[op]())
    if kind == "neg":
        return _chk(-py_eval(t[1], env))
    if kind == "inv":
        return ~py_eval(t[1], env)
    if kind == "call":
        args = [py_eval(x, env) for x in t[2]]
        f = {"abs": abs, "min": min, "max": max,
             "clamp": lambda x, lo, hi: min(max(x, lo), hi)}[t[1]]
        return _chk(f(*args))
    if kind == "cmp":
        a, b = py_eval(t[2], env), py_eval(t[3], env)
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b,
                "!=": a != b}[t[1]]
    if kind == "and":
        return py_eval(t[1], env) and py_eval(t[2], env)
    if kind == "or":
        return py_eval(t[1], env) or py_eval(t[2], env)
    if kind == "not":
        return not py_eval(t[1], env)
    if kind == "if":
        return py_eval(t[2], env) if py_eval(t[1], env) else py_eval(t[3], env)
    raise AssertionError(kind)


def src(t, names=None) -> str:
    """Fully parenthesised .attn source for a tree; `names` renames variables."""
    names = names or {}
    kind = t[0]
    if kind == "lit":
        if isinstance(t[1], bool):
            return "true" if t[1] else "false"
        return f"({t[1]})" if t[1] < 0 else str(t[1])
    if kind == "var":
        return names.get(t[1], t[1])
    if kind == "bin":
        return f"({src(t[2], names)} {t[1]} {src(t[3], names)})"
    if kind == "neg":
        return f"(-{src(t[1], names)})"
    if kind == "inv":
        return f"(~{src(t[1], names)})"
    if kind == "call":
        return f"{t[1]}({', '.join(src(x, names) for x in t[2])})"
    if kind == "cmp":
        return f"({src(t[2], names)} {t[1]} {src(t[3], names)})"
    if kind in ("and", "or"):
        return f"({src(t[1], names)} {kind} {src(t[2], names)})"
    if kind == "not":
        return f"(not {src(t[1], names)})"
    if kind == "if":
        return f"(if {src(t[1], names)} then {src(t[2], names)} else {src(t[3], names)})"
    raise AssertionError(kind)


VARS = ("a", "b", "c")
small = st.integers(-40, 40)


def ints(depth):
    leaf = st.one_of(small.map(lambda v: ("lit", v)), st.sampled_from(VARS).map(
        lambda n: ("var", n)))
    if depth == 0:
        return leaf
    sub = ints(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(st.just("bin"), st.sampled_from(["+", "-", "*", "//", "%", "&", "|", "^"]),
                  sub, sub),
        st.tuples(st.just("bin"), st.sampled_from(["<<", ">>"]), sub,
                  st.integers(0, 9).map(lambda v: ("lit", v))),
        st.tuples(st.just("neg"), sub),
        st.tuples(st.just("inv"), sub),
        st.tuples(st.just("call"), st.sampled_from(["abs"]), st.lists(sub, min_size=1,
                                                                     max_size=1)),
        st.tuples(st.just("call"), st.sampled_from(["min", "max"]),
                  st.lists(sub, min_size=2, max_size=3)),
        st.tuples(st.just("call"), st.just("clamp"), st.lists(sub, min_size=3, max_size=3)),
        st.tuples(st.just("if"), bools(depth - 1), sub, sub),
    )


def bools(depth):
    sub_i = ints(max(0, depth - 1))
    leaf = st.tuples(st.just("cmp"), st.sampled_from(["<", "<=", ">", ">=", "==", "!="]),
                     sub_i, sub_i)
    if depth == 0:
        return st.one_of(leaf, st.booleans().map(lambda v: ("lit", v)))
    sub = bools(depth - 1)
    return st.one_of(leaf, st.tuples(st.just("and"), sub, sub),
                     st.tuples(st.just("or"), sub, sub), st.tuples(st.just("not"), sub))


def _bound(expr_src: str, kind: str, values: dict, n: int = 1):
    text = (f"pattern t(a: int, b: int, c: int) {{\n    space seq({n})\n"
            f"    let r = {expr_src}\n    attend true\n}}\n")
    module = Loader().load_text(text, "<prop>")
    cp = check_pattern(module, module.scope["t"])
    assert cp.lets[0].value.ty.kind == kind
    return cp, module, bind(cp, values)


SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(t=ints(3), a=small, b=small, c=small)
def test_static_int_expressions_match_python(t, a, b, c):
    env = {"a": a, "b": b, "c": c}
    try:
        want = py_eval(t, env)
    except Overflow:
        assume(False)
    except Undefined:
        try:
            _bound(src(t), "int", env)
        except attndsl.EvaluationError:
            return
        raise AssertionError("expected an EvaluationError") from None
    _, _, bp = _bound(src(t), "int", env)
    assert bp.env["r"] == want


@SETTINGS
@given(t=bools(2), a=small, b=small, c=small)
def test_static_bool_expressions_match_python(t, a, b, c):
    env = {"a": a, "b": b, "c": c}
    try:
        want = py_eval(t, env)
    except (Overflow, Undefined):
        assume(False)
    _, _, bp = _bound(src(t), "bool", env)
    assert bp.env["r"] is want or bp.env["r"] == want


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=ints(3), a=small)
def test_tensor_int_expressions_match_python(t, a):
    """b and c become the query and key (offset to reach negatives): every pair at once."""
    n = 9
    expr = src(t, {"b": "(q - 4)", "c": "(k - 4)"})
    outs = {}
    undefined = False
    for qi in range(n):
        for ki in range(n):
            try:
                # per pair, with Python's short-circuits: the tensor evaluator's guards make
                # an error count only where its value is used
                outs[qi, ki] = py_eval(t, {"a": a, "b": qi - 4, "c": ki - 4})
            except Overflow:
                assume(False)
            except Undefined:
                undefined = True
    if undefined:
        try:  # the undefined part may be constant (caught while binding) or per (q, k)
            cp, module, bp = _bound(expr, "int", {"a": a, "b": 0, "c": 0}, n)
            ctx = context(bp, torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1))
            Evaluator(dict(bp.env), ctx).eval(cp.lets[0].value)
        except attndsl.EvaluationError:
            return
        raise AssertionError("expected an EvaluationError")
    cp, module, bp = _bound(expr, "int", {"a": a, "b": 0, "c": 0}, n)
    ctx = context(bp, torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1))
    ev = Evaluator(dict(bp.env), ctx)
    got = torch.as_tensor(ev.eval(cp.lets[0].value)).expand(n, n)
    want = torch.tensor([[outs[i, j] for j in range(n)] for i in range(n)])
    assert torch.equal(got, want)


def test_floor_semantics_examples():
    cases = {"-7 // 2": -4, "-7 % 2": 1, "7 % -2": -1, "7 // -2": -4, "-1 >> 3": -1,
             "1 << 40": 1 << 40, "~5": -6, "-8 & 7": 0, "2 ** 10": 1024, "cdiv(7, 2)": 4,
             "cdiv(-7, 2)": -3, "popcount(255)": 8, "ilog2(1025)": 10, "bit_length(0)": 0,
             "clamp(5, 0, 3)": 3, "min((4, 2, 9))": 2, "sum((1, 2, 3))": 6}
    for expr, want in cases.items():
        _, _, bp = _bound(expr, "int", {"a": 0, "b": 0, "c": 0})
        assert bp.env["r"] == want, expr


def test_chained_comparison_and_tuples():
    _, _, bp = _bound("all((1, 2) < (2, 3) <= (2, 4))", "bool", {"a": 0, "b": 0, "c": 0})
    assert bp.env["r"] is True
    _, _, bp = _bound("(a, b) * 2 + c", "int", {"a": 1, "b": 2, "c": 3})
    assert bp.env["r"] == (5, 7)


def test_overflow_is_an_error():
    for expr in ("a * a * a * a * a", "1 << 63", "2 ** 70"):
        try:
            _bound(expr, "int", {"a": 1 << 20, "b": 0, "c": 0})
        except attndsl.EvaluationError as e:
            assert "overflow" in e.message or "63" in e.message
        else:
            raise AssertionError(expr)
