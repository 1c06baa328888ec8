"""Abstract interpretation of typed mask expressions over boxes of queries and keys.

Each integer becomes an interval [lo, hi] and each bool a pair (may be true, may be false),
as numpy arrays that broadcast over many boxes at once. Every operation is sound: the true
value for any q, k in the box lies inside the result. A predicate that cannot be false over
a box makes a FULL block, one that cannot be true an EMPTY block; anything else is PARTIAL.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from attndsl.lang import ir
from attndsl.semantics.evaluate import Evaluator, fn_locals, fold, token_field
from attndsl.semantics.evaluate import lift as _map

EMPTY, PARTIAL, FULL = 0, 1, 2
BIG = np.int64(1 << 62)


@dataclass(frozen=True, slots=True)
class IV:
    """An integer interval; `tag` = (kind, c) records an exact linear form: q + c, k + c,
    or (q - k) + c ('d'), or -(q - k) + c ('-d'), so that the difference of the query and
    key keeps its true range instead of the box's looser one."""

    lo: np.ndarray
    hi: np.ndarray
    tag: tuple | None = None


@dataclass(frozen=True, slots=True)
class BV:
    t: np.ndarray  # may be true
    f: np.ndarray  # may be false


@dataclass(frozen=True, slots=True)
class FV:
    lo: np.ndarray
    hi: np.ndarray


@dataclass(frozen=True, slots=True)
class TokIV:
    index: IV
    pos: tuple
    shape: tuple
    axes: tuple


@dataclass(frozen=True, slots=True)
class SummaryIV:
    """A box of summary tokens: an interval per axis name (`r.l`, `r.m`)."""

    fields: dict


class Unknown(Exception):
    """The expression uses something the abstract domain does not model."""


def _i(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def lift(v):
    if isinstance(v, IV | BV | FV | TokIV | SummaryIV):
        return v
    if isinstance(v, tuple):
        return tuple(lift(x) for x in v)
    if isinstance(v, bool | np.bool_):
        b = np.asarray(bool(v))
        return BV(b, ~b)
    if isinstance(v, int | np.integer):
        a = _i(v)
        return IV(a, a)
    if isinstance(v, float):
        a = np.asarray(v, dtype=np.float64)
        return FV(a, a)
    raise Unknown(type(v).__name__)


def exact(v) -> bool:
    return isinstance(v, IV) and bool(np.all(v.lo == v.hi))


def token_box(lo, hi, shape, axes, role: str | None = None) -> TokIV:
    """The coordinates of every flat index in [lo, hi] (inclusive), per axis, soundly."""
    lo, hi = _i(lo), _i(hi)
    if role is not None and len(shape) == 1:
        iv = IV(lo, hi, (role, 0))
        return TokIV(iv, (iv,), tuple(shape), axes)
    pos = []
    stride = 1
    for size in reversed(shape):
        a, b = lo // stride, hi // stride
        same = (a // size) == (b // size)  # no wrap of this axis inside the range
        pos.append(IV(np.where(same, a % size, 0), np.where(same, b % size, size - 1)))
        stride *= size
    return TokIV(IV(lo, hi), tuple(reversed(pos)), tuple(shape), axes)


def tile_box(starts, stops, shape, axes) -> TokIV:
    """A box given per axis: coordinates in [starts[a], stops[a]] (inclusive)."""
    pos = tuple(IV(_i(s), _i(e)) for s, e in zip(starts, stops))
    lo = hi = _i(0)
    for (p, size) in zip(pos, shape):
        lo = lo * size + p.lo
        hi = hi * size + p.hi
    return TokIV(IV(lo, hi), pos, tuple(shape), axes)


class Deferred:
    """A local's value computed when first read (and then kept): a query-only let spread
    to every box is work for nothing where only its hoisted readers use it."""

    __slots__ = ("make", "value")

    def __init__(self, make):
        self.make, self.value = make, None

    def __call__(self):
        if self.make is not None:
            self.value, self.make = self.make(), None
        return self.value


class AbstractEvaluator:
    """Evaluates typed expressions on boxes. `diff` = (lo, hi) arrays: the range of q - k
    (flat indices) in each box, which narrows every tagged difference."""

    def __init__(self, env: dict, ctx: dict, hooks=None, diff=None):
        self.env = env
        self.ctx = ctx
        self.hooks = hooks
        self.diff = diff
        self.arrays: dict = {}
        # id(node) -> (node, value): sub-expressions already known on these boxes (those
        # that read only the query, computed once a query group: analysis/blocks.py)
        self.hoisted: dict = {}

    def eval(self, e: ir.Expr, local: dict | None = None):
        if self.hoisted:
            got = self.hoisted.get(id(e))
            if got is not None:
                return got[1]
        return getattr(self, "e_" + type(e).__name__)(e, local or {})

    def e_IntLit(self, e, local):
        return lift(e.value)

    def e_FloatLit(self, e, local):
        return lift(e.value)

    def e_BoolLit(self, e, local):
        return lift(e.value)

    def e_Name(self, e, local):
        if e.id in local:
            v = local[e.id]
            return v() if isinstance(v, Deferred) else v
        if e.ref in ("q", "k", "h"):
            if e.ref not in self.ctx:
                raise Unknown(e.ref)
            return self.ctx[e.ref]
        if e.ref == "summary":
            if "summary" not in self.ctx:
                raise Unknown("summary")
            return self.ctx["summary"]
        if e.id in self.env:
            v = self.env[e.id]
            if v is None or hasattr(v, "shape") and not isinstance(v, np.ndarray | tuple):
                if e.id not in self.arrays:
                    self.arrays[e.id] = _Array(v)
                return self.arrays[e.id]
            return lift(v)
        if e.value is not None:  # a constant
            return lift(Evaluator({}, {}).eval(e.value))
        raise Unknown(e.id)

    def e_TupleLit(self, e, local):
        return tuple(self.eval(i, local) for i in e.items)

    def num(self, v):
        return v.index if isinstance(v, TokIV) else v

    def e_Unary(self, e, local):
        x = self.num(self.eval(e.operand, local))
        if e.op == "not":
            return _map(lambda a: BV(a.f, a.t), x)
        if e.op == "-":
            return _map(lambda a: type(a)(-a.hi, -a.lo), x)  # |bounds| < 2^63: no wrap
        return _map(lambda a: IV(-a.hi - 1, -a.lo - 1), x)  # ~a = -a - 1

    def e_Binary(self, e, local):
        a = self.num(self.eval(e.left, local))
        b = self.num(self.eval(e.right, local))
        return _map(lambda x, y: binop(e.op, x, y, self.diff), a, b)

    def e_Compare(self, e, local):
        vals = [self.num(self.eval(o, local)) for o in e.operands]
        out = None
        for i, op in enumerate(e.ops):
            r = _map(lambda x, y, op=op: compare(op, x, y, self.diff), vals[i], vals[i + 1])
            out = r if out is None else _map(_and, out, r)
        return out

    def e_IfExpr(self, e, local):
        c = self.eval(e.cond, local)
        a = self.num(self.eval(e.then, local))
        b = self.num(self.eval(e.orelse, local))
        return _map(_select, c, a, b)

    def e_LetExpr(self, e, local):
        inner = dict(local)
        inner[e.name] = self.eval(e.value, local)
        return self.eval(e.body, inner)

    def e_Index(self, e, local):
        base = self.eval(e.base, local)
        idx = self.num(self.eval(e.index, local))
        if isinstance(base, tuple):
            return base[int(idx.lo)]
        if isinstance(base, _Array):
            return base.range(idx)
        raise Unknown("index")

    def e_Attr(self, e, local):
        base = self.eval(e.base, local)
        if isinstance(base, SummaryIV):
            return base.fields[e.name]
        if not isinstance(base, TokIV):
            raise Unknown("attr")
        return lift(token_field(base, e.name))

    def e_Call(self, e, local):
        if e.ref == "fn":
            return self.eval(e.body, fn_locals(e, self.eval, local))
        if e.ref == "builtin":
            args = [self.num(self.eval(a, local)) for a in e.args]
            return BUILTIN_IMPLS[e.func](args, self.diff)
        if e.ref == "pattern" and self.hooks is not None:
            return self.hooks.pattern(self, e, local)
        if e.ref == "dynamic" and e.ty is not None and e.ty.kind == "bool":
            # content-dependent selection: may be true or false anywhere (unless the hooks
            # know better), so the rest of the predicate still prunes (a causal DHSA box
            # above the diagonal is EMPTY)
            if self.hooks is not None and hasattr(self.hooks, "dynamic"):
                return self.hooks.dynamic(e)
            return BV(np.asarray(True), np.asarray(True))
        raise Unknown(e.func)


class _Array:
    """A run-time input: range queries give the min/max over an index interval."""

    def __init__(self, tensor):
        self.t = tensor
        if tensor is None:
            return
        a = np.asarray(tensor.cpu().numpy() if hasattr(tensor, "cpu") else tensor)
        self.a = a.astype(np.float64 if a.dtype.kind == "f" else np.int64).reshape(-1)
        # sparse tables for O(1) range min / max
        self.mins, self.maxs = [self.a], [self.a]
        j = 1
        while (1 << j) <= len(self.a):
            w = 1 << (j - 1)
            self.mins.append(np.minimum(self.mins[-1][:-w], self.mins[-1][w:]))
            self.maxs.append(np.maximum(self.maxs[-1][:-w], self.maxs[-1][w:]))
            j += 1

    def range(self, idx: IV):
        if self.t is None:
            raise Unknown("absent input")
        n = len(self.a)
        lo = np.clip(idx.lo, 0, n - 1)
        hi = np.clip(idx.hi, 0, n - 1)
        lo, hi = np.broadcast_arrays(lo, hi)
        length = hi - lo + 1
        j = np.floor(np.log2(np.maximum(length, 1))).astype(np.int64)
        out_lo = np.empty(lo.shape, dtype=self.a.dtype)
        out_hi = np.empty(lo.shape, dtype=self.a.dtype)
        for jj in np.unique(j):
            sel = j == jj
            mn, mx = self.mins[jj], self.maxs[jj]
            a, b = lo[sel], hi[sel] - (1 << int(jj)) + 1
            out_lo[sel] = np.minimum(mn[a], mn[b])
            out_hi[sel] = np.maximum(mx[a], mx[b])
        cls = FV if self.a.dtype.kind == "f" else IV
        return cls(out_lo, out_hi)


# ------------------------------------------------------------------ operations


def _and(a: BV, b: BV) -> BV:
    return BV(a.t & b.t, a.f | b.f)


def _or(a: BV, b: BV) -> BV:
    return BV(a.t | b.t, a.f & b.f)


def _select(c, a, b):
    if isinstance(c, BV) and isinstance(a, BV):
        return BV((c.t & a.t) | (c.f & b.t), (c.t & a.f) | (c.f & b.f))
    if isinstance(c, BV):
        lo = np.where(c.t & c.f, np.minimum(a.lo, b.lo), np.where(c.t, a.lo, b.lo))
        hi = np.where(c.t & c.f, np.maximum(a.hi, b.hi), np.where(c.t, a.hi, b.hi))
        return type(a)(lo, hi)
    raise Unknown("select")


def compare(op, a, b, diff=None) -> BV:
    if isinstance(a, IV) and isinstance(b, IV) and a.tag and b.tag and a.tag[0] != b.tag[0]:
        # compare the tagged difference with 0, which keeps the query-key correlation
        d = binop("-", a, b, diff)
        if d.tag is not None and d.tag[0] in ("d", "-d"):
            return compare(op, d, IV(_i(0), _i(0)))
    if isinstance(a, BV):
        if op == "==":
            t = (a.t & b.t) | (a.f & b.f)
            f = (a.t & b.f) | (a.f & b.t)
        else:
            t = (a.t & b.f) | (a.f & b.t)
            f = (a.t & b.t) | (a.f & b.f)
        return BV(t, f)
    if isinstance(a, IV) and isinstance(b, IV) and _points(a, b):
        t = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
             "==": np.equal, "!=": np.not_equal}[op](a.lo, b.lo)
        return BV(t, ~t)
    if op == "<":
        return BV(a.lo < b.hi, a.hi >= b.lo)
    if op == "<=":
        return BV(a.lo <= b.hi, a.hi > b.lo)
    if op == ">":
        return BV(a.hi > b.lo, a.lo <= b.hi)
    if op == ">=":
        return BV(a.hi >= b.lo, a.lo < b.hi)
    overlap = (a.lo <= b.hi) & (b.lo <= a.hi)
    single = (a.lo == a.hi) & (b.lo == b.hi) & (a.lo == b.lo)
    if op == "==":
        return BV(overlap, ~single)
    return BV(~single, overlap)


def _const(x: IV):
    if x.tag is None and x.lo.ndim == 0 and int(x.lo) == int(x.hi):
        return int(x.lo)
    return None


def _tag_add(a: IV, b: IV, sign: int):
    """The tag of a + sign * b, when it is still an exact linear form we track."""
    ca, cb = _const(a), _const(b)
    out = _tag_sum(a, b, sign, ca, cb)
    if out is not None and abs(out[1]) >= 1 << 62:
        return None  # a constant this large is no use to the tag (and may not fit int64)
    return out


def _tag_sum(a: IV, b: IV, sign: int, ca, cb):
    if a.tag is not None and cb is not None:
        return (a.tag[0], a.tag[1] + sign * cb)
    if b.tag is not None and ca is not None:
        if sign == 1:
            return (b.tag[0], b.tag[1] + ca)
        neg = {"q": None, "k": None, "d": "-d", "-d": "d"}[b.tag[0]]
        return (neg, ca - b.tag[1]) if neg else None
    if a.tag is not None and b.tag is not None and sign == -1:
        pair = (a.tag[0], b.tag[0])
        if pair == ("q", "k"):
            return ("d", a.tag[1] - b.tag[1])
        if pair == ("k", "q"):
            return ("-d", a.tag[1] - b.tag[1])
    if a.tag is not None and b.tag is not None and sign == 1:
        pair = (a.tag[0], b.tag[0])
        if pair in (("d", "k"), ("k", "d")):
            return ("q", a.tag[1] + b.tag[1])
    return None


def _tagged(iv: IV, tag, diff) -> IV:
    """Attach a tag, narrowing a difference to the known range `diff` of q - k."""
    if tag is None:
        return iv
    if tag[0] in ("d", "-d") and diff is not None:
        dlo, dhi = diff
        if tag[0] == "d":
            lo, hi = dlo + tag[1], dhi + tag[1]
        else:
            lo, hi = tag[1] - dhi, tag[1] - dlo
        return IV(np.maximum(iv.lo, lo), np.minimum(iv.hi, hi), tag)
    return IV(iv.lo, iv.hi, tag)


_INT64 = (-(1 << 63), (1 << 63) - 1)


def _span(a: IV) -> tuple[int, int]:
    """Every value of a lies in [min a.lo, max a.hi] (Python ints: they cannot wrap)."""
    lo, hi = np.asarray(a.lo), np.asarray(a.hi)
    if lo.size == 0 or hi.size == 0:
        return 0, 0
    return int(lo.min()), int(hi.max())


def _fits(a: IV, b: IV, g) -> None:
    """Bounds computed in int64 wrap silently: where g (exact, on Python ints) of some corner
    of a's and b's spans leaves int64, the interval is unknown (the box PARTIAL, which is
    always sound, and the exact evaluation reports the overflow). Two reductions an operand,
    not a float copy of every bound."""
    (alo, ahi), (blo, bhi) = _span(a), _span(b)
    for x in (alo, ahi):
        for y in (blo, bhi):
            if not _INT64[0] <= g(x, y) <= _INT64[1]:
                raise Unknown("integer overflow")


def _corners(f, a: IV, b: IV, g=None) -> IV:
    # an operand that is one value everywhere (a constant, mostly) has two corners, not four
    # (the other two repeat them): half the passes over the boxes; two points, one
    if _points(a, b):
        if g is not None:
            _fits(a, b, g)
        with np.errstate(over="ignore"):
            c = f(a.lo, b.lo)
        return IV(c, c)
    if _exact(b):
        pairs = [(a.lo, b.lo), (a.hi, b.lo)]
    elif _exact(a):
        pairs = [(a.lo, b.lo), (a.lo, b.hi)]
    else:
        pairs = [(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    if g is not None:
        _fits(a, b, g)
    with np.errstate(over="ignore"):
        c = [f(x, y) for x, y in pairs]
    lo, hi = c[0], c[0]
    for x in c[1:]:
        lo, hi = np.minimum(lo, x), np.maximum(hi, x)
    return IV(lo, hi)


def _exact(a: IV) -> bool:
    """Whether `a` is one point per box, decided cheaply: only scalars are looked at."""
    return np.ndim(a.lo) == 0 and np.ndim(a.hi) == 0 and a.lo == a.hi


def _point(a: IV) -> bool:
    """Whether `a` is known to be one value in each box by its bounds being one array:
    operations on points make one pass over the boxes, not two to four (a hashed random
    block is a chain of them once its query group is one block: a third less time to
    analyse the BigBird-style pattern of bench/cpu_bench.py)."""
    return a.lo is a.hi


def _points(a: IV, b: IV) -> bool:
    """Whether a is a point and b one too (or one constant): one value each a box."""
    return _point(a) and (_point(b) or _exact(b))


def _settle(lo, hi) -> IV:
    """IV(lo, hi), its bounds one array where they agree in every box (a point, _point)."""
    if lo is not hi and np.shape(lo) == np.shape(hi) and np.array_equal(lo, hi):
        return IV(lo, lo)
    return IV(lo, hi)


def _bits(x):
    """Smallest 2^n - 1 >= x for x >= 0 (elementwise)."""
    x = np.maximum(_i(x), 0)
    out = np.zeros_like(x)
    while True:
        more = out < x
        if not more.any():
            return out
        out = np.where(more, out * 2 + 1, out)


def _by_constant(op: str, a: IV, m: int) -> IV:
    """a // m or a % m for one m > 0: both bounds of a // m step with a (monotone), and
    a % m is exact where they agree. A power of two takes shifts and masks (the same floor
    semantics in int64), several times faster than integer division over many boxes."""
    pow2 = m & (m - 1) == 0
    k = m.bit_length() - 1
    if _point(a):
        if op == "//":
            x = np.right_shift(a.lo, k) if pow2 else np.floor_divide(a.lo, m)
        else:
            x = np.bitwise_and(a.lo, m - 1) if pow2 else np.mod(a.lo, m)
        return IV(x, x)
    if pow2 and op == "%" and np.ndim(a.lo) and np.shape(a.lo) == np.shape(a.hi):
        return _mod_pow2(a, m, k)
    if pow2:
        qlo, qhi = np.right_shift(a.lo, k), np.right_shift(a.hi, k)
    else:
        qlo, qhi = np.floor_divide(a.lo, m), np.floor_divide(a.hi, m)
    if op == "//":
        return _settle(qlo, qhi)
    same = qlo == qhi
    if not same.any():  # every box spans a whole period: one interval for all (a scalar)
        return IV(_i(0), _i(m - 1))
    rlo, rhi = ((np.bitwise_and(a.lo, m - 1), np.bitwise_and(a.hi, m - 1)) if pow2
                else (a.lo - qlo * m, a.hi - qhi * m))
    return IV(np.where(same, rlo, 0), np.where(same, rhi, m - 1))


def _mod_pow2(a: IV, m: int, k: int) -> IV:
    """a % 2^k over arrays of boxes in two new arrays, written in place: lo and hi lie in
    one period where they agree above bit k (their xor shifted right by k is 0); the
    BigBird-style analysis at 1M tokens makes 540 of these over up to 6M boxes, and on a
    machine where fresh pages are slow each temporary costs its page faults."""
    x = np.bitwise_xor(a.lo, a.hi)
    np.right_shift(x, k, out=x)
    same = x == 0
    del x
    if not same.any():  # every box spans a whole period: one interval for all (a scalar)
        return IV(_i(0), _i(m - 1))
    lo = np.bitwise_and(a.lo, m - 1)
    lo *= same
    hi = np.bitwise_and(a.hi, m - 1)
    np.invert(same, out=same)
    np.copyto(hi, m - 1, where=same)
    return IV(lo, hi)


def binop(op, a, b, diff=None):
    if op in ("and", "or"):
        return _and(a, b) if op == "and" else _or(a, b)
    if isinstance(a, FV) or isinstance(b, FV) or op in ("/", "**"):
        raise Unknown(op)
    if op in ("+", "-"):
        _fits(a, b, operator.add if op == "+" else operator.sub)
        if _points(a, b):
            x = a.lo + b.lo if op == "+" else a.lo - b.lo
            iv = IV(x, x)
        else:
            iv = (IV(a.lo + b.lo, a.hi + b.hi) if op == "+"
                  else IV(a.lo - b.hi, a.hi - b.lo))
        return _tagged(iv, _tag_add(a, b, 1 if op == "+" else -1), diff)
    if op == "*":
        return _corners(np.multiply, a, b, operator.mul)
    if op in ("//", "%") and _exact(b) and b.lo > 0:
        return _by_constant(op, a, int(b.lo))
    if op in ("//", "%"):
        pos = b.lo > 0
        neg = b.hi < 0
        if not np.all(pos | neg):
            raise Unknown("divisor may be zero")
        if op == "//":
            return _corners(np.floor_divide, a, b)
        const = b.lo == b.hi
        m = b.lo
        same = const & pos & (np.floor_divide(a.lo, np.where(pos, m, 1))
                              == np.floor_divide(a.hi, np.where(pos, m, 1)))
        lo = np.where(same, np.mod(a.lo, np.where(pos, m, 1)), np.where(pos, 0, b.lo + 1))
        hi = np.where(same, np.mod(a.hi, np.where(pos, m, 1)), np.where(pos, b.hi - 1, 0))
        return IV(lo, hi)
    both_exact = (a.lo == a.hi) & (b.lo == b.hi)
    nonneg = (a.lo >= 0) & (b.lo >= 0)
    if op in ("<<", ">>"):
        if np.any(b.lo < 0):
            raise Unknown("negative shift")
        if op == ">>":
            if _exact(b):  # monotone in a
                s_ = min(int(b.lo), 63)
                if _point(a):
                    x = np.right_shift(a.lo, s_)
                    return IV(x, x)
                return _settle(np.right_shift(a.lo, s_), np.right_shift(a.hi, s_))
            return _corners(np.right_shift, a, IV(np.minimum(b.lo, 63), np.minimum(b.hi, 63)))
        if np.any(b.hi >= 62):
            raise Unknown("shift")
        return _corners(np.left_shift, a, b, lambda x, y: x << y)
    f = {"&": np.bitwise_and, "|": np.bitwise_or, "^": np.bitwise_xor}[op]
    ex = f(a.lo, b.lo)
    if op == "&":
        lo = np.where(both_exact, ex, np.where(nonneg, 0, -BIG))
        hi = np.where(both_exact, ex, np.where(nonneg, np.minimum(a.hi, b.hi), BIG))
    else:
        lo = np.where(both_exact, ex, np.where(nonneg, 0, -BIG))
        hi = np.where(both_exact, ex, np.where(nonneg, _bits(np.maximum(a.hi, b.hi)), BIG))
    return IV(lo, hi)


def _elementwise(f):
    return lambda args, diff: _map(f, *args)


def _b_abs(a):
    """|a| over [lo, hi] (lo <= hi): [max(lo, -hi, 0), max(-lo, hi)], each bound one new
    array (a point: one for both)."""
    if _point(a):
        x = np.abs(a.lo)
        return IV(x, x)
    if not np.ndim(a.lo) or np.shape(a.lo) != np.shape(a.hi):
        return IV(np.maximum(np.maximum(a.lo, np.negative(a.hi)), 0),
                  np.maximum(np.negative(a.lo), a.hi))
    lo = np.negative(a.hi)
    np.maximum(lo, a.lo, out=lo)
    np.maximum(lo, 0, out=lo)
    hi = np.negative(a.lo)
    np.maximum(hi, a.hi, out=hi)
    return IV(lo, hi)


def _b_minmax(name):
    def impl(args, diff):
        if len(args) == 1 and isinstance(args[0], tuple):
            return _minmax(name, list(args[0]))
        return _map(lambda *xs: _minmax(name, xs), *args)
    return impl


def _b_cdiv(args, diff):
    return _map(lambda a, b: binop("-", lift(0), binop("//", binop("-", lift(0), a, diff), b,
                                                        diff), diff), *args)


def _b_is_pow2(a):
    hi = np.maximum(a.hi, 1)
    top = np.left_shift(1, np.floor(np.log2(hi.astype(np.float64))).astype(np.int64))
    top = np.where(top > hi, top // 2, top)
    t = (a.hi >= 1) & (top >= np.maximum(a.lo, 1))
    ex = (a.lo == a.hi) & (a.lo >= 1) & ((a.lo & (a.lo - 1)) == 0)
    return BV(t, ~ex)


def _b_reduce(name):
    def impl(args, diff):
        f = {"all": _and, "any": _or}.get(name) or (
            lambda a, b: binop("+" if name == "sum" else "*", a, b, diff))
        return fold(args[0], f)
    return impl


def _b_bit_length(ilog2: bool):
    def bl(a):
        if np.any(a.lo < 0):
            raise Unknown("ilog2" if ilog2 else "bit_length")
        f = np.vectorize(lambda v: int(v).bit_length(), otypes=[np.int64])
        lo, hi = f(a.lo), f(a.hi)
        return IV(lo - 1, hi - 1) if ilog2 else IV(lo, hi)
    return bl


def _b_popcount(a):
    if np.any(a.lo < 0):
        raise Unknown("popcount")
    f = np.vectorize(lambda v: bin(int(v)).count("1"), otypes=[np.int64])
    ex = a.lo == a.hi
    bits = np.vectorize(lambda v: int(v).bit_length(), otypes=[np.int64])(a.hi)
    return IV(np.where(ex, f(a.lo), 0), np.where(ex, f(a.lo), bits))


def _unknown(name):
    def impl(args, diff):
        raise Unknown(name)
    return impl


# One entry per built-in of lang/builtins.BUILTINS (tests/test_architecture.py checks that
# none is missing): f(args, diff) on intervals; float built-ins are not modelled (Unknown
# makes the box PARTIAL, which is always sound).
BUILTIN_IMPLS = {
    "abs": _elementwise(_b_abs),
    "min": _b_minmax("min"),
    "max": _b_minmax("max"),
    "clamp": lambda args, diff: _map(
        lambda x, lo, hi: _minmax("min", [_minmax("max", [x, lo]), hi]), *args),
    "cdiv": _b_cdiv,
    "popcount": _elementwise(_b_popcount),
    "bit_length": _elementwise(_b_bit_length(False)),
    "ilog2": _elementwise(_b_bit_length(True)),
    "is_pow2": _elementwise(_b_is_pow2),
    "all": _b_reduce("all"),
    "any": _b_reduce("any"),
    "sum": _b_reduce("sum"),
    "prod": _b_reduce("prod"),
    "float": _unknown("float"),
    "floor": _unknown("floor"),
    "sqrt": _unknown("sqrt"),
    "exp": _unknown("exp"),
    "log": _unknown("log"),
    "tanh": _unknown("tanh"),
}


def _minmax(name, items):
    out = items[0]
    for y in items[1:]:
        f = np.minimum if name == "min" else np.maximum
        out = type(out)(f(out.lo, y.lo), f(out.hi, y.hi))
    return out


def classify(bv: BV) -> np.ndarray:
    """EMPTY / PARTIAL / FULL per box."""
    t, f = np.broadcast_arrays(bv.t, bv.f)
    return np.where(~t, EMPTY, np.where(~f, FULL, PARTIAL)).astype(np.int8)
