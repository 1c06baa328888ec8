"""Closed forms (sympy) of a pattern's cost, and its growth class.

A pattern may state its number of attended pairs as an `nnz` expression in its parameters;
here it becomes a sympy expression, is evaluated exactly for the bound parameters (the
analysis compares it with the exact count), and divided by the number of (query, key)
pairs to give the density. The growth class comes from exact counts at doubling sizes.
"""

from __future__ import annotations

import math

import sympy as sp

from attndsl.analysis.blocks import decompose
from attndsl.errors import AttnError
from attndsl.lang import ir
from attndsl.semantics.bind import BoundPattern, bind
from attndsl.semantics.evaluate import Evaluator, fn_locals
from attndsl.semantics.evaluate import lift as _lift
from attndsl.semantics.inputs import route_inputs


class NoFormula(Exception):
    """The expression uses an operation sympy cannot express in closed form here."""


def to_sympy(e: ir.Expr, env: dict):
    """A static typed expression as sympy; env maps names to sympy values."""
    if isinstance(e, ir.IntLit):
        return sp.Integer(e.value)
    if isinstance(e, ir.FloatLit):
        return sp.Float(e.value)
    if isinstance(e, ir.BoolLit):
        return sp.true if e.value else sp.false
    if isinstance(e, ir.Name):
        if e.id in env:
            return env[e.id]
        if e.value is not None:  # a constant
            return to_sympy(e.value, {})
        raise NoFormula(e.id)
    if isinstance(e, ir.TupleLit):
        return tuple(to_sympy(i, env) for i in e.items)
    if isinstance(e, ir.LetExpr):
        inner = dict(env)
        inner[e.name] = to_sympy(e.value, env)
        return to_sympy(e.body, inner)
    if isinstance(e, ir.Unary):
        x = to_sympy(e.operand, env)
        return _lift(lambda a: sp.Not(a) if e.op == "not" else -a if e.op == "-" else
                     _no("~"), x)
    if isinstance(e, ir.Binary):
        a, b = to_sympy(e.left, env), to_sympy(e.right, env)
        return _lift(lambda x, y: _binop(e.op, x, y), a, b)
    if isinstance(e, ir.Compare):
        vals = [to_sympy(o, env) for o in e.operands]
        rel = {"<": sp.Lt, "<=": sp.Le, ">": sp.Gt, ">=": sp.Ge, "==": sp.Eq, "!=": sp.Ne}
        parts = [_lift(lambda x, y, op=op: rel[op](x, y), vals[i], vals[i + 1])
                 for i, op in enumerate(e.ops)]
        out = parts[0]
        for p in parts[1:]:
            out = _lift(sp.And, out, p)
        return out
    if isinstance(e, ir.IfExpr):
        c, a, b = (to_sympy(x, env) for x in (e.cond, e.then, e.orelse))
        return _lift(lambda c_, a_, b_: sp.Piecewise((a_, c_), (b_, True)), c, a, b)
    if isinstance(e, ir.Index):
        base = to_sympy(e.base, env)
        if isinstance(base, tuple) and isinstance(e.index, ir.IntLit):
            return base[e.index.value]
        raise NoFormula("index")
    if isinstance(e, ir.Call):
        if e.ref == "fn":
            return to_sympy(e.body, fn_locals(e, to_sympy, env))
        if e.ref == "builtin":
            return BUILTIN_IMPLS[e.func]([to_sympy(a, env) for a in e.args])
    raise NoFormula(type(e).__name__)


def _no(what):
    raise NoFormula(what)


def _binop(op, a, b):
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b
    if op == "//":
        return sp.floor(a / b)
    if op == "%":
        return sp.Mod(a, b)
    if op == "**":
        return a ** b
    if op == "and":
        return sp.And(a, b)
    if op == "or":
        return sp.Or(a, b)
    raise NoFormula(op)


def _log2floor(x):
    # ilog2 is defined for x >= 1 only; Max keeps untaken Piecewise branches finite
    return sp.floor(sp.log(sp.Max(x, 1), 2))


def _b_minmax(f):
    def impl(args):
        if len(args) == 1 and isinstance(args[0], tuple):
            return f(*args[0])
        return _lift(f, *args)
    return impl


def _b_reduce(f):
    return lambda args: f(*args[0]) if isinstance(args[0], tuple) else args[0]


def _no_formula(name):
    def impl(args):
        raise NoFormula(name)
    return impl


# One entry per built-in of lang/builtins.BUILTINS (tests/test_architecture.py checks that
# none is missing); those without a closed form here raise NoFormula.
BUILTIN_IMPLS = {
    "abs": lambda args: _lift(sp.Abs, *args),
    "min": _b_minmax(sp.Min),
    "max": _b_minmax(sp.Max),
    "clamp": lambda args: _lift(lambda x, lo, hi: sp.Min(sp.Max(x, lo), hi), *args),
    "cdiv": lambda args: _lift(lambda a, b: sp.ceiling(a / b), *args),
    "popcount": _no_formula("popcount"),
    "ilog2": lambda args: _lift(_log2floor, *args),
    "bit_length": lambda args: _lift(lambda x: sp.Piecewise(
        (0, sp.Eq(x, 0)), (_log2floor(sp.Abs(x)) + 1, True)), *args),
    "is_pow2": _no_formula("is_pow2"),
    "all": _b_reduce(sp.And),
    "any": _b_reduce(sp.Or),
    "sum": _b_reduce(sp.Add),
    "prod": _b_reduce(sp.Mul),
    "float": lambda args: args[0],
    "floor": _no_formula("floor"),
    "sqrt": lambda args: _lift(sp.sqrt, *args),
    "exp": _no_formula("exp"),
    "log": _no_formula("log"),
    "tanh": _no_formula("tanh"),
}


def symbols_of(checked) -> dict:
    """A sympy symbol per parameter (tuples become one symbol per axis)."""
    env = {}
    for p, t in checked.params:
        kw = {"integer": True} if t.kind == "int" else {}
        if t.n is None:
            env[p.name] = sp.Symbol(p.name, **kw)
        else:
            env[p.name] = tuple(sp.Symbol(f"{p.name}_{i}", **kw) for i in range(t.n))
    return env


def nnz_formula(bp):
    """(sympy nnz, its exact value here, sympy density) or None where no formula applies."""
    st = bp.checked.nnz
    if st is None:
        return None
    ev = Evaluator(bp.env, {})
    if st.when is not None and not all_true(ev.eval(st.when)):
        return None
    env = symbols_of(bp.checked)
    try:
        expr = to_sympy(st.expr, env)
        nq = sp.Mul(*[to_sympy(s, env) for s in bp.checked.qspace.sizes])
        nk = sp.Mul(*[to_sympy(s, env) for s in bp.checked.kspace.sizes])
    except NoFormula:
        return None
    value = ev.eval(st.expr)
    return expr, int(value), expr / (nq * nk)


def all_true(v) -> bool:
    return all(v) if isinstance(v, tuple) else bool(v)


def substitute(expr, bp) -> int:
    """Evaluate a sympy formula at the bound parameters (exact integer arithmetic)."""
    env = symbols_of(bp.checked)
    subs = {}
    for name, sym in env.items():
        val = bp.values[name]
        if isinstance(sym, tuple):
            subs.update({s: v for s, v in zip(sym, val)})
        else:
            subs[sym] = val
    return expr.subs(subs)


# ------------------------------------------------------------------ growth


CLASSES = [("O(N)", lambda n: n), ("O(N log N)", lambda n: n * math.log2(n)),
           ("O(N sqrt N)", lambda n: n ** 1.5), ("O(N^2)", lambda n: n * n)]


def growth_class(bp: BoundPattern, max_tokens: int = 1 << 18) -> str:
    """Fit exact pair counts at four doubling sizes (other parameters fixed)."""
    if bp.average or bp.content_dependent or bp.checked.qspace is None:
        return "unknown (averaged or content-dependent pattern)"
    if set(bp.inputs) - set(route_inputs(bp)):  # gate inputs leave the mask alone
        return "unknown (the mask depends on run-time inputs)"
    size_params = []
    for sz in bp.checked.qspace.sizes + bp.checked.kspace.sizes:
        if isinstance(sz, ir.Name) and sz.ref == "param" and sz.id not in size_params:
            size_params.append(sz.id)
    if not size_params:
        return "unknown (the space sizes are not parameters)"
    others = [abs(v) for k, v in bp.values.items() if k not in size_params
              and isinstance(v, int) and not isinstance(v, bool)]
    others += [abs(x) for k, v in bp.values.items() if k not in size_params
               and isinstance(v, tuple) for x in v if isinstance(x, int)
               and not isinstance(x, bool)]
    # start well past the other parameters (windows, blocks) so borders matter little
    m = max(others, default=1)
    d = len(size_params)
    base = max(16, math.ceil((64 * m) ** (1.0 / d)), {1: 2, 2: 16}.get(d, 4) * m)
    counts, ns, subs = [], [], []
    for j in range(4):
        values = dict(bp.values)
        for i, name in enumerate(size_params):
            # a multiple of the given size, so that requires such as `H % tile == 0` that
            # hold for it hold here too; one axis doubles per step, so N doubles exactly
            given = max(1, bp.values[name])
            start = given * math.ceil(max(base, given) / given)
            values[name] = start * 2 ** ((j + d - 1 - i) // d)
        try:
            sub = bind(bp.checked, values)
        except AttnError as e:  # a size the constraints reject: no fit
            tried = ", ".join(f"{n}={values[n]}" for n in size_params)
            return f"unknown (the pattern's constraints reject the larger sizes {tried}: " \
                   f"{e.message})"
        if sub.nq > max_tokens:  # decided before any counting
            return "unknown (sizes too large to count)"
        subs.append(sub)
    for sub in subs:
        n = sub.nq
        counts.append(sum(decompose(sub, head=h).nnz for h in (
            range(sub.heads) if sub.head_dependent and sub.heads else [None])))
        ns.append(n)
    # fit the increments, so constant border terms (c*N - d) do not bend the fit
    best, spread = "unknown", math.inf
    for name, g in CLASSES:
        r = [(counts[i + 1] - counts[i]) / (g(ns[i + 1]) - g(ns[i])) for i in range(3)]
        if min(r) <= 0:
            continue
        s = max(r) / min(r)
        if s < spread:
            best, spread = name, s
    return f"{best} (fit to exact counts at N = {', '.join(map(str, ns))})"
