"""Whether a 1D pattern's direct mask reads q and k only through q - k.

Such a mask is the same on every block pair of one block diagonal, so its exact tables come
from the mask on the 2N - 1 differences alone (codegen/plan/tables.py), with no refinement
of block pairs: seconds at a million tokens for strided and dilated windows, whose
periodic rules the interval analysis cannot decide.

A syntactic proof over the checked IR, sound and deliberately narrow: each expression is
classed C (reads neither q nor k), D (a function of q - k), Q or K (q or k plus a term of
class C) or X (anything else). q - k, k - q and comparisons between a Q and a K give D;
arithmetic, logic, conditionals, lets, fn calls and built-ins keep C and D; everything
else (inputs, fields, pattern calls, content-dependent built-ins) is X.
"""

from __future__ import annotations

from attndsl.lang import ir
from attndsl.semantics.bind import BoundPattern

C, D, Q, K, X = "C", "D", "Q", "K", "X"


def difference_only(bp: BoundPattern) -> bool:
    """Every rule of `bp` (and of the patterns it includes) is of class C or D."""
    if len(bp.qshape) != 1 or len(bp.kshape) != 1 or bp.content_dependent:
        return False
    for owner, rule, _ in bp.rules:
        if _Classifier(owner).cls(rule.expr, {}) not in (C, D):
            return False
    return True


def _join(*xs: str) -> str:
    return D if D in xs else C


class _Classifier:
    def __init__(self, owner: BoundPattern):
        self.lazy = owner.lazy_lets
        self.memo: dict = {}

    def cls(self, e: ir.Expr, local: dict) -> str:
        f = getattr(self, "c_" + type(e).__name__, None)
        return X if f is None else f(e, local)

    def c_IntLit(self, e, local):
        return C

    c_FloatLit = c_BoolLit = c_IntLit

    def c_Name(self, e, local):
        if e.id in local:
            return local[e.id]
        if e.ref == "q":
            return Q
        if e.ref == "k":
            return K
        if e.ref == "h" or (e.ref or "").startswith("const") or e.ref == "param":
            return C
        if e.ref in ("input", "summary"):
            return X
        if e.id in self.lazy:  # a pattern-level let on q, k or h
            if e.id not in self.memo:
                self.memo[e.id] = X  # no recursion through itself
                self.memo[e.id] = self.cls(self.lazy[e.id], {})
            return self.memo[e.id]
        return C if e.ref == "local" else X  # a static let: a value of its own

    def c_TupleLit(self, e, local):
        xs = [self.cls(i, local) for i in e.items]
        return _join(*xs) if all(x in (C, D) for x in xs) else X

    def c_Unary(self, e, local):
        x = self.cls(e.operand, local)
        return x if x in (C, D) else X

    def c_Binary(self, e, local):
        a, b = self.cls(e.left, local), self.cls(e.right, local)
        if a in (C, D) and b in (C, D):
            return _join(a, b)
        if e.op == "-" and {a, b} == {Q, K}:
            return D
        if e.op in ("+", "-") and a in (Q, K) and b == C:
            return a  # q + c, k - c
        if e.op == "+" and a == C and b in (Q, K):
            return b
        if e.op == "-" and a == b and a in (Q, K):
            return C  # (q + c1) - (q + c2)
        return X

    def c_Compare(self, e, local):
        xs = [self.cls(o, local) for o in e.operands]
        out = C
        for a, b in zip(xs, xs[1:]):
            if a in (C, D) and b in (C, D):
                out = _join(out, a, b)
            elif {a, b} == {Q, K}:
                out = D  # q + c1 < k + c2  <=>  q - k < c2 - c1
            elif a == b and a in (Q, K):
                pass  # q + c1 < q + c2: a constant
            else:
                return X
        return out

    def c_IfExpr(self, e, local):
        xs = [self.cls(x, local) for x in (e.cond, e.then, e.orelse)]
        return _join(*xs) if all(x in (C, D) for x in xs) else X

    def c_LetExpr(self, e, local):
        return self.cls(e.body, {**local, e.name: self.cls(e.value, local)})

    def c_Call(self, e, local):
        if e.ref == "fn":
            inner: dict = {}
            defaults = e.defaults or (False,) * len(e.args)
            for p, a, is_default in zip(e.params, e.args, defaults):
                inner[p] = self.cls(a, inner if is_default else local)
            return self.cls(e.body, inner)
        if e.ref == "builtin":  # pure functions of their arguments
            xs = [self.cls(a, local) for a in e.args]
            return _join(*xs) if all(x in (C, D) for x in xs) else X
        return X  # pattern calls, content-dependent built-ins
