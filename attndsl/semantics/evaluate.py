"""Evaluates typed expressions on Python scalars (parameters) or torch tensors (masks).

One evaluator serves both: Python ints follow Python semantics exactly; tensors are int64
(float64 for floats) with the same floor division and non-negative modulo. Tuples are Python
tuples evaluated item by item, broadcasting scalars.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from attndsl.errors import EvaluationError
from attndsl.lang import ir
from attndsl.lang.ir import INT_LIMIT


@dataclass(frozen=True, slots=True)
class TokenVal:
    """A query or key token: flat index, per-axis coordinates and the space's shape."""

    index: object
    pos: tuple
    shape: tuple[int, ...]
    axes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SummaryVal:
    coords: dict


def unravel(index, shape: tuple[int, ...]) -> tuple:
    """Row-major coordinates (last axis fastest) of flat indices: Python ints, numpy arrays
    or tensors alike. The one place that turns a token index into its position."""
    pos = []
    rem = index
    for size in reversed(shape):
        pos.append(rem % size)
        rem = rem // size
    return tuple(reversed(pos))


def token(index, shape: tuple[int, ...], axes: tuple[str, ...]) -> TokenVal:
    return TokenVal(index, unravel(index, shape), tuple(shape), axes)


def token_field(tok, name: str):
    """`.pos`, `.shape`, `.size`, `.index` or an axis of a token: the same for every
    interpreter's token value (index, pos, shape, axes)."""
    if name == "pos":
        return tok.pos
    if name == "shape":
        return tok.shape
    if name == "size":
        return math.prod(tok.shape)
    if name == "index":
        return tok.index
    return tok.pos[tok.axes.index(name)]


@dataclass(frozen=True)
class Rows:
    """An input of several dimensions indexed on its leading ones (x[i] of x[i, j]): the
    tensor and the index values so far, combined (broadcast) at the last index."""

    t: torch.Tensor
    idx: tuple


def _index_rows(base, idx, span):
    """x[i, j, ...] one index at a time, each checked against its dimension."""
    t, done = (base.t, base.idx) if isinstance(base, Rows) else (base, ())
    n = t.shape[len(done)]
    lo = int(idx.min()) if _is_t(idx) and idx.numel() else idx if not _is_t(idx) else 0
    hi = int(idx.max()) if _is_t(idx) and idx.numel() else idx if not _is_t(idx) else 0
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise EvaluationError(f"index {bad} is out of range for dimension {len(done) + 1} "
                              f"(of size {n}) of an input of shape {list(t.shape)}", span)
    done = done + (idx if _is_t(idx) else torch.tensor(idx),)
    if len(done) < t.dim():
        return Rows(t, done)
    return t[tuple(torch.broadcast_tensors(*[d.to(t.device) for d in done]))]


def _is_t(x) -> bool:
    return isinstance(x, torch.Tensor)


def num(x):
    return x.index if isinstance(x, TokenVal) else x


def lift(f, *xs):
    """Apply f item by item when any argument is a tuple (scalars broadcast)."""
    if any(isinstance(x, tuple) for x in xs):
        n = max(len(x) for x in xs if isinstance(x, tuple))
        return tuple(lift(f, *[x[i] if isinstance(x, tuple) else x for x in xs])
                     for i in range(n))
    return f(*xs)


def _check_int(v, span):
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= INT_LIMIT:
        shown = str(v) if v.bit_length() <= 128 else f"a {v.bit_length()}-bit value"
        raise EvaluationError(f"integer overflow: {shown} does not fit in a signed 64-bit "
                              "integer", span)
    return v


def _any_zero(b, guard=None) -> bool:
    """A zero divisor where the value is actually used (`guard`: the elements that matter)."""
    if not _is_t(b):
        return b == 0 and (guard is None or bool(torch.as_tensor(guard).any()))
    z = b == 0
    if guard is not None:
        z = z & guard
    return bool(z.any())


def _nonzero(b):
    """Tensors: replace zero divisors (only in unused elements, see _any_zero) by 1."""
    if _is_t(b):
        return torch.where(b == 0, torch.ones_like(b), b)
    return 1 if b == 0 else b


def fn_locals(call: ir.Call, evaluate, local: dict) -> dict:
    """A called function's parameters: arguments in the caller's scope, defaults in the
    callee's (they may use earlier parameters). Shared by every evaluator of the IR."""
    inner: dict = {}
    defaults = call.defaults or (False,) * len(call.args)
    for p, a, is_default in zip(call.params, call.args, defaults):
        inner[p] = evaluate(a, inner if is_default else local)
    return inner


class Evaluator:
    def __init__(self, env: dict, ctx: dict | None = None, hooks=None, lazy=None):
        self.env = env  # name -> value for params, consts, inputs, static lets
        self.ctx = ctx or {}  # q, k, h and summary values
        self.hooks = hooks  # pattern calls and content-dependent built-ins (semantics/masks.py)
        self.lazy = lazy or {}  # pattern-level lets on q/k/h: evaluated when first used
        self.memo: dict = {}
        self.consts: dict = {}
        self.guard = None  # tensors: the elements whose value is used (and/or/if branches)

    def eval(self, e: ir.Expr, local: dict | None = None):
        return getattr(self, "e_" + type(e).__name__)(e, local or {})

    # ---- leaves
    def e_IntLit(self, e, local):
        return e.value

    def e_FloatLit(self, e, local):
        return e.value

    def e_BoolLit(self, e, local):
        return e.value

    def e_Name(self, e, local):
        if e.id in local:
            return local[e.id]
        if e.ref in ("q", "k", "h"):
            if e.ref not in self.ctx:
                raise EvaluationError(f"'{e.id}' has no value here", e.span)
            return self.ctx[e.ref]
        if e.ref == "summary":
            return self.ctx["summary"]
        if e.id in self.env:
            return self.env[e.id]
        if e.id in self.lazy:
            if e.id not in self.memo:
                saved, self.guard = self.guard, None
                try:
                    self.memo[e.id] = self.eval(self.lazy[e.id])
                finally:
                    self.guard = saved
            return self.memo[e.id]
        if e.value is not None:  # a constant: its typed definition, evaluated once here
            key = (e.ref, e.id)  # constants of two files may share a name
            if key not in self.consts:
                sub = Evaluator({}, {})
                sub.consts = self.consts  # and the constants it names, once too
                self.consts[key] = sub.eval(e.value)
            return self.consts[key]
        raise EvaluationError(f"'{e.id}' has no value here", e.span)

    def _guarded(self, e, local, mask):
        """Evaluate e where only the elements in `mask` matter (errors elsewhere ignored)."""
        saved = self.guard
        self.guard = mask if saved is None else saved & mask
        try:
            return self.eval(e, local)
        finally:
            self.guard = saved

    def e_TupleLit(self, e, local):
        return tuple(self.eval(i, local) for i in e.items)

    # ---- operators
    def e_Unary(self, e, local):
        x = num(self.eval(e.operand, local))
        if e.op == "not":
            return lift(lambda a: ~a if _is_t(a) else not a, x)
        if e.op == "~":  # |~a| = |a| + 1 for a >= 0: only 2^63 - 1 overflows
            return lift(lambda a: (_check_tensor(~a, None, e.span, self.guard,
                                                 "the result of '~'")
                                   if _bound(a) >= INT_LIMIT - 1 else ~a)
                        if _is_t(a) else _check_int(~a, e.span), x)
        return lift(lambda a: -a if _is_t(a) else _check_int(-a, e.span), x)  # -a fits

    def e_Binary(self, e, local):
        op = e.op
        if op in ("and", "or"):
            a = self.eval(e.left, local)
            if isinstance(a, bool) and a == (op == "or"):  # Python semantics: short-circuit
                n = e.ty.n if e.ty is not None else None
                return a if n is None else (a,) * n
            if _is_t(a):
                b = self._guarded(e.right, local, a if op == "and" else ~a)
            else:
                b = self.eval(e.right, local)
            if op == "and":
                return lift(lambda x, y: x & y if _is_t(x) or _is_t(y) else (x and y), a, b)
            return lift(lambda x, y: x | y if _is_t(x) or _is_t(y) else (x or y), a, b)
        a, b = num(self.eval(e.left, local)), num(self.eval(e.right, local))
        return lift(lambda x, y: binop(op, x, y, e.span, self.guard), a, b)

    def e_Compare(self, e, local):
        vals = [num(self.eval(o, local)) for o in e.operands]
        out = None
        for i, op in enumerate(e.ops):
            r = lift(lambda x, y, op=op: _CMP[op](x, y), vals[i], vals[i + 1])
            out = r if out is None else lift(
                lambda x, y: x & y if _is_t(x) or _is_t(y) else (x and y), out, r)
        return out

    def e_IfExpr(self, e, local):
        c = self.eval(e.cond, local)
        if isinstance(c, bool):
            return num(self.eval(e.then if c else e.orelse, local))
        if _is_t(c):
            a = num(self._guarded(e.then, local, c))
            b = num(self._guarded(e.orelse, local, ~c))
        else:  # a per-axis tuple of conditions
            a, b = num(self.eval(e.then, local)), num(self.eval(e.orelse, local))
        return lift(_where, c, a, b)

    def e_LetExpr(self, e, local):
        v = self.eval(e.value, local)
        inner = dict(local)
        inner[e.name] = v
        return self.eval(e.body, inner)

    def e_Index(self, e, local):
        base = self.eval(e.base, local)
        idx = num(self.eval(e.index, local))
        if isinstance(base, tuple):
            return base[idx]
        if base is None:
            raise EvaluationError("indexing an absent optional input", e.span)
        if isinstance(base, Rows) or (_is_t(base) and base.dim() > 1):
            return _index_rows(base, idx, e.span)
        n = base.shape[0]
        if _is_t(idx):
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
                raise EvaluationError(f"index {bad} is out of range for an input of length "
                                      f"{n}", e.span)
            return base[idx]
        if not 0 <= idx < n:
            raise EvaluationError(f"index {idx} is out of range for an input of length {n}",
                                  e.span)
        v = base[idx]
        return v.item() if v.dim() == 0 and not v.is_floating_point() else v

    def e_Attr(self, e, local):
        base = self.eval(e.base, local)
        if isinstance(base, SummaryVal):
            return base.coords[e.name]
        return token_field(base, e.name)

    def e_Call(self, e, local):
        if e.ref == "fn":
            return self.eval(e.body, fn_locals(e, self.eval, local))
        if e.ref == "builtin":
            args = [num(self.eval(a, local)) for a in e.args]
            return call_builtin(e.func, args, e.span, self.guard)
        if e.ref == "pattern" and self.hooks is not None:
            return self.hooks.pattern(self, e, local)
        if e.ref == "dynamic" and self.hooks is not None:
            args = {p: self.eval(a, local) for p, a in zip(e.params, e.args)}
            return self.hooks.dynamic(self, e, args)
        raise EvaluationError(f"cannot evaluate call of '{e.func}'", e.span)


_CMP = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
        "==": operator.eq, "!=": operator.ne}


def _where(c, a, b):
    if not _is_t(c):
        return a if c else b
    if not _is_t(a) and not _is_t(b):
        dt = torch.float64 if isinstance(a, float) or isinstance(b, float) else (
            torch.bool if isinstance(a, bool) else torch.int64)
        a = torch.tensor(a, dtype=dt)
    return torch.where(c, a, b)


def _t(x):
    return x if _is_t(x) else torch.tensor(x)


INT64_MIN = -(1 << 63)
_OVERFLOW = "integer overflow: {} does not fit in a signed 64-bit integer"


def _int_tensor(r) -> bool:
    return _is_t(r) and not r.is_floating_point() and r.dtype != torch.bool


def _guarded_any(bad, guard) -> bool:
    """Whether `bad` holds at an element whose value is used (see binop's `guard`)."""
    if guard is not None:
        bad = bad & guard
    return bool(bad.any())


def _check_tensor(r, bad, span, guard, what: str):
    """r, unless an integer result wrapped: `bad` marks the elements whose exact result
    left the 64-bit range; -2^63 itself is outside it too (|value| < 2^63, as for Python
    ints), so no operation ever sees it."""
    if not _int_tensor(r):
        return r
    bad = r == INT64_MIN if bad is None else bad | (r == INT64_MIN)
    if _guarded_any(bad, guard):
        raise EvaluationError(_OVERFLOW.format(what), span)
    return r


def _exact_overflow(a, b, f, est, guard) -> torch.Tensor:
    """Elements where f(a, b) leaves the 64-bit range, from a float64 estimate `est` and
    exact Python integers where the estimate is too close to call."""
    a, b, est = torch.broadcast_tensors(_t(a), _t(b), est)
    bad = est >= 2.0 ** 64
    close = (est >= 2.0 ** 62) & ~bad
    if guard is not None:
        close = close & guard
    if bool(close.any()):
        exact = [abs(f(int(x), int(y))) >= 1 << 63
                 for x, y in zip(a[close].tolist(), b[close].tolist())]
        bad = bad.clone()
        bad[close] = torch.tensor(exact, dtype=torch.bool, device=bad.device)
    return bad


def _bound(x) -> int:
    """max |x| over the elements of an int tensor (or |x| of a number), exactly, in one
    pass that allocates nothing of x's size. No value is ever -2^63 (see _check_tensor)."""
    if not _is_t(x):
        return abs(int(x))
    if x.numel() == 0:
        return 0
    lo, hi = torch.aminmax(x)
    return max(-int(lo), int(hi))


def binop(op: str, a, b, span, guard=None):
    """One arithmetic or bit operation with Python's semantics on ints and tensors; an
    integer result outside the signed 64-bit range is an overflow error, never a wrapped
    value. Whether a tensor operation can overflow is first decided from its operands'
    largest magnitudes (cheap: the operands are often far smaller than the broadcast
    result); only when it might is the result checked element by element.

    `guard` marks the tensor elements whose value is used; a zero divisor or an overflow
    elsewhere (in the untaken side of an 'or', 'and' or 'if') is not an error."""
    if not (_is_t(a) or _is_t(b)):
        return _check_int(_scalar_op(op, a, b, span), span)
    if op in ("+", "-"):
        r = a + b if op == "+" else a - b
        if not _int_tensor(r) or _bound(a) + _bound(b) < INT_LIMIT:
            return r
        ta, tb = _t(a), _t(b)
        bad = (((ta ^ r) & (tb ^ r)) < 0) if op == "+" else (((ta ^ tb) & (ta ^ r)) < 0)
        return _check_tensor(r, bad, span, guard, "a sum" if op == "+" else "a difference")
    if op == "*":
        r = a * b
        if not _int_tensor(r) or _bound(a) * _bound(b) < INT_LIMIT:
            return r
        est = (_t(a).double() * _t(b).double()).abs()
        return _check_tensor(r, _exact_overflow(a, b, lambda x, y: x * y, est, guard), span,
                             guard, "a product")
    if op == "/":
        if _any_zero(b, guard):
            raise EvaluationError("division by zero", span)
        return (a.double() if _is_t(a) else float(a)) / _nonzero(b)
    if op in ("//", "%"):
        if _any_zero(b, guard):
            raise EvaluationError("division by zero" if op == "//" else "modulo by zero", span)
        b = _nonzero(b)
        if op == "//":
            return torch.div(_t(a), b, rounding_mode="floor")  # |a // b| <= |a|: fits
        return torch.remainder(_t(a), b)
    if op == "**":
        return _tensor_pow(a, b, span, guard)
    if op in ("&", "|", "^"):
        r = {"&": operator.and_, "|": operator.or_, "^": operator.xor}[op](_t(a), b)
        if not _int_tensor(r) or max(_bound(a), _bound(b)) < INT_LIMIT // 2:
            return r  # both in [-2^62, 2^62): so is the result
        return _check_tensor(r, None, span, guard, f"the result of '{op}'")
    if op in ("<<", ">>"):
        return _tensor_shift(op, a, b, span, guard)
    raise EvaluationError(f"unknown operator '{op}'", span)  # pragma: no cover


def _tensor_pow(a, b, span, guard):
    if _is_t(b) and not b.is_floating_point() and _guarded_any(b < 0, guard):
        raise EvaluationError("negative integer exponent", span)
    if isinstance(b, int) and not isinstance(b, bool) and b < 0 and not (
            _is_t(a) and a.is_floating_point()) and not isinstance(a, float):
        raise EvaluationError(f"negative integer exponent {b}", span)
    if _is_t(b) and not b.is_floating_point():
        b = b.clamp(min=0)  # negative exponents only where unused (checked above)
    r = torch.pow(_t(a), b)
    if not _int_tensor(r):
        return r
    ba, bb = _bound(a), _bound(b)
    if ba <= 1 or (bb < 64 and ba ** bb < INT_LIMIT):
        return r
    est = _t(a).double().abs() ** _t(b).double().clamp(min=0)
    return _check_tensor(r, _exact_overflow(a, b, lambda x, y: x ** max(y, 0), est, guard),
                         span, guard, "a power")


def _tensor_shift(op, a, b, span, guard):
    if _is_t(b):
        if _guarded_any(b < 0, guard):
            raise EvaluationError("negative shift count", span)
        if op == "<<" and _guarded_any(b >= 63, guard):
            raise EvaluationError("shift count of 63 or more overflows 64-bit integers", span)
        b = b.clamp(min=0, max=63 if op == ">>" else 62)
    else:
        if b < 0:
            raise EvaluationError("negative shift count", span)
        if op == "<<" and b >= 63:
            raise EvaluationError("shift count of 63 or more overflows 64-bit integers", span)
        b = min(b, 63)
    if op == ">>":
        return torch.bitwise_right_shift(_t(a), b)  # moves towards 0 or -1: fits
    r = torch.bitwise_left_shift(_t(a), b)
    if _bound(a) << _bound(b) < INT_LIMIT:
        return r
    return _check_tensor(r, torch.bitwise_right_shift(r, b) != _t(a), span, guard, "a shift")


def _scalar_op(op: str, a, b, span):
    """binop on Python numbers (the caller checks the result's range)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0:
            raise EvaluationError("division by zero", span)
        return float(a) / b
    if op in ("//", "%"):
        if b == 0:
            raise EvaluationError("division by zero" if op == "//" else "modulo by zero", span)
        try:
            return a // b if op == "//" else a % b
        except OverflowError:  # float // float beyond the float range
            raise EvaluationError(f"{a} {op} {b} overflows", span) from None
    if op == "**":
        if isinstance(b, int) and not isinstance(a, float) and b < 0:
            raise EvaluationError(f"negative integer exponent {b}", span)
        if isinstance(a, int) and isinstance(b, int) and b > 64 and abs(a) > 1:
            raise EvaluationError(f"integer overflow: {a} ** {b} does not fit in 64 bits",
                                  span)
        return _pow(a, b, span)
    if op in ("&", "|", "^"):
        return {"&": operator.and_, "|": operator.or_, "^": operator.xor}[op](a, b)
    if op in ("<<", ">>"):
        if b < 0:
            raise EvaluationError("negative shift count", span)
        if op == "<<":
            if b >= 63:
                raise EvaluationError("shift count of 63 or more overflows 64-bit integers",
                                      span)
            return a << b
        return a >> min(b, 63)
    raise EvaluationError(f"unknown operator '{op}'", span)  # pragma: no cover


def _pow(a, b, span):
    try:
        r = a ** b
    except ZeroDivisionError:
        raise EvaluationError(f"0 cannot be raised to a negative power ({b})", span) from None
    except OverflowError:
        raise EvaluationError(f"{a} ** {b} overflows", span) from None
    if isinstance(r, complex):
        raise EvaluationError(f"a negative number ({a}) cannot be raised to a fractional power"
                              f" ({b})", span)
    return r


def _floor(x, span, guard=None):
    if _is_t(x):
        if not x.is_floating_point():
            return x
        f = torch.floor(x)
        ok = torch.isfinite(f) & (f.abs() < 2.0 ** 63)
        if _guarded_any(~ok, guard):
            raise EvaluationError("floor of a number that is not finite or does not fit in a "
                                  "signed 64-bit integer", span)
        return torch.where(ok, f, torch.zeros_like(f)).long()
    if isinstance(x, int):
        return x
    if not math.isfinite(x):
        raise EvaluationError(f"floor of {x} is not an integer", span)
    return _check_int(math.floor(x), span)


def _elementwise(f):
    """A one-argument built-in applied item by item to tuples."""
    return lambda args, span, guard=None: lift(lambda x: f(x, span, guard), *args)


def _b_minmax(name):
    def impl(args, span, guard=None):
        if len(args) == 1:
            return _minmax(name, list(args[0]) if isinstance(args[0], tuple) else [args[0]])
        return lift(lambda *xs: _minmax(name, list(xs)), *args)
    return impl


def _b_clamp(args, span, guard=None):
    return lift(lambda x, lo, hi: _minmax("min", [_minmax("max", [x, lo]), hi]), *args)


def _b_cdiv(args, span, guard=None):
    return lift(lambda a, b: binop("-", 0, binop("//", binop("-", 0, a, span, guard), b, span,
                                                 guard), span, guard), *args)


def _popcount(x, span, guard=None):
    if _is_t(x):
        if _guarded_any(x < 0, guard):
            raise EvaluationError("popcount of a negative number", span)
        y = x.clamp(min=0)
        c = torch.zeros_like(y)
        for _ in range(63):  # y < 2^63: at most 63 bits
            if not bool((y != 0).any()):
                break
            c += y & 1
            y = y >> 1
        return c
    if x < 0:
        raise EvaluationError("popcount of a negative number", span)
    return bin(x).count("1")


def _bit_length(x, span, guard=None):
    """Bits of |x|, as Python's int.bit_length; on tensors at most 64 steps of a logical
    shift, whatever the values."""
    if _is_t(x):
        y = x.abs()
        c = torch.zeros_like(y)
        for _ in range(64):
            nz = y != 0
            if not bool(nz.any()):
                break
            c += nz.long()
            y = (y >> 1) & ((1 << 63) - 1)
        return c
    return x.bit_length()


def _ilog2(x, span, guard=None):
    if (_is_t(x) and _guarded_any(x < 1, guard)) or (not _is_t(x) and x < 1):
        raise EvaluationError("ilog2 needs x >= 1", span)
    return _bit_length(x, span) - 1


def _is_pow2(x, span, guard=None):
    return (x > 0) & ((x & (x - 1)) == 0) if _is_t(x) else x > 0 and x & (x - 1) == 0


def fold(x, f):
    """A per-axis tuple folded left with f (a scalar stays as it is): all, any, sum and prod
    of every interpreter."""
    if not isinstance(x, tuple):
        return x
    out = x[0]
    for y in x[1:]:
        out = f(out, y)
    return out


def _b_reduce(name):
    def impl(args, span, guard=None):
        if name == "all":
            return fold(args[0], lambda a, b: a & b if _is_t(a) or _is_t(b) else (a and b))
        if name == "any":
            return fold(args[0], lambda a, b: a | b if _is_t(a) or _is_t(b) else (a or b))
        op = "+" if name == "sum" else "*"
        return fold(args[0], lambda a, b: binop(op, a, b, span, guard))
    return impl


def _sqrt(x, span, guard=None):
    if (_is_t(x) and _guarded_any(x < 0, guard)) or (not _is_t(x) and x < 0):
        raise EvaluationError("square root of a negative number", span)
    return torch.sqrt(_t(x).double()) if _is_t(x) else math.sqrt(x)


def _log(x, span, guard=None):
    if (_is_t(x) and _guarded_any(x <= 0, guard)) or (not _is_t(x) and x <= 0):
        raise EvaluationError("logarithm of a number <= 0", span)
    return torch.log(_t(x).double()) if _is_t(x) else math.log(x)


def _abs(x, span, guard=None):
    if _is_t(x):
        return x.abs()  # no value is -2^63: |x| fits
    return _check_int(abs(x), span)


def _exp(x, span, guard=None):
    if _is_t(x):
        return torch.exp(x.double())
    try:
        return math.exp(x)
    except OverflowError:
        raise EvaluationError(f"exp({x}) overflows", span) from None


# One implementation per built-in of lang/builtins.BUILTINS (tests/test_architecture.py
# checks that none is missing): f(args, span, guard) on Python values or tensors; `guard`
# marks the tensor elements whose value is used (see binop).
BUILTIN_IMPLS = {
    "abs": _elementwise(_abs),
    "min": _b_minmax("min"),
    "max": _b_minmax("max"),
    "clamp": _b_clamp,
    "cdiv": _b_cdiv,
    "popcount": _elementwise(_popcount),
    "bit_length": _elementwise(_bit_length),
    "ilog2": _elementwise(_ilog2),
    "is_pow2": _elementwise(_is_pow2),
    "all": _b_reduce("all"),
    "any": _b_reduce("any"),
    "sum": _b_reduce("sum"),
    "prod": _b_reduce("prod"),
    "float": _elementwise(lambda x, span, guard: x.double() if _is_t(x) else float(x)),
    "floor": _elementwise(_floor),
    "sqrt": _elementwise(_sqrt),
    "exp": _elementwise(_exp),
    "log": _elementwise(_log),
    "tanh": _elementwise(lambda x, span, guard: torch.tanh(x.double()) if _is_t(x)
                         else math.tanh(x)),
}


def call_builtin(name: str, args: list, span, guard=None):
    return BUILTIN_IMPLS[name](args, span, guard)


def _minmax(name, items):
    out = items[0]
    for y in items[1:]:
        if _is_t(out) or _is_t(y):
            f = torch.minimum if name == "min" else torch.maximum
            out = f(_t(out), _t(y))
        else:
            out = min(out, y) if name == "min" else max(out, y)
    return out
